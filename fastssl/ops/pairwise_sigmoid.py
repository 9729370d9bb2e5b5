"""The pairwise-sigmoid op (SigLIP, Zhai et al. 2023): custom-op registration, backend dispatch, autograd.

Forward: for rows x (M, D), columns y (Ny, D), logits ℓ_ij = scale·x_i·y_j + bias and, when
has_pos, one positive column per row p(i) = (i + pos_offset) mod Ny (label +1; every other pair −1):

    rows_i = Σ_j softplus(−label_ij·ℓ_ij) = −Σ_j log σ(label_ij·ℓ_ij)        (M,)

The O(M) row sums are all that is kept; the backward recomputes the logits tile by tile (a
sum of independent pair terms: no row statistic is needed to do so, unlike the pairwise LSE).
Single-process SigLIP is pos_offset = 0 with M = Ny; under gather_distributed, this rank's rows
against every rank's columns put the positive at the rank's row offset; a block of another rank
only (a ring step) has has_pos = False. Both are in fastssl/ops/pairwise_sigmoid_distributed.py.

`fastssl::pairwise_sigmoid_fwd` and `fastssl::pairwise_sigmoid_bwd` are `torch.library` custom ops
with fake (meta) implementations, composed by the public autograd Function `PairwiseSigmoid`, so
that `torch.compile(fullgraph=True)` traces through without graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl._common import compute_dtype
from fastssl.ops._dispatch import kernel_module

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.pairwise_sigmoid",
    "triton": "fastssl.kernels.triton.pairwise_sigmoid",
    "cuda": "fastssl.kernels.cuda.pairwise_sigmoid",
}


def _kernels(backend: str):
    return kernel_module("pairwise_sigmoid", _KERNEL_MODULES, backend)


@torch.library.custom_op("fastssl::pairwise_sigmoid_fwd", mutates_args=())
def pairwise_sigmoid_fwd(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, pos_offset: int, has_pos: bool,
                         backend: str) -> Tensor:
    """rows (M,) in fp32 (fp64 for fp64 inputs)."""
    return _kernels(backend).pairwise_sigmoid_forward(x, y, scale, bias, pos_offset, has_pos)


@pairwise_sigmoid_fwd.register_fake
def _(x, y, scale, bias, pos_offset, has_pos, backend):
    return x.new_empty(x.shape[0], dtype=compute_dtype(x))


@torch.library.custom_op("fastssl::pairwise_sigmoid_bwd", mutates_args=())
def pairwise_sigmoid_bwd(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad_rows: Tensor, pos_offset: int,
                         has_pos: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dlogit_rows, dscale_rows): the gradients of Σ_i grad_rows_i·rows_i through x and y
    (input dtype), and per row Σ_j G_ij and Σ_j G_ij·x_i·y_j (fp32/fp64), G_ij = ∂/∂ℓ_ij, whose
    sums over the rows are d bias and d scale."""
    return _kernels(backend).pairwise_sigmoid_backward(x, y, scale, bias, grad_rows, pos_offset, has_pos)


@pairwise_sigmoid_bwd.register_fake
def _(x, y, scale, bias, grad_rows, pos_offset, has_pos, backend):
    m = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(y, memory_format=torch.contiguous_format),
            x.new_empty(m, dtype=compute_dtype(x)), x.new_empty(m, dtype=compute_dtype(x)))  # fmt: skip


class PairwiseSigmoid(torch.autograd.Function):
    """Autograd over the pairwise-sigmoid custom ops; `apply(x, y, scale, bias, pos_offset, has_pos,
    backend) -> rows (M,)`. Gradients flow to x, y, scale and bias (0-dim tensors, e.g. SigLIP's
    learnable t = exp(t') and b)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, pos_offset, has_pos, backend):
        rows = torch.ops.fastssl.pairwise_sigmoid_fwd(x, y, scale, bias, pos_offset, has_pos, backend)
        ctx.save_for_backward(x, y, scale, bias)
        ctx.options = (pos_offset, has_pos, backend)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        x, y, scale, bias = ctx.saved_tensors
        dx, dy, dlogit, dscale = torch.ops.fastssl.pairwise_sigmoid_bwd(
            x, y, scale, bias, grad_rows.contiguous(), *ctx.options
        )
        d_scale = dscale.sum().to(scale.dtype) if ctx.needs_input_grad[2] else None
        d_bias = dlogit.sum().to(bias.dtype) if ctx.needs_input_grad[3] else None
        return dx, dy, d_scale, d_bias, None, None, None


def pairwise_sigmoid(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    *,
    pos_offset: int = 0,
    has_pos: bool = True,
    backend: str,
) -> Tensor:
    """Differentiable rows (M,) of the module docstring; `backend` is "torch", "triton" or "cuda".

    Shapes: x (M, D), y (Ny, D), scale and bias 0-dim (cast here to fp32, fp64 for fp64 inputs).
    Callers (fastssl.functional) validate user input; this checks only what the kernels rely on.
    """
    if y is x:
        raise ValueError("pairwise_sigmoid: pass x and y as two tensors (clone one if they are the same)")
    dtype = compute_dtype(x)
    scale = scale.reshape(()).to(device=x.device, dtype=dtype)
    bias = bias.reshape(()).to(device=x.device, dtype=dtype)
    return PairwiseSigmoid.apply(x, y, scale, bias, int(pos_offset) % y.shape[0], bool(has_pos), backend)
