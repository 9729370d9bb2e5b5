"""The pairwise-max op (nearest neighbour by inner product): custom op, dispatch and autograd.

A sibling of the pairwise-LSE family (docs/design.md, family 1) with a max in place of the
log-sum-exp, for KoLeo's nearest neighbours (Sablayrolles et al. 2019). For rows x (M, D) and
columns y (Ny, D), s_ij = x_i·y_j:

    value_i = max_{j (≠ i if exclude_self)} s_ij,   index_i = the first j attaining it (torch.argmax's rule)

`fastssl::pairwise_max_fwd` returns (value, index) and keeps nothing else: no M x Ny matrix is
stored, on any backend. The selection is piecewise constant, so the gradient of value_i flows
through the selected pair only, as ArCL's worst pair does (fastssl/ops/worst_pair.py):

    ∂value_i/∂x_i = y_index_i,   ∂value_i/∂y_index_i = x_i,   every other row gets zero

written with one row gather and one index_add (O(M·D), plain torch ops that torch.compile traces).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl.ops._dispatch import kernel_module
from fastssl.ops.reductions import compute_dtype

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.pairwise_max",
    "triton": "fastssl.kernels.triton.pairwise_max",
    "cuda": "fastssl.kernels.cuda.pairwise_max",
}


def _kernels(backend: str):
    return kernel_module("pairwise_max", _KERNEL_MODULES, backend)


@torch.library.custom_op("fastssl::pairwise_max_fwd", mutates_args=())
def pairwise_max_fwd(x: Tensor, y: Optional[Tensor], exclude_self: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(value, index): (M,) in compute_dtype(x) and (M,) int64; y=None means y is x."""
    return _kernels(backend).pairwise_max_forward(x, x if y is None else y, exclude_self)


@pairwise_max_fwd.register_fake
def _(x, y, exclude_self, backend):
    m = x.shape[0]
    return x.new_empty(m, dtype=compute_dtype(x)), torch.empty(m, dtype=torch.long, device=x.device)


class PairwiseMax(torch.autograd.Function):
    """`apply(x, y, exclude_self, backend) -> (value, index)`; value is differentiable through the
    selected pair, index is not. y=None: the columns are the rows themselves, and x gets both roles."""

    @staticmethod
    def forward(ctx, x, y, exclude_self, backend):
        value, index = torch.ops.fastssl.pairwise_max_fwd(x, y, exclude_self, backend)
        ctx.save_for_backward(x, y, index)
        ctx.mark_non_differentiable(index)
        return value, index

    @staticmethod
    def backward(ctx, grad_value, _grad_index):
        x, y, index = ctx.saved_tensors
        acc = compute_dtype(x)
        columns = x if y is None else y
        grad = grad_value.to(acc)[:, None]
        dx = grad * columns[index].to(acc)
        # Several rows may share a neighbour: their contributions add up.
        dy = torch.zeros(columns.shape, dtype=acc, device=x.device).index_add_(0, index, grad * x.to(acc))
        if y is None:
            return (dx + dy).to(x.dtype), None, None, None
        return dx.to(x.dtype), dy.to(y.dtype), None, None


def pairwise_max(x: Tensor, y: Tensor, *, exclude_self: bool = False, backend: str) -> tuple[Tensor, Tensor]:
    """Differentiable (value, index) of the module docstring; `backend` is "torch", "triton" or "cuda".

    Shapes: x (M, D), y (Ny, D) (y may be x); returns (M,) in compute_dtype(x) and (M,) int64.
    Callers validate user input; this checks only what the kernels rely on.
    """
    if y is not x and (y.dim() != 2 or y.shape[1] != x.shape[1] or y.dtype != x.dtype or y.device != x.device):
        raise ValueError(f"pairwise_max: x {tuple(x.shape)} {x.dtype} and y {tuple(y.shape)} {y.dtype} must match in D, dtype, device")
    return PairwiseMax.apply(x, None if y is x else y, bool(exclude_self), backend)
