"""lightly 1.6's MACL, DirectCLR, FroSSL, TiCo and KoLeo losses: the spec against independent float64
formulas, and every backend against lightly's own modules.

1. Oracles: each loss written a different way from fastssl.reference — Python loops over anchors,
   pairs and samples with torch scalar ops (so autograd differentiates them independently), or a
   different algebraic route (FroSSL's Frobenius norm from singular values). Compared with the
   reference in float64 (value and gradient, rtol 1e-10).
2. lightly parity (skipped, with the reason, where lightly is not installed): fastssl's module on
   `reference`, `torch` and `triton` (under TRITON_INTERPRET=1) against lightly's module of the same
   name and arguments, fp32 value and gradients, module state (memory bank, TiCo's C) step by step,
   and the constructor signatures. Run with
   ``PYTHONPATH=. python -m pytest tests/spec/test_lightly_losses.py`` in a virtualenv with lightly (README, "Checking against lightly").
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F


from fastssl import nn as fnn
from fastssl import reference
from tests.utils import CPU_BACKENDS, LIGHTLY_AVAILABLE, TOLERANCES

BACKENDS = CPU_BACKENDS + ["reference"]
needs_lightly = pytest.mark.skipif(
    not LIGHTLY_AVAILABLE,
    reason="lightly is not installed here; run this file in a virtualenv with lightly 1.6 (README, \"Checking against lightly\")",
)

ORACLE_RTOL, ORACLE_ATOL = 1e-10, 1e-12


def _grads(loss, inputs):
    """(value, gradients) with a grad_output ≠ 1 (both sides are linear in it)."""
    return loss.detach(), torch.autograd.grad(loss * 0.7, inputs, allow_unused=False)


def assert_oracle(ours, theirs, inputs, what):
    """fp64 reference against the fp64 oracle: value and every gradient."""
    value, grads = _grads(ours, inputs)
    want_value, want_grads = _grads(theirs, inputs)
    torch.testing.assert_close(value, want_value, rtol=ORACLE_RTOL, atol=ORACLE_ATOL, msg=lambda m: f"{what} value: {m}")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        torch.testing.assert_close(g, w, rtol=ORACLE_RTOL, atol=ORACLE_ATOL * max(1.0, float(w.abs().max())),
                                   msg=lambda m: f"{what} grad {i}: {m}")  # fmt: skip


def assert_lightly(ours, theirs, inputs, what):
    """A fastssl module against lightly's, fp32: the table's fp32 tolerance, atol scaled by magnitude."""
    rtol, atol = TOLERANCES[torch.float32]
    value, grads = _grads(ours, inputs)
    want_value, want_grads = _grads(theirs, inputs)
    torch.testing.assert_close(value, want_value, rtol=rtol, atol=atol * max(1.0, float(want_value.abs())),
                               msg=lambda m: f"{what} value: {m}")  # fmt: skip
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * max(1.0, float(w.abs().max())),
                                   msg=lambda m: f"{what} grad {i}: {m}")  # fmt: skip


def _pair(n, d, dtype=torch.float64, seed=0, correlated=True):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen, dtype=dtype)
    noise = torch.randn(n, d, generator=gen, dtype=dtype)
    z2 = z1 + 0.8 * noise if correlated else noise
    return z1.requires_grad_(), z2.requires_grad_()


def _signature(cls):
    """{argument: default} of a loss constructor, without fastssl's keyword-only extras."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.kind != p.KEYWORD_ONLY}


# ------------------------------------------------------------------------------------------------
# MACL (Huang et al. 2023)
# ------------------------------------------------------------------------------------------------


def oracle_macl(z1, z2, tau, alpha, a0, eps=1e-8):
    """Per-anchor loops: the softmax probability of the positive among the 2N − 1 candidates."""
    n = z1.shape[0]
    z = [row / row.norm() for row in torch.cat([z1, z2])]
    positives = [torch.dot(z[a], z[(a + n) % (2 * n)]) for a in range(2 * n)]
    t = tau * (1 + alpha * (sum(float(p.detach()) for p in positives) / (2 * n) - a0))
    total = 0.0
    for a in range(2 * n):
        exps = [torch.exp(torch.dot(z[a], z[b]) / t) for b in range(2 * n) if b != a]
        prob = torch.exp(positives[a] / t) / torch.stack(exps).sum()
        total = total - torch.log(prob) / (1 - float(prob.detach()) + eps)  # the weight is a constant
    return total / (2 * n)


