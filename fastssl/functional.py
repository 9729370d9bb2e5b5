"""The functional API: each loss is a thin composition over one kernel family (docs/design.md).

Every function validates its input (fastssl._validation), resolves `backend=` (fastssl.backends),
and either calls the spec in fastssl.reference (backend="reference") or the fused op. Shapes:
z1, z2 are (N, D) embeddings of two views; the loss is a 0-dim fp32 tensor (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import distributed, reference
from fastssl._common import compute_dtype
from fastssl._validation import (
    Temperature,
    check_embeddings,
    check_finite_scalar,
    check_labels,
    check_loss_dim,
    check_nonnegative,
    check_norm_degree,
    check_pair,
    check_positive,
    check_route,
    check_same,
    check_unit_interval,
    inverse_temperature,
    scalar_tensor,
)
from fastssl.backends import resolve
from fastssl.kernels import PairwiseLSEFlags
from fastssl.ops.frobenius import choose_side, op_route, sq_frobenius
from fastssl.ops.pairwise_lse import pairwise_lse
from fastssl.ops.pairwise_lse_distributed import pairwise_lse_global
from fastssl.ops.pairwise_max import pairwise_max
from fastssl.ops.pairwise_sigmoid import pairwise_sigmoid
from fastssl.ops.pairwise_sigmoid_distributed import pairwise_sigmoid_global
from fastssl.ops.prototype_ce import prototype_ce
from fastssl.ops.prototype_codes import lse_over_ranks, prototype_mean_probs, sinkhorn_scaling
from fastssl.ops.reductions import column_dot, column_mean_var
from fastssl.ops.worst_pair import worst_pair

__all__ = [
    "nt_xent_loss",
    "moco_loss",
    "dcl_loss",
    "clip_loss",
    "uniformity",
    "alignment",
    "barlow_twins_loss",
    "vicreg_loss",
    "spectral_contrastive_loss",
    "vicreg_exp_loss",
    "vicreg_ctr_loss",
    "arcl_loss",
    "macl_loss",
    "directclr_loss",
    "frossl_loss",
    "tico_loss",
    "koleo_loss",
    "dino_loss",
    "dino_loss_from_logits",
    "DINOLossOutput",
    "ibot_patch_loss",
    "ibot_patch_loss_from_logits",
    "siglip_loss",
    "supcon_loss",
    "swav_loss",
    "swav_loss_from_scores",
    "msn_loss",
]


# --------------------------------------------------------------------------------------------------
# gather_distributed (docs/design.md, "Scale past one device"; the semantics per loss are in
# docs/distributed.md). Contrastive losses keep their anchors local and take columns from every rank
# (fastssl/ops/pairwise_lse_distributed.py); their per-anchor terms are reduced with
# distributed.global_mean, so that DDP's average over ranks is the mean over the global batch.
# --------------------------------------------------------------------------------------------------


def _local_rows(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    flags: PairwiseLSEFlags,
    mode: Optional[Union[bool, str]],
    backend: str,
    sizes: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """(lse, pos, reduce): the pairwise-LSE op on this rank's rows x against y's columns of every
    rank (mode None: just this process's), and the reduction of per-row terms — the mean, or this
    rank's share of the global mean. x and y have equal rows on each rank (`sizes`, exchanged when None)."""
    if mode is None:
        lse, pos = pairwise_lse(x, y, bank, scale, flags, backend=backend)
        return lse, pos, torch.mean
    sizes = distributed.batch_sizes(x) if sizes is None else sizes
    lse, pos = pairwise_lse_global(x, y, bank, scale, flags, mode=mode, sizes=sizes, backend=backend)
    return lse, pos, lambda values: distributed.global_mean(values, sizes)


#: SimCLR's and DCL's rows over Z = [z1; z2] (2N rows): self excluded, the positive N rows away is
#: returned apart from the LSE (InfoNCE adds it back through a softplus; DCL leaves it out).
def _two_view_flags(n: int) -> PairwiseLSEFlags:
    return PairwiseLSEFlags(pos_offset=n, exclude_self=True, include_pos=False)


#: Columns without the positive in the LSE (CLIP's and MoCo's rows; the positive is returned apart).
_POSITIVE_APART = PairwiseLSEFlags(include_pos=False)


def _normalize(z: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, computed in compute_dtype(z) and rounded once to z's dtype.

    Why not F.normalize(z) in half precision: its backward, g/‖z‖ − z(z·g)/‖z‖³, then rounds each
    term to fp16/bf16 before they cancel. The exact gradient is orthogonal to z (zero at D = 1), and
    those roundings leave an ulp of g/‖z‖ instead (0.06 at N = 2, D = 1, τ = 0.5 in fp16). In fp32
    the cancellation keeps full precision and the result is rounded once.
    """
    return F.normalize(z.to(compute_dtype(z)), dim=-1).to(z.dtype)


def _info_nce(lse_negatives: Tensor, pos: Tensor) -> Tensor:
    """Per-row InfoNCE −pos + log(exp(pos) + exp(lse_negatives)), as softplus(lse_negatives − pos).

    Why not lse_all − pos: on well-separated rows lse_all ≈ pos ≈ 1/τ and both carry an fp32 ulp of
    1/τ (~1e-6 at τ = 0.07), so the difference — and the backward's 1 − P_pos — would keep only a few
    digits of a loss of ~1e-3. lse_negatives − pos is a large, well-resolved gap, and softplus and
    its derivative sigmoid are exact there: value and gradients keep full fp32 relative precision.
    """
    return F.softplus(lse_negatives - pos)


def nt_xent_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = 0.5,
    *,
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """NT-Xent / SimCLR loss (lightly's `NTXentLoss` without a memory bank).

    Z = [n(z1); n(z2)] (2N, D) with n the row L2 normalisation; anchor a has positive a ± N and the
    2N − 1 other rows as candidates: loss = mean_a [LSE_{b≠a}(Z_a·Z_b/τ) − Z_a·Z_pos(a)/τ].

    Args: z1, z2 (N, D), N ≥ 2; temperature τ > 0 (float or 0-dim tensor). Returns a 0-dim loss.
    Memory: O(N·D) on the fused backends (the 2N x 2N logits are never stored).

    gather_distributed (True or "ring"; lightly's semantics): this rank's 2n anchors against the
    columns of every rank (2N − 1 candidates); the loss is this rank's share of the global mean,
    so the average over ranks is the single-process loss of the concatenated batch.
    """
    check_pair(z1, z2)
    check_positive("temperature", temperature)
    backend, mode = resolve(backend, z1, gather_distributed)
    if backend == "reference":
        return reference.nt_xent_loss(z1, z2, temperature)
    z = torch.cat([_normalize(z1), _normalize(z2)])
    scale = inverse_temperature(temperature, z1)
    lse_negatives, pos, reduce = _local_rows(z, z, None, scale, _two_view_flags(z1.shape[0]), mode, backend)
    return reduce(_info_nce(lse_negatives, pos))


def moco_loss(
    query: Tensor,
    key: Tensor,
    bank: Tensor,
    temperature: Temperature = 0.5,
    *,
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """MoCo / InfoNCE with a memory bank (lightly's `NTXentLoss` with `memory_bank_size`).

    q = n(query), k = n(key); the candidates of anchor i are its positive k_i and the K bank rows:
    with s_i+ = q_i·k_i/τ and s_ik = q_i·bank_k/τ, loss = mean_i [LSE({s_i+} ∪ {s_ik}) − s_i+].

    Args: query, key (N, D); bank (K, D), used as given (lightly stores L2-normalised rows) and never
    differentiated; temperature τ > 0. Note lightly's bank tensor is (D, K): pass its transpose.

    gather_distributed: the negatives are the bank's (no columns travel); the loss is this rank's
    share of the global mean over the anchors of all ranks. (The module also enqueues every rank's
    keys, as lightly's memory bank does.)
    """
    check_pair(query, key, ("query", "key"))
    check_embeddings("bank", bank, min_rows=1)
    check_same("query", query, "bank", bank, dims="D")
    check_positive("temperature", temperature)
    backend, mode = resolve(backend, query, gather_distributed)
    if backend == "reference":
        return reference.moco_loss(query, key, bank, temperature)
    q, k = _normalize(query), _normalize(key)
    flags = PairwiseLSEFlags(include_pos=False, y_negatives=False)  # k_i is the positive, the bank the negatives
    scale = inverse_temperature(temperature, query)
    lse_negatives, pos, reduce = _local_rows(q, k, bank.detach(), scale, flags, mode, backend)
    return reduce(_info_nce(lse_negatives, pos))


def _dcl(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature,
    weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]],
    backend: str,
    mode: Optional[Union[bool, str]] = None,
) -> Tensor:
    """DCL over validated inputs; `weight_fn(a, b)` as in lightly (called on normalised views — this
    rank's, under a gather, as lightly does). `mode`: an active gather mode or None."""
    n = z1.shape[0]
    n1, n2 = _normalize(z1), _normalize(z2)
    z = torch.cat([n1, n2])
    lse, pos, reduce = _local_rows(z, z, None, inverse_temperature(temperature, z1), _two_view_flags(n), mode, backend)
    if weight_fn is not None:
        weights = torch.cat([weight_fn(n1, n2), weight_fn(n2, n1)]).to(pos.dtype)
        pos = pos * weights
    return reduce(lse - pos)


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
    weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """Decoupled contrastive loss (lightly's `DCLLoss`; with `sigma`, `DCLWLoss`).

    The positive is removed from the denominator. For anchor z1_i (and symmetrically z2_i):
    −w_i·s(z1_i, z2_i) + LSE_{j≠i}({z1_i·z1_j} ∪ {z1_i·z2_j})/τ on normalised rows; the loss is the
    mean over the 2N anchors. w = 1, or with σ: w = 2 − N·softmax(n(z1)·n(z2)/σ) (no gradient),
    or w = weight_fn(a, b) for the normalised views (lightly's `weight_fn`: (N,) weights).

    Args: z1, z2 (N, D), N ≥ 2; temperature τ > 0; sigma > 0 or None; weight_fn or None (not with
    sigma; not on backend="reference", whose spec knows σ only). Returns a 0-dim loss.

    gather_distributed (True or "ring"; lightly's semantics): local anchors against every rank's
    columns, this rank's share of the global mean; the σ weights' softmax runs over this rank's
    batch, as lightly's weight_fn does.
    """
    check_pair(z1, z2)
    check_positive("temperature", temperature)
    if sigma is not None:
        check_positive("sigma", sigma)
        if weight_fn is not None:
            raise ValueError("dcl_loss takes sigma (DCLW's weights) or weight_fn, not both")
        weight_fn = _mises_fisher_weights(sigma)
    elif weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable (a, b) -> (N,) weights or None, got {type(weight_fn).__name__}")
    backend, mode = resolve(backend, z1, gather_distributed)
    if backend == "reference":
        if weight_fn is not None and sigma is None:
            raise ValueError("backend='reference' supports no custom weight_fn (DCLW's sigma weights only)")
        return reference.dcl_loss(z1, z2, temperature, sigma=sigma)
    return _dcl(z1, z2, temperature, weight_fn, backend, mode)


def clip_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = 0.07,
    *,
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """CLIP-style symmetric InfoNCE between two towers.

    S = n(z1)·n(z2)ᵀ/τ (N x N, never stored); loss = ½[mean_i(LSE_j S_ij − S_ii) + mean_j(LSE_i S_ij − S_jj)].

    Args: z1, z2 (N, D); temperature τ > 0, a float or a 0-dim tensor (learnable: its gradient is
    returned). Returns a 0-dim loss.

    gather_distributed (True or "ring"; not in lightly — the single-process objective on the
    concatenated batch): this rank's rows of S against every rank's columns and its columns against
    every rank's rows (open_clip's "local loss"); the average over ranks is the global loss.
    """
    check_pair(z1, z2)
    check_positive("temperature", temperature)
    backend, mode = resolve(backend, z1, gather_distributed)
    if backend == "reference":
        return reference.clip_loss(z1, z2, temperature)
    a, b = _normalize(z1), _normalize(z2)
    scale = inverse_temperature(temperature, z1)
    sizes = None if mode is None else distributed.batch_sizes(a)
    lse_rows, pos_rows, reduce = _local_rows(a, b, None, scale, _POSITIVE_APART, mode, backend, sizes)
    lse_cols, pos_cols, _ = _local_rows(b, a, None, scale, _POSITIVE_APART, mode, backend, sizes)
    return 0.5 * (reduce(_info_nce(lse_rows, pos_rows)) + reduce(_info_nce(lse_cols, pos_cols)))


def uniformity(z: Tensor, t: float = 2.0, *, backend: str = "auto") -> Tensor:
    """Uniformity of Wang & Isola (2020): log mean_{i≠j} exp(−t·‖z_i − z_j‖²).

    z is used as given (normalise it first, as in the paper). Computed as one LSE per row over
    2t·(z_i·z_j − ‖z_j‖²/2), so large N needs O(N·D) memory. Args: z (N, D), N ≥ 2; t > 0.
    """
    check_embeddings("z", z)
    check_positive("t", t)
    backend, _ = resolve(backend, z, False)
    if backend == "reference":
        return reference.uniformity(z, t)
    n = z.shape[0]
    acc = compute_dtype(z)
    sq_norm = z.to(acc).square().sum(1)
    # −‖z_j‖²/2 rides in extra columns against ones in x; split into a high and a low part so that
    # half-precision inputs do not round it (the row term −t‖z_i‖² is added in fp32 below).
    half_sq_hi = (-0.5 * sq_norm).to(z.dtype)
    half_sq_lo = (-0.5 * sq_norm - half_sq_hi.to(acc)).to(z.dtype)
    x = torch.cat([z, torch.ones(n, 2, dtype=z.dtype, device=z.device)], dim=1)
    y = torch.cat([z, half_sq_hi[:, None], half_sq_lo[:, None]], dim=1)
    scale = torch.full((), 2.0 * float(t), dtype=acc, device=z.device)
    lse, _ = pairwise_lse(x, y, None, scale, PairwiseLSEFlags(exclude_self=True, include_pos=False), backend=backend)
    return torch.logsumexp(lse - t * sq_norm, dim=0) - math.log(n * (n - 1))


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """Alignment of Wang & Isola (2020): mean_i ‖z1_i − z2_i‖^α (O(N·D), no kernel needed)."""
    check_pair(z1, z2)
    check_positive("alpha", alpha)
    acc = compute_dtype(z1)
    sq_dist = (z1.to(acc) - z2.to(acc)).square().sum(1)
    # ‖d‖^α = (‖d‖²)^(α/2): no sqrt, whose gradient at identical rows would be NaN.
    return sq_dist.pow(alpha / 2).mean()


# --------------------------------------------------------------------------------------------------
# The off-diagonal Frobenius family (docs/design.md, family 2). Each loss computes its O(N·D) parts with
# torch ops (statistics, diagonals, invariance) and its one O(N·D·min(N, D)) part, the squared
# Frobenius norm of a cross product, with the fused op on the route that `route` names:
# "covariance" = the D x D side, "gram" = the N x N side, "auto" = the smaller one.
# The per-column normalisation (batch norm, centring, norm clip) is passed to the op and to the
# diagonal (column_dot) as a shift and scale, never written out as a normalised copy; both apply it
# identically (rounded to the input dtype), so off-diagonal sums do not inherit a diagonal's rounding.
# --------------------------------------------------------------------------------------------------


def _check_vicreg_weights(lambda_param: float, mu_param: float, nu_param: float, eps: float) -> None:
    """λ, μ, ν ≥ 0 and eps > 0 (VICReg, VICReg-exp, VICReg-ctr); a ValueError naming the argument."""
    for name, value in (("lambda_param", lambda_param), ("mu_param", mu_param), ("nu_param", nu_param)):
        check_nonnegative(name, value)
    check_positive("eps", eps)


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    lambda_param: float = 5e-3,
    *,
    gather_distributed: bool = False,
    route: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """Barlow Twins (lightly's `BarlowTwinsLoss`).

    A, B = per-dimension batch norms of z1, z2 (biased variance, eps 1e-5); C = AᵀB/N (D x D, never
    stored on the Gram route):

        loss = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²,   Σ_{i≠j} C_ij² = ‖AᵀB‖²_F/N² − Σ_i C_ii²

    ‖AᵀB‖²_F is computed on the D x D side (cost N·D²) or as ⟨AAᵀ, BBᵀ⟩_F on the N x N side (N²·D).
    The batch norm is folded into the op's loads (A and B are never written).

    Args: z1, z2 (N, D), N ≥ 2; lambda_param λ ≥ 0; route "auto" | "covariance" | "gram".
    Returns a 0-dim loss (fp32; fp64 for fp64 inputs).

    gather_distributed=True (lightly's semantics, #1977-correct): each rank batch-normalises its own
    slice and C = (1/W) Σ_r C_r is the mean of the ranks' C_r = A_rᵀB_r/n_r; every rank returns the
    same loss of that C. See :func:`_barlow_twins_distributed`.
    """
    check_pair(z1, z2)
    check_nonnegative("lambda_param", lambda_param)
    check_route(route)
    backend, mode = resolve(backend, z1, gather_distributed, ring=False, op="sq_frobenius")
    if backend == "reference":
        return reference.barlow_twins_loss(z1, z2, lambda_param)
    if mode is not None:
        return _barlow_twins_distributed(z1, z2, lambda_param, route, backend)
    n, d = z1.shape
    mean1, var1 = column_mean_var(z1, unbiased=False)
    mean2, var2 = column_mean_var(z2, unbiased=False)
    norm = dict(a_shift=mean1, a_scale=torch.rsqrt(var1 + 1e-5), b_shift=mean2, b_scale=torch.rsqrt(var2 + 1e-5))
    c_diag = column_dot(z1, z2, **norm) / n
    frob = sq_frobenius(z1, z2, **norm, route=op_route(choose_side(n, d, route), True), backend=backend) / (n * n)
    return (1.0 - c_diag).square().sum() + lambda_param * (frob - c_diag.square().sum())


def _barlow_twins_distributed(z1: Tensor, z2: Tensor, lambda_param: float, route: str, backend: str) -> Tensor:
    """Barlow Twins on W ranks with lightly's per-rank batch norm: C = (1/W) Σ_r A_rᵀB_r/n_r.

    With Â_r = A_r/√n_r (and B̂_r), C = ÂᵀB̂/W for the row-concatenations Â, B̂ (N, D), so

        diag C = all_reduce(Σ_rows Â_r ∘ B̂_r)/W     (an autograd-aware all-reduce of D numbers)
        ‖C‖²_F = ‖ÂᵀB̂‖²_F / W²                      (the Frobenius op on the gathered Â, B̂)

    and no D x D matrix is formed (on the Gram route; the op chooses as in the single-process loss).
    The normalised slices are written (O(n·D)) because each rank's statistics differ, so the
    per-column transform of the op cannot express them. The gathered work is repeated on every rank
    and every rank returns the same loss; the gather's and the all-reduce's backward sum over the
    ranks, so DDP's average gives the gradient of that loss.
    """
    sizes = distributed.batch_sizes(z1)
    w, n, d = len(sizes), z1.shape[0], z1.shape[1]
    acc = compute_dtype(z1)

    def normalised(z: Tensor) -> Tensor:
        mean, var = column_mean_var(z, unbiased=False)
        # Rounded to the input dtype once, so that diag C and ‖C‖² see the very same operands.
        return ((z.to(acc) - mean) * (torch.rsqrt(var + 1e-5) / math.sqrt(n))).to(z.dtype)

    a, b = normalised(z1), normalised(z2)
    c_diag = distributed.all_reduce(column_dot(a, b)) / w
    a_all, b_all = distributed.gather_cat(a, sizes), distributed.gather_cat(b, sizes)
    side = op_route(choose_side(sum(sizes), d, route), True)
    frob = sq_frobenius(a_all, b_all, route=side, backend=backend) / (w * w)
    return (1.0 - c_diag).square().sum() + lambda_param * (frob - c_diag.square().sum())


def _vicreg_variance_covariance(z: Tensor, eps: float, route: str, backend: str) -> tuple[Tensor, Tensor]:
    """VICReg's v(z) = mean_d relu(1 − sqrt(Var_d + eps)) and c(z) = (1/D) Σ_{i≠j} Cov_ij² for z (N, D)."""
    n, d = z.shape
    mean, _ = column_mean_var(z, unbiased=True)
    # Var_d = Cov_dd, from the same centred (rounded) operand as the Frobenius norm.
    cov_diag = column_dot(z, None, a_shift=mean) / (n - 1)
    variance = F.relu(1.0 - torch.sqrt(cov_diag + eps)).mean()
    side = op_route(choose_side(n, d, route), True)
    frob = sq_frobenius(z, None, a_shift=mean, route=side, backend=backend) / (n - 1) ** 2
    return variance, (frob - cov_diag.square().sum()) / d


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
    *,
    gather_distributed: bool = False,
    route: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """VICReg (lightly's `VICRegLoss`): λ·inv + μ·½[v(z1) + v(z2)] + ν·[c(z1) + c(z2)].

    inv = mean (z1 − z2)² (MSE over all N·D entries); v(z) = mean_d relu(1 − sqrt(Var_d(z) + eps))
    (unbiased variance); c(z) = (1/D) Σ_{i≠j} Cov_ij², Cov = XᵀX/(N − 1) with X the column-centred z,
    and Σ_{i≠j} Cov_ij² = ‖XᵀX‖²_F/(N − 1)² − Σ_i Var_i². ‖XᵀX‖²_F = ‖XXᵀ‖²_F: the D x D side costs
    N·D², the N x N side N²·D, so a (256, 65536) batch never builds a 65536² covariance. The
    centring is folded into the op's loads (X is never written).

    Args: z1, z2 (N, D), N ≥ 2; λ, μ, ν ≥ 0; eps > 0; route "auto" | "covariance" | "gram".
    Returns a 0-dim loss.

    gather_distributed=True (lightly's semantics): the invariance term is this rank's (its share of
    the global mean), then z1, z2 are gathered and v, c are those of the global batch (computed on
    every rank). The average over ranks is the single-process loss of the concatenated batch.
    """
    check_pair(z1, z2)
    _check_vicreg_weights(lambda_param, mu_param, nu_param, eps)
    check_route(route)
    backend, mode = resolve(backend, z1, gather_distributed, ring=False, op="sq_frobenius")
    if backend == "reference":
        return reference.vicreg_loss(z1, z2, lambda_param, mu_param, nu_param, eps)
    acc = compute_dtype(z1)
    if mode is not None:
        sizes = distributed.batch_sizes(z1)
        # mean over N·D entries = mean over the N rows of each row's mean square.
        invariance = distributed.global_mean((z1.to(acc) - z2.to(acc)).square().mean(1), sizes)
        z1, z2 = distributed.gather_cat(z1, sizes), distributed.gather_cat(z2, sizes)
    else:
        invariance = (z1.to(acc) - z2.to(acc)).square().mean()
    v1, c1 = _vicreg_variance_covariance(z1, eps, route, backend)
    v2, c2 = _vicreg_variance_covariance(z2, eps, route, backend)
    return lambda_param * invariance + mu_param * 0.5 * (v1 + v2) + nu_param * (c1 + c2)


def spectral_contrastive_loss(
    z1: Tensor,
    z2: Tensor,
    mu: float = 1.0,
    *,
    gather_distributed: bool = False,
    route: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """Spectral contrastive loss (HaoChen et al. 2021), as the authors' code computes it.

    Rows with ‖z‖ ≥ √μ are scaled back to radius √μ. With a, b the clipped z1, z2 (N, D):

        part1 = −(2/N) Σ_i a_i·b_i
        part2 = Σ_{i≠j} (a_i·b_j)² / (N(N − 1)),   Σ_{i≠j} (a_i·b_j)² = ‖abᵀ‖²_F − Σ_i (a_i·b_i)²
        loss  = (part1 + part2)/μ

    ‖abᵀ‖²_F = ⟨aᵀa, bᵀb⟩_F: the N x N side costs N²·D, the D x D side N·D² (auto: the smaller),
    so N = 65,536 at D = 64 never builds the 65536² matrix abᵀ. The clip is a per-row scale folded
    into the op's loads.

    Args: z1, z2 (N, D), N ≥ 2; mu μ > 0; route "auto" | "covariance" | "gram". Returns a 0-dim loss.

    gather_distributed=True (not in lightly): the single-process loss of the concatenated batch,
    computed by every rank on the gathered z1, z2 (part2 pairs samples of different ranks).
    """
    check_pair(z1, z2)
    check_positive("mu", mu)
    check_route(route)
    backend, mode = resolve(backend, z1, gather_distributed, ring=False, op="sq_frobenius")
    if backend == "reference":
        return reference.spectral_contrastive_loss(z1, z2, mu)
    if mode is not None:
        sizes = distributed.batch_sizes(z1)
        z1, z2 = distributed.gather_cat(z1, sizes), distributed.gather_cat(z2, sizes)
    n, d = z1.shape
    radius = math.sqrt(mu)

    def clip_scale(z: Tensor) -> Tensor:
        """Per-row factor: 1 inside the √μ ball, √μ/‖z_i‖ outside (F.normalize's eps guards ‖z_i‖ = 0)."""
        norm = torch.linalg.vector_norm(z.to(compute_dtype(z)), dim=1)
        return torch.where(norm.detach() < radius, torch.ones_like(norm), radius / norm.clamp_min(1e-12))

    # The op's rows are dimensions: a.T, b.T are (D, N) views, read through strides, and the clip
    # is a scale per column (sample).
    clip = dict(a_scale=clip_scale(z1), b_scale=clip_scale(z2))
    row_dots = column_dot(z1.T, z2.T, **clip)
    frob = sq_frobenius(z1.T, z2.T, **clip, route=op_route(choose_side(n, d, route), False), backend=backend)
    part1 = -2.0 * row_dots.sum() / n
    part2 = (frob - row_dots.square().sum()) / (n * (n - 1))
    return (part1 + part2) / mu


# --------------------------------------------------------------------------------------------------
# VICReg-exp / VICReg-ctr (Garrido et al. 2023): the covariance penalty as a LogSumExp, computed by the
# pairwise-LSE op (family 1) on the centred, transposed embeddings — the sample-/dimension-contrastive
# duality made literal: one kernel, two orientations, no D x D (or N x N) matrix.
# --------------------------------------------------------------------------------------------------


def _vicreg_exp_terms(z: Tensor, temperature: Temperature, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """VICReg's variance hinge v(z) and c_exp(z) = (1/D) Σ_d LSE_{e≠d} Cov(z)_de/τ for z (N, D).

    One pass of column statistics serves both terms (Cov unbiased over the N rows). Cov = xxᵀ with
    x = ((z − z̄)/√(N − 1))ᵀ, a (D, N) transposed view of the centred copy: each dimension is a row
    of the pairwise-LSE op, its own column excluded, no positive.
    """
    n = z.shape[0]
    mean, var = column_mean_var(z, unbiased=True)
    variance = F.relu(1.0 - torch.sqrt(var + eps)).mean()
    x = ((z.to(mean.dtype) - mean) / math.sqrt(n - 1)).to(z.dtype).T
    flags = PairwiseLSEFlags(exclude_self=True, include_pos=False)
    lse, _ = pairwise_lse(x, x, None, inverse_temperature(temperature, z), flags, backend=backend)
    return variance, lse.mean()


def _vicreg_exp(
    z1: Tensor, z2: Tensor, temperature: Temperature, lambda_param: float, mu_param: float, nu_param: float,
    eps: float, backend: str,
) -> Tensor:  # fmt: skip
    """VICReg-exp of validated, single-process (or already gathered) z1, z2 on a concrete backend."""
    acc = compute_dtype(z1)
    invariance = (z1.to(acc) - z2.to(acc)).square().mean()
    v1, c1 = _vicreg_exp_terms(z1, temperature, eps, backend)
    v2, c2 = _vicreg_exp_terms(z2, temperature, eps, backend)
    return lambda_param * invariance + mu_param * 0.5 * (v1 + v2) + nu_param * (c1 + c2)


def _check_vicreg_exp_args(
    z1: object, z2: object, temperature: object, lambda_param: float, mu_param: float, nu_param: float, eps: float,
    what: str,
) -> None:  # fmt: skip
    """The arguments of VICReg-exp / VICReg-ctr: a pair with D ≥ 2 (`what` names the D axis), τ > 0, the weights."""
    check_pair(z1, z2)
    if z1.shape[1] < 2:
        raise ValueError(f"{what}, got shape {tuple(z1.shape)}")
    check_positive("temperature", temperature)
    _check_vicreg_weights(lambda_param, mu_param, nu_param, eps)


def vicreg_exp_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = reference.VICREG_EXP_TEMPERATURE,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """VICReg-exp (Garrido et al. 2023): VICReg whose covariance penalty is a LogSumExp over dimensions.

        c_exp(z) = (1/D) Σ_d LSE_{e≠d} Cov(z)_de/τ,   Cov = (z − z̄)ᵀ(z − z̄)/(N − 1)
        loss     = λ·mean(z1 − z2)² + μ·½[v(z1) + v(z2)] + ν·[c_exp(z1) + c_exp(z2)]

    v is VICReg's variance hinge. Each dimension is an anchor contrasted against the other D − 1
    (no positive, as DCL's negative LSE). Default τ = 0.1: the variance hinge keeps Cov entries
    correlation-sized, the range of cosine similarities, and 0.1 is DCL's default for that range
    (the reasoning is in fastssl.reference.vicreg_exp_loss). Memory O(N·D): the D x D covariance
    is never built.

    Args: z1, z2 (N, D), N ≥ 2, D ≥ 2; temperature τ > 0; λ, μ, ν ≥ 0; eps > 0. Returns a 0-dim loss.

    gather_distributed=True (not in lightly): the single-process loss of the concatenated batch,
    computed by every rank on the gathered z1, z2 (the covariance needs every sample; "ring" does
    not apply, since its columns are dimensions, not samples).
    """
    weights = (lambda_param, mu_param, nu_param, eps)
    _check_vicreg_exp_args(z1, z2, temperature, *weights, "vicreg_exp_loss needs D ≥ 2 dimensions to contrast")
    backend, mode = resolve(backend, z1, gather_distributed, ring=False)
    if backend == "reference":
        return reference.vicreg_exp_loss(z1, z2, temperature, *weights)
    if mode is not None:
        sizes = distributed.batch_sizes(z1)
        z1, z2 = distributed.gather_cat(z1, sizes), distributed.gather_cat(z2, sizes)
    return _vicreg_exp(z1, z2, temperature, *weights, backend)


def vicreg_ctr_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = reference.VICREG_EXP_TEMPERATURE,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
    *,
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """VICReg-ctr (Garrido et al. 2023): VICReg-exp applied to zᵀ, the sample-contrastive side of the duality.

    ``vicreg_ctr_loss(z1, z2) == vicreg_exp_loss(z1.T, z2.T)``: the variance hinge is over each
    sample's D coordinates (unbiased), and c_ctr(z) = (1/N) Σ_i LSE_{j≠i} G(z)_ij/τ with
    G = (z − z̄_row)(z − z̄_row)ᵀ/(D − 1), the Gram matrix of the row-centred embeddings. The
    invariance term is unchanged. Default τ = 0.1, as VICReg-exp. Memory O(N·D): no N x N matrix.

    Args: z1, z2 (N, D), N ≥ 2, D ≥ 2; as vicreg_exp_loss. Returns a 0-dim loss.

    gather_distributed (True or "ring"; not in lightly — the single-process objective on the
    concatenated batch): every term is a mean over samples, so each rank keeps its samples as
    anchors (invariance, per-sample variance, and the LSE of its rows of G against every rank's
    columns) and returns its share of the global mean.
    """
    weights = (lambda_param, mu_param, nu_param, eps)
    _check_vicreg_exp_args(z1, z2, temperature, *weights, "vicreg_ctr_loss needs D ≥ 2 coordinates per sample")
    backend, mode = resolve(backend, z1, gather_distributed)
    if backend == "reference":
        return reference.vicreg_ctr_loss(z1, z2, temperature, *weights)
    if mode is None:
        return _vicreg_exp(z1.T, z2.T, temperature, *weights, backend)
    return _vicreg_ctr_distributed(z1, z2, temperature, *weights, mode, backend)


def _vicreg_ctr_distributed(
    z1: Tensor, z2: Tensor, temperature: Temperature, lambda_param: float, mu_param: float, nu_param: float,
    eps: float, mode: Union[bool, str], backend: str,
) -> Tensor:  # fmt: skip
    """VICReg-ctr as a sum of per-sample terms over this rank's n samples (validated inputs):

        ℓ_i = λ·mean_d (z1_id − z2_id)² + μ·½[v1_i + v2_i] + ν·[LSE1_i + LSE2_i],
        v_i = relu(1 − sqrt(Var_d(z_i) + eps)),   LSE_i = LSE_{j≠i, all ranks} x_i·x_j/τ,
        x_i = (z_i − mean_d z_i)/√(D − 1)

    (the rows of vicreg_exp_loss(zᵀ)'s pairwise-LSE call), reduced with distributed.global_mean.
    """
    d, acc = z1.shape[1], compute_dtype(z1)
    sizes = distributed.batch_sizes(z1)
    scale = inverse_temperature(temperature, z1)
    invariance = (z1.to(acc) - z2.to(acc)).square().mean(1)

    def variance_and_lse(z: Tensor) -> tuple[Tensor, Tensor]:
        var, mean = torch.var_mean(z.to(acc), dim=1, correction=1)
        x = ((z.to(acc) - mean[:, None]) / math.sqrt(d - 1)).to(z.dtype)
        flags = PairwiseLSEFlags(exclude_self=True, include_pos=False)
        lse, _, _ = _local_rows(x, x, None, scale, flags, mode, backend, sizes)
        return F.relu(1.0 - torch.sqrt(var + eps)), lse

    v1, lse1 = variance_and_lse(z1)
    v2, lse2 = variance_and_lse(z2)
    per_sample = lambda_param * invariance + mu_param * 0.5 * (v1 + v2) + nu_param * (lse1 + lse2)
    return distributed.global_mean(per_sample, sizes)


# --------------------------------------------------------------------------------------------------
# ArCL (Zhao et al. 2023): SimCLR with each sample's worst positive pair over m views.
# --------------------------------------------------------------------------------------------------


def _check_views(views: object) -> Tensor:
    """views as an (N, m, D) tensor: given as one such tensor or as a list/tuple of m (N, D) tensors."""
    if isinstance(views, (list, tuple)):
        if len(views) < 2:
            raise ValueError(f"views needs at least 2 views per sample, got a {type(views).__name__} of {len(views)}")
        for index, view in enumerate(views):
            check_embeddings(f"views[{index}]", view)
            check_same("views[0]", views[0], f"views[{index}]", view)
        return torch.stack(list(views), dim=1)
    check_embeddings("views", views, ndim=3)
    if views.shape[1] < 2:
        raise ValueError(f"views must be (N, m, D) with m ≥ 2 views per sample, got shape {tuple(views.shape)}")
    return views


def arcl_loss(
    views: Union[Tensor, Sequence[Tensor]],
    temperature: Temperature = 0.5,
    *,
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """ArCL on top of SimCLR (Zhao et al. 2023, Algorithm 1): NT-Xent with each sample's worst positive.

    Rows are normalised, z_ij = n(view j of sample i). The worst positive is the pair of views
    farthest apart (Huang et al. (2023)'s "max over augmentations" of the distance)::

        s_i⁺ = min_{j<k} z_ij·z_ik

    Anchors are views 0 and 1 of every sample, Z = [z_·0; z_·1] (2N, D); anchor a of sample i has
    partner p(a) = (a + N) mod 2N, which is neither a positive nor a negative::

        ℓ_a  = −s_i⁺/τ + log(exp(s_i⁺/τ) + Σ_{b ∉ {a, p(a)}} exp(Z_a·Z_b/τ))
             = softplus(LSE_{b ∉ {a, p(a)}} Z_a·Z_b/τ − s_i⁺/τ)
        loss = 1/(2N) Σ_a ℓ_a

    With m = 2, s_i⁺ = z_i0·z_i1 and this equals :func:`nt_xent_loss`. The gradient of s_i⁺ flows
    through the selected pair only (ties: the first pair in (j, k) order). Composition: one
    worst-pair pass over the N·m·D views (per-sample m x m similarities, min and argmin fused, three
    numbers kept per sample), the pairwise-LSE op over the negatives of Z (the 2N x 2N logits are
    never stored), and an O(N) softplus — computed as softplus of the difference so that a
    well-separated positive keeps its precision.

    Args: views (N, m, D) with N ≥ 2 and m ≥ 2, or a list/tuple of m tensors (N, D) (a training
    loop's views; stacked into one (N, m, D) copy); temperature τ > 0. Returns a 0-dim loss.
    The triton backend takes m ≤ 64 views per sample.

    gather_distributed (True or "ring"; not in lightly — the single-process objective on the
    concatenated batch, as NT-Xent's): the worst pair is per sample (local); this rank's 2n anchors
    take their negatives from every rank; this rank's share of the global mean is returned.
    """
    views = _check_views(views)
    check_positive("temperature", temperature)
    backend, mode = resolve(backend, views, gather_distributed)
    if backend == "reference":
        return reference.arcl_loss(views, temperature)
    n = views.shape[0]
    v = _normalize(views)
    scale = inverse_temperature(temperature, views)
    worst = worst_pair(v, backend=backend) * scale  # s_i⁺/τ, (N,)
    z = torch.cat([v[:, 0], v[:, 1]])
    lse_negatives, _, reduce = _local_rows(z, z, None, scale, _two_view_flags(n), mode, backend)
    return reduce(_info_nce(lse_negatives, worst.repeat(2)))


# ==================================================================================================
# lightly 1.6's further losses on the existing kernel families (appended section): MACL and DirectCLR
# are NT-Xent variants on the pairwise-LSE op (family 1); FroSSL and TiCo take their one
# N·D·min(N, D) part from the squared-Frobenius op (family 2) and the rest from O(N·D) torch ops;
# KoLeo's nearest neighbours come from the pairwise-max op (fastssl/ops/pairwise_max.py).
# ==================================================================================================


#: MACL's guard in V = 1/(1 − P + eps) (lightly's `MACLLoss.eps`).
MACL_EPS = 1e-8


def macl_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = 0.1,
    alpha: float = 0.5,
    A_0: float = 0.0,
    *,
    eps: float = MACL_EPS,
    backend: str = "auto",
) -> Tensor:
    """Model-aware contrastive loss (Huang et al. 2023, MACL; lightly's `MACLLoss`).

    NT-Xent whose temperature follows the batch's alignment, each anchor reweighted. With
    Z = [n(z1); n(z2)] (2N, D), anchor a, positive p(a) = (a + N) mod 2N and s_ab = Z_a·Z_b:

        A       = mean_i n(z1_i)·n(z2_i)                       (no gradient: the mean positive)
        t       = τ·(1 + α·(A − A_0))                          (the model-aware temperature)
        log P_a = s_a,p(a)/t − LSE_{b≠a} s_ab/t                (log-probability of the positive)
        loss    = mean_a −V_a·log P_a,   V_a = 1/(1 − P_a + eps)   (V without gradient)

    Composition: an O(N·D) row dot for A, then the pairwise-LSE op at scale 1/t over each anchor's
    2N − 1 candidates, as nt_xent_loss (the 2N x 2N logits are never stored). With the gap
    g_a = LSE_{b∉{a,p(a)}} s_ab/t − s_a,p(a)/t, −log P_a = softplus(g_a) and 1 − P_a = sigmoid(g_a),
    both exact where the positive dominates (where lightly's 1 − exp(log P) cancels).
    t ≤ 0 needs α·(A_0 − A) ≥ 1; as in lightly it is not guarded (that would cost a host sync).

    Args: z1, z2 (N, D), N ≥ 2; temperature τ > 0 (default 0.1; a float or a 0-dim tensor);
    alpha α ∈ [0, 1] (0.5); A_0 ∈ [0, 1] (0); eps > 0 (1e-8). Returns a 0-dim loss.
    """
    check_pair(z1, z2)
    check_positive("temperature", temperature)
    check_unit_interval("alpha", alpha)
    check_unit_interval("A_0", A_0)
    check_positive("eps", eps)
    backend, _ = resolve(backend, z1, False)
    if backend == "reference":
        return reference.macl_loss(z1, z2, temperature, alpha, A_0, eps=eps)
    n, acc = z1.shape[0], compute_dtype(z1)
    a, b = _normalize(z1), _normalize(z2)
    with torch.no_grad():
        mean_positive = (a.to(acc) * b.to(acc)).sum(1).mean()
    # t stays a device scalar (no sync); a tensor τ keeps its gradient through it.
    tau = temperature.reshape(()).to(mean_positive) if isinstance(temperature, Tensor) else float(temperature)
    t = tau * (1.0 + alpha * (mean_positive - A_0))
    z = torch.cat([a, b])
    lse_negatives, pos = pairwise_lse(z, z, None, inverse_temperature(t, z1), _two_view_flags(n), backend=backend)
    gap = lse_negatives - pos
    weight = 1.0 / (torch.sigmoid(gap.detach()) + eps)
    return (weight * F.softplus(gap)).mean()


def _leading_dims(z: object, loss_dim: int) -> object:
    """DirectCLR's truncation, as lightly's: z.flatten(start_dim=1)[:, :loss_dim] — a strided view of
    z (flatten copies only a non-contiguous input of more than 2 dimensions). Anything that is not a
    tensor of at least 2 dimensions is passed through for the loss's own checks to name."""
    if not isinstance(z, Tensor) or z.dim() < 2:
        return z
    return z.flatten(start_dim=1)[:, :loss_dim]


def directclr_loss(
    z1: Tensor,
    z2: Tensor,
    loss_dim: int = 64,
    temperature: Temperature = 0.5,
    *,
    bank: Optional[Tensor] = None,
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """DirectCLR (Jing et al. 2022; lightly's `DirectCLRLoss`): NT-Xent on the first `loss_dim` dimensions.

    With z[:, :k] the first k = loss_dim entries of each flattened row (all of them if k ≥ D):

        loss = nt_xent_loss(z1[:, :k], z2[:, :k], τ)            (bank None)
             = moco_loss(z1[:, :k], z2[:, :k], bank, τ)          (a (K, k) memory bank of negatives)

    The truncation is a strided view (row stride D, no copy). F.normalize reads that view in place;
    the L2-normalised rows it writes (O(N·k), smaller than the input: the pairwise-LSE op has no
    per-row scale to fold the normalisation into) are what the kernels read, and the 2N x 2N logits
    are never formed. (Both kernels also take strided operands: Triton reads them through their
    strides, the torch kernel makes one row-major copy in the compute dtype.)

    Args: z1, z2 (N, ...) with N ≥ 2 (flattened to (N, D)); loss_dim k ≥ 1 (default 64);
    temperature τ > 0 (0.5); bank (K, k) or None; gather_distributed as nt_xent_loss / moco_loss.
    Returns a 0-dim loss.
    """
    loss_dim = check_loss_dim(loss_dim)
    z1, z2 = _leading_dims(z1, loss_dim), _leading_dims(z2, loss_dim)
    if bank is None:
        return nt_xent_loss(z1, z2, temperature, gather_distributed=gather_distributed, backend=backend)
    return moco_loss(z1, z2, bank, temperature, gather_distributed=gather_distributed, backend=backend)


def _check_view_list(z_views: object) -> list[Tensor]:
    """A list/tuple of V ≥ 2 (N, D) tensors of one shape, dtype and device (FroSSL's views)."""
    if not isinstance(z_views, (list, tuple)):
        raise TypeError(f"z_views must be a list or tuple of (N, D) tensors, got {type(z_views).__name__}")
    if len(z_views) < 2:
        raise ValueError(f"z_views must contain at least two views but found {len(z_views)}")
    for index, view in enumerate(z_views):
        check_embeddings(f"z_views[{index}]", view)
        check_same("z_views[0]", z_views[0], f"z_views[{index}]", view)
    return list(z_views)


def frossl_loss(
    z_views: Sequence[Tensor],
    invariance_weight: float = 1.0,
    *,
    route: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """FroSSL (Skean et al. 2024; lightly's `FroSSLLoss`) over V ≥ 2 views.

    Each view is normalised per dimension, ẑ_v = z_v / ‖z_v‖_col (F.normalize(z, dim=0)); z̄ is the
    mean of the V normalised views. With C_v = ẑ_vᵀẑ_v (D x D; ‖C_v‖_F = ‖ẑ_vẑ_vᵀ‖_F):

        reg_v = log ‖C_v‖²_F − 2·log tr(C_v)                  (= 2·log ‖C_v/tr C_v‖_F, lightly's form)
        inv_v = V·D·mean_{N,D}(ẑ_v − z̄)²
        loss  = Σ_v reg_v + invariance_weight·Σ_v inv_v

    tr C_v = Σ_d ‖ẑ_vd‖² (= D unless a column is zero) carries no gradient: lightly divides by
    ``trace.item()``. ‖C_v‖²_F is the squared-Frobenius op on z_v with the column normalisation
    folded into its loads (ẑ_v is not written for it), on the D x D side (cost N·D²) or the N x N
    side (N²·D) — auto: the smaller, as lightly's choice of matrix; C_v is never stored on the Gram
    route. The invariance term is O(V·N·D) torch ops (it writes the normalised views, the size of
    the inputs).

    Args: z_views, a list/tuple of V ≥ 2 tensors (N, D), N ≥ 2; invariance_weight ≥ 0 (default 1);
    route "auto" | "covariance" | "gram". Returns a 0-dim loss.
    """
    views = _check_view_list(z_views)
    check_nonnegative("invariance_weight", invariance_weight)
    check_route(route)
    backend, _ = resolve(backend, views[0], False, op="sq_frobenius")
    if backend == "reference":
        return reference.frossl_loss(views, invariance_weight)
    n, d = views[0].shape
    acc = compute_dtype(views[0])
    side = op_route(choose_side(n, d, route), True)
    regularization, normalised = 0.0, []
    for z in views:
        # F.normalize(z, dim=0): 1/max(‖z_col‖, 1e-12) per column.
        scale = 1.0 / torch.linalg.vector_norm(z.to(acc), dim=0).clamp_min(1e-12)
        trace = column_dot(z, None, a_scale=scale).sum().detach()
        frob = sq_frobenius(z, None, a_scale=scale, route=side, backend=backend)
        regularization = regularization + torch.log(frob) - 2.0 * torch.log(trace)
        normalised.append(z.to(acc) * scale)
    stacked = torch.stack(normalised)  # (V, N, D)
    invariance = len(views) * d * (stacked - stacked.mean(0)).square().mean(dim=(1, 2)).sum()
    return regularization + invariance_weight * invariance


def _check_tico_covariance(covariance: object, z_a: Tensor) -> Optional[Tensor]:
    """TiCo's running C: None, or a floating (D, D) tensor; returned detached, on z_a's device, in its compute dtype."""
    if covariance is None:
        return None
    d = z_a.shape[1]
    if not isinstance(covariance, Tensor) or not covariance.is_floating_point():
        raise TypeError(f"covariance must be None or a floating (D, D) tensor, got {covariance!r:.80}")
    if tuple(covariance.shape) != (d, d):
        raise ValueError(f"covariance must be (D, D) = ({d}, {d}) for z_a of shape {tuple(z_a.shape)}, got {tuple(covariance.shape)}")
    return covariance.detach().to(device=z_a.device, dtype=compute_dtype(z_a))


def _tico(z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor], beta: float, rho: float, route: str, backend: str) -> Tensor:
    """TiCo's loss for validated inputs (already gathered); see tico_loss."""
    n, d = z_a.shape
    acc = compute_dtype(z_a)
    a, b = F.normalize(z_a.to(acc), dim=1), F.normalize(z_b.to(acc), dim=1)
    invariance = 1.0 - (a * b).sum(1).mean()
    contrast = a.new_zeros(())
    if covariance is not None and beta > 0:
        contrast = contrast + beta * ((a @ covariance) * a).sum(1).mean()  # N·D² against the D x D state
    if beta < 1:
        # ‖aaᵀ‖²_F with a = n(z_a): z_aᵀ (D, N) as the op's operand, the row normalisation a scale
        # per column (sample); value ‖·‖² with half its gradient = ⟨aᵀa, sg(aᵀa)⟩_F.
        row_scale = 1.0 / torch.linalg.vector_norm(z_a.to(acc), dim=1).clamp_min(1e-12)
        side = op_route(choose_side(n, d, route), False)
        frob = sq_frobenius(z_a.T, None, a_scale=row_scale, route=side, backend=backend)
        contrast = contrast + (1.0 - beta) * 0.5 * (frob + frob.detach()) / (n * n)
    return invariance + rho * contrast


def tico_loss(
    z_a: Tensor,
    z_b: Tensor,
    covariance: Optional[Tensor] = None,
    beta: float = 0.9,
    rho: float = 8.0,
    *,
    gather_distributed: bool = False,
    route: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """TiCo (Zhu et al. 2022; lightly's `TiCoLoss`), given the running covariance before this step.

    a = n(z_a), b = n(z_b) (N, D); B = aᵀa/N without gradient; C = β·covariance + (1 − β)·B
    (covariance None: zero, lightly's first step):

        loss = 1 − mean_i a_i·b_i + ρ·mean_i a_i C a_iᵀ
             = 1 − mean_i a_i·b_i + ρβ·mean_i a_i·(covariance a_i) + ρ(1 − β)/N²·⟨aᵀa, sg(aᵀa)⟩_F

    ⟨aᵀa, sg(aᵀa)⟩_F has the value ‖aaᵀ‖²_F and half its gradient: the squared-Frobenius op on
    the D x D side (N·D²) or the N x N side (N²·D, auto: the smaller), with the row normalisation
    folded into its loads — B is never formed. What is O(D²) by nature is the state: `covariance`
    is D x D, and the term against it is one N·D² product (N x D output). Without a state (or
    β = 0) nothing D x D exists on the Gram route. TiCoLoss keeps the state and updates it,
    C ← β·C + (1 − β)·B, as lightly does; functional users can do the same.

    Args: z_a, z_b (N, D), N ≥ 2; covariance (D, D) or None (no gradient); beta β ∈ [0, 1]
    (default 0.9); rho ρ ≥ 0 (8); route "auto" | "covariance" | "gram". Returns a 0-dim loss.

    gather_distributed=True (lightly's semantics): z_a and z_b are gathered from every rank and every
    rank computes the loss of the global batch.
    """
    check_pair(z_a, z_b, ("z_a", "z_b"))
    covariance = _check_tico_covariance(covariance, z_a)
    check_unit_interval("beta", beta)
    check_nonnegative("rho", rho)
    check_route(route)
    backend, mode = resolve(backend, z_a, gather_distributed, ring=False, op="sq_frobenius")
    if backend == "reference":
        return reference.tico_loss(z_a, z_b, covariance, beta, rho)
    if mode is not None:
        sizes = distributed.batch_sizes(z_a)
        z_a, z_b = distributed.gather_cat(z_a, sizes), distributed.gather_cat(z_b, sizes)
    return _tico(z_a, z_b, covariance, beta, rho, route, backend)


def koleo_loss(x: Tensor, p: float = 2.0, eps: float = 1e-8, *, backend: str = "auto") -> Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019, as DINOv2 and lightly's `KoLeoLoss` compute it).

    With u_i = x_i/max(‖x_i‖, eps) (x (N, D)) and each row's nearest neighbour by cosine,
    j(i) = argmax_{j≠i} u_i·u_j (ties: the first j, as torch.argmax):

        loss = −1/N Σ_i log(‖u_i − u_j(i) + eps‖_p + eps)

    (the inner eps is torch.pairwise_distance's). The neighbours come from the pairwise-max op: one
    similarity GEMM streamed through a running max/argmax, O(N) numbers kept, never N x N. The
    selection carries no gradient; the distance's gradient reaches u_i and its neighbour u_j(i)
    through one O(N·D) row gather.

    Args: x (N, D), N ≥ 2; p > 0, the norm of the distance (default 2; the neighbour is by cosine
    whatever p, as lightly's); eps > 0 (1e-8). Returns a 0-dim loss.
    """
    check_embeddings("x", x)
    check_norm_degree(p)
    check_positive("eps", eps)
    backend, _ = resolve(backend, x, False, op="pairwise_max")
    if backend == "reference":
        return reference.koleo_loss(x, p, eps)
    u = F.normalize(x.to(compute_dtype(x)), dim=-1, eps=eps)
    # The kernels compare the rows as the input dtype rounds them (tensor cores for bf16/fp16).
    rows = u.detach().to(x.dtype)
    _, neighbour = pairwise_max(rows, rows, exclude_self=True, backend=backend)
    distance = F.pairwise_distance(u, u[neighbour], p=p, eps=eps)
    return -(distance + eps).log().mean()


# --------------------------------------------------------------------------------------------------
# Prototype cross-entropy (docs/design.md, family 4): DINO (Caron et al. 2021), iBOT's patch loss
# (Zhou et al. 2022). Appended section:
# everything of the prototype losses in this file lives below this line.
# --------------------------------------------------------------------------------------------------


class DINOLossOutput(NamedTuple):
    """`dino_loss(..., return_batch_center=True)`: the loss and the teacher's batch-mean logit (K,)
    (fp32; fp64 for fp64 inputs, no gradient), which DINO's centre update averages in:
    c ← m·c + (1 − m)·batch_center."""

    loss: Tensor
    batch_center: Tensor


def _view_list(name: str, views: object) -> list[Tensor]:
    """Crops as a list of V (B, D) tensors, given as such a list/tuple or as one (V, B, D) tensor."""
    if isinstance(views, (list, tuple)):
        if len(views) == 0:
            raise ValueError(f"{name} needs at least one view, got an empty {type(views).__name__}")
        for index, view in enumerate(views):
            check_embeddings(f"{name}[{index}]", view, min_rows=1)
            check_same(f"{name}[0]", views[0], f"{name}[{index}]", view)
        return list(views)
    check_embeddings(name, views, ndim=3, min_rows=1)
    if views.shape[1] < 1:
        raise ValueError(f"{name} must be (views, B, D) with B ≥ 1, got shape {tuple(views.shape)}")
    return list(views.unbind(0))


def _crop_views(name: str, views: object) -> Tensor:
    """Crops as one (V, B, D) tensor (a list is stacked: one O(V·B·D) copy)."""
    listed = _view_list(name, views)
    return views if isinstance(views, Tensor) else torch.stack(listed)


def _check_crop_pair(names: tuple[str, str], a: Tensor, b: Tensor) -> None:
    """Two crop sets (…, B, D) of the same images: same device, dtype, B and D."""
    check_same(names[0], a, names[1], b, dims="D")
    if a.shape[-2] != b.shape[-2]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same batch size B, got (B, D) = "
                         f"{tuple(a.shape[-2:])} and {tuple(b.shape[-2:])}")  # fmt: skip


def _fixed_temperature(name: str, value: Temperature) -> None:
    check_positive(name, value)
    if isinstance(value, Tensor) and value.requires_grad:
        raise ValueError(f"{name} gets no gradient in the DINO loss; pass a float or a tensor without requires_grad")


def _check_center(center: object, k: int, like: Tensor) -> Optional[Tensor]:
    """The centre as given ((K,) or lightly's (1, 1, K)), or None."""
    if center is None:
        return None
    if not isinstance(center, Tensor):
        raise TypeError(f"center must be a torch.Tensor or None, got {type(center).__name__}")
    if not center.is_floating_point() or center.numel() != k or center.shape[-1] != k:
        raise ValueError(f"center must be a floating (K,) or (1, 1, K) tensor with K = {k}, got {center.dtype} of "
                         f"shape {tuple(center.shape)}")  # fmt: skip
    if center.device != like.device:
        raise ValueError(f"center is on {center.device} but the embeddings are on {like.device}")
    return center


def _dino_pair_counts(n_student: int, n_teacher: int) -> int:
    """n_terms of lightly's DINOLoss: view pairs (teacher q, student v) with q ≠ v; ValueError if none."""
    n_terms = n_student * n_teacher - min(n_student, n_teacher)
    if n_terms == 0:
        raise ValueError(
            f"the DINO loss needs a pair of different views, but got {n_teacher} teacher view(s) and {n_student} "
            "student view(s): view q of the teacher and view q of the student are the same crop and are skipped"
        )
    return n_terms


def _head_args(
    student: Tensor, prototypes: object, teacher_prototypes: object, center: object, student_temp: object,
    teacher_temp: object, normalize_prototypes: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:  # fmt: skip
    """The head's arguments of DINO and iBOT, checked: (W, W_t, centre). W is normalised per row when
    `normalize_prototypes` (DINO's weight-normalised last layer); W_t is the teacher's prototypes,
    or W, without gradient either way."""
    check_embeddings("prototypes", prototypes, min_rows=1)
    check_same("student", student, "prototypes", prototypes, dims="D")
    if teacher_prototypes is not None:
        check_embeddings("teacher_prototypes", teacher_prototypes, min_rows=1)
        check_same("prototypes", prototypes, "teacher_prototypes", teacher_prototypes)
    center = _check_center(center, prototypes.shape[0], student)
    _fixed_temperature("student_temp", student_temp)
    _fixed_temperature("teacher_temp", teacher_temp)
    w = F.normalize(prototypes, dim=1) if normalize_prototypes else prototypes
    w_t = w.detach() if teacher_prototypes is None else teacher_prototypes.detach()
    if normalize_prototypes and teacher_prototypes is not None:
        w_t = F.normalize(w_t, dim=1)
    return w, w_t, center


def _batch_center(w_t: Tensor, teacher_rows: Tensor) -> Tensor:
    """mean_j t_j·W_tᵀ (K,): the batch-mean teacher logit of DINO's centre update, as one (K, D) x (D,)
    product (the mean is linear), without gradient."""
    with torch.no_grad():
        acc = compute_dtype(teacher_rows)
        return w_t.to(acc) @ teacher_rows.to(acc).mean(0)


def dino_loss(
    student: Union[Tensor, Sequence[Tensor]],
    teacher: Union[Tensor, Sequence[Tensor]],
    prototypes: Tensor,
    center: Optional[Tensor] = None,
    *,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
    teacher_prototypes: Optional[Tensor] = None,
    normalize_prototypes: bool = False,
    return_batch_center: bool = False,
    backend: str = "auto",
) -> Union[Tensor, DINOLossOutput]:
    """DINO's loss (Caron et al. 2021) from the embeddings that enter the head's last layer, fused.

    student (S, B, D) and teacher (T, B, D) are S and T crops of B images (or lists of (B, D)
    tensors); teacher view q and student view q are the same crop (DINO puts the global crops
    first). W = prototypes (K, D), the student's last-layer weight; W_t = teacher_prototypes
    (K, D), the EMA teacher's (None: W, detached); c = center (K,) or (1, 1, K) (None: zeros)::

        p_t[q, b]     = softmax((t[q, b]·W_tᵀ − c)/τt)                      (no gradient)
        log p_s[v, b] = log_softmax(s[v, b]·Wᵀ/τs)
        loss = 1/(B·n_terms) Σ_{q ≠ v} Σ_b −p_t[q, b]·log p_s[v, b],   n_terms = T·S − min(T, S)

    — lightly 1.6's DINOLoss on the logits s·Wᵀ and t·W_tᵀ, with the same value and gradients, but
    the B·S x K and B·T x K logits are never stored (fastssl.ops.prototype_ce: per crop an LSE and
    the teacher's expected prototype P_t = p_tᵀW; each pair is then an O(D) dot). Memory
    O((S·B + T·B + K)·D). Gradients reach student and prototypes (W is both the student's scorer
    and the value of P_t); the teacher, W_t, c and the temperatures get none.

    normalize_prototypes: use n(W) (rows L2-normalised, differentiable; W_t likewise): pass the raw
    weight `v` of a weight-normalised last layer with its gain fixed at 1 (DINO's norm_last_layer).
    The embeddings are used as given (DINO's head L2-normalises them before the last layer).

    return_batch_center: return DINOLossOutput(loss, batch_center), batch_center = mean_{q,b} t[q, b]·W_tᵀ
    (K,), DINO's batch centre, computed as (mean t)·W_tᵀ (exact: the mean is linear), for
    c ← m·c + (1 − m)·batch_center (fastssl.nn.DINOLoss.forward_fused does the update).

    Returns a 0-dim loss (fp32; fp64 for fp64 inputs).
    """
    s3, t3 = _crop_views("student", student), _crop_views("teacher", teacher)
    _check_crop_pair(("student", "teacher"), s3, t3)
    w, w_t, center = _head_args(s3, prototypes, teacher_prototypes, center, student_temp, teacher_temp,
                                normalize_prototypes)  # fmt: skip
    n_student, n_images, d = s3.shape
    n_teacher = t3.shape[0]
    n_terms = _dino_pair_counts(n_student, n_teacher)
    backend, _ = resolve(backend, s3, False, op="prototype_ce")

    if backend == "reference":
        loss = reference.dino_loss(s3, t3, w, center, student_temp, teacher_temp, w_t)
    else:
        scale_s = inverse_temperature(student_temp, s3)
        lse_s, p_t = prototype_ce(
            s3.reshape(-1, d), w, t3.reshape(-1, d), scale_s, inverse_temperature(teacher_temp, s3),
            teacher_prototypes=None if teacher_prototypes is None else w_t, center=center, backend=backend,
        )  # fmt: skip
        # Σ over pairs (v, q ≠ v, b) of lse_s[v, b] − α_s·s[v, b]·P_t[q, b], without gathering the pairs:
        # student view v meets the T teacher views but its own, and Σ_{q≠v} P_t[q] = Σ_q P_t[q] − P_t[v].
        acc = lse_s.dtype
        lse_s, p_t = lse_s.view(n_student, n_images), p_t.view(n_teacher, n_images, d)
        own = min(n_student, n_teacher)  # views present on both sides
        views_met = torch.full((n_student, 1), float(n_teacher), dtype=acc, device=s3.device)
        views_met[:own] -= 1
        s_acc = s3.to(acc)
        cross = (s_acc * p_t.sum(0)).sum() - (s_acc[:own] * p_t[:own]).sum()
        loss = ((views_met * lse_s).sum() - scale_s * cross) / (n_terms * n_images)
    return DINOLossOutput(loss, _batch_center(w_t, t3.reshape(-1, d))) if return_batch_center else loss


def dino_loss_from_logits(
    teacher_logits: Union[Tensor, Sequence[Tensor]],
    student_logits: Union[Tensor, Sequence[Tensor]],
    center: Optional[Tensor] = None,
    *,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
) -> Tensor:
    """DINO's loss on finished logits: lightly 1.6's DINOLoss.forward (without its centre update).

    teacher_logits (T, B, K) and student_logits (S, B, K), or lists of (B, K) tensors (lightly's
    argument order: teacher first); the formula of :func:`dino_loss` with the logits given. The
    logits exist already, so nothing is fused; the computation goes view by view (no stacked copies,
    no (T, S) einsum operands) and, as in lightly, gradients reach both logit tensors.
    """
    teachers = _view_list("teacher_logits", teacher_logits)
    students = _view_list("student_logits", student_logits)
    _check_crop_pair(("teacher_logits", "student_logits"), teachers[0], students[0])
    center = _check_center(center, teachers[0].shape[-1], teachers[0])
    check_positive("student_temp", student_temp)
    check_positive("teacher_temp", teacher_temp)
    n_terms = _dino_pair_counts(len(students), len(teachers))
    acc = compute_dtype(students[0])
    shift = 0.0 if center is None else center.reshape(-1).to(acc)
    p_t = [torch.softmax((t.to(acc) - shift) / teacher_temp, dim=-1) for t in teachers]
    p_all = p_t[0]
    for p in p_t[1:]:
        p_all = p_all + p
    # Student view v meets every teacher view but its own: Σ_{q≠v} p_t[q] = p_all − p_t[v]. Two dots
    # instead of one with (p_all − p_t[v]): autograd then keeps no extra (B, K) tensor per view.
    total = 0.0
    for v, s in enumerate(students):
        log_p_s = torch.log_softmax(s.to(acc) / student_temp, dim=-1).flatten()
        total = total - torch.dot(p_all.flatten(), log_p_s)
        if v < len(p_t):
            total = total + torch.dot(p_t[v].flatten(), log_p_s)
    return total / (n_terms * students[0].shape[0])


def _check_token_mask(mask: object, like: Tensor) -> Tensor:
    """A bool (B, H, W) or (B, N) mask of patch tokens (True: masked) on like's device."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() < 2:
        raise ValueError(f"mask must be a bool (B, H, W) or (B, N) tensor of masked tokens, got {mask.dtype} of "
                         f"shape {tuple(mask.shape)}")  # fmt: skip
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but the embeddings are on {like.device}")
    return mask


def _token_weights(mask: Tensor, n_tokens: int, dtype: torch.dtype) -> Tensor:
    """1/(masked tokens of its image) for each of the n_tokens masked tokens, which come image by image
    (the row-major order of mask's True entries). Counting them is a host sync, as lightly's indexing."""
    per_image = mask.reshape(mask.shape[0], -1).sum(dim=1)
    weights = torch.repeat_interleave(1.0 / per_image.clamp(min=1).to(dtype), per_image)
    if weights.shape[0] != n_tokens:
        raise ValueError(f"mask {tuple(mask.shape)} has {weights.shape[0]} True entries (masked tokens) but the "
                         f"embeddings have {n_tokens} rows")  # fmt: skip
    return weights


def ibot_patch_loss(
    student: Tensor,
    teacher: Tensor,
    prototypes: Tensor,
    mask: Tensor,
    center: Optional[Tensor] = None,
    *,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
    teacher_prototypes: Optional[Tensor] = None,
    normalize_prototypes: bool = False,
    return_batch_center: bool = False,
    backend: str = "auto",
) -> Union[Tensor, DINOLossOutput]:
    """iBOT's masked-patch loss (Zhou et al. 2022; DINOv2's form, Oquab et al. 2023) from the embeddings
    that enter the head's last layer, fused: lightly 1.6's IBOTPatchLoss on the logits s·Wᵀ, t·W_tᵀ.

    student, teacher (M, D): the M masked patch tokens, in the row-major order of the True entries
    of mask (B, H, W) or (B, N); W = prototypes (K, D), W_t = teacher_prototypes (None: W, detached),
    c = center (K,) or (1, K)::

        CE_i = −Σ_k softmax((t_i·W_tᵀ − c)/τt)_k · log_softmax(s_i·Wᵀ/τs)_k = lse_s,i − s_i·P_t,i/τs
        loss = 1/B Σ_i CE_i / (masked tokens of the image of token i)

    The same op as :func:`dino_loss` (token i of the student paired with token i of the teacher); the
    M x K logits are never stored. Gradients reach student and prototypes only. Reading the mask's
    True entries costs one host sync (as lightly's boolean indexing).

    return_batch_center: DINOLossOutput(loss, batch_center), batch_center = mean_i t_i·W_tᵀ (K,), the
    mean teacher logit of the masked tokens (lightly's centre update input).
    """
    check_embeddings("student", student, min_rows=1)
    check_embeddings("teacher", teacher, min_rows=1)
    check_same("student", student, "teacher", teacher)
    mask = _check_token_mask(mask, student)
    w, w_t, center = _head_args(student, prototypes, teacher_prototypes, center, student_temp, teacher_temp,
                                normalize_prototypes)  # fmt: skip
    backend, _ = resolve(backend, student, False, op="prototype_ce")

    if backend == "reference":
        loss = reference.ibot_patch_loss(student, teacher, w, mask, center, student_temp, teacher_temp, w_t)
    else:
        scale_s = inverse_temperature(student_temp, student)
        lse_s, p_t = prototype_ce(student, w, teacher, scale_s, inverse_temperature(teacher_temp, student),
                                  teacher_prototypes=None if teacher_prototypes is None else w_t, center=center,
                                  backend=backend)  # fmt: skip
        ce = lse_s - scale_s * (student.to(p_t.dtype) * p_t).sum(dim=1)
        loss = (ce * _token_weights(mask, ce.shape[0], ce.dtype)).sum() / mask.shape[0]
    return DINOLossOutput(loss, _batch_center(w_t, teacher)) if return_batch_center else loss


def ibot_patch_loss_from_logits(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Tensor,
    center: Optional[Tensor] = None,
    *,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
) -> Tensor:
    """iBOT's masked-patch loss on finished (M, K) logits (lightly's argument order: teacher first):
    lightly 1.6's IBOTPatchLoss.forward without its centre update; the formula of :func:`ibot_patch_loss`.
    Gradients reach both logit tensors, as in lightly."""
    check_embeddings("teacher_logits", teacher_logits, min_rows=1)
    check_embeddings("student_logits", student_logits, min_rows=1)
    check_same("teacher_logits", teacher_logits, "student_logits", student_logits)
    mask = _check_token_mask(mask, student_logits)
    center = _check_center(center, teacher_logits.shape[-1], teacher_logits)
    check_positive("student_temp", student_temp)
    check_positive("teacher_temp", teacher_temp)
    acc = compute_dtype(student_logits)
    shift = 0.0 if center is None else center.reshape(-1).to(acc)
    p_t = torch.softmax((teacher_logits.to(acc) - shift) / teacher_temp, dim=-1)
    z_s = student_logits.to(acc) / student_temp
    ce = torch.logsumexp(z_s, dim=-1) - (p_t * z_s).sum(dim=-1)  # −Σ p_t log softmax(z_s), Σ p_t = 1
    return (ce * _token_weights(mask, ce.shape[0], acc)).sum() / mask.shape[0]

# SigLIP (Zhai et al. 2023) and SupCon (Khosla et al. 2020) — appended section.
# SigLIP is the pairwise-sigmoid op (fastssl/ops/pairwise_sigmoid.py); SupCon is the pairwise-LSE op
# plus O(N·D) class sums for its positives.
# ==================================================================================================

def siglip_loss(
    z1: Tensor,
    z2: Tensor,
    scale: Union[float, Tensor] = reference.SIGLIP_INIT_TEMPERATURE,
    bias: Union[float, Tensor] = reference.SIGLIP_INIT_BIAS,
    *,
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) between two towers.

    x = n(z1), y = n(z2) (N, D); logits ℓ_ij = t·x_i·y_j + b, labels +1 on the diagonal, −1 elsewhere::

        loss = −1/N Σ_ij log σ(label_ij·ℓ_ij) = 1/N Σ_ij softplus(−label_ij·ℓ_ij)

    Args: z1, z2 (N, D), N ≥ 2; scale t > 0 (the paper's "temperature" t = exp(t'), a multiplier;
    default 10, its initial value) and bias b (default −10), each a float or a 1-element tensor
    whose gradient is returned. Returns a 0-dim loss. Memory O(N·D) on the fused backends: the
    N x N logits are never stored (fastssl.ops.pairwise_sigmoid).

    gather_distributed (True or "ring"; not in lightly — the single-process objective on the
    concatenated batch): this rank's rows against every rank's columns, the positive of local row i
    being this rank's column i; this rank's share of the global mean is returned, so the average
    over ranks is the loss of the whole batch. True gathers n(z2) by one differentiable all-gather
    (O(N·D) per rank); "ring" sends the other ranks' column blocks round a ring instead (at most
    three blocks of n_r rows held; fastssl.ops.pairwise_sigmoid_distributed). The gradients of t and
    b are this rank's terms in both modes; under DDP they must be averaged over the ranks like any
    parameter (put the loss module inside the DDP model).
    """
    check_pair(z1, z2)
    check_positive("scale", scale)
    check_finite_scalar("bias", bias)
    backend, mode = resolve(backend, z1, gather_distributed, op="pairwise_sigmoid")
    if backend == "reference":
        return reference.siglip_loss(z1, z2, scale, bias)
    x, y = _normalize(z1), _normalize(z2)
    t, b = scalar_tensor(scale, z1), scalar_tensor(bias, z1)
    if mode is None:
        return pairwise_sigmoid(x, y, t, b, backend=backend).mean()
    sizes = distributed.batch_sizes(x)
    rows = pairwise_sigmoid_global(x, y, t, b, mode=mode, sizes=sizes, backend=backend)
    return distributed.global_mean(rows, sizes)


def _class_sums(z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row i: Σ_{a: label_a = label_i} z_a (i itself included) and that class's size; O(R·D).

    Class ids come from a sort (equal labels become one consecutive run), so any integer labels
    work and nothing waits on the host (no unique, no bincount).
    """
    rows = labels.shape[0]
    sorted_labels, order = torch.sort(labels, stable=True)
    starts = torch.cat([sorted_labels.new_ones(1, dtype=torch.bool), sorted_labels[1:] != sorted_labels[:-1]])
    class_of_sorted = torch.cumsum(starts, 0) - 1
    class_id = torch.empty_like(class_of_sorted).scatter_(0, order, class_of_sorted)
    sums = z.new_zeros(rows, z.shape[1]).index_add(0, class_id, z)
    sizes = z.new_zeros(rows).index_add(0, class_id, z.new_ones(rows))
    return sums[class_id], sizes[class_id]


def supcon_loss(
    z1: Tensor,
    labels: Tensor,
    temperature: Temperature = reference.SUPCON_TEMPERATURE,
    *,
    z2: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Supervised contrastive loss, L_out (Khosla et al. 2020): a *supervised* loss — it needs labels.

    Z = n(z1) (N rows), or with a second view Z = [n(z1); n(z2)] (2N rows, labels repeated);
    s_ia = Z_i·Z_a/τ; P(i) = rows a ≠ i with i's label, plus (two views) i's other view::

        ℓ_i  = LSE_{a≠i} s_ia − 1/|P(i)| Σ_{p∈P(i)} s_ip
        loss = mean of ℓ_i over the anchors with |P(i)| > 0   (0 if there are none)

    Labels < 0 (−1) mark unlabeled rows: their only positive is their other view (none with one
    view, so they are no anchor), and they are negatives of every other anchor. With two views and
    every label −1 this is NT-Xent. Anchors without a positive are left out of the mean (Khosla et
    al.'s code gives them NaN; see fastssl.reference.supcon_loss).

    Memory O(N·D): the LSE is the pairwise-LSE op (self column excluded), and the positive sum is
    Z_i·(C_label(i) − Z_i)/τ with C the per-class sums of Z, computed in fp32 (fp64 for fp64).

    Args: z1 (N, D), N ≥ 2; labels (N,) integer class ids on z1's device; temperature τ > 0;
    z2 (N, D) or None. Returns a 0-dim loss.
    """
    check_embeddings("z1", z1)
    if z2 is not None:
        check_embeddings("z2", z2)
        check_same("z1", z1, "z2", z2)
    check_labels(labels, z1)
    check_positive("temperature", temperature)
    backend, _ = resolve(backend, z1, False)
    if backend == "reference":
        return reference.supcon_loss(z1, labels, temperature, z2)
    n = z1.shape[0]
    z = _normalize(z1)
    lab = labels
    if z2 is not None:
        z = torch.cat([z, _normalize(z2)])
        lab = torch.cat([labels, labels])
    scale = inverse_temperature(temperature, z1)
    lse, _ = pairwise_lse(z, z, None, scale, PairwiseLSEFlags(exclude_self=True, include_pos=False), backend=backend)
    zc = z.to(compute_dtype(z))
    class_sum, class_size = _class_sums(zc, lab)
    labelled = lab >= 0
    if z2 is not None:  # an unlabeled row's one positive: its other view
        partner = torch.roll(zc, n, dims=0)
        pos_sum = torch.where(labelled[:, None], class_sum - zc, partner)
        pos_count = torch.where(labelled, class_size - 1, torch.ones_like(class_size))
    else:
        pos_sum = torch.where(labelled[:, None], class_sum - zc, torch.zeros_like(zc))
        pos_count = torch.where(labelled, class_size - 1, torch.zeros_like(class_size))
    has_positive = pos_count > 0
    pos_mean = scale * (zc * pos_sum).sum(1) / pos_count.clamp_min(1)
    per_anchor = torch.where(has_positive, lse - pos_mean, torch.zeros_like(lse))
    return per_anchor.sum() / has_positive.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Prototype codes (docs/design.md, family 4): SwaV (Caron et al. 2020) and MSN (Assran et al. 2022).
# Appended section: the codes come from fastssl.ops.prototype_codes (Sinkhorn-Knopp in tiles, as a
# centre of the prototype-CE op's teacher softmax), the cross-entropies from fastssl.ops.prototype_ce.
# --------------------------------------------------------------------------------------------------



def _check_iterations(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _check_swav_args(temperature: object, sinkhorn_iterations: object, sinkhorn_epsilon: object) -> None:
    for name, value in (("temperature", temperature), ("sinkhorn_epsilon", sinkhorn_epsilon)):
        if isinstance(value, Tensor):
            raise TypeError(f"{name} must be a float (it gets no gradient in the SwaV loss), got a tensor")
        check_positive(name, value)
    _check_iterations("sinkhorn_iterations", sinkhorn_iterations)


def _swav_views(high: object, low: object, queue: object, names: tuple[str, str, str]):
    """(high H x (B, ·), low L x (B, ·), queue H x (Bq, ·) or None) as lists, checked. low may be None,
    an empty list or a (0, B, ·) tensor: no low-resolution crops."""
    highs = _view_list(names[0], high)
    empty = low is None or (isinstance(low, (list, tuple)) and len(low) == 0) or (
        isinstance(low, Tensor) and low.dim() == 3 and low.shape[0] == 0)
    lows = [] if empty else _view_list(names[1], low)
    if lows:
        _check_crop_pair((f"{names[1]}[0]", f"{names[0]}[0]"), lows[0], highs[0])
    queues = None
    if queue is not None:
        queues = _view_list(names[2], queue)
        check_same(f"{names[2]}[0]", queues[0], f"{names[0]}[0]", highs[0], dims="D")
        if len(queues) != len(highs):
            raise ValueError(f"{names[2]} needs one view per high-resolution view: got {len(queues)} for "
                             f"{len(highs)} views of {names[0]}")  # fmt: skip
    if len(highs) + len(lows) < 2:
        raise ValueError(f"the SwaV loss needs at least two crops (views), got {len(highs)} high-resolution and "
                         f"{len(lows)} low-resolution view(s)")  # fmt: skip
    return highs, lows, queues


def _swav_codes_from_scores(rows: Tensor, epsilon: float, iterations: int, gather: bool) -> Tensor:
    """SwaV's codes (N, K) of finished scores (N, K) in the log domain (fastssl.ops.prototype_codes'
    iteration on the whole matrix: the scores exist already). No gradient."""
    with torch.no_grad():
        z = rows.detach().to(compute_dtype(rows)) / epsilon
        if iterations == 0:
            v = torch.logsumexp(z, dim=1)
            total = torch.logsumexp(v, 0)
            if gather:
                total = lse_over_ranks(total.reshape(1))[0]
            n_global = z.shape[0] * (distributed.world_size() if gather else 1)
            return torch.exp(z - total + math.log(n_global))
        v = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
        for step in range(iterations):
            u = torch.logsumexp(z - v, dim=0)
            if gather:
                u = lse_over_ranks(u)
            if step + 1 < iterations:
                v = torch.logsumexp(z - u, dim=1, keepdim=True)
                if gather:  # lightly: each rank's columns are divided by its rows x ranks
                    v = v + math.log(z.shape[0])
        return torch.softmax(z - u, dim=1)


def swav_loss_from_scores(
    high_resolution_outputs: Union[Tensor, Sequence[Tensor]],
    low_resolution_outputs: Union[Tensor, Sequence[Tensor], None] = (),
    queue_outputs: Union[Tensor, Sequence[Tensor], None] = None,
    *,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
    sinkhorn_gather_distributed: bool = False,
) -> Tensor:
    """SwaV's loss (Caron et al. 2020) on finished prototype scores: lightly 1.6's SwaVLoss.forward.

    high_resolution_outputs: H views of (B, K) scores z = x·Wᵀ (a list or an (H, B, K) tensor);
    low_resolution_outputs: L views (B, K) (may be empty); queue_outputs: H views (Bq, K) of the
    queue's scores, or None. For each high-resolution view i, codes q_i (B, K) without gradient::

        q_i = Sinkhorn-Knopp(exp([z_i; queue_i]/ε), sinkhorn_iterations)[:B]     (rows sum to 1)
        CE(z, q) = −(1/B) Σ_b Σ_k q_bk·log_softmax_k(z_b/τ)
        loss = 1/H Σ_i 1/(H + L − 1) Σ_{v ≠ i} CE(z_v, q_i)

    The Sinkhorn-Knopp steps (fastssl.reference.swav_sinkhorn) run in the log domain, so scores
    past 88·ε do not overflow (lightly's exp does). The scores exist already: nothing is fused
    (:func:`swav_loss` is the fused path from embeddings). sinkhorn_gather_distributed: the
    prototypes' totals run over every rank's rows (lightly's all_reduce). Gradients reach every
    score tensor through log_softmax. Returns a 0-dim loss (fp32; fp64 for fp64 inputs).
    """
    highs, lows, queues = _swav_views(high_resolution_outputs, low_resolution_outputs, queue_outputs,
                                      ("high_resolution_outputs", "low_resolution_outputs", "queue_outputs"))
    _check_swav_args(temperature, sinkhorn_iterations, sinkhorn_epsilon)
    mode = distributed.check_gather(sinkhorn_gather_distributed, ring=False, name="sinkhorn_gather_distributed")
    gather = distributed.is_active(mode)
    acc = compute_dtype(highs[0])
    log_probs = [torch.log_softmax(z.to(acc) / temperature, dim=1) for z in highs + lows]
    n_views, b = len(log_probs), highs[0].shape[0]
    total = 0.0
    for i, z_i in enumerate(highs):
        rows = z_i if queues is None else torch.cat([z_i.detach(), queues[i].detach()])
        q = _swav_codes_from_scores(rows, sinkhorn_epsilon, sinkhorn_iterations, gather)[:b]
        for v, log_p in enumerate(log_probs):
            if v != i:
                total = total - torch.dot(q.flatten(), log_p.flatten())
    return total / (len(highs) * (n_views - 1) * b)


def swav_loss(
    high_resolution: Union[Tensor, Sequence[Tensor]],
    low_resolution: Union[Tensor, Sequence[Tensor], None],
    prototypes: Tensor,
    queue: Union[Tensor, Sequence[Tensor], None] = None,
    *,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
    sinkhorn_gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """SwaV's loss (Caron et al. 2020) from the embeddings that enter the prototype layer, fused.

    high_resolution (H, B, D) and low_resolution (L, B, D) (lists of (B, D) tensors, or None / []
    for no low-resolution crop) are the crops' embeddings, W = prototypes (K, D), queue None or H
    views (Bq, D) of queued embeddings. The loss is :func:`swav_loss_from_scores` on the scores
    x·Wᵀ — lightly 1.6's SwaVLoss on the prototype layer's output, same value and gradients — but no
    (B, K) score matrix is ever stored:

        codes of view i: q_i,bk = softmax_k((x_i,b·W_k − c_i,k)/ε)     (T ≥ 1 Sinkhorn steps; no gradient)
        CE(v, i, b) = LSE_k(x_v,b·W_k/τ) − x_v,b·P_i,b/τ,   P_i,b = Σ_k q_i,bk·W_k

    c_i (K,) is the Sinkhorn-Knopp scaling of the scores [x_i; queue_i]·Wᵀ, found in LSE passes
    tiled over the prototypes (fastssl.ops.prototype_codes); the LSE and the expected prototype P
    are the prototype-CE op's (fastssl.ops.prototype_ce) with c_i as the teacher's centre, and the
    pairs v ≠ i are summed as DINO's are: O(D) per pair. Memory O((H + L)·B·D + Bq·D + K·D) plus a
    chunk or tile. Gradients reach the crops' embeddings and W (W through the student's LSE and as
    the value of P, not through the codes); the queue gets none. T = 0 (lightly's unnormalised
    codes) multiplies each code row by its mass.

    Returns a 0-dim loss (fp32; fp64 for fp64 inputs).
    """
    highs, lows, queues = _swav_views(high_resolution, low_resolution, queue,
                                      ("high_resolution", "low_resolution", "queue"))
    check_embeddings("prototypes", prototypes, min_rows=1)
    check_same("high_resolution[0]", highs[0], "prototypes", prototypes, dims="D")
    _check_swav_args(temperature, sinkhorn_iterations, sinkhorn_epsilon)
    distributed.check_gather(sinkhorn_gather_distributed, ring=False, name="sinkhorn_gather_distributed")
    backend, mode = resolve(backend, highs[0], sinkhorn_gather_distributed, ring=False, op="prototype_ce")
    crops = torch.stack(highs + lows)  # (V, B, D), one O(V·B·D) copy
    if backend == "reference":
        return reference.swav_loss(crops[: len(highs)], crops[len(highs):], prototypes,
                                   None if queues is None else torch.stack(queues), temperature,
                                   sinkhorn_iterations, sinkhorn_epsilon)  # fmt: skip
    n_high, (n_views, b, d) = len(highs), crops.shape
    acc = compute_dtype(crops)
    scale_s = inverse_temperature(temperature, crops)
    scale_t = inverse_temperature(sinkhorn_epsilon, crops)
    students = crops.reshape(-1, d)
    lse_s, expected, mass = None, [], []
    for i in range(n_high):
        rows = highs[i].detach() if queues is None else torch.cat([highs[i].detach(), queues[i].detach()])
        center, m = sinkhorn_scaling(rows, prototypes, scale_t, sinkhorn_iterations, gather=mode is not None,
                                     backend=backend)  # fmt: skip
        # View i's codes are a teacher softmax with centre c_i. The student rows enter the first call
        # only (their LSE does not depend on the codes); the later calls score just the teacher rows.
        lse, p_t = prototype_ce(students if i == 0 else students[:0], prototypes, highs[i], scale_s, scale_t,
                                center=center, backend=backend)  # fmt: skip
        if i == 0:
            lse_s = lse
        mass.append(torch.ones(b, dtype=acc, device=crops.device) if m is None else m[:b].to(acc))
        expected.append(p_t if m is None else p_t * mass[-1][:, None])
    mass_t, p_all = torch.stack(mass), torch.stack(expected)  # (H, B), (H, B, D)
    # Σ over pairs (i, v ≠ i, b) of m_ib·lse_s[v, b] − x[v, b]·P̃[i, b]/τ, P̃ = m·P: view v meets every
    # high-resolution view but itself, so Σ_{i≠v} P̃[i] = Σ_i P̃[i] − P̃[v] (the last only for v < H).
    weights = mass_t.sum(0).expand(n_views, b).clone()
    weights[:n_high] -= mass_t
    x = crops.to(acc)
    cross = (x * p_all.sum(0)).sum() - (x[:n_high] * p_all).sum()
    return ((weights * lse_s.view(n_views, b)).sum() - scale_s * cross) / (n_high * (n_views - 1) * b)


def msn_loss(
    anchors: Tensor,
    targets: Tensor,
    prototypes: Tensor,
    target_sharpen_temperature: float = 0.25,
    *,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    regularization_weight: float = 1.0,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """MSN's loss (Assran et al. 2022): lightly 1.6's MSNLoss.forward, fused.

    anchors (V·B, D): V views of B images, view-major (anchor i belongs to image i mod B); targets
    (B, D); prototypes (K, D). n(·) normalises rows, τ = temperature, T = target_sharpen_temperature,
    λ = regularization_weight::

        p_i = softmax_k(n(a_i)·n(W_k)/τ)                         anchor probabilities (no V·B x K stored)
        t_b = Sinkhorn-Knopp(softmax_k(n(t_b)·n(W_k)/(τ·T)))     sharpened targets, no gradient
        loss = mean_i −Σ_k t_(i mod B),k·log p_ik + λ·(Σ_k p̄_k·log p̄_k + log K),   p̄ = mean_i p_i

    (sharpening p^(1/T)/Σ p^(1/T) of a softmax at 1/τ is the softmax at 1/(τ·T)). The Sinkhorn-Knopp
    steps are fastssl.ops.prototype_codes' (rows first), the cross-entropy is the prototype-CE op's
    with the targets as the teacher, and p̄ (K,) is accumulated over tiles
    (fastssl.ops.prototype_codes.prototype_mean_probs); λ ≤ 0 drops the regulariser (as lightly).
    Memory O((V·B + K)·D) plus a chunk or tile. Gradients reach anchors and prototypes; targets get
    none. gather_distributed: the Sinkhorn-Knopp prototype totals run over every rank's targets (as
    lightly's). Returns a 0-dim loss (fp32; fp64 for fp64 inputs).
    """
    check_embeddings("anchors", anchors, min_rows=1)
    check_embeddings("targets", targets, min_rows=1)
    check_embeddings("prototypes", prototypes, min_rows=1)
    check_same("anchors", anchors, "targets", targets, dims="D")
    check_same("anchors", anchors, "prototypes", prototypes, dims="D")
    if anchors.shape[0] % targets.shape[0] != 0:
        raise ValueError(f"anchors must have V·B rows (V views of the B = {targets.shape[0]} target images), got "
                         f"anchors {tuple(anchors.shape)} and targets {tuple(targets.shape)}")  # fmt: skip
    for name, value in (("temperature", temperature), ("target_sharpen_temperature", target_sharpen_temperature)):
        if isinstance(value, Tensor):
            raise TypeError(f"{name} must be a float (it gets no gradient in the MSN loss), got a tensor")
        check_positive(name, value)
    _check_iterations("sinkhorn_iterations", sinkhorn_iterations)
    weight = _check_number("regularization_weight", regularization_weight)
    backend, mode = resolve(backend, anchors, gather_distributed, ring=False, op="prototype_ce")
    if backend == "reference":
        return reference.msn_loss(anchors, targets, prototypes, target_sharpen_temperature, temperature,
                                  sinkhorn_iterations, weight)  # fmt: skip
    a, t = _normalize(anchors), _normalize(targets).detach()
    w = _normalize(prototypes)
    scale = inverse_temperature(temperature, anchors)
    scale_t = inverse_temperature(temperature * target_sharpen_temperature, anchors)
    center, _ = sinkhorn_scaling(t, w, scale_t, sinkhorn_iterations, rows_first=True, gather=mode is not None,
                                 backend=backend)  # fmt: skip
    lse, p_t = prototype_ce(a, w, t, scale, scale_t, center=center, backend=backend)
    n, (b, d) = a.shape[0], t.shape
    cross = (a.to(p_t.dtype).view(n // b, b, d) * p_t).sum()
    loss = (lse.sum() - scale * cross) / n
    if weight > 0:
        mean_probs = prototype_mean_probs(a, w, scale, backend=backend)
        loss = loss + weight * (torch.special.xlogy(mean_probs, mean_probs).sum() + math.log(w.shape[0]))
    return loss
