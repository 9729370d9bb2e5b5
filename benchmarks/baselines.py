"""The speed baselines: each loss as users write it without fastssl, materialising its N x N, D x D or
rows x K matrix with the matmul in the input dtype.

lightly 1.6's formulas where lightly has the loss (NTXentLoss, DCLLoss, DCLWLoss, BarlowTwinsLoss,
VICRegLoss: the same masked copies and concatenations), the spec's (docs/design.md, "The losses")
written plainly otherwise. Every matmul runs in the input dtype — bf16 logits on tensor cores, no
upcast before the matmul — and the softmax / LSE / squared sums after it in fp32: what
``torch.autocast`` makes of such code (matmuls in bf16, softmax and cross-entropy in fp32). They are
the suite's providers ``materialising-bf16`` and, under ``torch.compile``, ``materialising-bf16-compiled``;
with fp32 inputs, where every step is fp32 and so exactly lightly's module, ``materialising`` and
``materialising-compiled``. ``fastssl.reference``, which upcasts to fp32 before the matmul, stays the
accuracy baseline.

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


# --------------------------------------------------------------------------------------------------
# the recent losses: lightly 1.6's module formulas (MACL, DirectCLR, KoLeo, FroSSL, TiCo, DINO, iBOT,
# SwaV, MSN) and the papers' plain formulas where lightly lacks the loss (SigLIP, SupCon).
# tests/spec/test_benchmark_baselines_lightly.py checks each lightly formula against lightly's module.
# --------------------------------------------------------------------------------------------------


def macl(z0: Tensor, z1: Tensor, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0) -> Tensor:
    """lightly's MACLLoss: the 2N x 2N similarities, the positive first, log_softmax at the
    model-aware temperature t = τ·(1 + α(A − A_0)), each anchor weighted by V = 1/(1 − P + eps)."""
    z0, z1 = F.normalize(z0, dim=-1, p=2), F.normalize(z1, dim=-1, p=2)
    out = torch.cat([z0, z1], dim=0)
    batch_size, n_samples = z0.shape[0], 2 * z0.shape[0]
    cov = (out @ out.T).float()
    mask = cov.new_ones(cov.shape, dtype=torch.bool)
    mask.diagonal()[:] = False
    mask.diagonal(batch_size)[:] = False
    mask.diagonal(-batch_size)[:] = False
    neg = cov.masked_select(mask).view(n_samples, -1)
    pos = torch.cat([torch.diag(cov, batch_size), torch.diag(cov, -batch_size)], dim=0).reshape(n_samples, 1)
    a = torch.mean(pos.detach())
    t = temperature * (1 + alpha * (a - A_0))
    log_pos_prob = F.log_softmax(torch.cat([pos, neg], dim=1) / t, dim=1)[:, 0]
    v = 1.0 / (1.0 - log_pos_prob.exp() + 1e-8)
    return (-v.detach() * log_pos_prob).mean()


def directclr(out0: Tensor, out1: Tensor, loss_dim: int = 64, temperature: float = 0.5) -> Tensor:
    """lightly's DirectCLRLoss: NTXentLoss on the first `loss_dim` entries of each flattened row."""
    return nt_xent(out0.flatten(start_dim=1)[:, :loss_dim], out1.flatten(start_dim=1)[:, :loss_dim], temperature)


