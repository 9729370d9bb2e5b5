"""The functional API: each loss is a thin composition over one kernel family (docs/design.md).

Every function validates its input (fastssl._validation), resolves `backend=` (fastssl.backends),
and either calls the spec in fastssl.reference (backend="reference") or the fused op. Shapes:
z1, z2 are (N, D) embeddings of two views; the loss is a 0-dim fp32 tensor (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import distributed, reference
from fastssl._validation import (
    Temperature,
    check_embeddings,
    check_nonnegative,
    check_positive,
    check_same,
    inverse_temperature,
)
from fastssl.backends import resolve_backend
from fastssl.ops.frobenius import check_route, choose_side, op_route, sq_frobenius
from fastssl.ops.pairwise_lse import pairwise_lse
from fastssl.ops.reductions import column_dot, column_mean_var, compute_dtype
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
]


def _check_pair(z1: object, z2: object, names: tuple[str, str] = ("z1", "z2")) -> tuple[Tensor, Tensor]:
    check_embeddings(names[0], z1)
    check_embeddings(names[1], z2)
    check_same(names[0], z1, names[1], z2)
    return z1, z2


# --------------------------------------------------------------------------------------------------
# gather_distributed (docs/design.md, "Scale past one device"; the semantics per loss are in
# docs/distributed.md). Contrastive losses keep their anchors local and take columns from every rank
# (fastssl.distributed.pairwise_lse_global); their per-anchor terms are reduced with
# distributed.global_mean, so that DDP's average over ranks is the mean over the global batch.
# --------------------------------------------------------------------------------------------------


def _distributed_mode(gather_distributed: object, backend: str, *, ring: bool = True) -> Optional[Union[bool, str]]:
    """The active gather mode (True or "ring"), or None for single-process math (gather off,
    torch.distributed not initialised, or one rank — lightly's fallback)."""
    mode = distributed.check_gather(gather_distributed, ring=ring)
    if not distributed.is_active(mode):
        return None
    if backend == "reference":
        raise ValueError(
            "backend='reference' is the single-process spec and does not gather across ranks; "
            "use backend='auto', 'torch' or 'triton' with gather_distributed"
        )
    return mode


def _local_rows(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    mode: Optional[Union[bool, str]],
    backend: str,
    sizes: Optional[list[int]] = None,
    **flags,
) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """(lse, pos, reduce): the pairwise-LSE op on this rank's rows x against y's columns of every
    rank (mode None: just this process's), and the reduction of per-row terms — the mean, or this
    rank's share of the global mean. x and y have equal rows on each rank (`sizes`, exchanged when None)."""
    if mode is None:
        lse, pos = pairwise_lse(x, y, bank, scale, **flags, backend=backend)
        return lse, pos, torch.mean
    sizes = distributed.batch_sizes(x) if sizes is None else sizes
    lse, pos = distributed.pairwise_lse_global(x, y, bank, scale, **flags, mode=mode, sizes=sizes, backend=backend)
    return lse, pos, lambda values: distributed.global_mean(values, sizes)


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
    _check_pair(z1, z2)
    check_positive("temperature", temperature)
    backend = resolve_backend(backend, z1)
    mode = _distributed_mode(gather_distributed, backend)
    if backend == "reference":
        return reference.nt_xent_loss(z1, z2, temperature)
    n = z1.shape[0]
    z = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    lse_negatives, pos, reduce = _local_rows(
        z, z, None, inverse_temperature(temperature, z1), mode, backend, pos_offset=n, exclude_self=True,
        include_pos=False,
    )
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
    _check_pair(query, key, ("query", "key"))
    check_embeddings("bank", bank, min_rows=1)
    check_same("query", query, "bank", bank, dims="D")
    check_positive("temperature", temperature)
    backend = resolve_backend(backend, query)
    mode = _distributed_mode(gather_distributed, backend)
    if backend == "reference":
        return reference.moco_loss(query, key, bank, temperature)
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    lse_negatives, pos, reduce = _local_rows(
        q, k, bank.detach(), inverse_temperature(temperature, query), mode, backend, include_pos=False,
        y_negatives=False,
    )
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
    n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    z = torch.cat([n1, n2])
    lse, pos, reduce = _local_rows(
        z, z, None, inverse_temperature(temperature, z1), mode, backend, pos_offset=n, exclude_self=True,
        include_pos=False,
    )
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
    gather_distributed: Union[bool, str] = False,
    backend: str = "auto",
) -> Tensor:
    """Decoupled contrastive loss (lightly's `DCLLoss`; with `sigma`, `DCLWLoss`).

    The positive is removed from the denominator. For anchor z1_i (and symmetrically z2_i):
    −w_i·s(z1_i, z2_i) + LSE_{j≠i}({z1_i·z1_j} ∪ {z1_i·z2_j})/τ on normalised rows; the loss is the
    mean over the 2N anchors. w = 1, or with σ: w = 2 − N·softmax(n(z1)·n(z2)/σ) (no gradient).

    Args: z1, z2 (N, D), N ≥ 2; temperature τ > 0; sigma > 0 or None. Returns a 0-dim loss.

    gather_distributed (True or "ring"; lightly's semantics): local anchors against every rank's
    columns, this rank's share of the global mean; the σ weights' softmax runs over this rank's
    batch, as lightly's weight_fn does.
    """
    _check_pair(z1, z2)
    check_positive("temperature", temperature)
    if sigma is not None:
        check_positive("sigma", sigma)
    backend = resolve_backend(backend, z1)
    mode = _distributed_mode(gather_distributed, backend)
    if backend == "reference":
        return reference.dcl_loss(z1, z2, temperature, sigma=sigma)
    return _dcl(z1, z2, temperature, None if sigma is None else _mises_fisher_weights(sigma), backend, mode)


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
    _check_pair(z1, z2)
    check_positive("temperature", temperature)
    backend = resolve_backend(backend, z1)
    mode = _distributed_mode(gather_distributed, backend)
    if backend == "reference":
        return reference.clip_loss(z1, z2, temperature)
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    scale = inverse_temperature(temperature, z1)
    sizes = None if mode is None else distributed.batch_sizes(a)
    lse_rows, pos_rows, reduce = _local_rows(a, b, None, scale, mode, backend, sizes, include_pos=False)
    lse_cols, pos_cols, _ = _local_rows(b, a, None, scale, mode, backend, sizes, include_pos=False)
    return 0.5 * (reduce(_info_nce(lse_rows, pos_rows)) + reduce(_info_nce(lse_cols, pos_cols)))


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


