"""Distributed losses on torch.distributed: gathers with correct gradients, and local anchors
against global columns (docs/design.md, "Scale past one device").

Under data parallelism (DDP) each of the W ranks holds a slice of the global batch, z_r (n_r, D),
computes its own loss_r, and DDP averages the parameter gradients: the step follows
∇ (1/W) Σ_r loss_r. Everything here is built so that (1/W) Σ_r loss_r is the loss of the
single-process objective on the concatenated batch (or, where lightly 1.6 defines it otherwise,
lightly's objective), and the gradients come out right after DDP's averaging:

* :func:`all_gather` returns every rank's slice; its backward **sums** the incoming gradients over
  the ranks (all_reduce) and hands back this rank's slice. Rank s then holds Σ_r ∂loss_r/∂z_s —
  its z_s enters every rank's loss — and DDP's 1/W turns that into ∂((1/W)Σ_r loss_r)/∂z_s.
  A backward that returned only the local gradient (lightly #1528) or averaged it (lightly #1977)
  is off by the other ranks' terms or by W.
* :func:`all_reduce` is a sum whose backward is again a sum over the ranks, for the same reason.
* :func:`global_mean` turns per-anchor terms of this rank into its share of the global mean,
  Σ_{i on r} ℓ_i · W/N, so that the average over ranks is (1/N) Σ_i ℓ_i even when the per-rank
  batch sizes differ (with equal sizes it is the local mean, as in lightly).
* :func:`pairwise_lse_global` runs the pairwise-LSE op (fastssl.ops.pairwise_lse) on this rank's
  rows against the columns of every rank: this rank's own block keeps the op's self/positive masks
  (self column i, positive (i + pos_offset) mod n_own), every other rank's block is all negatives.
  The LSE over the union is the logaddexp of the per-block LSEs. The other ranks' blocks either
  arrive by one all-gather (mode True) or travel round a ring by point-to-point send/recv (mode
  "ring", :class:`RingLSE`), so that a rank holds at most three blocks at a time.

Uses only torch.distributed (gloo on CPUs, NCCL on GPUs) on the default process group (or the
`group` given). When torch.distributed is not initialised, or the world has one rank, every loss
computes exactly its single-process value, as lightly's losses do.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_available",
    "is_active",
    "world_size",
    "rank",
    "check_gather",
    "batch_sizes",
    "row_offset",
    "all_gather",
    "gather_cat",
    "all_reduce",
    "eye_rank",
    "positive_mask",
    "global_mean",
    "pairwise_lse_global",
    "RingLSE",
]

#: The accepted values of `gather_distributed`: off, one all-gather, or the ring exchange.
GATHER_MODES = (False, True, "ring")

GatherMode = Union[bool, str]


def is_available() -> bool:
    """Whether this torch build has torch.distributed."""
    return dist.is_available()


def world_size(group=None) -> int:
    """The number of ranks, 1 when torch.distributed is not initialised."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank, 0 when torch.distributed is not initialised."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def check_gather(value: object, *, ring: bool = True, name: str = "gather_distributed") -> GatherMode:
    """`value` if it is False, True or (when `ring`) "ring"; else a ValueError/TypeError naming it.

    Like lightly, asking for a gather without torch.distributed in this torch build is an error;
    asking for it while torch.distributed is not initialised is not (see :func:`is_active`).
    """
    if not (isinstance(value, bool) or isinstance(value, str)):
        raise TypeError(f"{name} must be False, True or 'ring', got {type(value).__name__}")
    if isinstance(value, str) and value != "ring":
        raise ValueError(f"{name} must be False, True or 'ring', got {value!r}")
    if value == "ring" and not ring:
        raise ValueError(
            f"{name}='ring' is for the pairwise-LSE (contrastive) losses, whose columns can travel "
            "round the ranks; this loss needs statistics of the whole batch: use gather_distributed=True"
        )
    if value and not dist.is_available():
        raise ValueError(
            f"{name}={value!r} but torch.distributed is not available in this torch build; "
            f"set {name}=False or install a torch with distributed support"
        )
    return value


def is_active(mode: GatherMode, group=None) -> bool:
    """True when `mode` asks for a gather and more than one rank exists (else: single-process math)."""
    return bool(mode) and world_size(group) > 1


