"""The SwaV and MSN specs (fastssl.reference.swav_*, msn_*; Caron et al. 2020, Assran et al. 2022)
against an independent float64 oracle, the log-domain codes of the functional API, and the validation
of the public API built on them.

The oracle is numpy with explicit loops: Sinkhorn-Knopp (Cuturi 2013) as element-wise sums over
python loops, the cross-entropies as −Σ_k q_k·log p_k with explicit exponentials, no torch softmax.
A second, algorithm-free check: many Sinkhorn-Knopp steps reach the matrix whose rows sum to 1 and
whose prototype columns sum to B/K (the equipartition SwaV asks for).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.nn as fnn
from fastssl import reference as ref

RTOL, ATOL = 1e-10, 1e-12  # fp64 spec vs fp64 oracle


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(requires_grad)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def oracle_sinkhorn(scores, iterations, epsilon, msn=False):
    """SwaV's (or, msn=True, MSN's, on probabilities) Sinkhorn-Knopp with python loops over entries."""
    n, k = scores.shape
    q = np.exp(scores / epsilon) if not msn else scores.copy()
    q = q / q.sum()
    for _ in range(iterations):
        for j in range(k):  # each prototype's mass over the batch
            total = sum(q[b, j] for b in range(n))
            for b in range(n):
                q[b, j] /= total * (k if msn else 1)
        for b in range(n):  # each sample's mass over the prototypes
            total = sum(q[b, j] for j in range(k))
            for j in range(k):
                q[b, j] /= total * n
    return q * n


def oracle_swav(high, low, queue, tau, iterations, epsilon):
    """lightly's loop over (high view i, view v ≠ i), each −mean_b Σ_k q_bk·log p_bk, in numpy."""
    high = [h.detach().numpy() for h in high]
    low = [v.detach().numpy() for v in low]
    views = high + low
    total = 0.0
    for i, z_i in enumerate(high):
        rows = z_i if queue is None else np.concatenate([z_i, queue[i].detach().numpy()])
        q = oracle_sinkhorn(rows, iterations, epsilon)[: z_i.shape[0]]
        sub = 0.0
        for v, z_v in enumerate(views):
            if v == i:
                continue
            ces = [-(q[b] * np.log(np_softmax(z_v[b] / tau))).sum() for b in range(z_v.shape[0])]
            sub += float(np.mean(ces))
        total += sub / (len(views) - 1)
    return total / len(high)


def np_normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def oracle_msn(anchors, targets, prototypes, sharpen, tau, iterations, weight):
    a, t, w = (np_normalize(x.detach().numpy()) for x in (anchors, targets, prototypes))
    probs = np.stack([np_softmax(a[i] @ w.T / tau) for i in range(a.shape[0])])
    target = np.stack([np_softmax(t[b] @ w.T / tau) ** (1 / sharpen) for b in range(t.shape[0])])
    target = target / target.sum(axis=1, keepdims=True)
    if iterations > 0:
        target = oracle_sinkhorn(target, iterations, 1.0, msn=True)
    b = t.shape[0]
    ce = float(np.mean([-(target[i % b] * np.log(probs[i])).sum() for i in range(a.shape[0])]))
    if weight > 0:
        mean = probs.mean(axis=0)
        ce += weight * (float((mean * np.log(mean)).sum()) + math.log(w.shape[0]))
    return ce


# --------------------------------------------------------------------------------------------------
# SwaV


@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("epsilon", [0.05, 0.7])
def test_sinkhorn_matches_oracle(iterations, epsilon):
    scores = F.normalize(randn(6, 4), dim=1) @ F.normalize(randn(9, 4), dim=1).T
    got = ref.swav_sinkhorn(scores, iterations, epsilon)
    want = oracle_sinkhorn(scores.numpy(), iterations, epsilon)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=RTOL, atol=ATOL)


