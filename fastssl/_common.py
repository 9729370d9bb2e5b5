"""Small helpers every layer uses, in one leaf module (it imports nothing from fastssl).

- :func:`compute_dtype`: the precision statistics, accumulators and per-row results are kept in.
- :func:`triton_interpreting`: whether Triton runs its CPU interpreter (the CPU tests).
- :func:`device_ctx`: make a tensor's GPU the current device around a kernel launch.
- :data:`ROUTES` / :data:`OP_ROUTES`: the Frobenius family's public and op-level route names.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

#: The public `route=` of the Frobenius-family losses: "covariance" walks the D x D side, "gram" the
#: N x N side, "auto" the smaller one (docs/design.md, family 2).
ROUTES = ("auto", "covariance", "gram")

#: The op's routes for ‖aᵀb‖²_F with a, b (R, K): "inner" walks the K x K product, "outer" the R x R Grams.
OP_ROUTES = ("inner", "outer")


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32: half-precision inputs are accumulated and reduced in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def triton_interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``, set by the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_ctx(x: Tensor):
    """A context that makes x's GPU current (Triton launches on the current device), else a no-op."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
