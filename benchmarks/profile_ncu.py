"""One NT-Xent forward+backward for a profiler (Nsight Compute / Nsight Systems), inside NVTX ranges.

    python benchmarks/profile_ncu.py [--provider fastssl] [--batch 32768] [--dim 256] [--dtype bf16]
                                     [--warmup 2] [--iters 1] [--device cuda|cpu]

The defaults are the GPU targets' headline case: 2N = 32,768, D = 256, bf16. The warm-up calls
(Triton autotuning, torch.compile, lazy initialisation) run outside the profiled region; the
measured calls run between ``torch.cuda.profiler.start()`` / ``stop()`` (cudaProfilerStart/Stop),
the forward inside the NVTX push/pop range ``nt_xent-forward-<provider>`` and the backward inside
``nt_xent-backward-<provider>`` (flat ranges, no "/" in the names: ncu uses "/" to nest). So:

    ncu --profile-from-start off --set full -o nt_xent_fastssl python benchmarks/profile_ncu.py
    ncu --profile-from-start off --nvtx --nvtx-include "nt_xent-backward-fastssl/" --set full \
        -o nt_xent_fastssl_bwd python benchmarks/profile_ncu.py
    ncu --profile-from-start off --set full -o nt_xent_reference python benchmarks/profile_ncu.py --provider reference
    nsys profile --capture-range=cudaProfilerApi --trace=cuda,nvtx -o nt_xent_fastssl python benchmarks/profile_ncu.py
    ncu --import nt_xent_fastssl.ncu-rep --print-summary per-kernel

``--device cpu`` runs the same code without CUDA (no NVTX, no profiler calls) as a self-test.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works both as a script and with -m

import torch  # noqa: E402

import env  # noqa: E402
import flops  # noqa: E402
import providers  # noqa: E402
import specs  # noqa: E402

PROVIDERS = {"fastssl": "fastssl-auto", "fastssl-triton": "fastssl-triton", "fastssl-cuda": "fastssl-cuda",
             "fastssl-torch": "fastssl-torch", "reference": "reference", "reference-compiled": "reference-compiled",
             "materialising-bf16": "materialising-bf16",
             "materialising-bf16-compiled": "materialising-bf16-compiled"}
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


@contextlib.contextmanager
def nvtx(name: str, enabled: bool) -> Iterator[None]:
    """An NVTX push/pop range when profiling CUDA; nothing on the CPU (torch's NVTX needs a CUDA build)."""
    if enabled:
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if enabled:
            torch.cuda.nvtx.range_pop()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="fastssl", choices=sorted(PROVIDERS))
    parser.add_argument("--batch", type=int, default=32768, help="2N, rows of Z (default 32768)")
    parser.add_argument("--dim", type=int, default=256, help="D (default 256)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled calls first (default 2)")
    parser.add_argument("--iters", type=int, default=1, help="profiled calls (default 1)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (use --device cpu for a self-test)")
    if args.batch < 4 or args.batch % 2:
        parser.error(f"--batch is 2N: an even number >= 4, got {args.batch}")
    cuda = device == "cuda"
    env.configure_threads(device)

    provider = PROVIDERS[args.provider]
    why = providers.provider_unavailable(provider, device, "nt_xent", args.dim, DTYPES[args.dtype])
    if why:
        parser.error(f"--provider {args.provider}: {why}")
    case = specs.Case("nt_xent", provider, "fwd+bwd", args.batch, args.dim, DTYPES[args.dtype], device)
    fn = providers.loss_function(case.loss, case.provider)
    z1, z2 = providers.make_inputs(case)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def call() -> None:
        with nvtx(f"nt_xent-forward-{args.provider}", cuda):
            loss = fn(z1, z2)
        with nvtx(f"nt_xent-backward-{args.provider}", cuda):
            torch.autograd.grad(loss, (z1, z2))
        sync()

    for _ in range(args.warmup):
        call()
    if cuda:
        torch.cuda.profiler.start()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    if cuda:
        torch.cuda.profiler.stop()
    model = flops.model_flops(case)
    best = min(times)
    print(f"{case.label} ({provider}, {env.device_name(device)}): {best * 1e3:.2f} ms, "
          f"{model / best / 1e12:.3g} model TFLOP/s (fastest of {args.iters} profiled call(s); a profiler slows them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