def siglip(z1: Tensor, z2: Tensor, scale: float = 10.0, bias: float = -10.0) -> Tensor:
    """SigLIP (Zhai et al. 2023) as its paper writes it: the N x N logits t·x·yᵀ + b, labels 2I − 1,
    −Σ log σ(label·logit) / N."""
    x, y = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = scale * (x @ y.T).float() + bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def supcon(z1: Tensor, z2: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """SupCon's L_out (Khosla et al. 2020) as their code computes it with two views, without its
    τ/τ_base factor: the 2N x 2N logits, a positive mask from the labels, the mean log-probability
    of each anchor's positives (every anchor has one: its other view)."""
    z = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    lab = torch.cat([labels, labels])
    rows = z.shape[0]
    logits = (z @ z.T).float() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    self_mask = ~_eye(rows, z.device)
    positive = (lab[:, None] == lab[None, :]) & self_mask
    exp_logits = torch.exp(logits) * self_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    return -((positive * log_prob).sum(1) / positive.sum(1)).mean()


def koleo(x: Tensor, p: float = 2.0, eps: float = 1e-8) -> Tensor:
    """lightly's KoLeoLoss: the N x N cosine similarities, the self-similarity set to −2, argmax."""
    x = F.normalize(x, p=2, dim=-1, eps=eps)
    cos_sim = torch.mm(x, x.t())
    cos_sim.fill_diagonal_(-2)
    nn_dist = F.pairwise_distance(x.float(), x[cos_sim.argmax(dim=1)].float(), p=p, eps=eps)
    return -(nn_dist + eps).log().mean()


def frossl(z1: Tensor, z2: Tensor, invariance_weight: float = 1.0) -> Tensor:
    """lightly's FroSSLLoss on two views: per-dimension normalised views, the smaller of zᵀz / zzᵀ,
    divided by its trace (read on the host, ``.item()``), 2·log of its Frobenius norm, plus the
    invariance to the mean view."""
    z_views = [z1, z2]
    num_views, dim = len(z_views), z1.shape[1]
    normalized_z = [F.normalize(z, p=2, dim=0) for z in z_views]
    average_embedding = torch.mean(torch.stack(normalized_z), dim=0).float()
    total_regularization, total_invariance = 0.0, 0.0
    for z in normalized_z:
        cov = (z.T @ z if z.shape[0] > dim else z @ z.T).float()
        cov = cov / torch.trace(cov).item()
        total_regularization = total_regularization + 2 * torch.log(torch.linalg.norm(cov, ord="fro"))
        total_invariance = total_invariance + num_views * dim * F.mse_loss(z.float(), average_embedding)
    return total_regularization + invariance_weight * total_invariance


def tico(z_a: Tensor, z_b: Tensor, covariance: Tensor, beta: float = 0.9, rho: float = 8.0) -> Tensor:
    """lightly's TiCoLoss at a step whose running C is `covariance`: B = aᵀa/N (no gradient),
    C = βC + (1 − β)B, 1 − mean a·b + ρ·mean a C aᵀ."""
    z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    b = torch.mm(z_a.T, z_a).detach().float() / z_a.shape[0]
    c = beta * covariance.float() + (1 - beta) * b
    invariance = 1.0 - (z_a.float() * z_b.float()).sum(dim=1).mean()
    return invariance + rho * (torch.mm(z_a, c.to(z_a.dtype)).float() * z_a.float()).sum(dim=1).mean()


def _weight_normalised(v: Tensor) -> Tensor:
    """The weight of torch's weight_norm(nn.Linear) with its gain fixed at 1 (DINO's norm_last_layer):
    each row of v over its norm."""
    return v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


def _dino_on_logits(teacher_out: list[Tensor], student_out: list[Tensor], center: Tensor,
                    teacher_temp: float = 0.04, student_temp: float = 0.1) -> Tensor:
    """lightly's DINOLoss.forward on the heads' outputs (its centre update, O(K), left out)."""
    teacher_out_stacked = torch.stack(teacher_out).float()
    t_out = F.softmax((teacher_out_stacked - center) / torch.tensor(teacher_temp), dim=-1)
    s_out = F.log_softmax(torch.stack(student_out).float() / student_temp, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t_out, s_out)
    loss.fill_diagonal_(0)
    n_terms = loss.numel() - loss.diagonal().numel()
    return loss.sum() / (n_terms * teacher_out_stacked.shape[1])


def dino(student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor, center: Tensor) -> Tensor:
    """DINO: the heads' weight-normalised last layers on each crop's embedding (lightly's
    DINOProjectionHead: logits x·n(v)ᵀ; the teacher's without gradient), then lightly's DINOLoss."""
    with torch.no_grad():
        w_t = _weight_normalised(teacher_weight)
        teacher_out = [F.linear(t, w_t) for t in teacher]
    w = _weight_normalised(weight)
    return _dino_on_logits(teacher_out, [F.linear(s, w) for s in student], center.float())


def ibot(student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor, center: Tensor,
         mask: Tensor, teacher_temp: float = 0.04, student_temp: float = 0.1) -> Tensor:
    """iBOT's patch loss: the masked tokens through the weight-normalised last layers, then lightly's
    IBOTPatchLoss.forward (its centre update left out)."""
    with torch.no_grad():
        teacher_out = F.linear(teacher, _weight_normalised(teacher_weight)).float()
    student_out = F.linear(student, _weight_normalised(weight)).float()
    teacher_softmax = F.softmax((teacher_out - center.float()) / torch.tensor(teacher_temp), dim=-1)
    student_log_softmax = F.log_softmax(student_out / student_temp, dim=-1)
    loss = -torch.sum(teacher_softmax * student_log_softmax, dim=-1)
    num_masked_per_image = mask.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)
    weight_per_token = (1.0 / num_masked_per_image).expand_as(mask)[mask]
    return (loss * weight_per_token).sum() / mask.shape[0]


