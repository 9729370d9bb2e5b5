"""The benchmark suite's baselines for the recent losses (benchmarks/baselines.py) against lightly 1.6's
modules: each re-implementation of a lightly formula gives lightly's value and gradients, fp32.

lightly cannot be imported beside the suite's torch (it needs torchvision), so the suite runs these
re-implementations in its place; this file is the proof that they are lightly's computation. DINO's
and iBOT's baselines include the head's last layer: lightly's nn.utils.weight_norm(nn.Linear) with its
gain fixed at 1 (DINOProjectionHead with norm_last_layer), whose weight v gets a gradient.

lightly is not a dependency (nor installed in CI): the module is skipped, with the reason, without it.
Run it in a virtualenv with lightly (README, "Checking against lightly"):
``PYTHONPATH=. python -m pytest tests/spec/test_benchmark_baselines_lightly.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lightly_loss = pytest.importorskip(
    "lightly.loss", reason="lightly is not installed; these tests compare the benchmark baselines with lightly 1.6"
)

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import baselines  # noqa: E402

RTOL = 1e-5


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    atol = 1e-6 * max(1.0, float(theirs.detach().abs().max()))  # entries near 0 have no relative precision
    torch.testing.assert_close(ours.reshape(theirs.shape), theirs, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def leaves(*shapes: tuple[int, ...], seed: int = 0, normalise: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        out.append((F.normalize(x, dim=-1) if normalise else x).requires_grad_())
    return out


def assert_same(ours_fn, theirs_fn, inputs: list[torch.Tensor], what: str) -> None:
    """Value and the gradient of every input (with a grad_output ≠ 1) of both functions."""
    ours = ours_fn(*inputs)
    theirs = theirs_fn(*inputs)
    close(ours, theirs, f"{what} value")
    ours_grads = torch.autograd.grad(0.7 * ours.sum(), inputs)
    theirs_grads = torch.autograd.grad(0.7 * theirs.sum(), inputs)
    for i, (a, b) in enumerate(zip(ours_grads, theirs_grads, strict=True)):
        close(a, b, f"{what} grad {i}")


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.3, "alpha": 0.2, "A_0": 0.1}])
def test_macl(kwargs):
    z0, z1 = leaves((24, 16), (24, 16))
    assert_same(lambda a, b: baselines.macl(a, b, **kwargs), lightly_loss.MACLLoss(**kwargs), [z0, z1], "MACL")


@pytest.mark.parametrize("dim", [40, 128])  # below and above loss_dim = 64
def test_directclr(dim):
    z0, z1 = leaves((20, dim), (20, dim))
    assert_same(baselines.directclr, lightly_loss.DirectCLRLoss(), [z0, z1], "DirectCLR")


def test_koleo():
    (x,) = leaves((30, 12))
    assert_same(baselines.koleo, lightly_loss.KoLeoLoss(), [x], "KoLeo")


@pytest.mark.parametrize("n,d", [(40, 12), (12, 40)])  # lightly's D x D side, then its N x N side
def test_frossl(n, d):
    z1, z2 = leaves((n, d), (n, d))
    assert_same(baselines.frossl, lambda a, b: lightly_loss.FroSSLLoss()([a, b]), [z1, z2], "FroSSL")


def test_tico_step_with_a_running_covariance():
    """lightly's second step (its C from the first) against the baseline given that C."""
    first_a, first_b, z_a, z_b = leaves((24, 10), (24, 10), (24, 10), (24, 10))
    module = lightly_loss.TiCoLoss()
    module(first_a, first_b)
    covariance = module.C.clone()
    assert_same(lambda a, b: baselines.tico(a, b, covariance), lambda a, b: module(a, b, update_covariance_matrix=False),
                [z_a, z_b], "TiCo")  # fmt: skip


def weight_normalised_layer(v: torch.Tensor) -> torch.nn.Module:
    """lightly's DINOProjectionHead last layer: weight_norm(Linear(D, K, bias=False)), gain 1 and frozen."""
    layer = torch.nn.utils.weight_norm(torch.nn.Linear(v.shape[1], v.shape[0], bias=False))
    layer.weight_g.data.fill_(1)
    layer.weight_g.requires_grad = False
    del layer.weight_v
    layer.weight_v = v  # the test's leaf: its gradient is compared
    return layer


# lightly's DINOProjectionHead builds its last layer with the deprecated torch.nn.utils.weight_norm; so does this test.
WEIGHT_NORM_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


@WEIGHT_NORM_DEPRECATED
def test_dino_with_the_weight_normalised_head():
    k, d, b = 33, 12, 5
    student, teacher = leaves((12, b, d), (2, b, d), normalise=True)
    v, v_t, center = leaves((k, d), (k, d), (k,), seed=1)
    teacher, v_t, center = teacher.detach(), v_t.detach(), center.detach()

    def theirs(student, v):
        module = lightly_loss.DINOLoss(k)
        module.center.copy_(center.reshape(1, 1, k))
        with torch.no_grad():
            teacher_out = [weight_normalised_layer(v_t.clone())(t) for t in teacher]
        head = weight_normalised_layer(v)
        return module(teacher_out, [head(s) for s in student])

    assert_same(lambda s, w: baselines.dino(s, teacher, w, v_t, center), theirs, [student, v], "DINO")


@WEIGHT_NORM_DEPRECATED
def test_ibot_with_the_weight_normalised_head():
    k, d = 29, 10
    mask = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.4
    m = int(mask.sum())
    student, teacher = leaves((m, d), (m, d), normalise=True)
    v, v_t, center = leaves((k, d), (k, d), (k,), seed=1)
    teacher, v_t, center = teacher.detach(), v_t.detach(), center.detach()

    def theirs(student, v):
        module = lightly_loss.IBOTPatchLoss(k)
        module.center.center.copy_(center.reshape(1, k))
        with torch.no_grad():
            teacher_out = weight_normalised_layer(v_t.clone())(teacher)
        return module(teacher_out, weight_normalised_layer(v)(student), mask)

    assert_same(lambda s, w: baselines.ibot(s, teacher, w, v_t, center, mask), theirs, [student, v], "iBOT")


@pytest.mark.parametrize("n_high,n_low", [(2, 6), (2, 0), (3, 1)])
def test_swav_on_the_prototype_layer(n_high, n_low):
    k, d, b = 30, 8, 6
    high, low, w = leaves((n_high, b, d), (n_low, b, d), (k, d), normalise=True)

    def theirs(high, w, low=low):
        return lightly_loss.SwaVLoss()([x @ w.T for x in high], [x @ w.T for x in low])

    def ours(high, w, low=low):
        return baselines.swav(high, low, w)

    assert_same(ours, theirs, [high, w], "SwaV")
    if n_low:
        assert_same(lambda lo: ours(high, w, lo), lambda lo: theirs(high, w, lo), [low], "SwaV, low-resolution crops")


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.2, "sinkhorn_iterations": 0, "regularization_weight": 0.5}])
def test_msn(kwargs):
    k, d, b = 19, 8, 4
    anchors, targets, prototypes = leaves((11 * b, d), (b, d), (k, d))
    targets = targets.detach()
    module = lightly_loss.MSNLoss(**kwargs)
    assert_same(lambda a, p: baselines.msn(a, targets, p, **kwargs), lambda a, p: module(a, targets, p),
                [anchors, prototypes], "MSN")  # fmt: skip
