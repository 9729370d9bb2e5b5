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
* :func:`peer` names a ring neighbour for point-to-point sends.
* :func:`ring_blocks` and :func:`ring_reduce` are the ring schedule (mode "ring"): every other
  rank's column block visits this rank by point-to-point send/recv, once in the forward and once
  more in the backward with a gradient accumulator that ends at the block's owner. They move blocks
  only; what is computed on a visiting block is the caller's (the pairwise-LSE and pairwise-sigmoid
  ops), so both ring modes share one schedule.

The pairwise ops over every rank's columns (one all-gather, or the ring) are built on these in
fastssl/ops/pairwise_lse_distributed.py and fastssl/ops/pairwise_sigmoid_distributed.py; this
module holds only the collectives.

Uses only torch.distributed (gloo on CPUs, NCCL on GPUs) on the default process group (or the
`group` given). When torch.distributed is not initialised, or the world has one rank, every loss
computes exactly its single-process value, as lightly's losses do.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

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
    "global_mean",
    "peer",
    "ring_blocks",
    "ring_reduce",
]

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
            f"{name}='ring' is for the pairwise-LSE (contrastive) losses and SigLIP, whose columns can "
            "travel round the ranks; this loss needs statistics of the whole batch: use gather_distributed=True"
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


def global_mean(values: Tensor, sizes: Sequence[int]) -> Tensor:
    """This rank's share of the global mean over all ranks' rows: Σ_i values_i · W / N.

    values (n_r,) are per-anchor terms of this rank; sizes, every rank's anchor count (N = Σ sizes).
    The average over ranks, which is what DDP's gradient averaging differentiates, is
    (1/N) Σ_{all anchors} values_i. With equal sizes this is values.mean(), lightly's local mean.
    """
    return values.sum() * (len(sizes) / sum(sizes))


def peer(index: int, group=None) -> int:
    """The global rank of group rank `index mod W` (point-to-point ops take global ranks)."""
    local = index % world_size(group)
    return local if group is None else dist.get_global_rank(group, local)


def ring_blocks(y: Tensor, sizes: Sequence[int], group=None) -> Iterator[Tensor]:
    """Every other rank's block of `y`, one at a time: the forward half of the ring schedule.

    Rank r sends to r + 1 and receives from r − 1 (mod W), so the k-th block yielded (k = 1 … W − 1)
    is rank r − k's. Every block but the last is yielded while it is being sent on, so the caller's
    work on it overlaps the next transfer. A rank holds at most three blocks: its own, the one it
    sends and the one arriving. Nothing is differentiable here (the caller's autograd Function
    routes the gradients with :func:`ring_reduce`). Shapes: y (n_r, ...), block k (n_{r−k}, ...).
    """
    w, r = len(sizes), rank(group)
    nxt, prv = peer(r + 1, group), peer(r - 1, group)
    current = y.detach().contiguous()
    for k in range(1, w):
        incoming = y.new_empty((sizes[(r - k) % w], *y.shape[1:]))
        requests = dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, current, nxt, group), dist.P2POp(dist.irecv, incoming, prv, group)]
        )
        if k > 1:  # the block that arrived last step is computed on while it is sent on
            yield current
        for request in requests:
            request.wait()
        current = incoming
    if w > 1:
        yield current


def ring_reduce(
    y: Tensor, sizes: Sequence[int], block_grad: Callable[[Tensor], Tensor], acc_dtype: torch.dtype, group=None
) -> Tensor:
    """Σ over the other ranks s of the gradient that rank s's terms give to this rank's `y` block:
    the backward half of the ring schedule.

    The blocks go round as in :func:`ring_blocks` (rank r − k's block at step k), each with an
    accumulator in `acc_dtype`: at every step this rank adds `block_grad(block)` — the gradient its
    own terms give to the visiting block, (n_s, ...) — to the block's accumulator and passes both on;
    after W − 1 steps one last hop brings every accumulator home. The caller's `block_grad` also
    collects whatever it needs locally (its rows' gradient, a temperature's). Returns (n_r, ...) in
    `acc_dtype`. A rank holds at most three blocks and the accumulators of the last two.
    """
    w, r = len(sizes), rank(group)
    if w == 1:
        return torch.zeros(y.shape, dtype=acc_dtype, device=y.device)
    nxt, prv = peer(r + 1, group), peer(r - 1, group)
    block, acc = y.detach().contiguous(), None
    for k in range(1, w):
        owner_rows = sizes[(r - k) % w]
        incoming = y.new_empty((owner_rows, *y.shape[1:]))
        ops = [dist.P2POp(dist.isend, block, nxt, group), dist.P2POp(dist.irecv, incoming, prv, group)]
        incoming_acc = None
        if k > 1:  # the block's accumulator travels with it (none yet on the first hop)
            incoming_acc = torch.empty(incoming.shape, dtype=acc_dtype, device=y.device)
            ops += [
                dist.P2POp(dist.isend, acc, nxt, group, tag=1),
                dist.P2POp(dist.irecv, incoming_acc, prv, group, tag=1),
            ]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        block = incoming
        acc = torch.zeros_like(incoming, dtype=acc_dtype) if incoming_acc is None else incoming_acc
        acc += block_grad(block).to(acc_dtype)
    # The last hop: rank r holds the block of rank r + 1 with every other rank's contribution.
    home = torch.empty(y.shape, dtype=acc_dtype, device=y.device)
    for request in dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, acc.contiguous(), nxt, group), dist.P2POp(dist.irecv, home, prv, group)]
    ):
        request.wait()
    return home