@torch.no_grad()
def _swav_sinkhorn(out: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """lightly's swav_loss.sinkhorn (one process)."""
    q = torch.exp(out / epsilon).t()
    q /= torch.sum(q)
    b = q.shape[1]
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def swav(high: Tensor, low: Tensor, prototypes: Tensor, temperature: float = 0.1, sinkhorn_iterations: int = 3,
         sinkhorn_epsilon: float = 0.05) -> Tensor:
    """SwaV: the prototype layer's scores x·Wᵀ of every crop, then lightly's SwaVLoss.forward (no queue)."""
    high_outputs = [(x @ prototypes.T).float() for x in high]
    low_outputs = [(x @ prototypes.T).float() for x in low]

    def subloss(z: Tensor, q: Tensor) -> Tensor:
        return -torch.mean(torch.sum(q * F.log_softmax(z / temperature, dim=1), dim=1))

    n_crops = len(high_outputs) + len(low_outputs)
    loss = high_outputs[0].new_zeros(1)
    for i in range(len(high_outputs)):
        q = _swav_sinkhorn(high_outputs[i].detach(), sinkhorn_iterations, sinkhorn_epsilon)
        sub = high_outputs[i].new_zeros(1)
        for v in range(len(high_outputs)):
            if v != i:
                sub = sub + subloss(high_outputs[v], q)
        for v in range(len(low_outputs)):
            sub = sub + subloss(low_outputs[v], q)
        loss = loss + sub / (n_crops - 1)
    return (loss / len(high_outputs)).reshape(())


@torch.no_grad()
def _msn_sinkhorn(probabilities: Tensor, iterations: int = 3) -> Tensor:
    """lightly's msn_loss.sinkhorn (one process)."""
    num_targets, num_prototypes = probabilities.shape
    probabilities = probabilities.T
    probabilities = probabilities / torch.sum(probabilities)
    for _ in range(iterations):
        probabilities /= torch.sum(probabilities, dim=1, keepdim=True)
        probabilities /= num_prototypes
        probabilities /= torch.sum(probabilities, dim=0, keepdim=True)
        probabilities /= num_targets
    probabilities *= num_targets
    return probabilities.T


def msn(anchors: Tensor, targets: Tensor, prototypes: Tensor, target_sharpen_temperature: float = 0.25,
        temperature: float = 0.1, sinkhorn_iterations: int = 3, regularization_weight: float = 1.0) -> Tensor:
    """lightly's MSNLoss.forward: softmax anchor probabilities over the normalised prototypes, sharpened
    Sinkhorn-Knopp targets, the cross-entropy as log(p^(−t)), the mean-entropy regulariser."""
    num_views = anchors.shape[0] // targets.shape[0]
    anchors, targets = F.normalize(anchors, dim=1), F.normalize(targets, dim=1)
    prototypes = F.normalize(prototypes, dim=1)
    anchor_probs = F.softmax((anchors @ prototypes.T).float() / temperature, dim=1)
    with torch.no_grad():
        target_probs = F.softmax((targets @ prototypes.T).float() / temperature, dim=1)
        target_probs = target_probs ** (1.0 / target_sharpen_temperature)
        target_probs /= torch.sum(target_probs, dim=1, keepdim=True)
        target_probs = _msn_sinkhorn(target_probs, sinkhorn_iterations).repeat((num_views, 1))
    loss = torch.mean(torch.sum(torch.log(anchor_probs ** (-target_probs)), dim=1))
    mean_anchor_probs = torch.mean(anchor_probs, dim=0)
    reg_loss = -torch.sum(torch.log(mean_anchor_probs ** (-mean_anchor_probs))) + math.log(len(mean_anchor_probs))
    return loss + regularization_weight * reg_loss


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
    "macl": macl,
    "directclr": directclr,
    "siglip": siglip,
    "supcon": supcon,
    "koleo": koleo,
    "frossl": frossl,
    "tico": tico,
    "dino": dino,
    "ibot": ibot,
    "swav": swav,
    "msn": msn,
}
