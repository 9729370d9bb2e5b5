"""The machine's practical peak, measured in the same run: one square torch.matmul.

"% of peak" in the tables is a rate divided by this one (flops.py says which FLOPs are counted).
"""

from __future__ import annotations

from typing import Optional

import torch

from formatting import SHORT_DTYPE
from providers import time_step

#: (dtype, size) of the peak matmul: bf16 8192³ on CUDA (the GPU targets'); on the CPU fp32 1024³ — a
#: bf16 8192³ product would take minutes on 2 cores and CPUs without AMX run bf16 GEMMs slower than fp32.
PEAK_MATMUL = {"cuda": ("bfloat16", 8192), "cpu": ("float32", 1024)}


def matmul_peak(device: str, reps: Optional[int] = None) -> dict:
    """TFLOP/s of torch.matmul on two random square matrices (PEAK_MATMUL), median of `reps` after warm-up."""
    dtype_name, size = PEAK_MATMUL[device]
    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        torch.matmul(a, b)
        sync()

    reps = reps or (20 if device == "cuda" else 5)
    seconds = time_step(step, reps, warmup=3)
    return {
        "tflops": 2 * size**3 / seconds / 1e12,
        "description": f"{SHORT_DTYPE[dtype_name]} torch.matmul {size}x{size}x{size} on {device}, median of {reps}",
        "seconds": seconds,
    }