@pytest.mark.parametrize("n,d", [(5, 3), (7, 12)])
# τ small enough that P_a → 1 would leave 1 − P_a (and V) with few digits in both fp64 computations.
@pytest.mark.parametrize("tau,alpha,a0", [(0.1, 0.5, 0.0), (0.5, 1.0, 0.3), (0.2, 0.0, 1.0)])
def test_macl_reference_matches_oracle(n, d, tau, alpha, a0):
    z1, z2 = _pair(n, d, seed=n + d)
    assert_oracle(reference.macl_loss(z1, z2, tau, alpha, a0), oracle_macl(z1, z2, tau, alpha, a0), (z1, z2),
                  f"macl N={n} D={d} τ={tau} α={alpha} A_0={a0}")  # fmt: skip


@needs_lightly
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.5, "alpha": 1.0, "A_0": 0.4}, {"alpha": 0.0}])
@pytest.mark.parametrize("n,d", [(8, 16), (13, 5)])
def test_macl_matches_lightly(backend, kwargs, n, d):
    from lightly.loss import MACLLoss

    z1, z2 = _pair(n, d, dtype=torch.float32, seed=3 * n + d)
    ours = fnn.MACLLoss(**kwargs, backend=backend)(z1, z2)
    assert_lightly(ours, MACLLoss(**kwargs)(z1, z2), (z1, z2), f"MACLLoss({kwargs}) {backend}")


@needs_lightly
def test_macl_signature_matches_lightly():
    from lightly.loss import MACLLoss

    assert _signature(fnn.MACLLoss) == _signature(MACLLoss)
    assert fnn.MACLLoss().eps == MACLLoss().eps


# ------------------------------------------------------------------------------------------------
# DirectCLR (Jing et al. 2022)
# ------------------------------------------------------------------------------------------------


def oracle_nt_xent(z1, z2, tau, bank=None):
    """Per-anchor loops: −log of the positive's softmax probability (with a bank: MoCo's anchors z1)."""
    n = z1.shape[0]
    unit = lambda row: row / row.norm()  # noqa: E731
    if bank is not None:
        total = 0.0
        for i in range(n):
            q, k = unit(z1[i]), unit(z2[i])
            terms = [torch.exp(torch.dot(q, k) / tau)] + [torch.exp(torch.dot(q, b) / tau) for b in bank]
            total = total - torch.log(terms[0] / torch.stack(terms).sum())
        return total / n
    z = [unit(row) for row in torch.cat([z1, z2])]
    total = 0.0
    for a in range(2 * n):
        terms = {b: torch.exp(torch.dot(z[a], z[b]) / tau) for b in range(2 * n) if b != a}
        total = total - torch.log(terms[(a + n) % (2 * n)] / torch.stack(list(terms.values())).sum())
    return total / (2 * n)


@pytest.mark.parametrize("shape,loss_dim", [((6, 9), 4), ((5, 3), 64), ((4, 2, 3, 2), 7)])
@pytest.mark.parametrize("with_bank", [False, True])
def test_directclr_reference_matches_oracle(shape, loss_dim, with_bank):
    gen = torch.Generator().manual_seed(sum(shape) + loss_dim)
    z1 = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    k = min(loss_dim, z1[0].numel())
    bank = F.normalize(torch.randn(5, k, generator=gen, dtype=torch.float64), dim=1) if with_bank else None
    # the oracle reads the leading entries of each sample in its own (row-major) order
    first = lambda z: torch.stack([z[i].reshape(-1)[:k] for i in range(z.shape[0])])  # noqa: E731
    assert_oracle(reference.directclr_loss(z1, z2, loss_dim, 0.3, bank=bank),
                  oracle_nt_xent(first(z1), first(z2), 0.3, bank), (z1, z2),
                  f"directclr {shape} loss_dim={loss_dim} bank={with_bank}")  # fmt: skip


@needs_lightly
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,kwargs", [((8, 20), {"loss_dim": 7}), ((9, 5), {}), ((6, 3, 2, 2), {"loss_dim": 10, "temperature": 0.2})])  # fmt: skip
def test_directclr_matches_lightly(backend, shape, kwargs):
    from lightly.loss import DirectCLRLoss

    z1, z2 = torch.randn(*shape, requires_grad=True), torch.randn(*shape, requires_grad=True)
    ours = fnn.DirectCLRLoss(**kwargs, backend=backend)(z1, z2)
    assert_lightly(ours, DirectCLRLoss(**kwargs)(z1, z2), (z1, z2), f"DirectCLRLoss({kwargs}) {backend} {shape}")


