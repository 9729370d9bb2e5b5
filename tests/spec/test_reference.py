"""fastssl.reference against independent float64 computations (docs/design.md, correctness layer 1).

Each oracle is written a different way from the reference: explicit Python/numpy loops over
samples, dimensions and pairs on small odd shapes, or a different algebraic route (cross-entropy
instead of LSE, ‖AᵀB‖²_F = ⟨AAᵀ, BBᵀ⟩_F, the pdist form, the VICReg-exp/ctr transpose duality).
Then: gradcheck of every function in fp64, the dtype rules, inputs never modified, and finite
values and gradients at τ = 0.01 on collapsed and zero embeddings.

The oracle tolerances live here rather than in tests/utils.py: they compare two fp64 computations
of the same formula, not a backend against the spec, and this file must run (and import the
reference) even while the rest of the package is being rebuilt.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def _load_reference():
    try:
        from fastssl import reference

        return reference
    except ImportError:  # the package around it is broken or half-written: load the file alone
        path = Path(__file__).resolve().parents[2] / "fastssl" / "reference.py"
        spec = importlib.util.spec_from_file_location("_fastssl_reference_standalone", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ref = _load_reference()

RTOL, ATOL = 1e-10, 1e-12  # fp64 reference vs fp64 oracle
SHAPES = [(5, 3), (7, 6), (9, 4)]


def close(actual, expected, rtol=RTOL, atol=ATOL, what="value"):
    actual = torch.as_tensor(actual).detach().to(torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def randn(*shape, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def np_rows_normalised(x):
    x = x.detach().numpy().astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_lse(values):
    values = np.asarray(values, dtype=np.float64)
    m = values.max()
    return m + math.log(np.exp(values - m).sum())


# --------------------------------------------------------------------------------------------------
# independent oracles
# --------------------------------------------------------------------------------------------------


def oracle_nt_xent(z1, z2, tau):
    a, b = np_rows_normalised(z1), np_rows_normalised(z2)
    n = a.shape[0]
    z = np.concatenate([a, b])
    total = 0.0
    for i in range(2 * n):
        pos = float(z[i] @ z[(i + n) % (2 * n)]) / tau
        denom = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(2 * n) if j != i)
        total += -pos + math.log(denom)
    return total / (2 * n)


def oracle_moco(q, k, bank, tau):
    q, k = np_rows_normalised(q), np_rows_normalised(k)
    bank = bank.numpy()
    total = 0.0
    for i in range(q.shape[0]):
        pos = float(q[i] @ k[i]) / tau
        denom = math.exp(pos) + sum(math.exp(float(q[i] @ bank[j]) / tau) for j in range(bank.shape[0]))
        total += -math.log(math.exp(pos) / denom)
    return total / q.shape[0]


def oracle_dcl(z1, z2, tau, sigma=None):
    a, b = np_rows_normalised(z1), np_rows_normalised(z2)
    n = a.shape[0]
    if sigma is None:
        w = np.ones(n)
    else:
        c = np.array([float(a[i] @ b[i]) for i in range(n)]) / sigma
        w = 2.0 - n * np.exp(c - c.max()) / np.exp(c - c.max()).sum()

    def one_side(x, y):
        total = 0.0
        for i in range(n):
            negs = [float(x[i] @ x[j]) / tau for j in range(n) if j != i]
            negs += [float(x[i] @ y[j]) / tau for j in range(n) if j != i]
            total += -w[i] * float(x[i] @ y[i]) / tau + np_lse(negs)
        return total / n

    return 0.5 * (one_side(a, b) + one_side(b, a))


def oracle_barlow(z1, z2, lam):
    def bn(z):
        z = z.numpy()
        return (z - z.mean(0)) / np.sqrt(z.var(0, ddof=0) + 1e-5)

    a, b = bn(z1), bn(z2)
    n, d = a.shape
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return loss


def np_cov(x):
    """Unbiased covariance of the columns of x, by loops."""
    n, d = x.shape
    mean = x.mean(0)
    return np.array(
        [[sum((x[k, i] - mean[i]) * (x[k, j] - mean[j]) for k in range(n)) / (n - 1) for j in range(d)] for i in range(d)]
    )


def np_var_term(x, eps):
    return float(np.mean([max(0.0, 1.0 - math.sqrt(x[:, d].var(ddof=1) + eps)) for d in range(x.shape[1])]))


def oracle_vicreg(z1, z2, lam=25.0, mu=25.0, nu=1.0, eps=1e-4, cov_term=None):
    a, b = z1.numpy(), z2.numpy()
    d = a.shape[1]
    if cov_term is None:

        def cov_term(x):
            c = np_cov(x)
            return sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    inv = float(((a - b) ** 2).sum()) / a.size
    var = 0.5 * (np_var_term(a, eps) + np_var_term(b, eps))
    return lam * inv + mu * var + nu * (cov_term(a) + cov_term(b))


def np_cov_lse(x, tau):
    c = np_cov(x)
    d = c.shape[0]
    return sum(np_lse([c[i, j] / tau for j in range(d) if j != i]) for i in range(d)) / d


def oracle_vicreg_ctr(z1, z2, tau, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    """Written sample by sample, without transposing anything."""
    a, b = z1.numpy(), z2.numpy()
    n, d = a.shape

    def var_term(x):
        per_sample = []
        for i in range(n):
            mean = sum(x[i]) / d
            var = sum((x[i, k] - mean) ** 2 for k in range(d)) / (d - 1)
            per_sample.append(max(0.0, 1.0 - math.sqrt(var + eps)))
        return sum(per_sample) / n

    def gram_term(x):
        xc = [[x[i, k] - sum(x[i]) / d for k in range(d)] for i in range(n)]
        g = [[sum(xc[i][k] * xc[j][k] for k in range(d)) / (d - 1) for j in range(n)] for i in range(n)]
        return sum(np_lse([g[i][j] / tau for j in range(n) if j != i]) for i in range(n)) / n

    inv = float(((a - b) ** 2).mean())
    return lam * inv + mu * 0.5 * (var_term(a) + var_term(b)) + nu * (gram_term(a) + gram_term(b))


def oracle_spectral(z1, z2, mu):
    def clip(z):
        z = z.numpy().copy()
        for i in range(z.shape[0]):
            norm = np.linalg.norm(z[i])
            if norm >= math.sqrt(mu):
                z[i] = z[i] / norm * math.sqrt(mu)
        return z

    a, b = clip(z1), clip(z2)
    n = a.shape[0]
    part1 = -2.0 / n * sum(float(a[i] @ b[i]) for i in range(n))
    part2 = sum(float(a[i] @ b[j]) ** 2 for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return (part1 + part2) / mu


def oracle_arcl(views, tau):
    """Torch scalar ops in Python loops (so autograd gives an independent gradient too)."""
    n, m = views.shape[0], views.shape[1]
    z = [[views[i, j] / views[i, j].norm() for j in range(m)] for i in range(n)]
    s_pos = []
    for i in range(n):
        best = None
        for j in range(m):
            for k in range(j + 1, m):
                s = torch.dot(z[i][j], z[i][k])
                if best is None or s.item() < best.item():  # strict: the first minimum wins
                    best = s
        s_pos.append(best)
    anchors = [z[i][0] for i in range(n)] + [z[i][1] for i in range(n)]
    total = 0.0
    for a in range(2 * n):
        i, partner = a % n, (a + n) % (2 * n)
        terms = [torch.exp(s_pos[i] / tau)]
        terms += [torch.exp(torch.dot(anchors[a], anchors[b]) / tau) for b in range(2 * n) if b not in (a, partner)]
        total = total - s_pos[i] / tau + torch.log(torch.stack(terms).sum())
    return total / (2 * n)


# --------------------------------------------------------------------------------------------------
# values against the oracles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tau", [0.5, 0.1, 1.3])
def test_nt_xent(n, d, tau):
    z1, z2 = randn(n, d), randn(n, d)
    close(ref.nt_xent_loss(z1, z2, tau), oracle_nt_xent(z1, z2, tau))


def test_nt_xent_default_and_cross_entropy_form():
    z1, z2 = randn(7, 5), randn(7, 5)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / 0.5).fill_diagonal_(-math.inf)
    labels = torch.cat([torch.arange(7, 14), torch.arange(0, 7)])
    close(ref.nt_xent_loss(z1, z2), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("n,d,k", [(5, 3, 4), (7, 6, 11), (9, 4, 1)])
@pytest.mark.parametrize("tau", [0.5, 0.2])
def test_moco(n, d, k, tau):
    q, key = randn(n, d), randn(n, d)
    bank = F.normalize(randn(k, d), dim=1)
    close(ref.moco_loss(q, key, bank, tau), oracle_moco(q, key, bank, tau))


def test_moco_bank_used_as_given_and_without_grad():
    q, key = randn(5, 3, requires_grad=True), randn(5, 3)
    bank = randn(4, 3, requires_grad=True)  # not normalised: used as is
    loss = ref.moco_loss(q, key, bank, 0.5)
    close(loss, oracle_moco(q.detach(), key, bank.detach(), 0.5))
    assert not torch.autograd.grad(loss, bank, allow_unused=True, materialize_grads=True)[0].any()


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tau,sigma", [(0.1, None), (0.5, None), (0.1, 0.5), (0.3, 2.0)])
def test_dcl(n, d, tau, sigma):
    z1, z2 = randn(n, d), randn(n, d)
    close(ref.dcl_loss(z1, z2, tau, sigma=sigma), oracle_dcl(z1, z2, tau, sigma))


def test_dclw_with_huge_sigma_is_dcl():
    z1, z2 = randn(7, 5, requires_grad=True), randn(7, 5, requires_grad=True)
    plain = ref.dcl_loss(z1, z2)
    weighted = ref.dcl_loss(z1, z2, sigma=1e30)  # softmax -> 1/N, weights -> 1
    close(weighted, plain)
    for g_w, g_p in zip(torch.autograd.grad(weighted, (z1, z2)), torch.autograd.grad(plain, (z1, z2))):
        close(g_w, g_p, what="grad")


def test_dclw_weights_are_detached():
    # The weights enter as constants: the gradient equals that of the loss with w fixed beforehand.
    z1, z2 = randn(6, 4, requires_grad=True), randn(6, 4, requires_grad=True)
    a, b = F.normalize(z1.detach(), dim=1), F.normalize(z2.detach(), dim=1)
    w = 2.0 - 6 * torch.softmax((a * b).sum(1) / 0.5, dim=0)
    an, bn = F.normalize(z1, dim=1), F.normalize(z2, dim=1)

    def side(x, y):
        eye = torch.eye(6, dtype=torch.bool)
        negs = torch.cat([(x @ x.T)[~eye].view(6, 5), (x @ y.T)[~eye].view(6, 5)], dim=1) / 0.1
        return (-w * (x * y).sum(1) / 0.1 + torch.logsumexp(negs, 1)).mean()

    expected = 0.5 * (side(an, bn) + side(bn, an))
    got = ref.dcl_loss(z1, z2, 0.1, sigma=0.5)
    close(got, expected)
    for g, e in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(expected, (z1, z2))):
        close(g, e, what="grad")


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_clip_cross_entropy_form(n, d, tau):
    z1, z2 = randn(n, d), randn(n, d)
    logits = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / tau
    labels = torch.arange(n)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    close(ref.clip_loss(z1, z2, tau), expected)
    # explicit loops too
    a, b = np_rows_normalised(z1), np_rows_normalised(z2)
    rows = sum(-float(a[i] @ b[i]) / tau + np_lse([float(a[i] @ b[j]) / tau for j in range(n)]) for i in range(n))
    cols = sum(-float(a[j] @ b[j]) / tau + np_lse([float(a[i] @ b[j]) / tau for i in range(n)]) for j in range(n))
    close(ref.clip_loss(z1, z2, tau), 0.5 * (rows + cols) / n)


def test_clip_learnable_temperature():
    z1, z2 = randn(6, 4, requires_grad=True), randn(6, 4, requires_grad=True)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ref.clip_loss, (z1, z2, tau))
    # central finite difference on τ alone
    loss = ref.clip_loss(z1, z2, tau)
    (g_tau,) = torch.autograd.grad(loss, tau)
    h = 1e-6
    with torch.no_grad():
        fd = (ref.clip_loss(z1, z2, tau + h) - ref.clip_loss(z1, z2, tau - h)) / (2 * h)
    close(g_tau, fd, rtol=1e-6, atol=1e-8, what="dL/dτ")
    # a float and a tensor τ give the same value; the gradient reaches an fp32 τ from bf16 inputs
    close(ref.clip_loss(z1, z2, 0.2), loss)
    tau32 = torch.tensor(0.2, requires_grad=True)
    out = ref.clip_loss(z1.detach().bfloat16(), z2.detach().bfloat16(), tau32)
    assert out.dtype == torch.float32
    out.backward()
    assert tau32.grad is not None and tau32.grad.dtype == torch.float32 and torch.isfinite(tau32.grad)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("lam", [5e-3, 0.3])
def test_barlow_twins(n, d, lam):
    z1, z2 = randn(n, d) * 2 + 1, randn(n, d)
    close(ref.barlow_twins_loss(z1, z2, lam), oracle_barlow(z1, z2, lam))


def test_barlow_twins_frobenius_gram_route():
    # Σ_{i≠j} C_ij² = ‖AᵀB‖²_F/N² − Σ_i C_ii², with ‖AᵀB‖²_F = ⟨AAᵀ, BBᵀ⟩_F (N x N Gram side).
    n, d, lam = 9, 7, 0.02
    z1, z2 = randn(n, d), randn(n, d)
    a = F.batch_norm(z1, None, None, training=True)
    b = F.batch_norm(z2, None, None, training=True)
    diag = (a * b).sum(0) / n
    off = ((a @ a.T) * (b @ b.T)).sum() / n**2 - (diag**2).sum()
    close(ref.barlow_twins_loss(z1, z2, lam), ((1 - diag) ** 2).sum() + lam * off)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("params", [{}, dict(lambda_param=10.0, mu_param=5.0, nu_param=2.0, eps=1e-3)])
def test_vicreg(n, d, params):
    z1 = randn(n, d) * torch.linspace(0.3, 3.0, d, dtype=torch.float64)  # some std below 1, some above
    z2 = randn(n, d)
    names = dict(lambda_param="lam", mu_param="mu", nu_param="nu", eps="eps")
    close(ref.vicreg_loss(z1, z2, **params), oracle_vicreg(z1, z2, **{names[k]: v for k, v in params.items()}))


def test_vicreg_covariance_gram_route():
    # Σ_{d≠e} Cov_de² = ⟨XcXcᵀ, XcXcᵀ⟩_F/(N−1)² − Σ_d Var_d²: the same term from the N x N side.
    n, d = 7, 5
    z1, z2 = randn(n, d), randn(n, d)

    def cov_term(x):
        xc = x - x.mean(0)
        g = xc @ xc.T
        return float(((g * g).sum() / (n - 1) ** 2 - (xc.pow(2).sum(0) / (n - 1)).pow(2).sum()) / d)

    expected = oracle_vicreg(z1, z2, cov_term=lambda x: cov_term(torch.from_numpy(x)))
    close(ref.vicreg_loss(z1, z2), expected)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_vicreg_exp(n, d, tau):
    z1, z2 = randn(n, d) * 1.5, randn(n, d)
    close(ref.vicreg_exp_loss(z1, z2, tau), oracle_vicreg(z1, z2, cov_term=lambda x: np_cov_lse(x, tau)))
    close(
        ref.vicreg_exp_loss(z1, z2, tau, lambda_param=3.0, mu_param=2.0, nu_param=0.5, eps=1e-2),
        oracle_vicreg(z1, z2, 3.0, 2.0, 0.5, 1e-2, cov_term=lambda x: np_cov_lse(x, tau)),
    )


def test_vicreg_exp_default_temperature_is_documented():
    import inspect

    default = inspect.signature(ref.vicreg_exp_loss).parameters["temperature"].default
    assert default == inspect.signature(ref.vicreg_ctr_loss).parameters["temperature"].default
    assert str(default) in ref.vicreg_exp_loss.__doc__
    z1, z2 = randn(6, 4), randn(6, 4)
    close(ref.vicreg_exp_loss(z1, z2), oracle_vicreg(z1, z2, cov_term=lambda x: np_cov_lse(x, default)))


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_vicreg_ctr(n, d, tau):
    z1, z2 = randn(n, d) * 1.5, randn(n, d) + 0.5
    close(ref.vicreg_ctr_loss(z1, z2, tau), oracle_vicreg_ctr(z1, z2, tau))
    close(
        ref.vicreg_ctr_loss(z1, z2, tau, lambda_param=3.0, mu_param=2.0, nu_param=0.5, eps=1e-2),
        oracle_vicreg_ctr(z1, z2, tau, 3.0, 2.0, 0.5, 1e-2),
    )


def test_vicreg_ctr_is_vicreg_exp_of_the_transpose():
    # Garrido et al. (2023)'s duality: the sample-contrastive loss is the dimension-contrastive one on zᵀ.
    z1, z2 = randn(7, 5, requires_grad=True), randn(7, 5, requires_grad=True)
    ctr = ref.vicreg_ctr_loss(z1, z2, 0.3, mu_param=3.0)
    exp_t = ref.vicreg_exp_loss(z1.T, z2.T, 0.3, mu_param=3.0)
    close(ctr, exp_t)
    for g, e in zip(torch.autograd.grad(ctr, (z1, z2)), torch.autograd.grad(exp_t, (z1, z2))):
        close(g, e, what="grad")


def _mixed_norm_rows(n, d, mu):
    """Rows with norms well inside and well outside √μ (none near the boundary)."""
    z = F.normalize(randn(n, d), dim=1)
    radii = torch.where(torch.arange(n) % 2 == 0, 0.4, 2.5) * math.sqrt(mu)
    return z * radii[:, None].to(torch.float64)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("mu", [1.0, 2.5])
def test_spectral_contrastive(n, d, mu):
    z1, z2 = _mixed_norm_rows(n, d, mu), randn(n, d) * 0.5
    close(ref.spectral_contrastive_loss(z1, z2, mu), oracle_spectral(z1, z2, mu))


def test_spectral_contrastive_authors_form():
    # HaoChen et al.'s code: mask * z + (1 − mask) * n(z)·√μ, then means scaled by D and N/(N−1).
    n, d, mu = 8, 5, 1.0
    z1, z2 = _mixed_norm_rows(n, d, mu).requires_grad_(), randn(n, d, requires_grad=True)

    def authors(x1, x2):
        m1 = (x1.norm(dim=1) < math.sqrt(mu)).to(x1.dtype)[:, None]
        m2 = (x2.norm(dim=1) < math.sqrt(mu)).to(x2.dtype)[:, None]
        x1 = m1 * x1 + (1 - m1) * F.normalize(x1, dim=1) * math.sqrt(mu)
        x2 = m2 * x2 + (1 - m2) * F.normalize(x2, dim=1) * math.sqrt(mu)
        part1 = -2 * torch.mean(x1 * x2) * x1.shape[1]
        sq = (x1 @ x2.T) ** 2
        part2 = torch.mean(torch.triu(sq, diagonal=1) + torch.tril(sq, diagonal=-1)) * n / (n - 1)
        return (part1 + part2) / mu

    got, expected = ref.spectral_contrastive_loss(z1, z2, mu), authors(z1, z2)
    close(got, expected)
    for g, e in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(expected, (z1, z2))):
        close(g, e, what="grad")


def test_arcl_two_views_is_nt_xent():
    z1, z2 = randn(7, 5, requires_grad=True), randn(7, 5, requires_grad=True)
    for tau in (0.5, 0.1):
        arcl = ref.arcl_loss(torch.stack([z1, z2], dim=1), tau)
        nt = ref.nt_xent_loss(z1, z2, tau)
        close(arcl, nt)
        for g, e in zip(torch.autograd.grad(arcl, (z1, z2)), torch.autograd.grad(nt, (z1, z2))):
            close(g, e, what="grad")
    close(ref.arcl_loss([z1, z2]), ref.nt_xent_loss(z1, z2))  # default τ = 0.5, list input


@pytest.mark.parametrize("n,m,d", [(5, 3, 4), (6, 4, 3), (4, 5, 6)])
@pytest.mark.parametrize("tau", [0.5, 0.2])
def test_arcl_many_views(n, m, d, tau):
    views = randn(n, m, d, requires_grad=True)
    got, expected = ref.arcl_loss(views, tau), oracle_arcl(views, tau)
    close(got, expected)
    close(torch.autograd.grad(got, views)[0], torch.autograd.grad(expected, views)[0], what="grad")
    close(ref.arcl_loss(list(views.unbind(1)), tau), got)  # list of m (N, D) == (N, m, D)


def test_arcl_gradient_through_selected_pair_only_and_ties():
    # All views of each sample identical: every pair ties at 1, the first pair (0, 1) is selected,
    # the value is NT-Xent's, and views 2.. receive no gradient at all.
    base = randn(5, 4)
    views = base[:, None, :].repeat(1, 3, 1).requires_grad_()
    loss = ref.arcl_loss(views, 0.5)
    close(loss, ref.nt_xent_loss(base, base, 0.5))
    (grad,) = torch.autograd.grad(loss, views)
    assert grad[:, 2].abs().max() == 0
    # Random views, sample 0's worst pair forced to (1, 2): view 2 of a sample gets gradient iff
    # its selected pair contains view 2 (it is never an anchor nor a negative).
    views = randn(5, 3, 4)
    views[0, 2] = -views[0, 1]
    views.requires_grad_()
    (grad,) = torch.autograd.grad(ref.arcl_loss(views, 0.5), views)
    zn = F.normalize(views.detach(), dim=-1)
    for i in range(5):
        sims = {(j, k): float(zn[i, j] @ zn[i, k]) for j in range(3) for k in range(j + 1, 3)}
        worst = min(sims, key=sims.get)
        assert (grad[i, 2].abs().max() > 0) == (2 in worst), (i, worst)
    assert grad[0, 2].abs().max() > 0


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0])
def test_alignment(n, d, alpha):
    z1, z2 = randn(n, d), randn(n, d)
    expected = sum(np.linalg.norm(z1[i].numpy() - z2[i].numpy()) ** alpha for i in range(n)) / n
    close(ref.alignment(z1, z2, alpha), expected)
    # Wang & Isola's form
    close(ref.alignment(z1, z2, alpha), (z1 - z2).norm(p=2, dim=1).pow(alpha).mean())


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity(n, d, t):
    z = F.normalize(randn(n, d), dim=1) * 1.3
    close(ref.uniformity(z, t), torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log())  # Wang & Isola
    zn = z.numpy()
    pairs = [math.exp(-t * float(((zn[i] - zn[j]) ** 2).sum())) for i in range(n) for j in range(n) if i != j]
    close(ref.uniformity(z, t), math.log(sum(pairs) / len(pairs)))


def test_class_center_divergence():
    z = randn(9, 4)
    labels = torch.tensor([7, 3, 7, 9, 3, 3, 9, 7, 7])  # non-contiguous ids, unequal class sizes
    zn = np_rows_normalised(z)
    lab = labels.tolist()
    centres = {c: np.mean([zn[i] for i in range(9) if lab[i] == c], axis=0) for c in set(lab)}
    expected = max(float(centres[k] @ centres[l]) for k in centres for l in centres if k != l)
    close(ref.class_center_divergence(z, labels), expected)
    # the rows are normalised inside: rescaling rows changes nothing
    close(ref.class_center_divergence(z * torch.linspace(0.1, 10, 9, dtype=torch.float64)[:, None], labels), expected)


# --------------------------------------------------------------------------------------------------
# gradcheck, dtype rules, purity, numerics — over every function
# --------------------------------------------------------------------------------------------------

LABELS = torch.tensor([0, 1, 0, 2, 1, 2])


def _inputs(name, dtype, requires_grad=True, kind="random"):
    """(callable, tensors) for one function on 6 x 4 inputs of `kind`: random, collapsed, zero."""
    n, d = 6, 4

    def make(*shape, scale=1.0):
        if kind == "random":
            x = torch.randn(*shape, dtype=torch.float64)
        elif kind == "collapsed":  # every row the same vector
            x = torch.randn(shape[-1], dtype=torch.float64).expand(*shape).clone()
        else:
            x = torch.zeros(*shape, dtype=torch.float64)
        return (x * scale).to(dtype).requires_grad_(requires_grad)

    tau = 0.01 if kind != "random" else None
    bank = F.normalize(torch.randn(5, d, dtype=torch.float64), dim=1).to(dtype)
    col_scale = torch.linspace(0.3, 3.0, d, dtype=torch.float64)  # VICReg: std on both sides of 1
    cases = {
        "nt_xent": (lambda a, b: ref.nt_xent_loss(a, b, tau or 0.5), (make(n, d), make(n, d))),
        "moco": (lambda a, b: ref.moco_loss(a, b, bank, tau or 0.5), (make(n, d), make(n, d))),
        "dcl": (lambda a, b: ref.dcl_loss(a, b, tau or 0.1), (make(n, d), make(n, d))),
        "dclw": (lambda a, b: ref.dcl_loss(a, b, tau or 0.1, sigma=0.5), (make(n, d), make(n, d))),
        "clip": (lambda a, b: ref.clip_loss(a, b, tau or 0.07), (make(n, d), make(n, d))),
        "barlow_twins": (ref.barlow_twins_loss, (make(n, d), make(n, d))),
        "vicreg": (ref.vicreg_loss, (make(n, d), make(n, d, scale=col_scale))),
        "vicreg_exp": (lambda a, b: ref.vicreg_exp_loss(a, b, tau or 0.1), (make(n, d), make(n, d))),
        "vicreg_ctr": (lambda a, b: ref.vicreg_ctr_loss(a, b, tau or 0.1), (make(n, d), make(n, d))),
        "spectral": (ref.spectral_contrastive_loss, (make(n, d, scale=0.15), make(n, d, scale=2.0))),
        "arcl": (lambda v: ref.arcl_loss(v, tau or 0.5), (make(n, 3, d),)),
        "alignment": (ref.alignment, (make(n, d), make(n, d))),
        "uniformity": (ref.uniformity, (make(n, d),)),
        "class_center_divergence": (lambda z: ref.class_center_divergence(z, LABELS), (make(n, d),)),
    }
    return cases[name]


ALL = [
    "nt_xent", "moco", "dcl", "dclw", "clip", "barlow_twins", "vicreg", "vicreg_exp", "vicreg_ctr",
    "spectral", "arcl", "alignment", "uniformity", "class_center_divergence",
]  # fmt: skip


# DCLW is left out: its weights are detached by design (as in lightly), so finite differences see a
# dependence that autograd deliberately drops; test_dclw_weights_are_detached checks that gradient.
@pytest.mark.parametrize("name", [name for name in ALL if name != "dclw"])
def test_gradcheck(name):
    fn, inputs = _inputs(name, torch.float64)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtype_rules_and_inputs_unmodified(name, dtype):
    fn, inputs = _inputs(name, dtype)
    before = [x.detach().clone() for x in inputs]
    loss = fn(*inputs)
    assert loss.dim() == 0
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # low precision is upcast to fp32 (not computed in the input dtype): same as feeding fp32 copies
    if dtype in (torch.bfloat16, torch.float16):
        upcast = fn(*[x.detach().float() for x in inputs])
        assert torch.equal(loss.detach(), upcast)
    grads = torch.autograd.grad(loss * 1.7, inputs)
    for x, g, b in zip(inputs, grads, before):
        assert g.dtype == dtype and g.shape == x.shape
        assert torch.equal(x.detach(), b), "input modified"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", ["collapsed", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_at_low_temperature_on_degenerate_embeddings(name, kind, dtype):
    fn, inputs = _inputs(name, dtype, kind=kind)  # τ = 0.01 for every temperature-taking loss
    loss = fn(*inputs)
    assert torch.isfinite(loss), f"{name} on {kind} embeddings: {loss}"
    for g in torch.autograd.grad(loss, inputs):
        if dtype == torch.float16 and kind == "zero":
            # F.normalize's true gradient at a zero row is g/eps (eps = 1e-12): finite in fp32 but past
            # fp16's range whenever g ≠ 0 (MoCo: the bank pulls on the zero query). No NaN, though.
            assert not torch.isnan(g).any(), f"{name} on {kind} embeddings: NaN gradient"
        else:
            assert torch.isfinite(g).all(), f"{name} on {kind} embeddings: non-finite gradient"


def test_zero_embeddings_class_center_divergence_is_zero():
    z = torch.zeros(6, 4, requires_grad=True)
    loss = ref.class_center_divergence(z, LABELS)
    assert loss.item() == 0.0
    assert torch.isfinite(torch.autograd.grad(loss, z)[0]).all()


def test_low_temperature_random_values_match_oracle():
    # τ = 0.01 puts logits near ±100: the LSE must stay exact where a naive exp would overflow in fp32.
    z1, z2 = torch.randn(7, 5), torch.randn(7, 5)
    close(ref.nt_xent_loss(z1, z2, 0.01), oracle_nt_xent(z1.double(), z2.double(), 0.01), rtol=1e-5, atol=1e-5)
    close(ref.dcl_loss(z1, z2, 0.01), oracle_dcl(z1.double(), z2.double(), 0.01), rtol=1e-5, atol=1e-5)
