"""The pairwise-LSE op: custom-op registration, backend dispatch and autograd (docs/design.md, family 1).

Forward: for rows x (M, D), columns y (Ny, D) and optional bank columns (K, D), with logits
s_ij = scale·x_i·y_j and positive column p(i) = (i + pos_offset) mod Ny, return per row

    lse_i = LSE over {s_i,p(i)} (include_pos) ∪ {s_ij : j ≠ p(i), j ≠ i if exclude_self} (y_negatives)
                     ∪ {scale·x_i·bank_k : all k}
    pos_i = s_i,p(i)

and keep only those O(M) numbers for the backward, which recomputes the logits tile by tile.
One matrix (x is y: SimCLR, DCL), two matrices (CLIP), a bank (MoCo) and a self-masked
similarity sum (uniformity) are all settings of one :class:`~fastssl.kernels.PairwiseLSEFlags`.

`fastssl::pairwise_lse_fwd` and `fastssl::pairwise_lse_bwd` are `torch.library` custom ops with
fake (meta) implementations, composed by the public autograd Function `PairwiseLSE`, so that
`torch.compile(fullgraph=True)` traces through without graph breaks. The flags cross the custom-op
boundary as a list of ints (the schema has no tuple type).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl._common import compute_dtype
from fastssl.kernels import PairwiseLSEFlags
from fastssl.ops._dispatch import kernel_module

__all__ = ["PairwiseLSE", "PairwiseLSEFlags", "pairwise_lse", "pairwise_lse_fwd", "pairwise_lse_bwd"]

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.pairwise_lse",
    "triton": "fastssl.kernels.triton.pairwise_lse",
    "cuda": "fastssl.kernels.cuda.pairwise_lse",
}


def _kernels(backend: str):
    return kernel_module("pairwise_lse", _KERNEL_MODULES, backend)


@torch.library.custom_op("fastssl::pairwise_lse_fwd", mutates_args=())
def pairwise_lse_fwd(
    x: Tensor, y: Optional[Tensor], bank: Optional[Tensor], scale: Tensor, flags: list[int], backend: str
) -> tuple[Tensor, Tensor]:
    """(lse, pos), each (M,) in fp32 (fp64 for fp64 inputs); y=None means y is x."""
    return _kernels(backend).pairwise_lse_forward(x, x if y is None else y, bank, scale, PairwiseLSEFlags.from_list(flags))


@pairwise_lse_fwd.register_fake
def _(x, y, bank, scale, flags, backend):
    m = x.shape[0]
    return x.new_empty(m, dtype=compute_dtype(x)), x.new_empty(m, dtype=compute_dtype(x))


@torch.library.custom_op("fastssl::pairwise_lse_bwd", mutates_args=())
def pairwise_lse_bwd(
    x: Tensor,
    y: Optional[Tensor],
    bank: Optional[Tensor],
    scale: Tensor,
    lse: Tensor,
    grad_lse: Tensor,
    grad_pos: Tensor,
    flags: list[int],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dx, dy) in the input dtype: the gradients of Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i
    through the row and the column operand; one the flags do not ask for is empty, (0, D).
    y=None: both are x and the caller adds them; a kernel may then split the sum otherwise (the
    torch kernel returns half of it in each, from one GEMM), keeping Σ x·dx = Σ_ij G_ij x_i·x_j·scale,
    which d scale is computed from."""
    y = x if y is None else y
    return _kernels(backend).pairwise_lse_backward(x, y, bank, scale, lse, grad_lse, grad_pos, PairwiseLSEFlags.from_list(flags))


def _grad_like(t: Tensor, needed: bool) -> Tensor:
    shape = t.shape if needed else (0, *t.shape[1:])
    return t.new_empty(shape)


@pairwise_lse_bwd.register_fake
def _(x, y, bank, scale, lse, grad_lse, grad_pos, flags, backend):
    flags = PairwiseLSEFlags.from_list(flags)
    return _grad_like(x, flags.needs_dx), _grad_like(x if y is None else y, flags.needs_dy)


