"""The pairwise-sigmoid op over every rank's columns (docs/design.md, "Scale past one device").

:func:`pairwise_sigmoid_global` runs the pairwise-sigmoid op (fastssl/ops/pairwise_sigmoid.py) on
this rank's rows against the column blocks of every rank. SigLIP's row term is a sum of independent
pair terms, so the row sums over the union of the blocks are the sums of the per-block row sums:
this rank's own block holds the positives (row i against column i), every other rank's block is
all negatives (has_pos = False). The other ranks' blocks either arrive by one differentiable
all-gather (mode True) or travel round the ring of fastssl.distributed (mode "ring",
:class:`RingSigmoid`, the schedule that the pairwise-LSE ring uses too), so that a rank holds at
most three blocks at a time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastssl._common import compute_dtype
from fastssl.distributed import GatherMode, batch_sizes, gather_cat, is_active, ring_blocks, ring_reduce, row_offset
from fastssl.ops.pairwise_sigmoid import pairwise_sigmoid

__all__ = ["RingSigmoid", "pairwise_sigmoid_global"]


class RingSigmoid(torch.autograd.Function):
    """`apply(x, y, scale, bias, sizes, backend, group) -> rows (M,)`: per row of x, the sum of
    softplus(scale·x_i·y'_j + bias) over every column y' of every *other* rank's `y` block (all
    negatives: label −1), with no rank holding more than three blocks.

    Forward (fastssl.distributed.ring_blocks): W − 1 steps; each arriving block's row sums (the
    pairwise-sigmoid op with has_pos = False) are added while the next block is in flight. Only x,
    y, scale and bias are kept: the pair terms are independent, so the backward needs no row
    statistic. Backward (fastssl.distributed.ring_reduce): the blocks go round again; at each step
    the op's backward on the visiting block gives this rank's dx part (summed locally), the block's
    dy part (added to the accumulator that travels home with it), and this rank's parts of d scale
    and d bias. Those two are this rank's alone — Σ over its rows and every column — as in the
    all-gather mode, where the op runs on the gathered columns; DDP's averaging then completes them.

    Shapes: x (M, D), y (n_r, D) this rank's column block, scale and bias 0-dim in the compute dtype;
    sizes: every rank's block rows. The caller adds the own block's row sums (:func:`pairwise_sigmoid_global`).
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, sizes, backend, group):
        rows = None
        for block in ring_blocks(y, sizes, group):
            part = torch.ops.fastssl.pairwise_sigmoid_fwd(x, block, scale, bias, 0, False, backend)
            rows = part if rows is None else rows + part
        ctx.save_for_backward(x, y, scale, bias)
        ctx.sizes, ctx.backend, ctx.group = list(sizes), backend, group
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        x, y, scale, bias = ctx.saved_tensors
        backend = ctx.backend
        acc_dtype = compute_dtype(x)
        grad_rows = grad_rows.contiguous()
        dx = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
        d_scale = torch.zeros((), dtype=acc_dtype, device=x.device)
        d_bias = torch.zeros((), dtype=acc_dtype, device=x.device)

        def block_grad(block: Tensor) -> Tensor:
            dx_k, dy_k, dlogit_rows, dscale_rows = torch.ops.fastssl.pairwise_sigmoid_bwd(
                x, block, scale, bias, grad_rows, 0, False, backend
            )
            dx.add_(dx_k.to(acc_dtype))
            d_scale.add_(dscale_rows.sum())
            d_bias.add_(dlogit_rows.sum())
            return dy_k

        home = ring_reduce(y, ctx.sizes, block_grad, acc_dtype, ctx.group)
        return (
            dx.to(x.dtype),
            home.to(y.dtype),
            d_scale.to(scale.dtype) if ctx.needs_input_grad[2] else None,
            d_bias.to(bias.dtype) if ctx.needs_input_grad[3] else None,
            None,
            None,
            None,
        )


def pairwise_sigmoid_global(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    *,
    mode: GatherMode,
    sizes: Optional[Sequence[int]] = None,
    backend: str,
    group=None,
) -> Tensor:
    """SigLIP's row sums of local rows x against the column blocks y of every rank, (M,):

        rows_i = Σ_{s, j} softplus(−label·(scale·x_i·y^(s)_j + bias)),  label +1 only for s = rank, j = i

    x and y are this rank's rows of the two towers, (n_r, D) each. mode True: one differentiable
    all-gather of y (O(N·D) per rank) and the op on every column, the positive at this rank's row
    offset. mode "ring": the own block with its positives plus :class:`RingSigmoid` over the other
    blocks (at most three blocks held, no all-gather). Inactive mode (False, or one rank): the
    single-process op. `sizes`: every rank's rows (:func:`batch_sizes` when None). Gradients reach
    x, y (summed over the ranks whose rows use them), scale and bias (this rank's terms). No N x N
    matrix is formed on any path.
    """
    if not is_active(mode, group):
        return pairwise_sigmoid(x, y, scale, bias, backend=backend)
    sizes = list(batch_sizes(y, group) if sizes is None else sizes)
    if mode == "ring":
        own = pairwise_sigmoid(x, y, scale, bias, backend=backend)
        dtype = compute_dtype(x)
        scale = scale.reshape(()).to(device=x.device, dtype=dtype)
        bias = bias.reshape(()).to(device=x.device, dtype=dtype)
        return own + RingSigmoid.apply(x, y, scale, bias, sizes, backend, group)
    columns = gather_cat(y, sizes, group)
    return pairwise_sigmoid(x, columns, scale, bias, pos_offset=row_offset(sizes, group), backend=backend)
