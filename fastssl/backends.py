"""Backend names, what is available on this machine, and how `backend="auto"` chooses.

`auto` never picks `reference` (it materialises N x N matrices) and never picks a slow path
silently: CPU tensors go to the chunked `torch` backend; CUDA tensors go to `triton` or to `cuda`
(the csrc/ extension, when it loads) as :func:`auto_gpu_backend`'s table says. That table is
measured, not written by hand: fastssl/auto_gpu_table.json, written by benchmarks/auto_table.py from
a GPU run of benchmarks/cuda_variants.py, and read here once. :func:`resolve` is the prologue every
loss shares: the concrete backend and the active `gather_distributed` mode.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional, Union

import torch

from fastssl import distributed
from fastssl._common import triton_interpreting
from fastssl.auto_gpu_table import AUTO_GPU_TABLE_FILE, AutoRule, load_auto_gpu_table

#: Every name a `backend=` argument accepts.
BACKENDS = ("auto", "triton", "cuda", "torch", "reference")

@functools.lru_cache(maxsize=None)
def auto_gpu_table() -> dict[str, list[AutoRule]]:
    """Where `auto` sends CUDA tensors, per op: a list of AutoRule, first match wins, else triton.
    Read once from AUTO_GPU_TABLE_FILE. Until a GPU run has measured cuda faster than triton at a
    shape class, an op has no rules, and no speed is claimed for `cuda`."""
    return load_auto_gpu_table(AUTO_GPU_TABLE_FILE)


def __getattr__(name: str):
    # AUTO_GPU_TABLE (op -> rules) is read on first use, so `import fastssl` reads no file.
    if name == "AUTO_GPU_TABLE":
        return auto_gpu_table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def _device_capability(device: torch.device) -> tuple:
    """(major, minor) of the GPU holding `device`'s tensors, queried once per GPU."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


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
    """The backend `auto` uses for `op` on CUDA tensors like `x` (the op's first operand, (N, D)):
    the first rule of the measured table for `op` that matches x's dtype, shape and GPU (and whose
    backend can run: a cuda rule is passed over when the extension does not load), else "triton"."""
    rules = auto_gpu_table().get(op, ())
    if not rules:
        return "triton"
    capability = _device_capability(x.device)
    for rule in rules:
        if rule.matches(x.dtype, tuple(x.shape), capability) and (rule.backend != "cuda" or cuda_extension_usable()):
            return rule.backend
    return "triton"


def resolve_backend(backend: str, x: torch.Tensor, op: str = "pairwise_lse") -> str:
    """Turn a user's `backend=` into a concrete backend for tensors like `x`, or raise ValueError.

    `op` (the kernel family, e.g. "pairwise_lse") only matters to `auto` on CUDA tensors: an op
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