def test_sinkhorn_converges_to_equipartition():
    """Many steps: rows sum to 1, prototype columns to B/K (SwaV's equal partition of the batch)."""
    scores = F.normalize(randn(8, 3), dim=1) @ F.normalize(randn(5, 3), dim=1).T
    for codes in (ref.swav_sinkhorn(scores, 300, 0.3),
                  fastssl.functional._swav_codes_from_scores(scores, 0.3, 300, False)):  # fmt: skip
        torch.testing.assert_close(codes.sum(1), torch.ones(8, dtype=torch.float64), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(codes.sum(0), torch.full((5,), 8 / 5, dtype=torch.float64), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("iterations", [0, 2, 3])
def test_log_domain_codes_match_spec(iterations):
    scores = randn(7, 11)
    got = fastssl.functional._swav_codes_from_scores(scores, 0.3, iterations, False)
    torch.testing.assert_close(got, ref.swav_sinkhorn(scores, iterations, 0.3), rtol=RTOL, atol=ATOL)


def test_log_domain_codes_survive_large_scores():
    """Scores past 88·ε overflow exp in fp32 (lightly's codes are NaN there); the log domain is exact."""
    scores = randn(5, 6) * 10
    got = fastssl.functional._swav_codes_from_scores(scores.float(), 0.05, 3, False)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), ref.swav_sinkhorn(scores, 3, 0.05), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_high,n_low", [(2, 0), (2, 3), (1, 1), (3, 2)])
@pytest.mark.parametrize("queue", [False, True])
@pytest.mark.parametrize("iterations", [0, 3])
def test_swav_from_scores_matches_oracle(n_high, n_low, queue, iterations):
    b, k = 4, 7
    high, low = randn(n_high, b, k), randn(n_low, b, k)
    q = randn(n_high, 5, k) if queue else None
    want = oracle_swav(list(high), list(low), q, 0.2, iterations, 0.3)
    got = ref.swav_loss_from_scores(high, low, q, 0.2, iterations, 0.3)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    functional = fastssl.swav_loss_from_scores(list(high), list(low), q, temperature=0.2,
                                               sinkhorn_iterations=iterations, sinkhorn_epsilon=0.3)  # fmt: skip
    torch.testing.assert_close(functional, got, rtol=RTOL, atol=ATOL)


def test_swav_embeddings_match_oracle():
    high, low, w, queue = randn(2, 3, 5), randn(2, 3, 5), randn(9, 5), randn(2, 4, 5)
    got = ref.swav_loss(high, low, w, queue, 0.2, 3, 0.3)
    want = oracle_swav(list(high @ w.T), list(low @ w.T), queue @ w.T, 0.2, 3, 0.3)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    got = ref.swav_loss(high, None, w, None, 0.2, 3, 0.3)
    torch.testing.assert_close(got, torch.tensor(oracle_swav(list(high @ w.T), [], None, 0.2, 3, 0.3),
                                                 dtype=torch.float64), rtol=RTOL, atol=ATOL)  # fmt: skip


def test_swav_gradcheck_and_codes_without_gradient():
    # The low-resolution views do not enter the codes: a numerical gradient sees what autograd does.
    high, low = randn(2, 3, 6), randn(2, 3, 6, requires_grad=True)
    for fn in (lambda v: ref.swav_loss_from_scores(high, v, None, 0.3, 3, 0.5),
               lambda v: fastssl.swav_loss_from_scores(high, v, temperature=0.3, sinkhorn_epsilon=0.5)):  # fmt: skip
        assert torch.autograd.gradcheck(fn, (low,))
    # The codes carry no gradient: the gradient of view i's scores is that of its log-softmax only.
    z = randn(2, 3, 6, requires_grad=True)
    loss = ref.swav_loss_from_scores(z, [], None, 0.3, 3, 0.5)
    (grad,) = torch.autograd.grad(loss, z)
    q = [ref.swav_sinkhorn(z[i], 3, 0.5) for i in range(2)]
    # loss = ½[CE(z_1, q_0) + CE(z_0, q_1)], dCE(z, q)/dz_b = (softmax(z_b/τ) − q_b)/(τ·B), B = 3
    want = torch.stack([(torch.softmax(z[0] / 0.3, 1) - q[1]) / (0.3 * 3 * 2),
                        (torch.softmax(z[1] / 0.3, 1) - q[0]) / (0.3 * 3 * 2)])  # fmt: skip
    torch.testing.assert_close(grad, want.detach(), rtol=RTOL, atol=ATOL)


def test_dtype_rules():
    high, w = torch.randn(2, 3, 4), torch.randn(8, 4)
    assert ref.swav_loss(high, None, w).dtype == torch.float32
    assert ref.swav_loss(high.bfloat16(), None, w.bfloat16()).dtype == torch.float32
    assert ref.swav_loss(high.double(), None, w.double()).dtype == torch.float64
    a, t = torch.randn(6, 4), torch.randn(3, 4)
    assert ref.msn_loss(a.half(), t.half(), w.half()).dtype == torch.float32
    assert ref.msn_loss(a.double(), t.double(), w.double()).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# MSN


@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("weight", [0.0, 1.0, 0.3])
def test_msn_matches_oracle(views, iterations, weight):
    b, k, d = 4, 9, 5
    anchors, targets, w = randn(views * b, d), randn(b, d), randn(k, d)
    got = ref.msn_loss(anchors, targets, w, 0.25, 0.2, iterations, weight)
    want = oracle_msn(anchors, targets, w, 0.25, 0.2, iterations, weight)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=ATOL)