# --------------------------------------------------------------------------------------------------
# The off-diagonal Frobenius family (docs/design.md, family 2). Each loss computes its O(N·D) parts with
# torch ops (statistics, diagonals, invariance) and its one O(N·D·min(N, D)) part, the squared
# Frobenius norm of a cross product, with the fused op on the route that `route` names:
# "covariance" = the D x D side, "gram" = the N x N side, "auto" = the smaller one.
# The per-column normalisation (batch norm, centring, norm clip) is passed to the op and to the
# diagonal (column_dot) as a shift and scale, never written out as a normalised copy; both apply it
# identically (rounded to the input dtype), so off-diagonal sums do not inherit a diagonal's rounding.
# --------------------------------------------------------------------------------------------------


def _frobenius_args(z1: object, z2: object, route: str, backend: str, weights: dict) -> str:
    """Validate a Frobenius-family call; return the concrete backend."""
    _check_pair(z1, z2)
    for name, value in weights.items():
        check_nonnegative(name, value)
    check_route(route)
    return resolve_backend(backend, z1, op="sq_frobenius")


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
    backend = _frobenius_args(z1, z2, route, backend, {"lambda_param": lambda_param})
    mode = _distributed_mode(gather_distributed, backend, ring=False)
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
    backend = _frobenius_args(
        z1, z2, route, backend, {"lambda_param": lambda_param, "mu_param": mu_param, "nu_param": nu_param}
    )
    check_positive("eps", eps)
    mode = _distributed_mode(gather_distributed, backend, ring=False)
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
    _check_pair(z1, z2)
    check_positive("mu", mu)
    check_route(route)
    backend = resolve_backend(backend, z1, op="sq_frobenius")
    mode = _distributed_mode(gather_distributed, backend, ring=False)
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


