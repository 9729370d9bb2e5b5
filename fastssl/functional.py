"""The functional API: each loss is a thin composition over one kernel family (DESIGN.md).

Every function validates its input (fastssl._validation), resolves `backend=` (fastssl.backends),
and either calls the spec in fastssl.reference (backend="reference") or the fused op. Shapes:
z1, z2 are (N, D) embeddings of two views; the loss is a 0-dim fp32 tensor (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import reference
from fastssl._validation import Temperature, check_embeddings, check_positive, check_same, inverse_temperature
from fastssl.backends import resolve_backend
from fastssl.ops.pairwise_lse import pairwise_lse

__all__ = ["nt_xent_loss", "moco_loss", "dcl_loss", "clip_loss", "uniformity", "alignment"]


def _check_pair(z1: object, z2: object, names: tuple[str, str] = ("z1", "z2")) -> tuple[Tensor, Tensor]:
    check_embeddings(names[0], z1)
    check_embeddings(names[1], z2)
    check_same(names[0], z1, names[1], z2)
    return z1, z2


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: Temperature = 0.5, *, backend: str = "auto") -> Tensor:
    """NT-Xent / SimCLR loss (lightly's `NTXentLoss` without a memory bank).

    Z = [n(z1); n(z2)] (2N, D) with n the row L2 normalisation; anchor a has positive a ± N and the
    2N − 1 other rows as candidates: loss = mean_a [LSE_{b≠a}(Z_a·Z_b/τ) − Z_a·Z_pos(a)/τ].

    Args: z1, z2 (N, D), N ≥ 2; temperature τ > 0 (float or 0-dim tensor). Returns a 0-dim loss.
    Memory: O(N·D) on the fused backends (the 2N x 2N logits are never stored).
    """
    _check_pair(z1, z2)
    check_positive("temperature", temperature)
    backend = resolve_backend(backend, z1)
    if backend == "reference":
        return reference.nt_xent_loss(z1, z2, temperature)
    n = z1.shape[0]
    z = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    lse, pos = pairwise_lse(
        z, z, None, inverse_temperature(temperature, z1), pos_offset=n, exclude_self=True, backend=backend
    )
    return (lse - pos).mean()


def moco_loss(
    query: Tensor, key: Tensor, bank: Tensor, temperature: Temperature = 0.5, *, backend: str = "auto"
) -> Tensor:
    """MoCo / InfoNCE with a memory bank (lightly's `NTXentLoss` with `memory_bank_size`).

    q = n(query), k = n(key); the candidates of anchor i are its positive k_i and the K bank rows:
    with s_i+ = q_i·k_i/τ and s_ik = q_i·bank_k/τ, loss = mean_i [LSE({s_i+} ∪ {s_ik}) − s_i+].

    Args: query, key (N, D); bank (K, D), used as given (lightly stores L2-normalised rows) and never
    differentiated; temperature τ > 0. Note lightly's bank tensor is (D, K): pass its transpose.
    """
    _check_pair(query, key, ("query", "key"))
    check_embeddings("bank", bank, min_rows=1)
    check_same("query", query, "bank", bank, dims="D")
    check_positive("temperature", temperature)
    backend = resolve_backend(backend, query)
    if backend == "reference":
        return reference.moco_loss(query, key, bank, temperature)
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    lse, pos = pairwise_lse(
        q, k, bank.detach(), inverse_temperature(temperature, query), y_negatives=False, backend=backend
    )
    return (lse - pos).mean()


def _dcl(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature,
    weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]],
    backend: str,
) -> Tensor:
    """DCL over validated inputs; `weight_fn(a, b)` as in lightly (called on normalised views)."""
    n = z1.shape[0]
    n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    z = torch.cat([n1, n2])
    lse, pos = pairwise_lse(
        z, z, None, inverse_temperature(temperature, z1), pos_offset=n, exclude_self=True, include_pos=False,
        backend=backend,
    )
    if weight_fn is not None:
        weights = torch.cat([weight_fn(n1, n2), weight_fn(n2, n1)]).to(pos.dtype)
        pos = pos * weights
    return (lse - pos).mean()


def _mises_fisher_weights(sigma: float) -> Callable[[Tensor, Tensor], Tensor]:
    """DCLW's w = 2 − N·softmax_i(a_i·b_i/σ), without gradient (lightly's negative_mises_fisher_weights)."""

    def weights(a: Tensor, b: Tensor) -> Tensor:
        sim = (a.detach().float() * b.detach().float()).sum(1) / sigma
        return 2 - a.shape[0] * torch.softmax(sim, dim=0)

    return weights


def dcl_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = 0.1,
    *,
    sigma: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Decoupled contrastive loss (lightly's `DCLLoss`; with `sigma`, `DCLWLoss`).

    The positive is removed from the denominator. For anchor z1_i (and symmetrically z2_i):
    −w_i·s(z1_i, z2_i) + LSE_{j≠i}({z1_i·z1_j} ∪ {z1_i·z2_j})/τ on normalised rows; the loss is the
    mean over the 2N anchors. w = 1, or with σ: w = 2 − N·softmax(n(z1)·n(z2)/σ) (no gradient).

    Args: z1, z2 (N, D), N ≥ 2; temperature τ > 0; sigma > 0 or None. Returns a 0-dim loss.
    """
    _check_pair(z1, z2)
    check_positive("temperature", temperature)
    if sigma is not None:
        check_positive("sigma", sigma)
    backend = resolve_backend(backend, z1)
    if backend == "reference":
        return reference.dcl_loss(z1, z2, temperature, sigma=sigma)
    return _dcl(z1, z2, temperature, None if sigma is None else _mises_fisher_weights(sigma), backend)


def clip_loss(z1: Tensor, z2: Tensor, temperature: Temperature = 0.07, *, backend: str = "auto") -> Tensor:
    """CLIP-style symmetric InfoNCE between two towers.

    S = n(z1)·n(z2)ᵀ/τ (N x N, never stored); loss = ½[mean_i(LSE_j S_ij − S_ii) + mean_j(LSE_i S_ij − S_jj)].

    Args: z1, z2 (N, D); temperature τ > 0, a float or a 0-dim tensor (learnable: its gradient is
    returned). Returns a 0-dim loss.
    """
    _check_pair(z1, z2)
    check_positive("temperature", temperature)
    backend = resolve_backend(backend, z1)
    if backend == "reference":
        return reference.clip_loss(z1, z2, temperature)
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    scale = inverse_temperature(temperature, z1)
    lse_rows, pos = pairwise_lse(a, b, None, scale, backend=backend)
    lse_cols, _ = pairwise_lse(b, a, None, scale, backend=backend)
    return 0.5 * (lse_rows.mean() + lse_cols.mean()) - pos.mean()


def uniformity(z: Tensor, t: float = 2.0, *, backend: str = "auto") -> Tensor:
    """Uniformity of Wang & Isola (2020): log mean_{i≠j} exp(−t·‖z_i − z_j‖²).

    z is used as given (normalise it first, as in the paper). Computed as one LSE per row over
    2t·(z_i·z_j − ‖z_j‖²/2), so large N needs O(N·D) memory. Args: z (N, D), N ≥ 2; t > 0.
    """
    check_embeddings("z", z)
    check_positive("t", t)
    backend = resolve_backend(backend, z)
    if backend == "reference":
        return reference.uniformity(z, t)
    n = z.shape[0]
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    sq_norm = z.to(acc).square().sum(1)
    # −‖z_j‖²/2 rides in extra columns against ones in x; split into a high and a low part so that
    # half-precision inputs do not round it (the row term −t‖z_i‖² is added in fp32 below).
    half_sq_hi = (-0.5 * sq_norm).to(z.dtype)
    half_sq_lo = (-0.5 * sq_norm - half_sq_hi.to(acc)).to(z.dtype)
    x = torch.cat([z, torch.ones(n, 2, dtype=z.dtype, device=z.device)], dim=1)
    y = torch.cat([z, half_sq_hi[:, None], half_sq_lo[:, None]], dim=1)
    scale = torch.full((), 2.0 * float(t), dtype=acc, device=z.device)
    lse, _ = pairwise_lse(x, y, None, scale, exclude_self=True, include_pos=False, backend=backend)
    return torch.logsumexp(lse - t * sq_norm, dim=0) - math.log(n * (n - 1))


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """Alignment of Wang & Isola (2020): mean_i ‖z1_i − z2_i‖^α (O(N·D), no kernel needed)."""
    _check_pair(z1, z2)
    check_positive("alpha", alpha)
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    sq_dist = (z1.to(acc) - z2.to(acc)).square().sum(1)
    # ‖d‖^α = (‖d‖²)^(α/2): no sqrt, whose gradient at identical rows would be NaN.
    return sq_dist.pow(alpha / 2).mean()
