"""ArCL's worst-pair selection op: custom-op registration, dispatch and autograd (docs/design.md, family 3).

For normalised views v (N, m, D), per sample i:

    s_i = min_{j<k} v_ij·v_ik,   (j_i, k_i) = argmin, the first pair in (j, k) lexicographic order

`fastssl::worst_pair_fwd` returns (s, j, k) and keeps nothing else; the argmin is the only state
the backward needs. The selection is piecewise constant, so the gradient flows through the selected
pair only:

    ∂s_i/∂v_ij = v_ik,   ∂s_i/∂v_ik = v_ij,   every other view of sample i gets zero

which the backward writes with two row gathers (O(N·D) work, plain torch ops that torch.compile
traces). Ties follow torch.argmin: the first pair wins, on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl.ops._dispatch import kernel_module
from fastssl._common import compute_dtype

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.worst_pair",
    "triton": "fastssl.kernels.triton.worst_pair",
    "cuda": "fastssl.kernels.cuda.worst_pair",
}


def _kernels(backend: str):
    return kernel_module("worst_pair", _KERNEL_MODULES, backend)


@torch.library.custom_op("fastssl::worst_pair_fwd", mutates_args=())
def worst_pair_fwd(v: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(s, j, k): s (N,) in compute_dtype(v), j < k (N,) int64, for v (N, m, D)."""
    return _kernels(backend).worst_pair_forward(v)


@worst_pair_fwd.register_fake
def _(v, backend):
    n = v.shape[0]
    long = dict(dtype=torch.long, device=v.device)
    return v.new_empty(n, dtype=compute_dtype(v)), torch.empty(n, **long), torch.empty(n, **long)


class WorstPair(torch.autograd.Function):
    """`apply(v, backend) -> s`: the worst-pair similarity (N,), differentiable through the selected pair."""

    @staticmethod
    def forward(ctx, v, backend):
        sims, first, second = torch.ops.fastssl.worst_pair_fwd(v, backend)
        ctx.save_for_backward(v, first, second)
        return sims

    @staticmethod
    def backward(ctx, grad):
        v, first, second = ctx.saved_tensors
        acc = compute_dtype(v)
        samples = torch.arange(v.shape[0], device=v.device)
        grad = grad.to(acc)[:, None]
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        # j < k, so the two writes never land on the same row.
        dv[samples, first] = grad * v[samples, second].to(acc)
        dv[samples, second] = grad * v[samples, first].to(acc)
        return dv.to(v.dtype), None


def worst_pair(v: Tensor, *, backend: str) -> Tensor:
    """Differentiable s_i = min_{j<k} v_ij·v_ik for v (N, m, D), m ≥ 2; returns (N,) in compute_dtype(v).

    Callers (fastssl.functional.arcl_loss) validate user input and normalise the rows.
    """
    return WorstPair.apply(v, backend)