class PairwiseLSE(torch.autograd.Function):
    """Autograd over the pairwise-LSE custom ops: `apply(x, y, bank, scale, flags, backend) -> (lse, pos)`
    with `flags` a :class:`~fastssl.kernels.PairwiseLSEFlags` (its needs_dx / needs_dy are set here,
    from what autograd asks for).

    y=None means the columns are the rows themselves (SimCLR, DCL): one tensor, whose gradient is
    the sum of both roles (Dynamo cannot trace one tensor passed twice to a Function). Gradients
    flow to x, y and scale (a 0-dim tensor, e.g. 1/τ with τ learnable); the bank never gets one.
    d scale = Σ_ij G_ij x_i·y_j = Σ_i x_i·dx_i / scale, so it costs O(M·D) on top of dx.

    Precision of ``include_pos=True``: lse_i then holds the positive, and a caller that forms
    lse_i − pos_i (an InfoNCE row) subtracts two numbers near 1/τ that each carry an fp32 ulp of
    1/τ, keeping only a few digits of a small loss — and the backward's weight of the positive,
    1 − exp(pos − lse), likewise. The stable form, which every loss here uses: ``include_pos=False``
    and softplus(lse_i − pos_i), exact in value and gradient (fastssl/functional.py, `_info_nce`).
    """

    @staticmethod
    def forward(ctx, x, y, bank, scale, flags, backend):
        flags = PairwiseLSEFlags(*flags)
        lse, pos = torch.ops.fastssl.pairwise_lse_fwd(x, y, bank, scale, flags.to_list(), backend)
        ctx.save_for_backward(x, y, bank, scale, lse)
        ctx.flags, ctx.backend = flags, backend
        return lse, pos

    @staticmethod
    def backward(ctx, grad_lse, grad_pos):
        x, y, bank, scale, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # d scale is read off dx, so dx is needed for either; y=None: dx and dy are both x's.
        needs_dx = needs[0] or needs[3]
        flags = ctx.flags._replace(needs_dx=needs_dx, needs_dy=needs_dx if y is None else needs[1])
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_pos = torch.zeros_like(lse) if grad_pos is None else grad_pos
        dx, dy = torch.ops.fastssl.pairwise_lse_bwd(
            x, y, bank, scale, lse, grad_lse.contiguous(), grad_pos.contiguous(), flags.to_list(), ctx.backend
        )
        d_scale = None
        if needs[3]:
            acc = compute_dtype(x)
            d_scale = ((x.to(acc) * dx.to(acc)).sum() / scale.to(acc)).to(scale.dtype)
        if y is None:
            return (dx + dy if needs[0] else None), None, None, d_scale, None, None
        return (dx if needs[0] else None), (dy if needs[1] else None), None, d_scale, None, None


def pairwise_lse(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    flags: PairwiseLSEFlags = PairwiseLSEFlags(),
    *,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Differentiable (lse, pos) of the module docstring on a concrete `backend` ("torch", "triton", "cuda").

    Shapes: x (M, D), y (Ny, D), bank (K, D) or None, scale 0-dim; returns (M,), (M,). `flags`
    chooses the columns (the default: every y column once, the positive included, no bank).
    Callers (fastssl.functional) validate user input; this checks only what the kernels rely on.
    """
    if not (flags.y_negatives or flags.include_pos or (bank is not None and bank.shape[0] > 0)):
        raise ValueError("pairwise_lse: every row needs at least one column (y_negatives, include_pos or a bank)")
    if bank is not None:
        bank = bank.detach()
    scale = scale.to(device=x.device, dtype=compute_dtype(x))
    flags = PairwiseLSEFlags(*flags)._replace(pos_offset=int(flags.pos_offset) % y.shape[0])
    return PairwiseLSE.apply(x, None if y is x else y, bank, scale, flags, backend)
