"""ArCL's worst pair on the hand-written CUDA kernel of csrc/worst_pair.cu (docs/design.md, family 3).

Same contract as fastssl/kernels/torch/worst_pair.py and the Triton kernel: for normalised views
v (N, m, D), s_i = min_{j<k} v_ij·v_ik and the first minimising (j, k) in lexicographic order.
`fastssl._C` checks the shape (2 ≤ m ≤ 64), reads v through its strides and launches on the
current stream; this adapter only checks what the extension cannot name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl.kernels.cuda._ext import extension


def worst_pair_forward(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(s, j, k) for v (N, m, D), fp32/bf16/fp16 CUDA: s (N,) fp32, j < k (N,) int64."""
    if v.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"backend='cuda' takes float32, bfloat16 or float16 views, got {v.dtype}")
    return extension().worst_pair_forward(v)