def _check_vicreg_exp_args(temperature, lambda_param, mu_param, nu_param, eps) -> None:
    """τ > 0, λ, μ, ν ≥ 0, eps > 0 for VICReg-exp and VICReg-ctr; a ValueError naming the argument."""
    check_positive("temperature", temperature)
    for name, value in (("lambda_param", lambda_param), ("mu_param", mu_param), ("nu_param", nu_param)):
        check_nonnegative(name, value)
    check_positive("eps", eps)


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
    lse, _ = pairwise_lse(x, x, None, inverse_temperature(temperature, z), exclude_self=True, include_pos=False,
                          backend=backend)  # fmt: skip
    return variance, lse.mean()


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
    _check_pair(z1, z2)
    if z1.shape[1] < 2:
        raise ValueError(f"vicreg_exp_loss needs D ≥ 2 dimensions to contrast, got shape {tuple(z1.shape)}")
    _check_vicreg_exp_args(temperature, lambda_param, mu_param, nu_param, eps)
    backend = resolve_backend(backend, z1)
    mode = _distributed_mode(gather_distributed, backend, ring=False)
    if backend == "reference":
        return reference.vicreg_exp_loss(z1, z2, temperature, lambda_param, mu_param, nu_param, eps)
    if mode is not None:
        sizes = distributed.batch_sizes(z1)
        z1, z2 = distributed.gather_cat(z1, sizes), distributed.gather_cat(z2, sizes)
    acc = compute_dtype(z1)
    invariance = (z1.to(acc) - z2.to(acc)).square().mean()
    v1, c1 = _vicreg_exp_terms(z1, temperature, eps, backend)
    v2, c2 = _vicreg_exp_terms(z2, temperature, eps, backend)
    return lambda_param * invariance + mu_param * 0.5 * (v1 + v2) + nu_param * (c1 + c2)


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
    _check_pair(z1, z2)
    if z1.shape[1] < 2:
        raise ValueError(f"vicreg_ctr_loss needs D ≥ 2 coordinates per sample, got shape {tuple(z1.shape)}")
    resolved = resolve_backend(backend, z1)
    mode = _distributed_mode(gather_distributed, resolved)
    if resolved == "reference":
        return reference.vicreg_ctr_loss(z1, z2, temperature, lambda_param, mu_param, nu_param, eps)
    if mode is None:
        return vicreg_exp_loss(z1.T, z2.T, temperature, lambda_param, mu_param, nu_param, eps, backend=backend)
    _check_vicreg_exp_args(temperature, lambda_param, mu_param, nu_param, eps)
    return _vicreg_ctr_distributed(z1, z2, temperature, lambda_param, mu_param, nu_param, eps, mode, resolved)


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
        lse, _, _ = _local_rows(x, x, None, scale, mode, backend, sizes, exclude_self=True, include_pos=False)
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
    backend = resolve_backend(backend, views)
    mode = _distributed_mode(gather_distributed, backend)
    if backend == "reference":
        return reference.arcl_loss(views, temperature)
    n = views.shape[0]
    v = F.normalize(views, dim=-1)
    scale = inverse_temperature(temperature, views)
    worst = worst_pair(v, backend=backend) * scale  # s_i⁺/τ, (N,)
    z = torch.cat([v[:, 0], v[:, 1]])
    lse_negatives, _, reduce = _local_rows(
        z, z, None, scale, mode, backend, pos_offset=n, exclude_self=True, include_pos=False
    )
    return reduce(_info_nce(lse_negatives, worst.repeat(2)))


# ==================================================================================================
# SigLIP (Zhai et al. 2023) and SupCon (Khosla et al. 2020) — appended section.
# SigLIP is the pairwise-sigmoid op (fastssl/ops/pairwise_sigmoid.py); SupCon is the pairwise-LSE op
# plus O(N·D) class sums for its positives.
# ==================================================================================================

from fastssl.ops.pairwise_sigmoid import pairwise_sigmoid  # noqa: E402  (this section's only new op)

__all__ += ["siglip_loss", "supcon_loss"]


