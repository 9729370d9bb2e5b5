"""Pairwise sigmoid (SigLIP) sums in chunked PyTorch: the CPU default and the portable fallback.

The math of fastssl/ops/pairwise_sigmoid.py (Zhai et al. 2023), written with torch ops over row
chunks so that at most ``chunk x Ny`` logits exist at a time: memory O(N·D + chunk·N), never N².
The forward keeps nothing but the per-row sums; the backward recomputes each chunk's logits.

Logits ℓ_ij = scale·x_i·y_j + bias; the positive column of row i is p(i) = (i + pos_offset) mod Ny
(when has_pos), label_ij = +1 there and −1 elsewhere:

    rows_i = Σ_j softplus(−label_ij·ℓ_ij) = −Σ_j log σ(label_ij·ℓ_ij)

fp64 inputs are computed in fp64 (so that gradcheck works), everything else in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# One chunk budget (FASTSSL_TORCH_CHUNK_BYTES) for every torch kernel.
from fastssl._common import compute_dtype
from fastssl.kernels.torch.pairwise_lse import _chunk_rows


def _pair_terms(xc: Tensor, y: Tensor, scale: Tensor, bias: Tensor, rows: Tensor, pos_offset: int,
                has_pos: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(u (C, Ny), local row index (C,), positive column (C,)) of one row chunk, u = −label·ℓ.

    u is ℓ except at the positives, which are negated by index: O(C) masking, not O(C·Ny). The row
    term is softplus(u) and its derivative in ℓ is σ(u), negated at the positives.
    """
    u = ((scale * xc) @ y.T).add_(bias)  # the scale rides on the (C, D) rows, not on the chunk
    local = torch.arange(rows.shape[0], device=xc.device)
    pos_col = (rows + pos_offset) % y.shape[0]
    if has_pos:
        u[local, pos_col] = -u[local, pos_col]
    return u, local, pos_col


def _softplus_row_sums(u: Tensor) -> Tensor:
    """Σ_j softplus(u_ij), overwriting u. F.softplus returns u itself past u = 20, which is exact in
    fp32 (log1p(e^−20) = 2e-9 < ulp(20)/2) but not in fp64, where −log σ(−u) (no threshold) is used."""
    if u.dtype == torch.float64:
        return F.logsigmoid(u.neg_()).sum(1).neg_()
    return F.softplus(u).sum(1)


def _prepare(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor):
    dt = compute_dtype(x)
    return (dt, x.to(dt).contiguous(), y.to(dt).contiguous(), scale.to(dt), bias.to(dt),
            _chunk_rows(y.shape[0], torch.finfo(dt).bits // 8))  # fmt: skip


def pairwise_sigmoid_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, pos_offset: int,
                             has_pos: bool) -> Tensor:
    """rows (M,): Σ_j softplus(−label_ij·ℓ_ij), in fp32 (fp64 for fp64 inputs). x (M, D), y (Ny, D)."""
    dt, xa, ya, sc, b, step = _prepare(x, y, scale, bias)
    m = x.shape[0]
    out = torch.empty(m, dtype=dt, device=x.device)
    for start in range(0, m, step):
        stop = min(m, start + step)
        rows = torch.arange(start, stop, device=x.device)
        u, _, _ = _pair_terms(xa[start:stop], ya, sc, b, rows, pos_offset, has_pos)
        out[start:stop] = _softplus_row_sums(u)
    return out


def pairwise_sigmoid_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad_rows: Tensor,
                              pos_offset: int, has_pos: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dlogit_rows, dscale_rows) of Σ_i grad_rows_i·rows_i.

    With G_ij = grad_rows_i·∂rows_i/∂ℓ_ij = grad_rows_i·(−label_ij)·σ(−label_ij·ℓ_ij), i.e.
    grad_rows_i·σ(ℓ_ij) off the positive and −grad_rows_i·σ(−ℓ_i,p(i)) on it:
    dx_i = scale·Σ_j G_ij y_j, dy_j = scale·Σ_i G_ij x_i (input dtype), and per row, in the compute
    dtype, dlogit_rows_i = Σ_j G_ij (Σ_i of it is d bias) and dscale_rows_i = Σ_j G_ij x_i·y_j
    (Σ_i of it is d scale, with no division by the scale). grad_rows and scale are folded into
    (C, 1) coefficients of the (C, D) operands, never applied to the (C, Ny) chunk.
    """
    dt, xa, ya, sc, b, step = _prepare(x, y, scale, bias)
    m = x.shape[0]
    dx = torch.empty(x.shape, dtype=dt, device=x.device)
    dy = torch.zeros(y.shape, dtype=dt, device=x.device)
    dlogit = torch.empty(m, dtype=dt, device=x.device)
    dscale = torch.empty(m, dtype=dt, device=x.device)
    for start in range(0, m, step):
        stop = min(m, start + step)
        rows = torch.arange(start, stop, device=x.device)
        xc = xa[start:stop]
        u, local, pos_col = _pair_terms(xc, ya, sc, b, rows, pos_offset, has_pos)
        # ∂/∂ℓ of softplus(−label·ℓ) is −label·σ(−label·ℓ) = σ(u), negated at the positives. In place:
        # the chunk is the only large buffer held.
        w = u.sigmoid_()
        if has_pos:
            w[local, pos_col] = -w[local, pos_col]
        g = grad_rows[start:stop, None].to(dt)
        wy = w @ ya  # (C, D): Σ_j w_ij y_j
        dx[start:stop] = (g * sc) * wy
        dy.addmm_(w.T, (g * sc) * xc)
        dlogit[start:stop] = g[:, 0] * w.sum(1)
        dscale[start:stop] = g[:, 0] * (xc * wy).sum(1)
    return dx.to(x.dtype), dy.to(y.dtype), dlogit, dscale