def test_msn_sinkhorn_matches_oracle():
    probs = torch.softmax(randn(5, 7), dim=1)
    for iterations in (0, 1, 4):
        want = probs.numpy() if iterations == 0 else oracle_sinkhorn(probs.numpy(), iterations, 1.0, msn=True)
        torch.testing.assert_close(ref.msn_sinkhorn(probs, iterations), torch.from_numpy(want), rtol=RTOL, atol=ATOL)


def test_msn_gradcheck():
    # The anchors only: the targets' codes depend on W without gradient, which a numerical gradient sees.
    anchors, w, targets = randn(6, 4, requires_grad=True), randn(7, 4), randn(3, 4)
    assert torch.autograd.gradcheck(lambda a: ref.msn_loss(a, targets, w, 0.5, 0.3, 3, 0.7), (anchors,))


# --------------------------------------------------------------------------------------------------
# validation


def _swav_good():
    return dict(high_resolution=torch.randn(2, 3, 4), low_resolution=torch.randn(1, 3, 4),
                prototypes=torch.randn(8, 4))  # fmt: skip


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(high_resolution=torch.randn(6, 4)), ValueError, r"high_resolution must have 3 dimensions"),
        (dict(low_resolution=torch.randn(1, 3, 5)), ValueError, r"must have the same embedding dimension"),
        (dict(low_resolution=torch.randn(1, 2, 4)), ValueError,
         r"must have the same batch size B, got \(B, D\) = \(2, 4\) and \(3, 4\)"),
        (dict(prototypes=torch.randn(8, 5)), ValueError, r"high_resolution\[0\] and prototypes must have the same"),
        (dict(prototypes=torch.randn(8, 4).double()), TypeError, r"is torch.float32 but prototypes is"),
        (dict(high_resolution=torch.randn(2, 3, 4).long()), TypeError, r"must be float16, bfloat16, float32"),
        (dict(prototypes="W"), TypeError, r"prototypes must be a torch.Tensor"),
        (dict(high_resolution=torch.randn(1, 3, 4), low_resolution=None), ValueError,
         r"at least two crops \(views\), got 1 high-resolution and 0 low-resolution"),
        (dict(queue=[torch.randn(5, 4)]), ValueError, r"queue needs one view per high-resolution view: got 1 for 2"),
        (dict(queue=torch.randn(2, 5, 3)), ValueError, r"queue\[0\] and high_resolution\[0\] must have the same"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
        (dict(sinkhorn_epsilon=-1.0), ValueError, r"sinkhorn_epsilon must be a finite number > 0"),
        (dict(temperature=torch.tensor(0.1)), TypeError, r"temperature must be a float"),
        (dict(sinkhorn_iterations=-1), ValueError, r"sinkhorn_iterations must be >= 0, got -1"),
        (dict(sinkhorn_iterations=2.0), TypeError, r"sinkhorn_iterations must be an int"),
        (dict(sinkhorn_gather_distributed="ring"), ValueError, r"sinkhorn_gather_distributed='ring' is for"),
        (dict(backend="cudnn"), ValueError, r"backend must be one of"),
        (dict(high_resolution=[]), ValueError, r"high_resolution needs at least one view"),
    ],
)
def test_swav_loss_validation(change, error, match):
    with pytest.raises(error, match=match):
        fastssl.swav_loss(**dict(_swav_good(), **change))


