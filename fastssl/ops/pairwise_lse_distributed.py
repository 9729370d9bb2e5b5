"""The pairwise-LSE op over every rank's columns (docs/design.md, "Scale past one device").

:func:`pairwise_lse_global` runs the pairwise-LSE op (fastssl/ops/pairwise_lse.py) on this rank's
rows against the column blocks of every rank: this rank's own block keeps the op's self/positive
masks (self column i, positive (i + pos_offset) mod n_own), every other rank's block is all
negatives, and the LSE over the union is the logaddexp of the per-block LSEs. The other ranks'
blocks either arrive by one differentiable all-gather (mode True) or travel round a ring by
point-to-point send/recv (mode "ring", :class:`RingLSE`), so that a rank holds at most three blocks
at a time. The collectives and the ring schedule (:func:`fastssl.distributed.ring_blocks`,
:func:`fastssl.distributed.ring_reduce`, shared with the pairwise-sigmoid ring) are
fastssl.distributed's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastssl._common import compute_dtype
from fastssl.distributed import GatherMode, all_gather, batch_sizes, is_active, rank, ring_blocks, ring_reduce
from fastssl.kernels import PairwiseLSEFlags
from fastssl.ops.pairwise_lse import pairwise_lse

__all__ = ["RingLSE", "pairwise_lse_global"]

#: Every column of a foreign block enters the LSE once: the "positive" column i mod Ny is included
#: and nothing is excluded. Only the LSE is needed, so the backward never asks for the positive.
_ALL_COLUMNS = PairwiseLSEFlags(pos_offset=0, exclude_self=False, include_pos=True, y_negatives=True)


def _remote_lse_fwd(x: Tensor, block: Tensor, scale: Tensor, backend: str) -> Tensor:
    lse, _ = torch.ops.fastssl.pairwise_lse_fwd(x, block, None, scale, _ALL_COLUMNS.to_list(), backend)
    return lse


class RingLSE(torch.autograd.Function):
    """`apply(x, y, scale, sizes, backend, group) -> lse (M,)`: per row of x, the LSE of
    scale·x_i·y'_j over every column y' of every *other* rank's `y` block, with no rank holding more
    than three blocks.

    Ring (the schedule of fastssl.distributed.ring_blocks and ring_reduce): rank r sends to r + 1
    and receives from r − 1 (mod W). Forward: W − 1 steps; at step k the block of rank r − k arrives
    while the previous one is sent on, and each block's LSE (the pairwise-LSE op) is merged with
    logaddexp. Only x, y, scale and the merged LSE are kept. Backward: the blocks go round again,
    each with an fp32 accumulator of its gradient; at step k rank r adds ∂/∂y of its rows' terms
    (the op's backward against the saved global LSE, so the softmax weights are the global ones)
    and passes (block, accumulator) on; after W − 1 steps one last send brings each accumulator
    home. dx sums over the visiting blocks locally.

    Shapes: x (M, D), y (n_r, D) this rank's column block, scale 0-dim; sizes: every rank's block
    rows. The caller combines this with the own block's masked LSE (:func:`pairwise_lse_global`).
    """

    @staticmethod
    def forward(ctx, x, y, scale, sizes, backend, group):
        lse = None
        for block in ring_blocks(y, sizes, group):
            part = _remote_lse_fwd(x, block, scale, backend)
            lse = part if lse is None else torch.logaddexp(lse, part)
        ctx.save_for_backward(x, y, scale, lse)
        ctx.sizes, ctx.backend, ctx.group = list(sizes), backend, group
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        x, y, scale, lse = ctx.saved_tensors
        backend = ctx.backend
        acc_dtype = compute_dtype(x)
        grad_lse = grad_lse.contiguous()
        grad_pos = torch.zeros_like(grad_lse)
        dx = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)

        def block_grad(block: Tensor) -> Tensor:
            # The op's backward against the saved global LSE, so the softmax weights are the global ones.
            dx_k, dy_k = torch.ops.fastssl.pairwise_lse_bwd(
                x, block, None, scale, lse, grad_lse, grad_pos, _ALL_COLUMNS.to_list(), backend
            )
            dx.add_(dx_k.to(acc_dtype))
            return dy_k

        home = ring_reduce(y, ctx.sizes, block_grad, acc_dtype, ctx.group)
        d_scale = None
        if ctx.needs_input_grad[2]:
            # logits are scale·x·y: d scale = Σ_ij G_ij x_i·y_j = Σ_i x_i·dx_i / scale.
            d_scale = ((x.to(acc_dtype) * dx).sum() / scale.to(acc_dtype)).to(scale.dtype)
        return dx.to(x.dtype), home.to(y.dtype), d_scale, None, None, None


def pairwise_lse_global(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    flags: PairwiseLSEFlags = PairwiseLSEFlags(),
    *,
    mode: GatherMode,
    sizes: Optional[Sequence[int]] = None,
    backend: str,
    group=None,
) -> tuple[Tensor, Tensor]:
    """The pairwise-LSE op on local rows x against the column blocks y of every rank.

    Own block (this rank's y, and the bank): exactly :func:`fastssl.ops.pairwise_lse.pairwise_lse`
    with the given `flags` — self column i, positive (i + pos_offset) mod n_own. Every other rank's
    block: all columns are negatives (nothing masked). Returns (lse, pos), (M,) each:

        lse_i = logaddexp(LSE_own_i, LSE_{s ≠ rank, j} scale·x_i·y^(s)_j)

    mode True: the other blocks arrive by one differentiable all-gather (O(N·D) per rank);
    mode "ring": they travel round the ring (:class:`RingLSE`, at most three blocks held). Inactive
    mode (False, or one rank), or y_negatives=False (no column of another rank is a candidate):
    the single-process op. `sizes`: every rank's rows of y (:func:`batch_sizes` when None).
    No N x N matrix is formed on any path.
    """
    lse_own, pos = pairwise_lse(x, y, bank, scale, flags, backend=backend)
    if not (is_active(mode, group) and flags.y_negatives):
        return lse_own, pos
    sizes = list(batch_sizes(y, group) if sizes is None else sizes)
    if mode == "ring":
        scale = scale.to(device=x.device, dtype=compute_dtype(x))
        lse_rest = RingLSE.apply(x, y, scale, sizes, backend, group)
    else:
        blocks = all_gather(y, sizes, group)
        me = rank(group)
        others = torch.cat([b for s, b in enumerate(blocks) if s != me])
        lse_rest, _ = pairwise_lse(x, others, None, scale, backend=backend)  # the defaults: every column once
    return torch.logaddexp(lse_own, lse_rest), pos
