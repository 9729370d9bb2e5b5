"""fastssl's SwaV and MSN losses against lightly 1.6's `SwaVLoss` and `MSNLoss`: values and gradients, fp32.

docs/design.md: where lightly has the loss, fastssl's value, defaults and argument names must match it.
lightly is not a dependency (nor installed in CI): the module is skipped, with the reason, without it.
Run it in a virtualenv with lightly (README, "Checking against lightly"):
``PYTHONPATH=. python -m pytest tests/spec/test_swav_msn_lightly.py``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

lightly_loss = pytest.importorskip(
    "lightly.loss", reason="lightly is not installed; these tests compare fastssl's SwaV and MSN losses with lightly 1.6"
)

import fastssl.nn as fnn  # noqa: E402
from fastssl import reference  # noqa: E402

RTOL = 1e-5


def close(ours, theirs, what):
    theirs = theirs.reshape(ours.shape)  # lightly's SwaV loss is a 1-element tensor, fastssl's 0-dim
    atol = 1e-6 * max(1.0, float(theirs.detach().abs().max()))  # entries near 0 have no relative precision
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("ours,theirs", [(fnn.SwaVLoss, lightly_loss.SwaVLoss), (fnn.MSNLoss, lightly_loss.MSNLoss)])
def test_signatures_match(ours, theirs):
    def params(fn, drop=()):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n not in drop}

    assert params(ours.__init__, ("backend",)) == params(theirs.__init__)
    assert params(ours.forward) == params(theirs.forward)
    assert set(ours().state_dict()) == set(theirs().state_dict())


def _swav_inputs(n_high, n_low, b, k, d, bq, seed):
    gen = torch.Generator().manual_seed(seed)

    def rows(*shape):
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1)

    high = [rows(b, d).requires_grad_() for _ in range(n_high)]
    low = [rows(b, d).requires_grad_() for _ in range(n_low)]
    queue = [rows(bq, d) for _ in range(n_high)] if bq else None
    return high, low, queue, rows(k, d).requires_grad_()


@pytest.mark.parametrize("n_high,n_low,bq", [(2, 0, 0), (2, 6, 0), (2, 4, 16), (1, 2, 5), (3, 1, 0)])
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.2, "sinkhorn_iterations": 5, "sinkhorn_epsilon": 0.1},
                                    {"sinkhorn_iterations": 0}, {"sinkhorn_iterations": 1}])  # fmt: skip
def test_swav_matches_on_scores_and_fused(n_high, n_low, bq, kwargs):
    """forward on the scores x·Wᵀ, and forward_fused (torch and reference backends) on x and W, against
    lightly on the same scores: the loss and the gradients of the embeddings and of W."""
    high, low, queue, w = _swav_inputs(n_high, n_low, 6, 23, 10, bq, seed=n_high + 10 * n_low + bq)
    inputs = [w, *high, *low]
    q_scores = None if queue is None else [q @ w.detach().T for q in queue]
    theirs = lightly_loss.SwaVLoss(**kwargs)([h @ w.T for h in high], [v @ w.T for v in low], q_scores)
    g_theirs = torch.autograd.grad(theirs, inputs, allow_unused=True)
    runs = {"scores": lambda: fnn.SwaVLoss(**kwargs)([h @ w.T for h in high], [v @ w.T for v in low], q_scores)}
    for backend in ("torch", "reference"):
        runs[f"fused {backend}"] = lambda backend=backend: fnn.SwaVLoss(**kwargs, backend=backend).forward_fused(
            high, low, w, queue)
    for name, run in runs.items():
        ours = run()
        g_ours = torch.autograd.grad(ours, inputs, allow_unused=True)
        close(ours, theirs, f"{name} loss")
        for i, (a, g) in enumerate(zip(g_ours, g_theirs)):
            if g is None:  # lightly differentiates nothing here (a lone high view only gives codes)
                assert a is None or not bool(a.any()), f"{name} grad {i}"
                continue
            close(a, g, f"{name} grad {i}")


def test_swav_subloss_matches():
    z, q = torch.randn(5, 9, requires_grad=True), torch.softmax(torch.randn(5, 9), dim=1)
    close(fnn.SwaVLoss(temperature=0.3).subloss(z, q), lightly_loss.SwaVLoss(temperature=0.3).subloss(z, q), "subloss")


@pytest.mark.parametrize("views", [1, 4])
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.2, "sinkhorn_iterations": 0, "regularization_weight": 0.0},
                                    {"sinkhorn_iterations": 5, "regularization_weight": 0.3}])  # fmt: skip
@pytest.mark.parametrize("sharpen", [0.25, 0.6])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_msn_matches(views, kwargs, sharpen, backend):
    gen = torch.Generator().manual_seed(views)
    b, k, d = 6, 31, 12
    anchors = torch.randn(views * b, d, generator=gen).requires_grad_()
    targets = torch.randn(b, d, generator=gen)
    prototypes = torch.randn(k, d, generator=gen).requires_grad_()
    theirs = lightly_loss.MSNLoss(**kwargs)(anchors, targets, prototypes, sharpen)
    g_theirs = torch.autograd.grad(theirs, (anchors, prototypes))
    ours = fnn.MSNLoss(**kwargs, backend=backend)(anchors, targets, prototypes, sharpen)
    g_ours = torch.autograd.grad(ours, (anchors, prototypes))
    close(ours, theirs, "loss")
    for name, a, g in zip(("d anchors", "d prototypes"), g_ours, g_theirs):
        close(a, g, name)


def test_msn_regularization_loss_matches():
    p = torch.softmax(torch.randn(17), dim=0)
    close(fnn.MSNLoss().regularization_loss(p), lightly_loss.MSNLoss().regularization_loss(p), "regulariser")


def test_references_match_lightly():
    high, low, queue, w = _swav_inputs(2, 3, 4, 11, 6, 5, seed=0)
    with torch.no_grad():
        theirs = lightly_loss.SwaVLoss()([h @ w.T for h in high], [v @ w.T for v in low], [q @ w.T for q in queue])
        ours = reference.swav_loss(torch.stack(high), torch.stack(low), w, torch.stack(queue))
        close(ours, theirs, "swav reference")
        close(reference.swav_sinkhorn(high[0] @ w.T), lightly_loss.swav_loss.sinkhorn(high[0] @ w.T), "codes")
        anchors, targets = torch.randn(8, 6), torch.randn(4, 6)
        close(reference.msn_loss(anchors, targets, w), lightly_loss.MSNLoss()(anchors, targets, w), "msn reference")