def batch_sizes(x: Tensor, group=None) -> list[int]:
    """Every rank's number of rows of `x` (rows, ...), by one all-gather of the shapes.

    All ranks must agree on the trailing dimensions; if not, every rank raises the same ValueError
    (rather than hanging in a gather of mismatched buffers). This reads the shapes on the host: one
    small collective and one sync per call.
    """
    w = world_size(group)
    if w == 1:
        return [x.shape[0]]
    shape = torch.tensor([x.dim(), *x.shape], dtype=torch.long, device=x.device)
    width = 9  # ndim + up to 8 sizes
    if shape.numel() > width:
        raise ValueError(f"distributed gather takes tensors of at most {width - 1} dimensions, got {tuple(x.shape)}")
    padded = torch.zeros(width, dtype=torch.long, device=x.device)
    padded[: shape.numel()] = shape
    shapes = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(shapes, padded, group=group)
    rows = [s.tolist() for s in shapes]
    tails = {tuple(r[2 : 1 + r[0]]) if r[0] > 0 else () for r in rows}
    if len(tails) > 1 or rows[0][0] != x.dim() or any(r[0] != x.dim() for r in rows):
        described = [tuple(r[1 : 1 + r[0]]) for r in rows]
        raise ValueError(f"every rank must pass embeddings with the same trailing dimensions, got shapes {described}")
    return [r[1] for r in rows]


def row_offset(sizes: Sequence[int], group=None) -> int:
    """Index of this rank's first row in the concatenation of the ranks' slices (rank order)."""
    return int(sum(sizes[: rank(group)]))


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros((rows, *x.shape[1:]))
    out[: x.shape[0]] = x
    return out


