"""The pairwise-LSE op: custom-op registration, backend dispatch and autograd (docs/design.md, family 1).

Forward: for rows x (M, D), columns y (Ny, D) and optional bank columns (K, D), with logits
s_ij = scale·x_i·y_j and positive column p(i) = (i + pos_offset) mod Ny, return per row

    lse_i = LSE over {s_i,p(i)} (include_pos) ∪ {s_ij : j ≠ p(i), j ≠ i if exclude_self} (y_negatives)
                     ∪ {scale·x_i·bank_k : all k}
    pos_i = s_i,p(i)

and keep only those O(M) numbers for the backward, which recomputes the logits tile by tile.
One matrix (x is y: SimCLR, DCL), two matrices (CLIP), a bank (MoCo) and a self-masked
similarity sum (uniformity) are all flag settings of this one op.

`fastssl::pairwise_lse_fwd` and `fastssl::pairwise_lse_bwd` are `torch.library` custom ops with
fake (meta) implementations, composed by the public autograd Function `PairwiseLSE`, so that
`torch.compile(fullgraph=True)` traces through without graph breaks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl.ops._dispatch import kernel_module

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.pairwise_lse",
    "triton": "fastssl.kernels.triton.pairwise_lse",
    "cuda": "fastssl.kernels.cuda.pairwise_lse",
}


def _kernels(backend: str):
    return kernel_module("pairwise_lse", _KERNEL_MODULES, backend)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastssl::pairwise_lse_fwd", mutates_args=())
def pairwise_lse_fwd(
    x: Tensor,
    y: Optional[Tensor],
    bank: Optional[Tensor],
    scale: Tensor,
    pos_offset: int,
    exclude_self: bool,
    include_pos: bool,
    y_negatives: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(lse, pos), each (M,) in fp32 (fp64 for fp64 inputs); y=None means y is x."""
    return _kernels(backend).pairwise_lse_forward(x, x if y is None else y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives)


@pairwise_lse_fwd.register_fake
def _(x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives, backend):
    m = x.shape[0]
    return x.new_empty(m, dtype=_stat_dtype(x)), x.new_empty(m, dtype=_stat_dtype(x))


@torch.library.custom_op("fastssl::pairwise_lse_bwd", mutates_args=())
def pairwise_lse_bwd(
    x: Tensor,
    y: Optional[Tensor],
    bank: Optional[Tensor],
    scale: Tensor,
    lse: Tensor,
    grad_lse: Tensor,
    grad_pos: Tensor,
    pos_offset: int,
    exclude_self: bool,
    include_pos: bool,
    y_negatives: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dx, dy) in the input dtype: the gradients of Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i
    through the row and the column operand. y=None: both are x and the caller adds them; a kernel
    may then split the sum otherwise (the torch kernel returns half of it in each, from one GEMM),
    keeping Σ x·dx = Σ_ij G_ij x_i·x_j·scale, which d scale is computed from."""
    return _kernels(backend).pairwise_lse_backward(
        x, x if y is None else y, bank, scale, lse, grad_lse, grad_pos, pos_offset, exclude_self, include_pos, y_negatives
    )


@pairwise_lse_bwd.register_fake
def _(x, y, bank, scale, lse, grad_lse, grad_pos, pos_offset, exclude_self, include_pos, y_negatives, backend):
    dy_like = x if y is None else y
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        dy_like, memory_format=torch.contiguous_format
    )


class PairwiseLSE(torch.autograd.Function):
    """Autograd over the pairwise-LSE custom ops; `apply(x, y, bank, scale, pos_offset, exclude_self,
    include_pos, y_negatives, backend) -> (lse, pos)`.

    y=None means the columns are the rows themselves (SimCLR, DCL): one tensor, whose gradient is
    the sum of both roles (Dynamo cannot trace one tensor passed twice to a Function). Gradients
    flow to x, y and scale (a 0-dim tensor, e.g. 1/τ with τ learnable); the bank never gets one. d scale = Σ_ij G_ij x_i·y_j = Σ_i x_i·dx_i / scale, so it costs O(M·D) on top of dx.
    """

    @staticmethod
    def forward(ctx, x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives, backend):
        lse, pos = torch.ops.fastssl.pairwise_lse_fwd(
            x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives, backend
        )
        ctx.save_for_backward(x, y, bank, scale, lse)
        ctx.options = (pos_offset, exclude_self, include_pos, y_negatives, backend)
        return lse, pos

    @staticmethod
    def backward(ctx, grad_lse, grad_pos):
        x, y, bank, scale, lse = ctx.saved_tensors
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_pos = torch.zeros_like(lse) if grad_pos is None else grad_pos
        dx, dy = torch.ops.fastssl.pairwise_lse_bwd(
            x, y, bank, scale, lse, grad_lse.contiguous(), grad_pos.contiguous(), *ctx.options
        )
        d_scale = None
        if ctx.needs_input_grad[3]:
            acc = _stat_dtype(x)
            d_scale = ((x.to(acc) * dx.to(acc)).sum() / scale.to(acc)).to(scale.dtype)
        if y is None:
            return dx + dy, None, None, d_scale, None, None, None, None, None
        return dx, dy, None, d_scale, None, None, None, None, None


def pairwise_lse(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    *,
    pos_offset: int = 0,
    exclude_self: bool = False,
    include_pos: bool = True,
    y_negatives: bool = True,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Differentiable (lse, pos) of the module docstring; `backend` is "torch" or "triton".

    Shapes: x (M, D), y (Ny, D), bank (K, D) or None, scale 0-dim; returns (M,), (M,).
    Callers (fastssl.functional) validate user input; this checks only what the kernels rely on.
    """
    if not (y_negatives or include_pos or (bank is not None and bank.shape[0] > 0)):
        raise ValueError("pairwise_lse: every row needs at least one column (y_negatives, include_pos or a bank)")
    if bank is not None:
        bank = bank.detach()
    scale = scale.to(device=x.device, dtype=_stat_dtype(x))
    return PairwiseLSE.apply(x, None if y is x else y, bank, scale, int(pos_offset), exclude_self, include_pos, y_negatives, backend)
