"""Backend names, what is available on this machine, and how `backend="auto"` chooses.

`auto` never picks `reference` (it materialises N x N matrices) and never picks a slow path
silently: CPU tensors go to the chunked `torch` backend; CUDA tensors go to `triton` or to `cuda`
(the csrc/ extension, when it loads) as :func:`auto_gpu_backend`'s table says. :func:`resolve`
is the prologue every loss shares: the concrete backend and the active `gather_distributed` mode.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional, Union

import torch

from fastssl import distributed
from fastssl._common import triton_interpreting

#: Every name a `backend=` argument accepts.
BACKENDS = ("auto", "triton", "cuda", "torch", "reference")

#: Where `auto` sends CUDA tensors, per op: a list of (rule, backend), first match wins; a rule is
#: a predicate on (dtype, shape of the first operand). To be filled from benchmarks/RESULTS.md once
#: the cuda and triton backends have been timed on the same GPU (scripts/gpu_check.sh); until such
#: measurements exist every op keeps `triton`, and no speed is claimed for `cuda`.
AUTO_GPU_TABLE: dict[str, list] = {
    "pairwise_lse": [],
    "sq_frobenius": [],
}


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`."""
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreting()


def cuda_extension_usable() -> bool:
    """Whether the csrc/ extension (`fastssl._C`) loads here; on first call with a GPU and no
    prebuilt extension this builds it just in time (fastssl.kernels.cuda._ext)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from fastssl.kernels.cuda import _ext

    return _ext.available()


def cuda_unavailable_reason() -> str:
    """Why backend='cuda' cannot run here ("" when it can)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    from fastssl.kernels.cuda import _ext

    return _ext.unavailable_reason()


def available_backends() -> list[str]:
    """The backends that can run here, best first (``auto`` is always accepted as well)."""
    names = []
    if _triton_importable() and (torch.cuda.is_available() or triton_interpreting()):
        names.append("triton")
    if cuda_extension_usable():
        names.append("cuda")
    names += ["torch", "reference"]
    return names


def auto_gpu_backend(op: str, x: torch.Tensor) -> str:
    """The backend `auto` uses for `op` on CUDA tensors like `x`: the first rule of AUTO_GPU_TABLE[op]
    that matches (and whose backend can run), else "triton"."""
    for rule, backend in AUTO_GPU_TABLE.get(op, []):
        if rule(x.dtype, tuple(x.shape)) and (backend != "cuda" or cuda_extension_usable()):
            return backend
    return "triton"


def resolve_backend(backend: str, x: torch.Tensor, op: str = "pairwise_lse") -> str:
    """Turn a user's `backend=` into a concrete backend for tensors like `x`, or raise ValueError.

    `op` (an AUTO_GPU_TABLE key, e.g. "pairwise_lse") only matters to `auto` on CUDA tensors: an op
    without rules there gets triton.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if x.device.type == "cuda" and _triton_importable():
            return auto_gpu_backend(op, x)
        return "torch"
    if backend == "cuda":
        if x.device.type != "cuda":
            raise ValueError(f"backend='cuda' cannot run here: tensors are on {x.device}; it needs CUDA tensors")
        if not cuda_extension_usable():
            raise ValueError(f"backend='cuda' cannot run here: {cuda_unavailable_reason()}")
        if x.dtype == torch.float64:
            raise TypeError(
                "backend='cuda' takes float32, bfloat16 or float16 inputs, got float64; "
                "use backend='torch' or 'reference' for float64 (e.g. for gradcheck)"
            )
    if backend == "triton":
        if not triton_usable(x.device):
            why = (
                "triton is not installed"
                if not _triton_importable()
                else f"tensors are on {x.device}; Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)"
            )
            raise ValueError(f"backend='triton' cannot run here: {why}")
        if x.dtype == torch.float64:
            raise TypeError(
                "backend='triton' takes float32, bfloat16 or float16 inputs, got float64; "
                "use backend='torch' or 'reference' for float64 (e.g. for gradcheck)"
            )
    return backend


def resolve(
    backend: str, like: torch.Tensor, gather_distributed: object, *, ring: bool = True, op: str = "pairwise_lse"
) -> tuple[str, Optional[Union[bool, str]]]:
    """The prologue every loss shares once its own arguments are checked: (the concrete backend,
    the active gather mode or None). None means single-process math: gather off, torch.distributed
    not initialised, or one rank (lightly's fallback). `ring`: whether the loss accepts "ring";
    `op`: the kernel family `auto` chooses a backend for. The caller then returns the spec
    (fastssl.reference) when the backend is "reference", which never gathers across ranks.
    """
    backend = resolve_backend(backend, like, op=op)
    mode = distributed.check_gather(gather_distributed, ring=ring)
    if not distributed.is_active(mode):
        return backend, None
    if backend == "reference":
        raise ValueError(
            "backend='reference' is the single-process spec and does not gather across ranks; "
            "use backend='auto', 'torch' or 'triton' with gather_distributed"
        )
    return backend, mode