def test_swav_from_scores_validation():
    with pytest.raises(ValueError, match=r"high_resolution_outputs\[0\] and high_resolution_outputs\[1\] must have"):
        fastssl.swav_loss_from_scores([torch.randn(2, 8), torch.randn(3, 8)], [])
    with pytest.raises(ValueError, match=r"at least two crops"):
        fastssl.swav_loss_from_scores([torch.randn(2, 8)], [])
    with pytest.raises(ValueError, match=r"queue_outputs needs one view per high-resolution view"):
        fastssl.swav_loss_from_scores([torch.randn(2, 8)] * 2, [], [torch.randn(4, 8)] * 3)


def _msn_good():
    return dict(anchors=torch.randn(6, 4), targets=torch.randn(3, 4), prototypes=torch.randn(8, 4))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(anchors=torch.randn(7, 4)), ValueError,
         r"anchors must have V·B rows \(V views of the B = 3 target images\), got anchors \(7, 4\) and targets \(3, 4\)"),
        (dict(targets=torch.randn(3, 5)), ValueError, r"anchors and targets must have the same embedding dimension"),
        (dict(prototypes=torch.randn(8, 3)), ValueError, r"anchors and prototypes must have the same embedding"),
        (dict(targets=torch.randn(3, 4).half()), TypeError, r"anchors is torch.float32 but targets is torch.float16"),
        (dict(anchors=torch.randn(6, 4, 1)), ValueError, r"anchors must have 2 dimensions"),
        (dict(target_sharpen_temperature=0.0), ValueError, r"target_sharpen_temperature must be a finite number > 0"),
        (dict(temperature=-0.1), ValueError, r"temperature must be a finite number > 0"),
        (dict(sinkhorn_iterations=-2), ValueError, r"sinkhorn_iterations must be >= 0"),
        (dict(regularization_weight=float("nan")), ValueError, r"regularization_weight must be a finite number"),
        (dict(regularization_weight="1"), TypeError, r"regularization_weight must be a float"),
        (dict(gather_distributed="ring"), ValueError, r"gather_distributed='ring' is for"),
    ],
)
def test_msn_loss_validation(change, error, match):
    with pytest.raises(error, match=match):
        fastssl.msn_loss(**dict(_msn_good(), **change))


def test_module_validation():
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        fnn.SwaVLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"sinkhorn_iterations must be >= 0"):
        fnn.SwaVLoss(sinkhorn_iterations=-1)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fnn.SwaVLoss(backend="nope")
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        fnn.MSNLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"sinkhorn_iterations must be >= 0"):
        fnn.MSNLoss(sinkhorn_iterations=-1)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fnn.MSNLoss(backend="nope")


def test_triton_backend_rejects_float64():
    good = {k: v.double() for k, v in _swav_good().items()}
    with pytest.raises((TypeError, ValueError), match="triton"):
        fastssl.swav_loss(**good, backend="triton")
    with pytest.raises((TypeError, ValueError), match="triton"):
        fastssl.msn_loss(**{k: v.double() for k, v in _msn_good().items()}, backend="triton")


def test_inputs_not_modified():
    swav, msn = _swav_good(), _msn_good()
    queue = torch.randn(2, 5, 4)
    before = [t.clone() for t in (*swav.values(), *msn.values(), queue)]
    fastssl.swav_loss(**swav, queue=queue)
    fnn.SwaVLoss()(list(swav["high_resolution"] @ swav["prototypes"].T), [], list(queue @ swav["prototypes"].T))
    fastssl.msn_loss(**msn)
    for a, b in zip((*swav.values(), *msn.values(), queue), before):
        assert torch.equal(a, b)
