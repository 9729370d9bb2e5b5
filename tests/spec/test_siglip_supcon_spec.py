"""The SigLIP and SupCon specs (fastssl.reference) against independent float64 formulas.

The oracles here are written another way than the spec: scalar Python loops over the pairs with
the `math` module (SigLIP: Zhai et al. 2023, eq. 1; SupCon: Khosla et al. 2020, eq. 2, L_out), and,
for SupCon, the mask-matrix algorithm of Khosla et al.'s published code restated in torch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastssl import reference


def _softplus(u: float) -> float:
    return u + math.log1p(math.exp(-u)) if u > 0 else math.log1p(math.exp(u))


def siglip_loops(z1, z2, t, b):
    """1/N Σ_ij log(1 + exp(−label_ij·(t·x_i·y_j + b))), one pair at a time."""
    n = z1.shape[0]
    x = [[float(v) for v in row / row.norm()] for row in z1.double()]
    y = [[float(v) for v in row / row.norm()] for row in z2.double()]
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = t * sum(a * c for a, c in zip(x[i], y[j])) + b
            label = 1.0 if i == j else -1.0
            total += _softplus(-label * logit)
    return total / n


def supcon_loops(z1, labels, tau, z2=None):
    """Eq. 2 of Khosla et al. per anchor: −1/|P(i)| Σ_p log(exp(s_ip) / Σ_{a≠i} exp(s_ia)); mean over
    the anchors with a positive. Unlabeled (< 0) rows match no label; with two views, an anchor's
    other view is always a positive."""
    views = [z1] if z2 is None else [z1, z2]
    n = z1.shape[0]
    rows = [[float(v) for v in row / row.norm()] for z in views for row in z.double()]
    labs = [int(v) for v in labels] * len(views)
    r = len(rows)
    terms = []
    for i in range(r):
        s = [sum(a * c for a, c in zip(rows[i], rows[k])) / tau for k in range(r)]
        others = [s[a] for a in range(r) if a != i]
        top = max(others)
        lse = top + math.log(sum(math.exp(v - top) for v in others))
        pos = [p for p in range(r) if p != i and ((labs[p] == labs[i] and labs[i] >= 0) or
                                                   (z2 is not None and p == (i + n) % r))]  # fmt: skip
        if pos:
            terms.append(-sum(s[p] - lse for p in pos) / len(pos))
    return sum(terms) / len(terms) if terms else 0.0


def supcon_khosla_masks(z1, z2, labels, tau):
    """Khosla et al.'s published algorithm (contrast_mode 'all', τ = τ_base), restated: features
    (bsz, 2, D), view-major contrast rows, a label mask tiled 2 x 2, the self column masked out."""
    features = torch.stack([F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)], dim=1)
    bsz = features.shape[0]
    mask = (labels[:, None] == labels[None, :]).double()
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(2, 2)
    logits_mask = 1.0 - torch.eye(2 * bsz, dtype=torch.float64)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -mean_log_prob_pos.view(2, bsz).mean()


@pytest.mark.parametrize("n,d", [(2, 1), (3, 5), (7, 4)])
@pytest.mark.parametrize("t,b", [(10.0, -10.0), (1.0, 0.0), (100.0, 3.0)])
def test_siglip_matches_pairwise_loops(n, d, t, b):
    z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    got = reference.siglip_loss(z1, z2, t, b)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(siglip_loops(z1, z2, t, b), rel=1e-12, abs=1e-12)


def test_siglip_tensor_scale_and_bias_get_gradients():
    z1, z2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t, b: reference.siglip_loss(z1, z2, t, b), (t, b))
    reference.siglip_loss(z1, z2, t, b).backward()
    # dL/db = 1/N Σ_ij −label_ij·σ(−label_ij·ℓ_ij): checked by finite differences of the loops.
    h = 1e-6
    fd = (siglip_loops(z1, z2, 4.0, -2.0 + h) - siglip_loops(z1, z2, 4.0, -2.0 - h)) / (2 * h)
    assert float(b.grad) == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
def test_supcon_matches_per_anchor_loops(views, tau):
    n, d = 9, 4
    labels = torch.tensor([0, 1, 0, 2, -1, 1, 0, -1, 3])  # class 3 and the −1 rows: no same-label partner
    z1 = torch.randn(n, d, dtype=torch.float64)
    z2 = torch.randn(n, d, dtype=torch.float64) if views == 2 else None
    got = reference.supcon_loss(z1, labels, tau, z2)
    assert float(got) == pytest.approx(supcon_loops(z1, labels, tau, z2), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_supcon_matches_khosla_et_al_algorithm_when_every_anchor_has_a_positive(tau):
    # Two views: every anchor has its other view, so Khosla et al.'s code has no 0/0 and is the spec.
    z1, z2 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    labels = torch.tensor([3, 1, 3, 0, 1, 7, 0, 3])
    got = reference.supcon_loss(z1, labels, tau, z2)
    torch.testing.assert_close(got, supcon_khosla_masks(z1, z2, labels, tau), rtol=1e-12, atol=1e-12)


def test_supcon_unlabeled_two_views_is_nt_xent():
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    unlabeled = torch.full((6,), -1)
    torch.testing.assert_close(reference.supcon_loss(z1, unlabeled, 0.3, z2), reference.nt_xent_loss(z1, z2, 0.3),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_supcon_anchors_without_positive_leave_the_mean():
    z = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, -1])  # only rows 0 and 1 have a positive
    # Rows 2-4 are still negatives of rows 0 and 1, so the loss is that of a 2-anchor mean over 5 columns.
    want = supcon_loops(z, labels, 0.2)
    assert float(reference.supcon_loss(z, labels, 0.2)) == pytest.approx(want, rel=1e-12)
    assert float(reference.supcon_loss(z, torch.tensor([0, 1, 2, 3, -1]), 0.2)) == 0.0
