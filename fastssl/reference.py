"""The reference (spec) implementation of every fastssl loss and metric.

Plain, materialising PyTorch: each function builds the full N x N similarity / Gram matrix or the
D x D covariance matrix and applies the formula of docs/design.md ("The losses (the spec)") literally.
It is the specification, the test oracle for every backend, and the benchmark baseline; it is never
picked by ``backend="auto"``. Where lightly 1.6 has the loss, the value matches ``lightly.loss``
(tests/spec/test_lightly_reference.py checks values and gradients). The math comes from the papers:
ArCL (Zhao et al. 2023), alignment / class-centre divergence (Huang et al. 2023), the spectral
contrastive loss (HaoChen et al. 2021), VICReg-exp / VICReg-ctr (Garrido et al. 2023).

Conventions shared by every function:

* ``z1``, ``z2`` are (N, D) embeddings of two views of the same N samples; ``n(z)`` is row L2
  normalisation (``F.normalize``, eps 1e-12, so zero rows stay zero); LSE is ``torch.logsumexp``.
* Dtypes: fp64 inputs are computed in fp64 and give an fp64 loss (so ``gradcheck`` works);
  fp32 / bf16 / fp16 inputs are upcast to fp32 and give an fp32 loss. Every result is 0-dim.
  Autograd flows through the upcast, so gradients come back in the input dtype.
* Inputs are never modified. Nothing is validated here beyond what the math needs: the public API
  (``fastssl.functional``) checks shapes, dtypes and hyperparameters before calling in.
* A temperature may be a Python number or a 1-element tensor (the gradient flows to it).

This module depends on torch only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl._common import compute_dtype

__all__ = [
    "nt_xent_loss",
    "moco_loss",
    "dcl_loss",
    "clip_loss",
    "barlow_twins_loss",
    "vicreg_loss",
    "vicreg_exp_loss",
    "vicreg_ctr_loss",
    "spectral_contrastive_loss",
    "arcl_loss",
    "alignment",
    "uniformity",
    "class_center_divergence",
    "macl_loss",
    "directclr_loss",
    "frossl_loss",
    "tico_loss",
    "koleo_loss",
    "dino_loss_from_logits",
    "dino_loss",
    "ibot_patch_loss_from_logits",
    "ibot_patch_loss",
    "siglip_loss",
    "supcon_loss",
    "swav_sinkhorn",
    "swav_loss_from_scores",
    "swav_loss",
    "msn_sinkhorn",
    "msn_loss",
]

Temperature = Union[float, Tensor]

# Default temperature of VICReg-exp and VICReg-ctr; the reasons are in vicreg_exp_loss's docstring.
VICREG_EXP_TEMPERATURE = 0.1


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------



def _up(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """x in the compute dtype (out of place; a no-op when it already is)."""
    return x.to(compute_dtype(x) if dtype is None else dtype)


def _temp(temperature: Temperature, dtype: torch.dtype) -> Union[float, Tensor]:
    if isinstance(temperature, Tensor):
        return temperature.reshape(()).to(dtype)
    return float(temperature)


def _eye(n: int, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)


def _off_diagonal_sq_sum(c: Tensor) -> Tensor:
    """Σ_{i≠j} c_ij² of a square matrix."""
    return c.pow(2).masked_fill(_eye(c.shape[0], c.device), 0.0).sum()


def _covariance(x: Tensor) -> Tensor:
    """(x − x̄)ᵀ(x − x̄)/(N − 1) for x (N, D): the unbiased D x D covariance over the rows."""
    xc = x - x.mean(dim=0)
    return xc.T @ xc / (x.shape[0] - 1)


def _variance_term(x: Tensor, eps: float) -> Tensor:
    """VICReg v(x) = mean_d relu(1 − sqrt(Var_d(x) + eps)), Var unbiased over the N rows."""
    std = torch.sqrt(x.var(dim=0, unbiased=True) + eps)
    return F.relu(1.0 - std).mean()


def _cov_lse_term(x: Tensor, temperature: Temperature) -> Tensor:
    """c_exp(x) = (1/D) Σ_i LSE_{j≠i} Cov(x)_ij/τ for x (N, D)."""
    logits = _covariance(x) / _temp(temperature, x.dtype)
    logits = logits.masked_fill(_eye(logits.shape[0], logits.device), float("-inf"))
    return torch.logsumexp(logits, dim=1).mean()


# --------------------------------------------------------------------------------------------------
# sample-contrastive losses (pairwise LSE family)
# --------------------------------------------------------------------------------------------------


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: Temperature = 0.5) -> Tensor:
    """NT-Xent / SimCLR loss; equals ``lightly.loss.NTXentLoss(temperature)`` (no memory bank).

    Z = [n(z1); n(z2)] (2N, D), s_ab = Z_a·Z_b/τ, positive of anchor a is p(a) = (a + N) mod 2N::

        loss = 1/(2N) Σ_a [ LSE_{b≠a} s_ab − s_a,p(a) ]

    Args: z1, z2 (N, D); temperature τ > 0. Returns a 0-dim loss.
    """
    dtype = compute_dtype(z1)
    n = z1.shape[0]
    z = torch.cat([F.normalize(_up(z1, dtype), dim=1), F.normalize(_up(z2, dtype), dim=1)])
    logits = z @ z.T / _temp(temperature, dtype)
    rows = torch.arange(2 * n, device=z.device)
    pos = logits[rows, (rows + n) % (2 * n)]
    logits = logits.masked_fill(_eye(2 * n, z.device), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - pos).mean()


def moco_loss(query: Tensor, key: Tensor, bank: Tensor, temperature: Temperature = 0.5) -> Tensor:
    """MoCo: NT-Xent against a memory bank; equals ``NTXentLoss(temperature, memory_bank_size=(K, D))``.

    q = n(query), k = n(key) (N, D); bank (K, D) is used as given (lightly stores normalised rows),
    without gradient. With s_i⁺ = q_i·k_i/τ and s_ik = q_i·bank_k/τ::

        loss = 1/N Σ_i [ LSE({s_i⁺} ∪ {s_ik : k}) − s_i⁺ ]

    Note lightly hands its bank around as (D, K); ours is (K, D) (lightly's ``memory_bank.bank``).
    """
    dtype = compute_dtype(query)
    q = F.normalize(_up(query, dtype), dim=1)
    k = F.normalize(_up(key, dtype), dim=1)
    tau = _temp(temperature, dtype)
    pos = (q * k).sum(dim=1) / tau
    neg = q @ _up(bank.detach(), dtype).T / tau
    logits = torch.cat([pos[:, None], neg], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos).mean()


def _dcl_one_side(a: Tensor, b: Tensor, tau: Union[float, Tensor], weight: Optional[Tensor]) -> Tensor:
    n = a.shape[0]
    eye = _eye(n, a.device)
    s_aa = a @ a.T / tau
    s_ab = a @ b.T / tau
    pos = s_ab.diagonal()
    if weight is not None:
        pos = pos * weight
    # One LSE over the union of both negative sets {a_i·a_j, a_i·b_j : j ≠ i} (the positive is out).
    negs = torch.cat([s_aa.masked_fill(eye, float("-inf")), s_ab.masked_fill(eye, float("-inf"))], dim=1)
    return (torch.logsumexp(negs, dim=1) - pos).mean()


def dcl_loss(z1: Tensor, z2: Tensor, temperature: Temperature = 0.1, sigma: Optional[float] = None) -> Tensor:
    """Decoupled contrastive loss; equals ``lightly.loss.DCLLoss`` (sigma=None) / ``DCLWLoss(sigma)``.

    a = n(z1), b = n(z2) (N, D), s(x, y) = x·y/τ::

        L(a, b) = 1/N Σ_i [ −w_i s(a_i, b_i) + LSE_{j≠i}( {s(a_i, a_j)} ∪ {s(a_i, b_j)} ) ]
        loss    = ½ [ L(a, b) + L(b, a) ]

    w_i = 1 without sigma; with sigma, the negative von Mises-Fisher weights
    w = 2 − N·softmax_i(a_i·b_i/σ) over the batch, computed without gradient (DCLW).
    """
    dtype = compute_dtype(z1)
    a = F.normalize(_up(z1, dtype), dim=1)
    b = F.normalize(_up(z2, dtype), dim=1)
    tau = _temp(temperature, dtype)
    weight = None
    if sigma is not None:
        with torch.no_grad():
            weight = 2.0 - a.shape[0] * torch.softmax((a * b).sum(dim=1) / sigma, dim=0)
    return 0.5 * (_dcl_one_side(a, b, tau, weight) + _dcl_one_side(b, a, tau, weight))


def clip_loss(z1: Tensor, z2: Tensor, temperature: Temperature = 0.07) -> Tensor:
    """CLIP / two-tower InfoNCE (symmetric cross-entropy over an N x N similarity matrix).

    S = n(z1) n(z2)ᵀ/τ (N, N)::

        loss = ½ [ 1/N Σ_i (LSE_j S_ij − S_ii) + 1/N Σ_j (LSE_i S_ij − S_jj) ]

    ``temperature`` may be a float or a 0-dim tensor requiring grad (a learnable τ: its gradient is
    returned). z1 and z2 may come from different towers but share N and D.
    """
    dtype = compute_dtype(z1)
    s = F.normalize(_up(z1, dtype), dim=1) @ F.normalize(_up(z2, dtype), dim=1).T / _temp(temperature, dtype)
    diag = s.diagonal()
    return 0.5 * ((torch.logsumexp(s, dim=1) - diag).mean() + (torch.logsumexp(s, dim=0) - diag).mean())


# --------------------------------------------------------------------------------------------------
# dimension-contrastive / covariance losses (off-diagonal Frobenius family)
# --------------------------------------------------------------------------------------------------


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambda_param: float = 5e-3) -> Tensor:
    """Barlow Twins; equals ``lightly.loss.BarlowTwinsLoss(lambda_param)``.

    A, B (N, D) are the per-dimension batch norms of z1, z2 (mean over N, *biased* variance,
    eps 1e-5, no affine: ``F.batch_norm(training=True)``); C = AᵀB/N (D, D)::

        loss = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²
    """
    dtype = compute_dtype(z1)

    def batch_norm(z: Tensor) -> Tensor:
        z = _up(z, dtype)
        zc = z - z.mean(dim=0)
        return zc / torch.sqrt(zc.pow(2).mean(dim=0) + 1e-5)

    a, b = batch_norm(z1), batch_norm(z2)
    c = a.T @ b / a.shape[0]
    return (1.0 - c.diagonal()).pow(2).sum() + lambda_param * _off_diagonal_sq_sum(c)


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """VICReg; equals ``lightly.loss.VICRegLoss(lambda_param, mu_param, nu_param, eps=eps)``.

    For z1, z2 (N, D)::

        inv  = 1/(N·D) Σ_{i,d} (z1_id − z2_id)²                        (F.mse_loss, mean over all)
        v(z) = 1/D Σ_d relu(1 − sqrt(Var_d(z) + eps))                  (Var unbiased, over N)
        c(z) = 1/D Σ_{d≠e} Cov(z)_de²,  Cov = (z − z̄)ᵀ(z − z̄)/(N − 1)  (D, D)
        loss = λ·inv + μ·½[v(z1) + v(z2)] + ν·[c(z1) + c(z2)]
    """
    dtype = compute_dtype(z1)
    a, b = _up(z1, dtype), _up(z2, dtype)
    inv = (a - b).pow(2).mean()
    var = 0.5 * (_variance_term(a, eps) + _variance_term(b, eps))
    d = a.shape[1]
    cov = _off_diagonal_sq_sum(_covariance(a)) / d + _off_diagonal_sq_sum(_covariance(b)) / d
    return lambda_param * inv + mu_param * var + nu_param * cov


def vicreg_exp_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = VICREG_EXP_TEMPERATURE,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """VICReg-exp (Garrido et al. 2023): VICReg whose covariance penalty is a LogSumExp (dimension-contrastive).

    Same invariance and variance terms as :func:`vicreg_loss`; the covariance term c(z) becomes::

        c_exp(z) = 1/D Σ_d LSE_{e≠d} Cov(z)_de/τ,   Cov = (z − z̄)ᵀ(z − z̄)/(N − 1)  (D, D)
        loss     = λ·inv + μ·½[v(z1) + v(z2)] + ν·[c_exp(z1) + c_exp(z2)]

    i.e. each dimension d is an anchor contrasted against the other D − 1 dimensions, with no
    positive term (like DCL's negative LSE). Cov is used as is (not squared), as in Garrido et al. 2023.
    Needs D ≥ 2.

    Default τ = 0.1 (no official code exists). Why: the variance hinge holds every std near 1, so
    Cov entries are correlation-sized, |Cov_de| ≲ 1 — the same range as the cosine similarities of
    SimCLR / DCL. c_exp has exactly the shape of DCL's decoupled negative LSE, whose default
    (lightly ``DCLLoss``) is τ = 0.1; at that τ the LSE concentrates on the most correlated pairs
    of dimensions, much as VICReg's squared penalty does. VICReg-ctr uses the same default so
    that the two differ only by the transpose (the duality the seed studies).
    """
    dtype = compute_dtype(z1)
    a, b = _up(z1, dtype), _up(z2, dtype)
    inv = (a - b).pow(2).mean()
    var = 0.5 * (_variance_term(a, eps) + _variance_term(b, eps))
    cov = _cov_lse_term(a, temperature) + _cov_lse_term(b, temperature)
    return lambda_param * inv + mu_param * var + nu_param * cov


def vicreg_ctr_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = VICREG_EXP_TEMPERATURE,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """VICReg-ctr (Garrido et al. 2023): VICReg-exp with the variance and c_exp terms applied to zᵀ (sample-contrastive).

    Exactly VICReg-exp with the roles of N and D swapped, so that
    ``vicreg_ctr_loss(z1, z2) == vicreg_exp_loss(z1.T, z2.T)``. For z1, z2 (N, D)::

        inv       = 1/(N·D) Σ_{i,d} (z1_id − z2_id)²                 (unchanged; symmetric in N, D)
        v_ctr(z)  = 1/N Σ_i relu(1 − sqrt(Var_i(z) + eps))         Var_i: unbiased (1/(D − 1))
                                                                     variance of sample i's D coordinates
        G(z)      = (z − z̄_row)(z − z̄_row)ᵀ/(D − 1)  (N, N)        z̄_row: each row's mean over its D
                                                                     coordinates (row-centring)
        c_ctr(z)  = 1/N Σ_i LSE_{j≠i} G(z)_ij/τ                     (1/N in front of the N row LSEs)
        loss      = λ·inv + μ·½[v_ctr(z1) + v_ctr(z2)] + ν·[c_ctr(z1) + c_ctr(z2)]

    Each sample is an anchor contrasted against the other N − 1 samples of its own view through
    the (centred, scaled) Gram matrix: the InfoNCE-like side of the duality. Default τ = 0.1, the
    same as VICReg-exp (reasons there). Needs N ≥ 2 and D ≥ 2.
    """
    dtype = compute_dtype(z1)
    a, b = _up(z1, dtype).T, _up(z2, dtype).T  # (D, N): dimensions play the role of samples
    inv = (a - b).pow(2).mean()
    var = 0.5 * (_variance_term(a, eps) + _variance_term(b, eps))
    cov = _cov_lse_term(a, temperature) + _cov_lse_term(b, temperature)
    return lambda_param * inv + mu_param * var + nu_param * cov


def spectral_contrastive_loss(z1: Tensor, z2: Tensor, mu: float = 1.0) -> Tensor:
    """Spectral contrastive loss (HaoChen et al. 2021), as the authors' code computes it.

    Rows with ‖z‖ ≥ √μ are scaled back to radius √μ (z ← √μ·n(z)); rows inside are kept. Then::

        part1 = −(2/N) Σ_i z1_i·z2_i
        part2 = 1/(N(N − 1)) Σ_{i≠j} (z1_i·z2_j)²      (cross-view pairs only)
        loss  = (part1 + part2)/μ
    """
    dtype = compute_dtype(z1)
    radius = math.sqrt(mu)

    def clip_norm(z: Tensor) -> Tensor:
        z = _up(z, dtype)
        inside = z.detach().norm(dim=1, keepdim=True) < radius
        return torch.where(inside, z, F.normalize(z, dim=1) * radius)

    a, b = clip_norm(z1), clip_norm(z2)
    n = a.shape[0]
    part1 = -2.0 * (a * b).sum() / n
    part2 = _off_diagonal_sq_sum(a @ b.T) / (n * (n - 1))
    return (part1 + part2) / mu


def arcl_loss(views: Union[Tensor, Sequence[Tensor]], temperature: Temperature = 0.5) -> Tensor:
    """ArCL on top of SimCLR (Zhao et al. 2023, Algorithm 1): NT-Xent with the worst positive pair.

    views: (N, m, D), or a list of m tensors (N, D); m ≥ 2. Rows are normalised: z_ij = n(view j of
    sample i). Worst positive (the pair of views farthest apart)::

        s_i⁺ = min_{j<k} z_ij·z_ik

    Anchors are views 0 and 1 of every sample: Z = [z_·0; z_·1] (2N, D), s_ab = Z_a·Z_b, anchor a
    belongs to sample i = a mod N and its partner is p(a) = (a + N) mod 2N::

        ℓ_a  = −s_i⁺/τ + log( exp(s_i⁺/τ) + Σ_{b ∉ {a, p(a)}} exp(s_ab/τ) )
        loss = 1/(2N) Σ_a ℓ_a

    With m = 2, s_i⁺ = z_i0·z_i1 and this is :func:`nt_xent_loss`. The gradient of s_i⁺ flows
    through the selected pair only; on ties the first pair in (j, k) lexicographic order wins
    (``torch.argmin`` returns the first minimum).
    """
    if not isinstance(views, Tensor):
        views = torch.stack(list(views), dim=1)
    dtype = compute_dtype(views)
    v = F.normalize(_up(views, dtype), dim=-1)  # (N, m, D)
    n, m = v.shape[0], v.shape[1]
    tau = _temp(temperature, dtype)

    j, k = torch.triu_indices(m, m, offset=1, device=v.device)  # pairs j<k, lexicographic
    pair_sims = (v @ v.transpose(1, 2))[:, j, k]  # (N, m(m−1)/2)
    worst = pair_sims.detach().argmin(dim=1, keepdim=True)
    s_pos = pair_sims.gather(1, worst).squeeze(1)  # (N,)

    z = torch.cat([v[:, 0], v[:, 1]])  # (2N, D)
    logits = z @ z.T / tau
    rows = torch.arange(2 * n, device=v.device)
    excluded = _eye(2 * n, v.device)
    excluded[rows, (rows + n) % (2 * n)] = True  # the anchor itself and its partner view
    pos = torch.cat([s_pos, s_pos]) / tau
    all_logits = torch.cat([pos[:, None], logits.masked_fill(excluded, float("-inf"))], dim=1)
    return (torch.logsumexp(all_logits, dim=1) - pos).mean()


# --------------------------------------------------------------------------------------------------
# metrics (Wang & Isola 2020; Huang et al. 2023)
# --------------------------------------------------------------------------------------------------


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """Alignment (Wang & Isola 2020): mean_i ‖z1_i − z2_i‖^α for z1, z2 (N, D).

    No normalisation inside: pass normalised embeddings to get the paper's metric.
    """
    dtype = compute_dtype(z1)
    # ‖·‖^α as (‖·‖²)^(α/2): no square root, so identical rows give a zero (not NaN) gradient at α = 2.
    return (_up(z1, dtype) - _up(z2, dtype)).pow(2).sum(dim=1).pow(alpha / 2).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity (Wang & Isola 2020): log mean_{i≠j} exp(−t‖z_i − z_j‖²) for z (N, D), N ≥ 2.

    Computed as an LSE over the N(N − 1) off-diagonal pairs minus log(N(N − 1)) (equal to the
    paper's ``pdist`` form over i<j, the kernel being symmetric), with ‖z_i − z_j‖² =
    ‖z_i‖² + ‖z_j‖² − 2 z_i·z_j clamped at 0. No normalisation inside.
    """
    z = _up(z)
    n = z.shape[0]
    sq_norms = z.pow(2).sum(dim=1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    logits = (-t * sq_dist).masked_fill(_eye(n, z.device), float("-inf"))
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(n * (n - 1))


def class_center_divergence(z: Tensor, labels: Tensor) -> Tensor:
    """Divergence of class centres (Huang et al. 2023): max_{k≠l} μ_kᵀμ_l.

    z (N, D), labels (N,) integer class ids with at least two distinct values. μ_k is the mean of
    the *row-normalised* embeddings n(z_i) of class k. Normalising is our choice: Huang et al. (2023)'s bound
    compares μ_kᵀμ_l with r², embeddings lying on a sphere of radius r (r = 1 here), which keeps
    the metric comparable across losses whose raw embedding scales differ (Barlow Twins, VICReg)
    and bounded in [−1, 1]. Lower is better (centres farther apart).
    """
    zn = F.normalize(_up(z), dim=1)
    classes, inverse = torch.unique(labels, return_inverse=True)
    one_hot = F.one_hot(inverse, num_classes=classes.numel()).to(zn.dtype)  # (N, K)
    centres = (one_hot.T @ zn) / one_hot.sum(dim=0)[:, None]  # (K, D)
    k, l = torch.triu_indices(centres.shape[0], centres.shape[0], offset=1, device=zn.device)
    return (centres @ centres.T)[k, l].max()


# --------------------------------------------------------------------------------------------------
# lightly 1.6's further losses (appended section): MACL, DirectCLR, FroSSL, TiCo, KoLeo — each the
# formula of its lightly module written out literally (tests/spec/test_lightly_losses.py checks both).
# --------------------------------------------------------------------------------------------------



def macl_loss(
    z1: Tensor, z2: Tensor, temperature: Temperature = 0.1, alpha: float = 0.5, A_0: float = 0.0, eps: float = 1e-8
) -> Tensor:
    """Model-aware contrastive loss (Huang et al. 2023); equals ``lightly.loss.MACLLoss(temperature, alpha, A_0)``.

    Z = [n(z1); n(z2)] (2N, D), s_ab = Z_a·Z_b, positive p(a) = (a + N) mod 2N::

        A       = mean_a s_a,p(a)                (no gradient)
        t       = τ·(1 + α·(A − A_0))
        log P_a = s_a,p(a)/t − LSE_{b≠a} s_ab/t
        loss    = 1/(2N) Σ_a −V_a·log P_a,   V_a = 1/(1 − P_a + eps)   (no gradient through V)
    """
    dtype = compute_dtype(z1)
    n = z1.shape[0]
    z = torch.cat([F.normalize(_up(z1, dtype), dim=1), F.normalize(_up(z2, dtype), dim=1)])
    sim = z @ z.T
    rows = torch.arange(2 * n, device=z.device)
    pos = sim[rows, (rows + n) % (2 * n)]
    t = _temp(temperature, dtype) * (1 + alpha * (pos.detach().mean() - A_0))
    log_p = pos / t - torch.logsumexp((sim / t).masked_fill(_eye(2 * n, z.device), float("-inf")), dim=1)
    weight = 1.0 / (1.0 - log_p.exp() + eps)
    return (-weight.detach() * log_p).mean()


def directclr_loss(
    z1: Tensor, z2: Tensor, loss_dim: int = 64, temperature: Temperature = 0.5, bank: Optional[Tensor] = None
) -> Tensor:
    """DirectCLR (Jing et al. 2022); equals ``lightly.loss.DirectCLRLoss(loss_dim, temperature)``.

    NT-Xent (with a memory bank: MoCo) on the first ``loss_dim`` entries of each flattened row::

        loss = nt_xent_loss(z1.flatten(1)[:, :loss_dim], z2.flatten(1)[:, :loss_dim], τ)

    bank, when given, is (K, loss_dim), as :func:`moco_loss`'s.
    """
    a, b = z1.flatten(start_dim=1)[:, :loss_dim], z2.flatten(start_dim=1)[:, :loss_dim]
    return nt_xent_loss(a, b, temperature) if bank is None else moco_loss(a, b, bank, temperature)


def frossl_loss(z_views: Sequence[Tensor], invariance_weight: float = 1.0) -> Tensor:
    """FroSSL (Skean et al. 2024); equals ``lightly.loss.FroSSLLoss(invariance_weight)([z_1, ..., z_V])``.

    ẑ_v = z_v normalised per dimension (F.normalize(z_v, dim=0)), z̄ = mean_v ẑ_v; C_v = ẑ_vᵀẑ_v (D, D)
    when N > D, else ẑ_vẑ_vᵀ (N, N) — the same non-zero eigenvalues, so the same Frobenius norm::

        loss = Σ_v 2·log ‖C_v / tr(C_v)‖_F + invariance_weight·Σ_v V·D·mean_{N,D}(ẑ_v − z̄)²

    tr(C_v) is a constant to autograd (lightly divides by ``trace.item()``).
    """
    dtype = compute_dtype(z_views[0])
    views = [F.normalize(_up(z, dtype), p=2, dim=0) for z in z_views]
    mean_view = torch.stack(views).mean(dim=0)
    n, d = views[0].shape
    total_reg, total_inv = 0.0, 0.0
    for z in views:
        cov = z.T @ z if n > d else z @ z.T
        cov = cov / torch.trace(cov).detach()
        total_reg = total_reg + 2 * torch.log(torch.linalg.norm(cov, ord="fro"))
        total_inv = total_inv + len(views) * d * F.mse_loss(z, mean_view)
    return total_reg + invariance_weight * total_inv


def tico_loss(
    z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor] = None, beta: float = 0.9, rho: float = 8.0
) -> Tensor:
    """TiCo (Zhu et al. 2022); equals ``lightly.loss.TiCoLoss(beta, rho)`` whose running C is `covariance`.

    a = n(z_a), b = n(z_b) (N, D); B = aᵀa/N (D, D, no gradient); C = β·covariance + (1 − β)·B
    (covariance None: the zero matrix of lightly's first step)::

        loss = 1 − 1/N Σ_i a_i·b_i + ρ/N Σ_i a_i C a_iᵀ

    (the module then stores C as the next step's covariance).
    """
    dtype = compute_dtype(z_a)
    a, b = F.normalize(_up(z_a, dtype), dim=1), F.normalize(_up(z_b, dtype), dim=1)
    c = (1 - beta) * (a.T @ a).detach() / a.shape[0]
    if covariance is not None:
        c = c + beta * _up(covariance.detach(), dtype)
    return 1.0 - (a * b).sum(dim=1).mean() + rho * ((a @ c) * a).sum(dim=1).mean()


def koleo_loss(x: Tensor, p: float = 2.0, eps: float = 1e-8) -> Tensor:
    """KoLeo (Sablayrolles et al. 2019); equals ``lightly.loss.KoLeoLoss(p, eps)(x)``.

    u = x normalised per row with eps (F.normalize(x, eps=eps)); S = uuᵀ (N, N) with its diagonal
    set to −2 (below every cosine); j(i) = argmax_j S_ij (the first on ties)::

        loss = −1/N Σ_i log(‖u_i − u_j(i) + eps‖_p + eps)      (torch.pairwise_distance(p, eps))
    """
    u = F.normalize(_up(x), p=2, dim=-1, eps=eps)
    sim = (u @ u.T).detach().fill_diagonal_(-2.0)
    distance = F.pairwise_distance(u, u[sim.argmax(dim=1)], p=p, eps=eps)
    return -(distance + eps).log().mean()

# prototype cross-entropy: DINO (Caron et al. 2021) — family 4, appended section
# --------------------------------------------------------------------------------------------------



def dino_loss_from_logits(
    teacher_logits: Tensor,
    student_logits: Tensor,
    center: Optional[Tensor] = None,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
) -> Tensor:
    """DINO's cross-entropy on finished logits: lightly 1.6's ``DINOLoss.forward`` without its centre update.

    teacher_logits (T, B, K) and student_logits (S, B, K) are T and S views (crops) of B images; the
    centre c is (K,) (or lightly's (1, 1, K); zeros when None)::

        p_t[q, b]     = softmax((teacher_logits[q, b] − c)/τt)
        log p_s[v, b] = log_softmax(student_logits[v, b]/τs)
        loss = 1/(B·n_terms) Σ_{q ≠ v} Σ_b −p_t[q, b]·log p_s[v, b],   n_terms = T·S − min(T, S)

    View q of the teacher and view v = q of the student are the same crop and are skipped. As in
    lightly, gradients flow into both logit tensors (DINO's teacher is gradient-free by construction).
    """
    dtype = compute_dtype(student_logits)
    t, s = _up(teacher_logits, dtype), _up(student_logits, dtype)
    if center is not None:
        t = t - _up(center, dtype).reshape(-1)
    p_t = torch.softmax(t / _temp(teacher_temp, dtype), dim=-1)
    log_p_s = torch.log_softmax(s / _temp(student_temp, dtype), dim=-1)
    ce = -torch.einsum("qbk,vbk->qv", p_t, log_p_s)  # (T, S), summed over the batch
    pairs = ~torch.eye(ce.shape[0], ce.shape[1], dtype=torch.bool, device=ce.device)
    return ce[pairs].sum() / (pairs.sum() * t.shape[1])


def dino_loss(
    student: Tensor,
    teacher: Tensor,
    prototypes: Tensor,
    center: Optional[Tensor] = None,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
    teacher_prototypes: Optional[Tensor] = None,
) -> Tensor:
    """DINO's loss from the embeddings that enter the head's last layer: the logits, materialised.

    student (S, B, D), teacher (T, B, D), prototypes W (K, D) (the student's last-layer weight),
    teacher_prototypes W_t (K, D) (the EMA teacher's; W when None). Student logits s·Wᵀ, teacher
    logits t·W_tᵀ without gradient (DINO's stop-gradient), then :func:`dino_loss_from_logits`.
    """
    dtype = compute_dtype(student)
    w = _up(prototypes, dtype)
    w_t = w if teacher_prototypes is None else _up(teacher_prototypes, dtype)
    teacher_logits = (_up(teacher, dtype) @ w_t.T).detach()
    return dino_loss_from_logits(teacher_logits, _up(student, dtype) @ w.T, center, student_temp, teacher_temp)


def _masked_token_weights(mask: Tensor, n_tokens: int, dtype: torch.dtype) -> Tensor:
    """1/(masked tokens of the token's image) per masked token, in mask's row-major order (lightly's)."""
    per_image = mask.reshape(mask.shape[0], -1).sum(dim=1).clamp(min=1).to(dtype)
    weights = (1.0 / per_image)[:, None].expand(mask.shape[0], mask[0].numel())[mask.reshape(mask.shape[0], -1)]
    if weights.shape[0] != n_tokens:
        raise ValueError(f"mask has {weights.shape[0]} True entries but there are {n_tokens} masked tokens")
    return weights


def ibot_patch_loss_from_logits(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Tensor,
    center: Optional[Tensor] = None,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
) -> Tensor:
    """iBOT's masked-patch loss (Zhou et al. 2022; DINOv2's form, Oquab et al. 2023) on finished logits:
    lightly 1.6's ``IBOTPatchLoss.forward`` without its centre update.

    teacher_logits, student_logits (M, K): the M masked patch tokens, in the row-major order of the
    True entries of mask (B, H, W) (or (B, N)); centre (K,) or (1, K) (zeros when None)::

        CE_i = −Σ_k softmax((t_i − c)/τt)_k · log_softmax(s_i/τs)_k
        loss = 1/B Σ_i CE_i / (masked tokens of the image of token i)
    """
    dtype = compute_dtype(student_logits)
    t, s = _up(teacher_logits, dtype), _up(student_logits, dtype)
    if center is not None:
        t = t - _up(center, dtype).reshape(-1)
    p_t = torch.softmax(t / _temp(teacher_temp, dtype), dim=-1)
    ce = -(p_t * torch.log_softmax(s / _temp(student_temp, dtype), dim=-1)).sum(dim=-1)
    return (ce * _masked_token_weights(mask, ce.shape[0], dtype)).sum() / mask.shape[0]


def ibot_patch_loss(
    student: Tensor,
    teacher: Tensor,
    prototypes: Tensor,
    mask: Tensor,
    center: Optional[Tensor] = None,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
    teacher_prototypes: Optional[Tensor] = None,
) -> Tensor:
    """iBOT's masked-patch loss from the embeddings of the masked tokens (M, D) that enter the head's
    last layer: logits s·Wᵀ and t·W_tᵀ (the latter without gradient), then
    :func:`ibot_patch_loss_from_logits`."""
    dtype = compute_dtype(student)
    w = _up(prototypes, dtype)
    w_t = w if teacher_prototypes is None else _up(teacher_prototypes, dtype)
    teacher_logits = (_up(teacher, dtype) @ w_t.T).detach()
    return ibot_patch_loss_from_logits(teacher_logits, _up(student, dtype) @ w.T, mask, center, student_temp,
                                       teacher_temp)

# ==================================================================================================
# SigLIP (Zhai et al. 2023) and SupCon (Khosla et al. 2020) — appended section, one place for both.
# ==================================================================================================


#: SigLIP's initialisation (Zhai et al. 2023): t = exp(t') with t' = log 10, and b = −10.
SIGLIP_INIT_TEMPERATURE = 10.0
SIGLIP_INIT_BIAS = -10.0
#: SupCon's temperature (Khosla et al. 2020 train with τ = 0.1).
SUPCON_TEMPERATURE = 0.1


def siglip_loss(z1: Tensor, z2: Tensor, scale: Temperature = SIGLIP_INIT_TEMPERATURE,
                bias: Union[float, Tensor] = SIGLIP_INIT_BIAS) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023).

    x = n(z1), y = n(z2) (N, D); logits ℓ_ij = t·x_i·y_j + b with t = `scale` (the paper's
    "temperature", a multiplier: exp of the learnable t') and b = `bias`; labels +1 on the diagonal
    and −1 elsewhere::

        loss = −1/N Σ_ij log σ(label_ij·ℓ_ij) = 1/N Σ_ij softplus(−label_ij·ℓ_ij)

    Args: z1, z2 (N, D); scale t > 0 and bias b, floats or 1-element tensors (gradients flow to them).
    """
    dtype = compute_dtype(z1)
    x = F.normalize(_up(z1, dtype), dim=1)
    y = F.normalize(_up(z2, dtype), dim=1)
    logits = _temp(scale, dtype) * (x @ y.T) + _temp(bias, dtype)
    labels = 2.0 * torch.eye(x.shape[0], dtype=dtype, device=x.device) - 1.0
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


def supcon_loss(z1: Tensor, labels: Tensor, temperature: Temperature = SUPCON_TEMPERATURE,
                z2: Optional[Tensor] = None) -> Tensor:
    """Supervised contrastive loss, the L_out form (Khosla et al. 2020, eq. 2).

    Rows Z = n(z1) (N rows), or with a second view Z = [n(z1); n(z2)] (2N rows, SimCLR's order) with
    the labels repeated. s_ia = Z_i·Z_a/τ; A(i) = every row but i; P(i) = the rows a ≠ i with the
    label of i, and, with two views, the other view of i's sample whatever the label::

        ℓ_i  = LSE_{a∈A(i)} s_ia − 1/|P(i)| Σ_{p∈P(i)} s_ip
        loss = mean of ℓ_i over the anchors with |P(i)| > 0

    Negative labels (−1) mark unlabeled rows: they share a class with no row, so their only positive
    is their other view (with two views; with one view they have none), and they are negatives of
    every other anchor. Anchors with no positive are left out of the mean: Khosla et al.'s code
    divides by |P(i)| = 0 there (NaN), pytorch-metric-learning's SupConLoss drops them as here.
    No anchor with a positive at all gives 0 (an empty mean). Khosla et al.'s code also multiplies
    by τ/τ_base (τ_base = 0.07); the paper's loss, written here, has no such factor.

    Args: z1 (N, D); labels (N,) integers; temperature τ > 0; z2 (N, D) or None. Returns a 0-dim loss.
    """
    dtype = compute_dtype(z1)
    z = F.normalize(_up(z1, dtype), dim=1)
    lab = labels
    n = z1.shape[0]
    if z2 is not None:
        z = torch.cat([z, F.normalize(_up(z2, dtype), dim=1)])
        lab = torch.cat([labels, labels])
    rows = z.shape[0]
    eye = _eye(rows, z.device)
    logits = z @ z.T / _temp(temperature, dtype)
    positive = (lab[:, None] == lab[None, :]) & (lab[:, None] >= 0) & ~eye
    if z2 is not None:
        index = torch.arange(rows, device=z.device)
        positive[index, (index + n) % rows] = True
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    count = positive.sum(1)
    mean_log_prob = (log_prob * positive).sum(1) / count.clamp_min(1)
    has_positive = count > 0
    return -(mean_log_prob * has_positive).sum() / has_positive.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------
# prototype codes: SwaV (Caron et al. 2020) and MSN (Assran et al. 2022) — family 4, appended section
# --------------------------------------------------------------------------------------------------



def swav_sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """SwaV's codes (N, K) of scores (N, K): Sinkhorn-Knopp (Cuturi 2013) as SwaV's code runs it.

        Q = exp(scoresᵀ/ε)/Σ (K x N);  T times: each prototype's row /= its sum, then each sample's
        column /= its sum and /= N;  codes = N·Qᵀ

    exp(s/ε − max s/ε) stands for exp(s/ε): the constant factor cancels in the first normalisation
    (lightly 1.6's `sinkhorn` takes no max and overflows fp32 for scores past 88·ε). No gradient.
    """
    z = _up(scores).detach() / epsilon
    q = torch.exp(z - z.max()).T
    q = q / q.sum()
    n = q.shape[1]
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).T


def swav_loss_from_scores(
    high_resolution: Union[Tensor, Sequence[Tensor]],
    low_resolution: Union[Tensor, Sequence[Tensor]] = (),
    queue: Optional[Union[Tensor, Sequence[Tensor]]] = None,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
) -> Tensor:
    """SwaV's swapped prediction (Caron et al. 2020) on prototype scores: lightly 1.6's ``SwaVLoss.forward``.

    high_resolution: H views (B, K) of scores z = x·Wᵀ, low_resolution: L views (B, K), queue: H
    views (Bq, K) of the queue's scores (or None). For each high-resolution view i the codes
    q_i = swav_sinkhorn([z_i; queue_i])[:B] (no gradient), and with V = H + L views::

        CE(z, q) = −(1/B) Σ_b Σ_k q_bk·log_softmax_k(z_b/τ)
        loss = 1/H Σ_i 1/(V − 1) Σ_{v ≠ i} CE(z_v, q_i)

    Gradients reach every score tensor through log_softmax (not through the codes).
    """
    high, low = list(high_resolution), list(low_resolution)
    dtype = compute_dtype(high[0])
    n_views = len(high) + len(low)
    total = 0.0
    for i, z_i in enumerate(high):
        rows = z_i if queue is None else torch.cat([z_i, queue[i]])
        q = swav_sinkhorn(rows.to(dtype), sinkhorn_iterations, sinkhorn_epsilon)[: z_i.shape[0]]
        sub = 0.0
        for v, z_v in enumerate(high + low):
            if v != i:
                sub = sub - (q * torch.log_softmax(_up(z_v, dtype) / temperature, dim=1)).sum(dim=1).mean()
        total = total + sub / (n_views - 1)
    return total / len(high)


def swav_loss(
    high_resolution: Tensor,
    low_resolution: Optional[Tensor],
    prototypes: Tensor,
    queue: Optional[Tensor] = None,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
) -> Tensor:
    """SwaV's loss from the embeddings x (H, B, D), (L, B, D) (or None) and the prototypes W (K, D): the
    scores x·Wᵀ (queue (H, Bq, D) likewise), materialised, then :func:`swav_loss_from_scores`."""
    dtype = compute_dtype(high_resolution)
    w = _up(prototypes, dtype)
    low = () if low_resolution is None else _up(low_resolution, dtype) @ w.T
    q = None if queue is None else _up(queue, dtype) @ w.T
    return swav_loss_from_scores(_up(high_resolution, dtype) @ w.T, low, q, temperature, sinkhorn_iterations,
                                 sinkhorn_epsilon)


def msn_sinkhorn(probabilities: Tensor, iterations: int = 3) -> Tensor:
    """MSN's Sinkhorn-Knopp on probabilities P (B, K), as MSN's code runs it (no gradient)::

        Q = Pᵀ/ΣP (K x B);  T times: each prototype's row /= its sum and /= K, then each sample's
        column /= its sum and /= B;  codes = B·Qᵀ          (T = 0: P unchanged)
    """
    if iterations <= 0:
        return probabilities
    q = probabilities.detach().T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def msn_loss(
    anchors: Tensor,
    targets: Tensor,
    prototypes: Tensor,
    target_sharpen_temperature: float = 0.25,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    regularization_weight: float = 1.0,
) -> Tensor:
    """MSN's loss (Assran et al. 2022): lightly 1.6's ``MSNLoss.forward``.

    anchors (V·B, D) are V views of B images (view-major: anchor i is image i mod B), targets (B, D),
    prototypes (K, D); n(·) normalises rows, τ = temperature, T = target_sharpen_temperature::

        p_i = softmax(n(a_i)·n(W)ᵀ/τ)                               anchor probabilities (V·B, K)
        t_b = msn_sinkhorn(sharpen(softmax(n(t_b)·n(W)ᵀ/τ), T))     targets, no gradient
        sharpen(p, T) = p^(1/T)/Σ_k p_k^(1/T)
        loss = mean_i −Σ_k t_(i mod B),k·log p_ik + λ·(Σ_k p̄_k·log p̄_k + log K),   p̄ = mean_i p_i
    """
    dtype = compute_dtype(anchors)
    a = F.normalize(_up(anchors, dtype), dim=1)
    t = F.normalize(_up(targets, dtype), dim=1)
    w = F.normalize(_up(prototypes, dtype), dim=1)
    probs = torch.softmax(a @ w.T / temperature, dim=1)
    with torch.no_grad():
        target = torch.softmax(t @ w.T / temperature, dim=1) ** (1.0 / target_sharpen_temperature)
        target = msn_sinkhorn(target / target.sum(dim=1, keepdim=True), sinkhorn_iterations)
        target = target.repeat(anchors.shape[0] // targets.shape[0], 1)
    loss = -(target * torch.log(probs)).sum(dim=1).mean()
    if regularization_weight > 0:
        mean_probs = probs.mean(dim=0)
        loss = loss + regularization_weight * ((mean_probs * torch.log(mean_probs)).sum() + math.log(w.shape[0]))
    return loss