class _AllGather(torch.autograd.Function):
    """`apply(x, sizes, group) -> (x_0, ..., x_{W-1})`: every rank's slice (slices may differ in rows).

    Backward: the W incoming gradients are stacked (padded to the largest slice), summed over the
    ranks by all_reduce, and this rank's slice is returned — Σ_r ∂loss_r/∂x_rank.
    """

    @staticmethod
    def forward(ctx, x, sizes, group):
        longest = max(sizes)
        buffers = [x.new_empty((longest, *x.shape[1:])) for _ in sizes]
        dist.all_gather(buffers, _pad_rows(x, longest), group=group)
        ctx.sizes, ctx.group, ctx.rank = sizes, group, rank(group)
        return tuple(b[:n] for b, n in zip(buffers, sizes))

    @staticmethod
    def backward(ctx, *grads):
        longest = max(ctx.sizes)
        stacked = torch.stack([_pad_rows(g, longest) for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=ctx.group)
        return stacked[ctx.rank, : ctx.sizes[ctx.rank]], None, None


def all_gather(x: Tensor, sizes: Optional[Sequence[int]] = None, group=None) -> tuple[Tensor, ...]:
    """Every rank's `x` (rows may differ: `sizes`, from :func:`batch_sizes` when None), differentiable.

    The gradient that reaches this rank's `x` is the sum over ranks of the gradients of its copies,
    Σ_r ∂loss_r/∂x; with one rank, (x,). Shapes: x (n_r, ...) -> W tensors (n_s, ...).
    """
    if world_size(group) == 1:
        return (x,)
    sizes = list(batch_sizes(x, group) if sizes is None else sizes)
    return _AllGather.apply(x, sizes, group)


def gather_cat(x: Tensor, sizes: Optional[Sequence[int]] = None, group=None) -> Tensor:
    """torch.cat(all_gather(x)): the global batch (N, ...) in rank order, O(N·D), differentiable."""
    parts = all_gather(x, sizes, group)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; backward: the sum over ranks of the incoming gradients (each rank's loss
    depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce(x: Tensor, group=None) -> Tensor:
    """Σ_r x_r over the ranks, autograd-aware (a new tensor; `x` is not modified). One rank: x."""
    if world_size(group) == 1:
        return x
    return _AllReduce.apply(x, group)


def eye_rank(n: int, sizes: Optional[Sequence[int]] = None, device=None, group=None) -> Tensor:
    """(n, N) bool self mask of this rank's n rows among the N global columns (rank order).

    Row i is True at column offset + i, offset = Σ_{s<rank} sizes[s] (lightly's `eye_rank`, for
    slices of any size). `sizes` defaults to n on every rank. One rank: torch.eye(n).
    """
    sizes = [n] * world_size(group) if sizes is None else list(sizes)
    rows = torch.arange(n, device=device)
    mask = torch.zeros((n, sum(sizes)), dtype=torch.bool, device=device)
    mask[rows, rows + row_offset(sizes, group)] = True
    return mask


def positive_mask(n: int, view_offset: int, sizes: Optional[Sequence[int]] = None, device=None, group=None) -> Tensor:
    """(n, N) bool mask of each local row's positive among the N global columns.

    For columns laid out as concatenated per-rank slices, where local row i's positive is local
    column i + view_offset of its own slice (e.g. NT-Xent's [z1; z2] slices: view_offset ±n): the
    positive is global column offset + (i + view_offset) mod sizes[rank] — the rank-aware label that
    solo-learn #206 got wrong on ranks other than 0.
    """
    sizes = [n] * world_size(group) if sizes is None else list(sizes)
    own = sizes[rank(group)]
    rows = torch.arange(n, device=device)
    mask = torch.zeros((n, sum(sizes)), dtype=torch.bool, device=device)
    mask[rows, row_offset(sizes, group) + (rows + view_offset) % own] = True
    return mask


def global_mean(values: Tensor, sizes: Sequence[int]) -> Tensor:
    """This rank's share of the global mean over all ranks' rows: Σ_i values_i · W / N.

    values (n_r,) are per-anchor terms of this rank; sizes, every rank's anchor count (N = Σ sizes).
    The average over ranks, which is what DDP's gradient averaging differentiates, is
    (1/N) Σ_{all anchors} values_i. With equal sizes this is values.mean(), lightly's local mean.
    """
    return values.sum() * (len(sizes) / sum(sizes))


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Flags of the op that put every column of a block into the LSE once: the "positive" column i mod Ny
# is included (include_pos) and nothing is excluded.
_ALL_COLUMNS = dict(pos_offset=0, exclude_self=False, include_pos=True, y_negatives=True)


def _remote_lse_fwd(x: Tensor, block: Tensor, scale: Tensor, backend: str) -> Tensor:
    lse, _ = torch.ops.fastssl.pairwise_lse_fwd(x, block, None, scale, 0, False, True, True, backend)
    return lse


class RingLSE(torch.autograd.Function):
    """`apply(x, y, scale, sizes, backend, group) -> lse (M,)`: per row of x, the LSE of
    scale·x_i·y'_j over every column y' of every *other* rank's `y` block, with no rank holding more
    than three blocks.

    Ring: rank r sends to r + 1 and receives from r − 1 (mod W). Forward: W − 1 steps; at step k the
    block of rank r − k arrives while the previous one is sent on, and each block's LSE (the
    pairwise-LSE op) is merged with logaddexp. Only x, y, scale and the merged LSE are kept.
    Backward: the blocks go round again, each with an fp32 accumulator of its gradient; at step k
    rank r adds ∂/∂y of its rows' terms (the op's backward against the saved global LSE, so the
    softmax weights are the global ones) and passes (block, accumulator) on; after W − 1 steps one
    last send brings each accumulator home. dx sums over the visiting blocks locally.

    Shapes: x (M, D), y (n_r, D) this rank's column block, scale 0-dim; sizes: every rank's block
    rows. The caller combines this with the own block's masked LSE (:func:`pairwise_lse_global`).
    """

    @staticmethod
    def forward(ctx, x, y, scale, sizes, backend, group):
        w, r = len(sizes), rank(group)
        nxt, prv = _peer(r + 1, w, group), _peer(r - 1, w, group)
        lse = None
        cur = y.detach().contiguous()
        for k in range(1, w):
            incoming = y.new_empty((sizes[(r - k) % w], y.shape[1]))
            reqs = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, cur, nxt, group), dist.P2POp(dist.irecv, incoming, prv, group)]
            )
            if k > 1:  # overlap: the block that arrived last step is computed while it is sent on
                part = _remote_lse_fwd(x, cur, scale, backend)
                lse = part if lse is None else torch.logaddexp(lse, part)
            for req in reqs:
                req.wait()
            cur = incoming
        part = _remote_lse_fwd(x, cur, scale, backend)
        lse = part if lse is None else torch.logaddexp(lse, part)
        ctx.save_for_backward(x, y, scale, lse)
        ctx.sizes, ctx.backend, ctx.group = list(sizes), backend, group
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        x, y, scale, lse = ctx.saved_tensors
        sizes, backend, group = ctx.sizes, ctx.backend, ctx.group
        w, r = len(sizes), rank(group)
        nxt, prv = _peer(r + 1, w, group), _peer(r - 1, w, group)
        acc_dtype = _stat_dtype(x)
        grad_lse = grad_lse.contiguous()
        grad_pos = torch.zeros_like(grad_lse)
        dx = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
        block, acc = y.detach().contiguous(), None
        for k in range(1, w):
            owner_rows = sizes[(r - k) % w]
            incoming = y.new_empty((owner_rows, y.shape[1]))
            ops = [dist.P2POp(dist.isend, block, nxt, group), dist.P2POp(dist.irecv, incoming, prv, group)]
            incoming_acc = None
            if k > 1:  # the block's accumulator travels with it (none yet on the first hop)
                incoming_acc = torch.empty((owner_rows, y.shape[1]), dtype=acc_dtype, device=y.device)
                ops += [dist.P2POp(dist.isend, acc, nxt, group, tag=1), dist.P2POp(dist.irecv, incoming_acc, prv, group, tag=1)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            block = incoming
            acc = torch.zeros_like(incoming, dtype=acc_dtype) if incoming_acc is None else incoming_acc
            dx_k, dy_k = torch.ops.fastssl.pairwise_lse_bwd(
                x, block, None, scale, lse, grad_lse, grad_pos, 0, False, True, True, backend
            )
            dx += dx_k.to(acc_dtype)
            acc += dy_k.to(acc_dtype)
        # The last hop: rank r holds the block of rank r + 1 with every other rank's contribution.
        home = torch.empty(y.shape, dtype=acc_dtype, device=y.device)
        for req in dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, acc.contiguous(), nxt, group), dist.P2POp(dist.irecv, home, prv, group)]
        ):
            req.wait()
        d_scale = None
        if ctx.needs_input_grad[2]:
            # logits are scale·x·y: d scale = Σ_ij G_ij x_i·y_j = Σ_i x_i·dx_i / scale.
            d_scale = ((x.to(acc_dtype) * dx).sum() / scale.to(acc_dtype)).to(scale.dtype)
        return dx.to(x.dtype), home.to(y.dtype), d_scale, None, None, None