@needs_lightly
@pytest.mark.parametrize("backend", BACKENDS)
def test_directclr_memory_bank_training_matches_lightly(backend):
    """Same seed, same steps: the same losses, gradients and (truncated) bank, step after step."""
    from lightly.loss import DirectCLRLoss

    torch.manual_seed(5)
    ours = fnn.DirectCLRLoss(loss_dim=6, memory_bank_size=(14, 6), backend=backend)
    torch.manual_seed(5)
    theirs = DirectCLRLoss(loss_dim=6, memory_bank_size=(14, 6))
    torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)
    for step in range(4):  # 4 x 5 rows through a 14-row queue: it wraps
        out0, out1 = torch.randn(5, 11, requires_grad=True), torch.randn(5, 11, requires_grad=True)
        assert_lightly(ours(out0, out1), theirs(out0, out1), (out0, out1), f"DirectCLR bank step {step} {backend}")
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr)


@needs_lightly
def test_directclr_signature_matches_lightly():
    from lightly.loss import DirectCLRLoss

    assert _signature(fnn.DirectCLRLoss) == _signature(DirectCLRLoss)


# ------------------------------------------------------------------------------------------------
# FroSSL (Skean et al. 2024)
# ------------------------------------------------------------------------------------------------


def oracle_frossl(views, invariance_weight):
    """Another route: ‖C‖²_F = Σσ⁴ and tr C = Σσ² from the singular values σ of each normalised view;
    the invariance term by loops over samples."""
    v, (n, d) = len(views), views[0].shape
    normalised = [torch.stack([col / col.norm() for col in z.T], dim=1) for z in views]
    reg = 0.0
    for z in normalised:
        sigma = torch.linalg.svdvals(z)
        reg = reg + torch.log(sigma.pow(4).sum()) - 2 * torch.log(sigma.detach().pow(2).sum())
    inv = 0.0
    for i in range(n):
        mean_row = sum(z[i] for z in normalised) / v
        inv = inv + sum(((z[i] - mean_row) ** 2).sum() for z in normalised)
    return reg + invariance_weight * v * d * inv / (n * d)


@pytest.mark.parametrize("n,d", [(9, 4), (4, 7)])  # lightly's D x D and N x N choice
@pytest.mark.parametrize("num_views,weight", [(2, 1.0), (3, 0.3)])
def test_frossl_reference_matches_oracle(n, d, num_views, weight):
    gen = torch.Generator().manual_seed(10 * n + d + num_views)
    views = [torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(num_views)]
    assert_oracle(reference.frossl_loss(views, weight), oracle_frossl(views, weight), views,
                  f"frossl N={n} D={d} V={num_views} w={weight}")  # fmt: skip


@needs_lightly
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(16, 6), (5, 12)])
@pytest.mark.parametrize("num_views,kwargs", [(2, {}), (3, {"invariance_weight": 0.25})])
def test_frossl_matches_lightly(backend, n, d, num_views, kwargs):
    from lightly.loss import FroSSLLoss

    views = [torch.randn(n, d, requires_grad=True) for _ in range(num_views)]
    ours = fnn.FroSSLLoss(**kwargs, backend=backend)(views)
    assert_lightly(ours, FroSSLLoss(**kwargs)(views), views, f"FroSSLLoss({kwargs}) {backend} N={n} D={d} V={num_views}")


@needs_lightly
def test_frossl_signature_matches_lightly():
    from lightly.loss import FroSSLLoss

    assert _signature(fnn.FroSSLLoss) == _signature(FroSSLLoss)


# ------------------------------------------------------------------------------------------------
# TiCo (Zhu et al. 2022)
# ------------------------------------------------------------------------------------------------


def oracle_tico(z_a, z_b, covariance, beta, rho):
    """Loops over samples: a_i C a_i = β·a_i·(C_prev a_i) + (1 − β)/N·Σ_j (a_i·sg(a_j))²."""
    n = z_a.shape[0]
    a = [row / row.norm() for row in z_a]
    b = [row / row.norm() for row in z_b]
    invariance = 1 - sum(torch.dot(a[i], b[i]) for i in range(n)) / n
    contrast = 0.0
    for i in range(n):
        if covariance is not None:
            contrast = contrast + beta * torch.dot(a[i], covariance @ a[i])
        contrast = contrast + (1 - beta) / n * sum(torch.dot(a[i], a[j].detach()) ** 2 for j in range(n))
    return invariance + rho * contrast / n