def _check_finite_scalar(name: str, value: object) -> None:
    """A finite float or a 1-element floating tensor (SigLIP's bias, which may be any sign)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a 1-element floating tensor, got {value.dtype} of shape {tuple(value.shape)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def _scalar(value: Union[float, Tensor], like: Tensor) -> Tensor:
    """`value` as a 0-dim tensor on `like`'s device (fp32, fp64 for fp64 inputs), differentiable."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=like.device, dtype=dtype)
    return torch.full((), float(value), dtype=dtype, device=like.device)


def siglip_loss(
    z1: Tensor,
    z2: Tensor,
    scale: Union[float, Tensor] = reference.SIGLIP_INIT_TEMPERATURE,
    bias: Union[float, Tensor] = reference.SIGLIP_INIT_BIAS,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) between two towers.

    x = n(z1), y = n(z2) (N, D); logits ℓ_ij = t·x_i·y_j + b, labels +1 on the diagonal, −1 elsewhere::

        loss = −1/N Σ_ij log σ(label_ij·ℓ_ij) = 1/N Σ_ij softplus(−label_ij·ℓ_ij)

    Args: z1, z2 (N, D), N ≥ 2; scale t > 0 (the paper's "temperature" t = exp(t'), a multiplier;
    default 10, its initial value) and bias b (default −10), each a float or a 1-element tensor
    whose gradient is returned. Returns a 0-dim loss. Memory O(N·D) on the fused backends: the
    N x N logits are never stored (fastssl.ops.pairwise_sigmoid).

    gather_distributed=True (not in lightly — the single-process objective on the concatenated
    batch): this rank's rows against every rank's columns (one differentiable all-gather of n(z2)),
    the positive of local row i at global column offset + i; this rank's share of the global mean
    is returned, so the average over ranks is the loss of the whole batch. Under DDP, t and b must
    be averaged over the ranks like any parameter (put the loss module inside the DDP model).
    "ring" is not offered yet: the ring exchange (fastssl.distributed.RingLSE) is written for the
    pairwise-LSE op; SigLIP's would pass the same column blocks and add the row sums.
    """
    _check_pair(z1, z2)
    check_positive("scale", scale)
    _check_finite_scalar("bias", bias)
    backend = resolve_backend(backend, z1, op="pairwise_sigmoid")
    mode = _distributed_mode(gather_distributed, backend, ring=False)
    if backend == "reference":
        return reference.siglip_loss(z1, z2, scale, bias)
    x, y = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    t, b = _scalar(scale, z1), _scalar(bias, z1)
    if mode is None:
        return pairwise_sigmoid(x, y, t, b, backend=backend).mean()
    sizes = distributed.batch_sizes(x)
    columns = distributed.gather_cat(y, sizes)
    rows = pairwise_sigmoid(x, columns, t, b, pos_offset=distributed.row_offset(sizes), backend=backend)
    return distributed.global_mean(rows, sizes)


def _check_labels(labels: object, z: Tensor) -> Tensor:
    """labels: an integer (N,) tensor on z's device, N = z's rows."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integer class ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class ids, −1 for unlabeled), got {labels.dtype} "
                        f"of shape {tuple(labels.shape)}")  # fmt: skip
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"labels must have shape (N,) = ({z.shape[0]},) for z1 of shape {tuple(z.shape)}, "
                         f"got {tuple(labels.shape)}")  # fmt: skip
    if labels.device != z.device:
        raise ValueError(f"labels is on {labels.device} but z1 is on {z.device}")
    return labels


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
    _check_labels(labels, z1)
    check_positive("temperature", temperature)
    backend = resolve_backend(backend, z1)
    if backend == "reference":
        return reference.supcon_loss(z1, labels, temperature, z2)
    n = z1.shape[0]
    z = F.normalize(z1, dim=1)
    lab = labels
    if z2 is not None:
        z = torch.cat([z, F.normalize(z2, dim=1)])
        lab = torch.cat([labels, labels])
    scale = inverse_temperature(temperature, z1)
    lse, _ = pairwise_lse(z, z, None, scale, pos_offset=0, exclude_self=True, include_pos=False, backend=backend)
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
