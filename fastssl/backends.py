"""Backend names, what is available on this machine, and how `backend="auto"` chooses.

`auto` never picks `reference` (it materialises N x N matrices) and never picks a slow path
silently: CUDA tensors go to `triton`, CPU tensors to the chunked `torch` backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

#: Every name a `backend=` argument accepts ("cuda" arrives with the csrc/ extension).
BACKENDS = ("auto", "triton", "torch", "reference")


def triton_interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``), used by the CPU tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def available_backends() -> list[str]:
    """The backends that can run here, best first (``auto`` is always accepted as well)."""
    names = []
    if _triton_importable() and (torch.cuda.is_available() or triton_interpreting()):
        names.append("triton")
    names += ["torch", "reference"]
    return names


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Turn a user's `backend=` into a concrete backend for tensors like `x`, or raise ValueError."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.device.type == "cuda" and _triton_importable() else "torch"
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