@pytest.mark.parametrize("n,d", [(6, 4), (3, 8)])
@pytest.mark.parametrize("beta,rho,with_state", [(0.9, 8.0, True), (0.9, 8.0, False), (0.3, 2.0, True), (1.0, 1.0, True)])
def test_tico_reference_matches_oracle(n, d, beta, rho, with_state):
    z_a, z_b = _pair(n, d, seed=n * d)
    state = None
    if with_state:
        gen = torch.Generator().manual_seed(1)
        m = torch.randn(d, d, generator=gen, dtype=torch.float64)
        state = m @ m.T / d
    assert_oracle(reference.tico_loss(z_a, z_b, state, beta, rho), oracle_tico(z_a, z_b, state, beta, rho),
                  (z_a, z_b), f"tico N={n} D={d} β={beta} ρ={rho} state={with_state}")  # fmt: skip


@needs_lightly
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,kwargs", [(10, 6, {}), (4, 12, {"beta": 0.5, "rho": 2.0})])
def test_tico_training_matches_lightly(backend, n, d, kwargs):
    """Step by step: the same losses, gradients and running C, with and without the update."""
    from lightly.loss import TiCoLoss

    ours, theirs = fnn.TiCoLoss(**kwargs, backend=backend), TiCoLoss(**kwargs)
    for step, update in enumerate([False, True, True, False, True]):
        z_a, z_b = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
        assert_lightly(ours(z_a, z_b, update_covariance_matrix=update),
                       theirs(z_a, z_b, update_covariance_matrix=update), (z_a, z_b),
                       f"TiCoLoss({kwargs}) {backend} step {step} update={update}")  # fmt: skip
        torch.testing.assert_close(ours.C, theirs.C, rtol=1e-5, atol=1e-7, msg=lambda m: f"C after step {step}: {m}")


@needs_lightly
def test_tico_signature_matches_lightly():
    from lightly.loss import TiCoLoss

    assert _signature(fnn.TiCoLoss) == _signature(TiCoLoss)
    forward = lambda cls: {k: p.default for k, p in inspect.signature(cls.forward).parameters.items()}  # noqa: E731
    assert forward(fnn.TiCoLoss) == forward(TiCoLoss)


# ------------------------------------------------------------------------------------------------
# KoLeo (Sablayrolles et al. 2019)
# ------------------------------------------------------------------------------------------------


def oracle_koleo(x, p, eps):
    """Loops: each row's first most-similar other row, then the p-norm by its definition."""
    n = x.shape[0]
    u = [row / max(row.norm(), torch.tensor(eps, dtype=row.dtype)) for row in x]
    total = 0.0
    for i in range(n):
        best, best_sim = None, None
        for j in range(n):
            sim = float(torch.dot(u[i], u[j]).detach())
            if j != i and (best_sim is None or sim > best_sim):  # strict: the first maximum wins
                best, best_sim = j, sim
        distance = (u[i] - u[best] + eps).abs().pow(p).sum().pow(1.0 / p)
        total = total - torch.log(distance + eps)
    return total / n


@pytest.mark.parametrize("n,d", [(7, 3), (5, 9)])
@pytest.mark.parametrize("p,eps", [(2, 1e-8), (1, 1e-8), (3.5, 1e-3)])
def test_koleo_reference_matches_oracle(n, d, p, eps):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d), dtype=torch.float64, requires_grad=True)
    assert_oracle(reference.koleo_loss(x, p, eps), oracle_koleo(x, p, eps), (x,), f"koleo N={n} D={d} p={p} eps={eps}")


@needs_lightly
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, {"p": 1}, {"p": 3, "eps": 1e-4}])
@pytest.mark.parametrize("n,d", [(16, 8), (37, 5)])
def test_koleo_matches_lightly(backend, kwargs, n, d):
    from lightly.loss import KoLeoLoss

    x = torch.randn(n, d, requires_grad=True)
    assert_lightly(fnn.KoLeoLoss(**kwargs, backend=backend)(x), KoLeoLoss(**kwargs)(x), (x,),
                   f"KoLeoLoss({kwargs}) {backend} N={n} D={d}")  # fmt: skip


@needs_lightly
def test_koleo_signature_matches_lightly():
    from lightly.loss import KoLeoLoss

    assert _signature(fnn.KoLeoLoss) == _signature(KoLeoLoss)
