"""Prototype codes in chunked PyTorch: the LSE pass of the Sinkhorn-Knopp scaling (SwaV, MSN) and the
batch-mean prototype probabilities (MSN's regulariser). The CPU default and the portable fallback.

docs/design.md, kernel family 4; the math is in fastssl/ops/prototype_codes.py. Both run over chunks
of R rows of x that hold R x K logits and nothing larger (the chunking of
fastssl.kernels.torch.prototype_ce, whose helpers they use): never a rows x prototypes matrix.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl._common import compute_dtype
from fastssl.kernels.torch.prototype_ce import _chunk_rows, _exp_shifted, _logits, _softmax_stats


def prototype_lse(x: Tensor, a: Tensor, center: Optional[Tensor], scale: Tensor) -> Tensor:
    """lse_i = LSE_j scale·(x_i·a_j − center_j), (M,) for x (M, D), a (J, D), center (J,) or None.

    fp32 (fp64 for fp64 inputs). Chunks of rows of x, each R x J logits. The Sinkhorn scaling calls
    it both ways round: rows against prototypes, and prototypes against rows (then the chunks are
    tiles of prototypes).
    """
    dt = compute_dtype(x)
    xc, ac = x.to(dt).contiguous(), a.to(dt).contiguous()
    cc = None if center is None else center.to(dt).contiguous()
    return _softmax_stats(xc, ac, cc, scale.to(dt), None)[0]


def prototype_mean_probs_forward(x: Tensor, w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(lse (M,), pbar (K,)): lse_i = LSE_k scale·x_i·w_k and pbar_k = (1/M) Σ_i softmax_ik.

    fp32 (fp64 for fp64 inputs). One pass over row chunks: each chunk's softmax is one full-width
    pass, its column sums are added to pbar.
    """
    dt = compute_dtype(x)
    xc, wc, sc = x.to(dt).contiguous(), w.to(dt).contiguous(), scale.to(dt)
    m, k = xc.shape[0], wc.shape[0]
    lse = torch.empty(m, dtype=dt, device=x.device)
    total = torch.zeros(k, dtype=dt, device=x.device)
    step = _chunk_rows(k, dt)
    for start in range(0, m, step):
        stop = min(m, start + step)
        z = _logits(xc[start:stop], wc, None, sc)
        row_max = z.amax(dim=1, keepdim=True)
        p = _exp_shifted(z, row_max)
        row_sum = p.sum(dim=1, keepdim=True)
        lse[start:stop] = row_max[:, 0] + row_sum[:, 0].log()
        total += p.div_(row_sum).sum(dim=0)
    return lse, total / max(m, 1)


def prototype_mean_probs_backward(
    x: Tensor, w: Tensor, scale: Tensor, lse: Tensor, grad_pbar: Tensor, needs_dx: bool, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    """(dx (M, D) in x's dtype or (0, D), dw (K, D) in w's dtype or (0, D)) of Σ_k h_k·pbar_k, h = grad_pbar.

        dz_ik = (1/M)·p_ik·(h_k − h̄_i),   h̄_i = Σ_k p_ik·h_k
        dx_i = scale·Σ_k dz_ik·w_k,        dw_k = scale·Σ_i dz_ik·x_i

    Each chunk's probabilities are recomputed from the stored lse; dz overwrites them in place.
    """
    dt = compute_dtype(x)
    xc, wc, sc = x.to(dt).contiguous(), w.to(dt).contiguous(), scale.to(dt)
    h = grad_pbar.to(dt)
    m, k = xc.shape[0], wc.shape[0]
    dx = torch.empty(m if needs_dx else 0, xc.shape[1], dtype=dt, device=x.device)
    dw = torch.zeros(k if needs_dw else 0, wc.shape[1], dtype=dt, device=w.device)
    coef = sc / max(m, 1)
    step = _chunk_rows(k, dt)
    for start in range(0, m, step):
        stop = min(m, start + step)
        p = _exp_shifted(_logits(xc[start:stop], wc, None, sc), lse[start:stop, None].to(dt))
        h_bar = p @ h
        dz = p.mul_(h[None, :] - h_bar[:, None]).mul_(coef)  # scale/M folded in: dz·scale
        if needs_dx:
            torch.mm(dz, wc, out=dx[start:stop])
        if needs_dw:
            dw.addmm_(dz.T, xc[start:stop])
    return dx.to(x.dtype), dw.to(w.dtype)
