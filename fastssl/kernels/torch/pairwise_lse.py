"""Pairwise LogSumExp in chunked PyTorch: the CPU default and the portable fallback.

docs/design.md, kernel family 1. The math is the Triton kernels' (fastssl/kernels/triton/pairwise_lse.py),
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

from fastssl._common import compute_dtype
from fastssl.kernels import PairwiseLSEFlags

#: Upper bound on the bytes of one chunk of logits (the backward holds about three such buffers).
_CHUNK_BYTES = int(os.environ.get("FASTSSL_TORCH_CHUNK_BYTES", str(64 * 2**20)))

#: Most rows for which the backward of x-is-y forms G + Gᵀ to share one GEMM (see pairwise_lse_backward).
_SYMMETRIC_MAX_ROWS = 512


def _chunk_rows(n_cols: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, n_cols * itemsize))


def _chunk_logits(
    xc: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    rows: Tensor,
    flags: PairwiseLSEFlags,
    want_pos: bool = True,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Logits of one row chunk (x already scaled), excluded entries set to -inf.

    Returns (logits (C, Ny + K) or, without y negatives, (C, 1 + K) with the positive first;
    positive column index (C,); positive logit (C,), or None when neither `want_pos` nor the
    logits need it). The at most two excluded entries per row are written by index, so masking
    costs O(C), not O(C·Ny).
    """
    n_y = y.shape[0]
    include_pos = flags.include_pos
    pos_col = (rows + flags.pos_offset) % n_y
    pos = (xc * y[pos_col]).sum(1) if want_pos or include_pos else None
    parts = []
    if flags.y_negatives:
        s_y = xc @ y.T
        local = torch.arange(rows.shape[0], device=xc.device)
        if flags.exclude_self:
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
    """Row-major copies in the compute dtype (O(N·D), once), the scale, and the chunk height.

    Strided inputs (VICReg-exp's transposed view) would otherwise make every chunk's gathers and
    elementwise ops walk memory column by column; x and y share one copy when they are one tensor.
    """
    dt = compute_dtype(x)
    xc = x.to(dt).contiguous()
    yc = xc if y is x else y.to(dt).contiguous()
    bc = None if bank is None or bank.shape[0] == 0 else bank.to(dt).contiguous()
    n_cols = y.shape[0] + (0 if bc is None else bc.shape[0])
    return dt, xc, yc, bc, scale.to(dt), _chunk_rows(n_cols, torch.finfo(dt).bits // 8)


def pairwise_lse_forward(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    flags: PairwiseLSEFlags,
) -> tuple[Tensor, Tensor]:
    """Per-row LSE and positive logit, in fp32 (fp64 for fp64 inputs). Shapes (M,), (M,)."""
    dt, xa, yc, bc, sc, step = _prepare(x, y, bank, scale)
    m = x.shape[0]
    lse = torch.empty(m, dtype=dt, device=x.device)
    pos = torch.empty(m, dtype=dt, device=x.device)
    for start in range(0, m, step):
        stop = min(m, start + step)
        rows = torch.arange(start, stop, device=x.device)
        s, _, p = _chunk_logits(xa[start:stop] * sc, yc, bc, rows, flags)
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
    flags: PairwiseLSEFlags,
) -> tuple[Tensor, Tensor]:
    """Gradients (dx, dy) of Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i, in the input dtype; the one
    the flags do not ask for comes back empty, (0, D), and its products are skipped.

    With P_ij = exp(s_ij − lse_i) on the included columns and G_ij = grad_lse_i·P_ij + grad_pos_i·[j = p(i)]:
    dx_i = scale·(Σ_j G_ij y_j + Σ_k G_ik bank_k), dy_j = scale·Σ_i G_ij x_i.
    grad_lse and scale scale rows, so they are folded into (C, 1) coefficients applied to the
    (C, D) operands, never to the (C, Ny) chunk. Where every grad_pos is zero (the positive logit
    unused, as in DCL and VICReg-exp) the positive's gathers are skipped; the test is a host sync,
    so it is made on the CPU only.
    """
    dt, xa, yc, bc, sc, step = _prepare(x, y, bank, scale)
    m, n_y = x.shape[0], y.shape[0]
    want_dx, want_dy = flags.needs_dx, flags.needs_dy
    pos_grad = x.device.type != "cpu" or bool(grad_pos.any())
    # x is y (SimCLR, DCL, VICReg-exp) and one chunk holds every row: dx + dy = (G + Gᵀ)·x·scale
    # is one GEMM instead of two. Each of dx, dy gets half of it: the sum is what the op's caller
    # uses, and Σ x·dx = Σ x·dy = Σ G_ij x_i·x_j·scale still gives d scale (ops/pairwise_lse.py).
    # Only where the M x M transpose-add is cheaper than the GEMM it saves: it stays in cache
    # (M ≤ _SYMMETRIC_MAX_ROWS) and D ≥ 128 (benchmarks/RESULTS.md, "Measurements behind design choices").
    symmetric = (
        y is x and want_dx and want_dy and flags.y_negatives and step >= m and m <= _SYMMETRIC_MAX_ROWS
        and x.shape[1] >= 128
    )  # fmt: skip
    dx = torch.empty(x.shape if want_dx else (0, x.shape[1]), dtype=dt, device=x.device)
    dy_shape = y.shape if want_dy else (0, y.shape[1])
    dy = (torch.empty if symmetric else torch.zeros)(dy_shape, dtype=dt, device=x.device)
    n_y_cols = n_y if flags.y_negatives else int(flags.include_pos)
    for start in range(0, m, step):
        stop = min(m, start + step)
        rows = torch.arange(start, stop, device=x.device)
        xc = xa[start:stop]
        s, pos_col, _ = _chunk_logits(xc * sc, yc, bc, rows, flags, want_pos=False)
        # P overwrites the logits in place: the chunk is the only large buffer we hold.
        p = s.sub_(lse[start:stop, None].to(dt)).exp_()
        g_lse = grad_lse[start:stop, None].to(dt) * sc
        g_pos = grad_pos[start:stop, None].to(dt) * sc
        p_y, p_bank = p[:, :n_y_cols], p[:, n_y_cols:]
        if symmetric:
            g = p_y.mul_(g_lse)  # G = grad_lse·P (+ grad_pos at the positives), in place of P
            if pos_grad:
                g[torch.arange(m, device=x.device), pos_col] += g_pos[:, 0]
            dx.copy_((g + g.T).mul_(0.5) @ yc)
            dy.copy_(dx)
            continue
        if flags.y_negatives:
            dxc = g_lse * (p_y @ yc) if want_dx else None
            if want_dy:
                dy.addmm_(p_y.T, g_lse * xc)
            if pos_grad:
                if want_dx:
                    dxc += g_pos * yc[pos_col]
                if want_dy:
                    dy.index_add_(0, pos_col, g_pos * xc)
        else:
            # The only y column of row i is its positive: G_i,p(i) = grad_pos_i (+ grad_lse_i·P_i,p(i)).
            coef = g_pos + g_lse * p_y if flags.include_pos else g_pos
            dxc = coef * yc[pos_col] if want_dx else None
            if want_dy:
                dy.index_add_(0, pos_col, coef * xc)
        if want_dx:
            if p_bank.shape[1] > 0:
                dxc += g_lse * (p_bank @ bc)
            dx[start:stop] = dxc
    return dx.to(x.dtype), dy.to(y.dtype)
