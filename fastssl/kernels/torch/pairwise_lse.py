"""Pairwise LogSumExp in chunked PyTorch: the CPU default and the portable fallback.

DESIGN.md, kernel family 1. The math is the Triton kernels' (fastssl/kernels/triton/pairwise_lse.py),
written with torch ops over row chunks so that at most ``chunk x (Ny + K)`` logits exist at a time:
memory is O(N·D + chunk·N) instead of O(N²). The forward keeps only the per-row LSE and positive
logit; the backward recomputes each chunk's logits.

Logits: s_ij = scale·(x_i·y_j) (j < Ny) and s_ik = scale·(x_i·bank_k). The positive column of row i
is p(i) = (i + pos_offset) mod Ny. lse_i is the LSE over {s_i,p(i)} (if include_pos), the other
y columns (if y_negatives; minus column i if exclude_self) and every bank column.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

#: Upper bound on the bytes of one chunk of logits (the backward holds about three such buffers).
_CHUNK_BYTES = int(os.environ.get("FASTSSL_TORCH_CHUNK_BYTES", str(32 * 2**20)))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_rows(n_cols: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, n_cols * itemsize))


def _chunk_logits(
    xc: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    rows: Tensor,
    pos_offset: int,
    exclude_self: bool,
    include_pos: bool,
    y_negatives: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of one row chunk with excluded columns set to -inf.

    Returns (logits (C, Ny [+ K]), positive column index (C,), positive logit (C,)).
    """
    n_y = y.shape[0]
    pos_col = (rows + pos_offset) % n_y
    s_y = (xc @ y.T) * scale
    pos = s_y.gather(1, pos_col[:, None]).squeeze(1)
    cols = torch.arange(n_y, device=xc.device)
    is_pos = cols[None, :] == pos_col[:, None]
    if y_negatives:
        keep = torch.ones_like(is_pos)
        if exclude_self:
            keep &= cols[None, :] != rows[:, None]
        # The positive is in or out of the denominator as asked, whatever the self mask says.
        keep = keep | is_pos if include_pos else keep & ~is_pos
    else:
        keep = is_pos if include_pos else torch.zeros_like(is_pos)
    s_y = s_y.masked_fill(~keep, float("-inf"))
    if bank is not None and bank.shape[0] > 0:
        s_y = torch.cat([s_y, (xc @ bank.T) * scale], dim=1)
    return s_y, pos_col, pos


def pairwise_lse_forward(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    pos_offset: int,
    exclude_self: bool,
    include_pos: bool,
    y_negatives: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row LSE and positive logit, in fp32 (fp64 for fp64 inputs). Shapes (M,), (M,)."""
    dt = _compute_dtype(x)
    m = x.shape[0]
    n_cols = y.shape[0] + (0 if bank is None else bank.shape[0])
    yc = y.to(dt)
    bc = None if bank is None else bank.to(dt)
    sc = scale.to(dt)
    lse = torch.empty(m, dtype=dt, device=x.device)
    pos = torch.empty(m, dtype=dt, device=x.device)
    step = _chunk_rows(n_cols, torch.finfo(dt).bits // 8)
    for start in range(0, m, step):
        stop = min(m, start + step)
        rows = torch.arange(start, stop, device=x.device)
        s, _, p = _chunk_logits(x[start:stop].to(dt), yc, bc, sc, rows, pos_offset, exclude_self, include_pos, y_negatives)
        lse[start:stop] = torch.logsumexp(s, dim=1)
        pos[start:stop] = p
    return lse, pos


def pairwise_lse_backward(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    lse: Tensor,
    grad_lse: Tensor,
    grad_pos: Tensor,
    pos_offset: int,
    exclude_self: bool,
    include_pos: bool,
    y_negatives: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients (dx, dy) of Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i, in the input dtype.

    With P_ij = exp(s_ij − lse_i) on the included columns and G_ij = grad_lse_i·P_ij + grad_pos_i·[j = p(i)]:
    dx_i = scale·(Σ_j G_ij y_j + Σ_k G_ik bank_k), dy_j = scale·Σ_i G_ij x_i.
    """
    dt = _compute_dtype(x)
    m, n_y = x.shape[0], y.shape[0]
    n_cols = n_y + (0 if bank is None else bank.shape[0])
    yc = y.to(dt)
    bc = None if bank is None else bank.to(dt)
    sc = scale.to(dt)
    dx = torch.empty(x.shape, dtype=dt, device=x.device)
    dy = torch.zeros(y.shape, dtype=dt, device=x.device)
    step = _chunk_rows(n_cols, torch.finfo(dt).bits // 8)
    for start in range(0, m, step):
        stop = min(m, start + step)
        rows = torch.arange(start, stop, device=x.device)
        xc = x[start:stop].to(dt)
        s, pos_col, _ = _chunk_logits(xc, yc, bc, sc, rows, pos_offset, exclude_self, include_pos, y_negatives)
        # G overwrites the logits in place: the chunk is the only large buffer we hold.
        g = s.sub_(lse[start:stop, None].to(dt)).exp_().mul_(grad_lse[start:stop, None].to(dt))
        g_y = g[:, :n_y]
        g_y.scatter_add_(1, pos_col[:, None], grad_pos[start:stop, None].to(dt))
        dxc = g_y @ yc
        if bc is not None and n_cols > n_y:
            dxc += g[:, n_y:] @ bc
        dx[start:stop] = dxc * sc
        dy.addmm_(g_y.T, xc)
    return dx.to(x.dtype), (dy * sc).to(y.dtype)
