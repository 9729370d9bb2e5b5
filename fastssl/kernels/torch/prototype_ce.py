"""Prototype cross-entropy in chunked PyTorch: the CPU default and the portable fallback.

docs/design.md, kernel family 4; the math is in fastssl/ops/prototype_ce.py. Rows of the student
s (N, D) and of the teacher t (Nt, D) are scored against K prototypes in chunks of R rows: a chunk
holds its R x K logits and nothing larger, with R chosen so that the chunk stays under
FASTSSL_TORCH_CHUNK_BYTES. Memory is O((N + Nt + K)·D + R·K), never N x K (one row of K = 65,536
logits is 256 KiB, so chunking the rows alone is enough; each chunk's softmax is then one
full-width pass). The forward keeps per row the LSE and the softmax-weighted mean of the prototypes;
the backward recomputes each chunk's logits for dW.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl._common import compute_dtype
from fastssl.kernels import PrototypeCEFlags

#: Upper bound on the bytes of one chunk of logits (the only large buffer held at a time).
_CHUNK_BYTES = int(os.environ.get("FASTSSL_TORCH_CHUNK_BYTES", str(64 * 2**20)))

#: Shifted logits below this are dropped (their exp is set to 0). Their total weight, < K·e^-80 in
#: fp32, is far below rounding; kept, their exp would be denormal, and on the CPU a GEMM over denormal
#: weights is an order of magnitude slower (benchmarks/RESULTS.md, "Measurements behind design choices").
_DROP_BELOW = {torch.float32: -80.0, torch.float64: -700.0}


def _chunk_rows(k: int, dtype: torch.dtype) -> int:
    return max(1, _CHUNK_BYTES // max(1, k * torch.finfo(dtype).bits // 8))


def _logits(x: Tensor, a: Tensor, bias: Optional[Tensor], scale: Tensor) -> Tensor:
    """scale·(x·aᵀ − bias), (R, K), written in place into the one new buffer."""
    out = x @ a.T
    if bias is not None:
        out.sub_(bias)
    return out.mul_(scale)


def _exp_shifted(z: Tensor, shift: Tensor) -> Tensor:
    """exp(z − shift) in place of z, with the negligible entries set to exactly 0 (_DROP_BELOW)."""
    z.sub_(shift)
    F.threshold(z, _DROP_BELOW[z.dtype], float("-inf"), inplace=True)
    return z.exp_()


def _prepare(s: Tensor, w: Tensor, t: Tensor, w_t: Optional[Tensor], center: Optional[Tensor]):
    """Row-major copies in the compute dtype (no copy for contiguous fp32/fp64 inputs), once."""
    dt = compute_dtype(s)
    sc, wc, tc = (x.to(dt).contiguous() for x in (s, w, t))
    wtc = wc if w_t is None else w_t.to(dt).contiguous()
    cc = None if center is None else center.to(dt).contiguous()
    return dt, sc, wc, tc, wtc, cc


def _softmax_stats(x: Tensor, a: Tensor, bias: Optional[Tensor], scale: Tensor, v: Optional[Tensor]):
    """Per row of x: lse = LSE_k scale·(x·a_k − bias_k) (R,) and, if v is given, the softmax-weighted
    mean Σ_k softmax_k·v_k (R, D). One exp per logit: exp(z − max) is summed and multiplied into v."""
    n, k = x.shape[0], a.shape[0]
    lse = torch.empty(n, dtype=x.dtype, device=x.device)
    mean = None if v is None else torch.empty(n, v.shape[1], dtype=x.dtype, device=x.device)
    step = _chunk_rows(k, x.dtype)
    for start in range(0, n, step):
        stop = min(n, start + step)
        z = _logits(x[start:stop], a, bias, scale)
        row_max = z.amax(dim=1, keepdim=True)
        p = _exp_shifted(z, row_max)  # unnormalised: the max entry is 1
        total = p.sum(dim=1)
        lse[start:stop] = row_max[:, 0] + total.log()
        if v is not None:
            mean[start:stop] = (p @ v).div_(total[:, None])
    return lse, mean


def prototype_ce_forward(
    s: Tensor,
    w: Tensor,
    t: Tensor,
    w_t: Optional[Tensor],
    center: Optional[Tensor],
    scale_s: Tensor,
    scale_t: Tensor,
    flags: PrototypeCEFlags,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse_s (N,), mean_s (N, D) or (0, D), lse_t (Nt,), mean_t (Nt, D)), fp32 (fp64 for fp64 inputs).

    lse_s_i = LSE_k scale_s·s_i·w_k; mean_s_i = Σ_k softmax_ik·w_k (only if flags.needs_ds: the
    backward's ds). lse_t_j = LSE_k scale_t·(t_j·w_t,k − c_k); mean_t_j = Σ_k p_t,jk·w_k.
    w_t None means w.
    """
    dt, sc, wc, tc, wtc, cc = _prepare(s, w, t, w_t, center)
    lse_s, mean_s = _softmax_stats(sc, wc, None, scale_s.to(dt), wc if flags.needs_ds else None)
    if mean_s is None:
        mean_s = sc.new_empty(0, sc.shape[1])
    lse_t, mean_t = _softmax_stats(tc, wtc, cc, scale_t.to(dt), wc)
    return lse_s, mean_s, lse_t, mean_t


def prototype_ce_backward(
    s: Tensor,
    w: Tensor,
    t: Tensor,
    w_t: Optional[Tensor],
    center: Optional[Tensor],
    scale_s: Tensor,
    scale_t: Tensor,
    lse_s: Tensor,
    lse_t: Tensor,
    grad_lse_s: Optional[Tensor],
    grad_mean_t: Optional[Tensor],
) -> Tensor:
    """dW (K, D) in w's dtype: the gradient of Σ_i g_i·lse_s_i + Σ_j G_j·mean_t_j through w.

        dW_k = scale_s·Σ_i g_i·softmax_s,ik·s_i + Σ_j p_t,jk·G_j

    g = grad_lse_s (N,), G = grad_mean_t (Nt, D); either may be None (zero). Each chunk's
    probabilities are recomputed from the stored LSE; the row coefficients g_i·scale_s are folded
    into the (R, D) operand, never into the (R, K) chunk.
    """
    dt, sc, wc, tc, wtc, cc = _prepare(s, w, t, w_t, center)
    dw = torch.zeros(wc.shape, dtype=dt, device=w.device)
    k = wc.shape[0]
    step = _chunk_rows(k, dt)
    if grad_lse_s is not None:
        scale = scale_s.to(dt)
        coef = grad_lse_s.to(dt) * scale
        for start in range(0, sc.shape[0], step):
            stop = min(sc.shape[0], start + step)
            p = _exp_shifted(_logits(sc[start:stop], wc, None, scale), lse_s[start:stop, None].to(dt))
            dw.addmm_(p.T, coef[start:stop, None] * sc[start:stop])
    if grad_mean_t is not None:
        scale = scale_t.to(dt)
        g = grad_mean_t.to(dt)
        for start in range(0, tc.shape[0], step):
            stop = min(tc.shape[0], start + step)
            p = _exp_shifted(_logits(tc[start:stop], wtc, cc, scale), lse_t[start:stop, None].to(dt))
            dw.addmm_(p.T, g[start:stop])
    return dw.to(w.dtype)