def _peer(index: int, w: int, group) -> int:
    """The global rank of group rank `index mod w` (P2P ops take global ranks)."""
    local = index % w
    return local if group is None else dist.get_global_rank(group, local)


def pairwise_lse_global(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    *,
    pos_offset: int = 0,
    exclude_self: bool = False,
    include_pos: bool = True,
    y_negatives: bool = True,
    mode: GatherMode,
    sizes: Optional[Sequence[int]] = None,
    backend: str,
    group=None,
) -> tuple[Tensor, Tensor]:
    """The pairwise-LSE op on local rows x against the column blocks y of every rank.

    Own block (this rank's y, and the bank): exactly :func:`fastssl.ops.pairwise_lse.pairwise_lse`
    with the given flags — self column i, positive (i + pos_offset) mod n_own. Every other rank's
    block: all columns are negatives (nothing masked). Returns (lse, pos), (M,) each:

        lse_i = logaddexp(LSE_own_i, LSE_{s ≠ rank, j} scale·x_i·y^(s)_j)

    mode True: the other blocks arrive by one differentiable all-gather (O(N·D) per rank);
    mode "ring": they travel round the ring (:class:`RingLSE`, at most three blocks held). Inactive
    mode (False, or one rank), or y_negatives=False (no column of another rank is a candidate):
    the single-process op. `sizes`: every rank's rows of y (:func:`batch_sizes` when None).
    No N x N matrix is formed on any path.
    """
    from fastssl.ops.pairwise_lse import pairwise_lse

    flags = dict(pos_offset=pos_offset, exclude_self=exclude_self, include_pos=include_pos, y_negatives=y_negatives)
    lse_own, pos = pairwise_lse(x, y, bank, scale, **flags, backend=backend)
    if not (is_active(mode, group) and y_negatives):
        return lse_own, pos
    sizes = list(batch_sizes(y, group) if sizes is None else sizes)
    if mode == "ring":
        scale = scale.to(device=x.device, dtype=_stat_dtype(x))
        lse_rest = RingLSE.apply(x, y, scale, sizes, backend, group)
    else:
        blocks = all_gather(y, sizes, group)
        me = rank(group)
        others = torch.cat([b for s, b in enumerate(blocks) if s != me])
        lse_rest, _ = pairwise_lse(x, others, None, scale, **_ALL_COLUMNS, backend=backend)
    return torch.logaddexp(lse_own, lse_rest), pos
