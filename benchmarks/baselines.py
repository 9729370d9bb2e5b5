"""The speed baselines: each loss as users write it without fastssl, materialising its N x N or D x D
matrix with the matmul in the input dtype.

lightly 1.6's formulas where lightly has the loss (NTXentLoss, DCLLoss, DCLWLoss, BarlowTwinsLoss,
VICRegLoss: the same masked copies and concatenations), the spec's (docs/design.md, "The losses")
written plainly otherwise. Every matmul runs in the input dtype — bf16 logits on tensor cores, no
upcast before the matmul — and the softmax / LSE / squared sums after it in fp32: what
``torch.autocast`` makes of such code (matmuls in bf16, softmax and cross-entropy in fp32). They are
the suite's providers ``materialising-bf16`` and, under ``torch.compile``, ``materialising-bf16-compiled``;
``fastssl.reference``, which upcasts to fp32 before the matmul, stays the accuracy baseline.

Each function takes the suite's inputs (providers.make_inputs) and the loss's defaults and returns a
0-dim fp32 loss. ``BY_LOSS`` maps the suite's loss keys (specs.SPECS) to them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import env  # noqa: F401  (puts the checkout on sys.path before fastssl is imported)
from fastssl.reference import VICREG_EXP_TEMPERATURE


def _eye(n: int, device: torch.device) -> Tensor:
    return torch.eye(n, device=device, dtype=torch.bool)


# --------------------------------------------------------------------------------------------------
# pairwise (logits, then an fp32 softmax / LSE)
# --------------------------------------------------------------------------------------------------


def nt_xent(out0: Tensor, out1: Tensor, temperature: float = 0.5) -> Tensor:
    """lightly's NTXentLoss (no memory bank, one process): four N x N blocks, the self-similarities
    dropped, cross-entropy over the 2N x (2N − 1) logits."""
    batch_size = out0.shape[0]
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    diag_mask = _eye(batch_size, out0.device)
    logits_00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
    logits_01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
    logits_10 = torch.einsum("nc,mc->nm", out1, out0) / temperature
    logits_11 = torch.einsum("nc,mc->nm", out1, out1) / temperature
    logits_00 = logits_00[~diag_mask].view(batch_size, -1)
    logits_11 = logits_11[~diag_mask].view(batch_size, -1)
    logits = torch.cat([torch.cat([logits_01, logits_00], dim=1), torch.cat([logits_10, logits_11], dim=1)])
    labels = torch.arange(batch_size, device=out0.device).repeat(2)
    return F.cross_entropy(logits.float(), labels)


def moco(query: Tensor, key: Tensor, bank: Tensor, temperature: float = 0.5) -> Tensor:
    """lightly's NTXentLoss with a memory bank: the positive, then the bank's K negatives (the bank is
    (K, D) here, lightly's (D, K) transposed)."""
    out0, out1 = F.normalize(query, dim=1), F.normalize(key, dim=1)
    sim_pos = (out0 * out1).sum(dim=1, keepdim=True)  # lightly's einsum("nc,nc->n"), a row-wise dot
    sim_neg = torch.einsum("nc,kc->nk", out0, bank)
    logits = torch.cat([sim_pos, sim_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.long)
    return F.cross_entropy(logits.float(), labels)


def _mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float) -> Tensor:
    """lightly's negative_mises_fisher_weights: 2 − N·softmax(out0_i·out1_i/σ), without gradient."""
    similarity = (out0.detach() * out1.detach()).sum(dim=1).float() / sigma
    return 2 - out0.shape[0] * F.softmax(similarity, dim=0)


def _dcl_one_side(out0: Tensor, out1: Tensor, temperature: float, sigma: Optional[float]) -> Tensor:
    batch_size = out0.shape[0]
    diag_mask = _eye(batch_size, out0.device)
    sim_00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
    sim_01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
    positive_loss = -sim_01[diag_mask].float()
    if sigma is not None:
        positive_loss = positive_loss * _mises_fisher_weights(out0, out1, sigma)
    sim_00 = sim_00[~diag_mask].view(batch_size, -1)
    sim_01 = sim_01[~diag_mask].view(batch_size, -1)
    negative_loss = torch.logsumexp(torch.cat([sim_00, sim_01], dim=1).float(), dim=1)
    return (positive_loss + negative_loss).mean()


def dcl(out0: Tensor, out1: Tensor, temperature: float = 0.1, sigma: Optional[float] = None) -> Tensor:
    """lightly's DCLLoss (sigma None) / DCLWLoss(sigma): both directions, averaged."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    return 0.5 * (_dcl_one_side(out0, out1, temperature, sigma) + _dcl_one_side(out1, out0, temperature, sigma))


def clip(z1: Tensor, z2: Tensor, temperature: float = 0.07) -> Tensor:
    """The two-tower CLIP loss as usually written: one N x N logit matrix, cross-entropy both ways."""
    logits = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels))


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """Wang & Isola (2020)'s uniformity through the Gram matrix (their torch.pdist form has no
    tensor-core path): ‖z_i − z_j‖² = ‖z_i‖² + ‖z_j‖² − 2 z_i·z_j, an LSE over the pairs i ≠ j."""
    n = z.shape[0]
    sq_norms = z.float().pow(2).sum(dim=1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * (z @ z.T).float()).clamp_min(0)
    logits = (-t * sq_dist).masked_fill(_eye(n, z.device), float("-inf"))
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(n * (n - 1))


def _variance_loss(x: Tensor, eps: float) -> Tensor:
    """lightly's VICReg variance_loss, in fp32 (an O(N·D) term)."""
    std = torch.sqrt(x.float().var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def _covariance_lse(x: Tensor, temperature: float) -> Tensor:
    """c_exp(x) = mean_d LSE_{e≠d} Cov(x)_de/τ, with Cov = (x − x̄)ᵀ(x − x̄)/(N − 1) formed in x's dtype."""
    x = x - x.mean(dim=0)
    cov = (x.T @ x).float() / (x.shape[0] - 1)
    logits = (cov / temperature).masked_fill(_eye(cov.shape[0], cov.device), float("-inf"))
    return torch.logsumexp(logits, dim=1).mean()


def vicreg_exp(z1: Tensor, z2: Tensor, temperature: float = VICREG_EXP_TEMPERATURE, lambda_param: float = 25.0,
               mu_param: float = 25.0, nu_param: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg-exp (Garrido et al. 2023): lightly's VICReg terms, c replaced by the D x D covariance LSE."""
    invariance = F.mse_loss(z1.float(), z2.float())
    variance = 0.5 * (_variance_loss(z1, eps) + _variance_loss(z2, eps))
    covariance = _covariance_lse(z1, temperature) + _covariance_lse(z2, temperature)
    return lambda_param * invariance + mu_param * variance + nu_param * covariance


def vicreg_ctr(z1: Tensor, z2: Tensor, temperature: float = VICREG_EXP_TEMPERATURE, lambda_param: float = 25.0,
               mu_param: float = 25.0, nu_param: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg-ctr (Garrido et al. 2023): VICReg-exp on zᵀ (the N x N Gram of row-centred embeddings)."""
    return vicreg_exp(z1.T, z2.T, temperature, lambda_param, mu_param, nu_param, eps)


def arcl(views: Tensor, temperature: float = 0.5) -> Tensor:
    """ArCL (Zhao et al. 2023, Algorithm 1) as written from the paper: each sample's m x m view
    similarities (a batched matmul), the worst positive pair, then NT-Xent's logits over views 0 and 1."""
    v = F.normalize(views, dim=-1)
    n, m = v.shape[0], v.shape[1]
    first, second = torch.triu_indices(m, m, offset=1, device=v.device)
    s_pos = (v @ v.transpose(1, 2))[:, first, second].min(dim=1).values.float() / temperature
    z = torch.cat([v[:, 0], v[:, 1]])
    rows = torch.arange(2 * n, device=z.device)
    excluded = _eye(2 * n, z.device)
    excluded[rows, (rows + n) % (2 * n)] = True  # the anchor itself and its partner view
    logits = (z @ z.T / temperature).masked_fill(excluded, float("-inf"))
    pos = torch.cat([s_pos, s_pos])
    return (torch.logsumexp(torch.cat([pos[:, None], logits.float()], dim=1), dim=1) - pos).mean()


# --------------------------------------------------------------------------------------------------
# Frobenius family (a D x D or N x N matrix, then fp32 squared sums)
# --------------------------------------------------------------------------------------------------


def _off_diagonal(x: Tensor) -> Tensor:
    """lightly's flattened view of the off-diagonal entries of a square matrix."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins(z_a: Tensor, z_b: Tensor, lambda_param: float = 5e-3) -> Tensor:
    """lightly's BarlowTwinsLoss: batch-normalised views, C = AᵀB/N (D x D)."""
    z_a_norm = F.batch_norm(z_a, None, None, training=True)
    z_b_norm = F.batch_norm(z_b, None, None, training=True)
    c = (z_a_norm.T @ z_b_norm).float() / z_a.shape[0]
    invariance_loss = (torch.diagonal(c) - 1).pow(2).sum()
    redundancy_reduction_loss = _off_diagonal(c).pow(2).sum()
    return invariance_loss + lambda_param * redundancy_reduction_loss


def _covariance_loss(x: Tensor) -> Tensor:
    """lightly's VICReg covariance_loss: Σ_{d≠e} Cov_de² / D, Cov formed in x's dtype."""
    x = x - x.mean(dim=0)
    batch_size, dim = x.shape
    nondiag_mask = ~_eye(dim, x.device)
    cov = torch.einsum("bc,bd->cd", x, x).float() / (batch_size - 1)
    return cov[nondiag_mask].pow(2).sum() / dim


def vicreg(z_a: Tensor, z_b: Tensor, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
           eps: float = 1e-4) -> Tensor:
    """lightly's VICRegLoss: invariance (MSE, fp32 as under autocast), variance, covariance."""
    invariance = F.mse_loss(z_a.float(), z_b.float())
    variance = 0.5 * (_variance_loss(z_a, eps) + _variance_loss(z_b, eps))
    covariance = _covariance_loss(z_a) + _covariance_loss(z_b)
    return lambda_param * invariance + mu_param * variance + nu_param * covariance


def spectral_contrastive(z1: Tensor, z2: Tensor, mu: float = 1.0) -> Tensor:
    """The spectral contrastive loss (HaoChen et al. 2021) as the spec writes it: rows clipped to radius
    √μ, part2 over the off-diagonal (z1_i·z2_j)² of the N x N product."""
    radius = math.sqrt(mu)

    def clip_norm(z: Tensor) -> Tensor:
        inside = z.detach().norm(dim=1, keepdim=True) < radius
        return torch.where(inside, z, F.normalize(z, dim=1) * radius)

    a, b = clip_norm(z1), clip_norm(z2)
    n = a.shape[0]
    part1 = -2.0 * (a.float() * b.float()).sum() / n
    part2 = (a @ b.T).float().pow(2).masked_fill(_eye(n, a.device), 0.0).sum() / (n * (n - 1))
    return (part1 + part2) / mu


#: The suite's loss keys (specs.SPECS) -> their baseline; each spec's kwargs (DCLW's sigma) are passed on.
BY_LOSS: dict[str, Callable[..., Tensor]] = {
    "nt_xent": nt_xent,
    "moco": moco,
    "dcl": dcl,
    "dclw": dcl,
    "clip": clip,
    "uniformity": uniformity,
    "vicreg_exp": vicreg_exp,
    "vicreg_ctr": vicreg_ctr,
    "arcl_m4": arcl,
    "arcl_m8": arcl,
    "barlow_twins": barlow_twins,
    "vicreg": vicreg,
    "spectral_contrastive": spectral_contrastive,
}
