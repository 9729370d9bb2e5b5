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
_CHUNK_BYTES = int(os.environ.get("FASTSSL_TORCH_CHUNK_BYTES", str(64 * 2**20)))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_rows(n_cols: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, n_cols * itemsize))


def _chunk_logits(
    xc: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    rows: Tensor,
    pos_offset: int,
    exclude_self: bool,
    include_pos: bool,
    y_negatives: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of one row chunk (x already scaled), excluded entries set to -inf.

    Returns (logits (C, Ny + K) or, without y negatives, (C, 1 + K) with the positive first;
    positive column index (C,); positive logit (C,)). The at most two excluded entries per row are
    written by index, so masking costs O(C), not O(C·Ny).
    """
    n_y = y.shape[0]
    pos_col = (rows + pos_offset) % n_y
    pos = (xc * y[pos_col]).sum(1)
    parts = []
    if y_negatives:
        s_y = xc @ y.T
        local = torch.arange(rows.shape[0], device=xc.device)
        if exclude_self:
            self_in_range = rows < n_y
            s_y[local[self_in_range], rows[self_in_range]] = float("-inf")
        # The positive is in or out of the denominator as asked, whatever the self mask said.
        s_y[local, pos_col] = pos if include_pos else float("-inf")
        parts.append(s_y)
    elif include_pos:
        parts.append(pos[:, None])
    if bank is not None and bank.shape[0] > 0:
        parts.append(xc @ bank.T)
    logits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return logits, pos_col, pos


def _prepare(x: Tensor, y: Tensor, bank: Optional[Tensor], scale: Tensor):
    dt = _compute_dtype(x)
    yc = y.to(dt)
    bc = None if bank is None or bank.shape[0] == 0 else bank.to(dt)
    n_cols = y.shape[0] + (0 if bc is None else bc.shape[0])
    return dt, yc, bc, scale.to(dt), _chunk_rows(n_cols, torch.finfo(dt).bits // 8)


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
    dt, yc, bc, sc, step = _prepare(x, y, bank, scale)
    m = x.shape[0]
    lse = torch.empty(m, dtype=dt, device=x.device)
    pos = torch.empty(m, dtype=dt, device=x.device)
    for start in range(0, m, step):
        stop = min(m, start + step)
        rows = torch.arange(start, stop, device=x.device)
        s, _, p = _chunk_logits(x[start:stop].to(dt) * sc, yc, bc, rows, pos_offset, exclude_self, include_pos, y_negatives)
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
    grad_lse scales rows, so it is applied to the (C, D) operands, never to the (C, Ny) chunk.
    """
    dt, yc, bc, sc, step = _prepare(x, y, bank, scale)
    m, n_y = x.shape[0], y.shape[0]
    dx = torch.empty(x.shape, dtype=dt, device=x.device)
    dy = torch.zeros(y.shape, dtype=dt, device=x.device)
    for start in range(0, m, step):
        stop = min(m, start + step)
        rows = torch.arange(start, stop, device=x.device)
        xc = x[start:stop].to(dt)
        s, pos_col, _ = _chunk_logits(xc * sc, yc, bc, rows, pos_offset, exclude_self, include_pos, y_negatives)
        # P overwrites the logits in place: the chunk is the only large buffer we hold.
        p = s.sub_(lse[start:stop, None].to(dt)).exp_()
        g_lse = grad_lse[start:stop, None].to(dt)
        g_pos = grad_pos[start:stop, None].to(dt)
        n_y_cols = n_y if y_negatives else int(include_pos)
        p_y, p_bank = p[:, :n_y_cols], p[:, n_y_cols:]
        if y_negatives:
            dxc = g_lse * (p_y @ yc) + g_pos * yc[pos_col]
            dy.addmm_(p_y.T, g_lse * xc)
            dy.index_add_(0, pos_col, g_pos * xc)
        else:
            # The only y column of row i is its positive: G_i,p(i) = grad_pos_i (+ grad_lse_i·P_i,p(i)).
            coef = g_pos + g_lse * p_y if include_pos else g_pos
            dxc = coef * yc[pos_col]
            dy.index_add_(0, pos_col, coef * xc)
        if p_bank.shape[1] > 0:
            dxc += g_lse * (p_bank @ bc)
        dx[start:stop] = dxc * sc
    return dx.to(x.dtype), (dy * sc).to(y.dtype)
