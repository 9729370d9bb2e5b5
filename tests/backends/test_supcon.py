"""SupCon (`fastssl.supcon_loss`, `fastssl.nn.SupConLoss`) on every CPU backend against the float64 spec.

The spec is checked against Khosla et al.'s equation per anchor in tests/spec/test_siglip_supcon_spec.py.
Here: one and two views, labels with unlabeled rows and singleton classes, τ from 0.01 to 1, half
precision, extreme inputs, fp64 gradcheck, the NT-Xent special case, label handling and bad input.
"""

from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import reference
from tests.utils import CPU_BACKENDS, assert_close


def _labels(n, classes=3, unlabeled=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < unlabeled] = -1
    return labels


def _inputs(n, d, kind="random"):
    if kind == "random":
        return torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    if kind == "collapsed":
        z = torch.randn(1, d, dtype=torch.float64).expand(n, d).clone()
        return z, z.clone()
    if kind == "zero":
        z2 = torch.randn(n, d, dtype=torch.float64)
        z2[0] = 0
        return torch.zeros(n, d, dtype=torch.float64), z2
    if kind == "huge":
        return 1e4 * torch.randn(n, d, dtype=torch.float64), 1e4 * torch.randn(n, d, dtype=torch.float64)
    raise KeyError(kind)


def _run(fn, z1, z2, grad_output=1.7):
    leaves = [z1.detach().clone().requires_grad_()] + ([] if z2 is None else [z2.detach().clone().requires_grad_()])
    loss = fn(*leaves)
    (loss * grad_output).backward()
    return loss.detach(), [x.grad for x in leaves]


def check(backend, n, d, tau, views, dtype=torch.float32, kind="random", labels=None):
    labels = _labels(n) if labels is None else labels
    z1, z2 = _inputs(n, d, kind)
    z2 = z2 if views == 2 else None

    def fused(a, b=None):
        return fastssl.supcon_loss(a, labels, tau, z2=b, backend=backend)

    def spec(a, b=None):
        return reference.supcon_loss(a, labels, tau, b)

    value, grads = _run(fused, z1.to(dtype), None if z2 is None else z2.to(dtype))
    want, want_grads = _run(spec, z1, z2)
    what = f"supcon/{backend} N={n} D={d} τ={tau} views={views} {kind}"
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads), what
    assert_close(value, want, dtype, what=f"{what} loss", scale=1.0 / tau)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == dtype
        assert_close(g, w, dtype, what=f"{what} grad {i}", scale=1.0 / tau)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("n,d", [(2, 1), (5, 3), (33, 257), (300, 16)])
@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
def test_fp32_matches_float64_spec(backend, views, n, d, tau):
    if backend == "triton" and n > 33:
        pytest.skip("the Triton interpreter is slow on CPU; the large N is for the other backends")
    check(backend, n, d, tau, views)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("views", [1, 2])
def test_half_precision_matches_spec(backend, dtype, views):
    check(backend, 17, 24, 0.2, views, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("kind", ["collapsed", "zero", "huge"])
def test_extreme_inputs_stay_finite_at_tau_001(backend, kind):
    check(backend, 9, 6, 0.01, 2, kind=kind)


@pytest.mark.parametrize("views", [1, 2])
def test_gradcheck_fp64_torch_backend(views):
    labels = torch.tensor([0, 1, 0, -1, 1])
    z1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    if views == 1:
        torch.autograd.gradcheck(lambda a: fastssl.supcon_loss(a, labels, 0.3, backend="torch"), (z1,))
    else:
        torch.autograd.gradcheck(lambda a, b: fastssl.supcon_loss(a, labels, 0.3, z2=b, backend="torch"), (z1, z2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unlabeled_two_views_is_nt_xent(backend):
    z1, z2 = torch.randn(12, 7), torch.randn(12, 7)
    got = fastssl.supcon_loss(z1, torch.full((12,), -1), 0.3, z2=z2, backend=backend)
    torch.testing.assert_close(got, fastssl.nt_xent_loss(z1, z2, 0.3, backend=backend), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_label_values_only_matter_through_equality(backend):
    z1, z2 = torch.randn(10, 4), torch.randn(10, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, -1, 2, 2, 3, -1])
    renamed = torch.tensor([70000, 12, 5, 70000, 12, -1, 5, 5, 9, -1], dtype=torch.int32)
    base = fastssl.supcon_loss(z1, labels, 0.5, z2=z2, backend=backend)
    torch.testing.assert_close(fastssl.supcon_loss(z1, renamed, 0.5, z2=z2, backend=backend), base)
    shuffled = torch.randperm(10)
    torch.testing.assert_close(
        fastssl.supcon_loss(z1[shuffled], labels[shuffled], 0.5, z2=z2[shuffled], backend=backend), base
    )
    # Every negative label means unlabeled: −7 is −1.
    other_negative = labels.clone()
    other_negative[labels == -1] = -7
    torch.testing.assert_close(fastssl.supcon_loss(z1, other_negative, 0.5, z2=z2, backend=backend), base)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_no_anchor_with_a_positive_gives_zero(backend):
    z = torch.randn(6, 4, requires_grad=True)
    loss = fastssl.supcon_loss(z, torch.tensor([0, 1, 2, 3, -1, -1]), 0.1, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_inputs_not_modified(backend):
    z1, z2, labels = torch.randn(6, 5), torch.randn(6, 5), torch.tensor([1, 1, 0, -1, 0, 2])
    before = [x.clone() for x in (z1, z2, labels)]
    fastssl.supcon_loss(z1.requires_grad_(), labels, 0.5, z2=z2, backend=backend).backward()
    for x, y in zip((z1.detach(), z2, labels), before):
        assert torch.equal(x, y)


def test_module_matches_functional_and_repr():
    module = fastssl.nn.SupConLoss(backend="torch")
    z1, z2, labels = torch.randn(8, 5), torch.randn(8, 5), _labels(8)
    torch.testing.assert_close(module(z1, labels, z2), fastssl.supcon_loss(z1, labels, 0.1, z2=z2, backend="torch"))
    torch.testing.assert_close(module(z1, labels), fastssl.supcon_loss(z1, labels, 0.1, backend="torch"))
    assert repr(module) == "SupConLoss(temperature=0.1, backend='torch')"
    assert list(module.parameters()) == []


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    labels = _labels(16)

    def fn(a, b):
        return fastssl.supcon_loss(a, labels, 0.2, z2=b, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    results = []
    for f in (fn, compiled):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = f(a, b)
        loss.backward()
        results.append((loss, a.grad, b.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument and the shapes.


@pytest.mark.parametrize(
    "labels,error,match",
    [
        ([0, 1, 0, 1], TypeError, "labels must be a torch.Tensor"),
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), TypeError, r"labels must be an integer tensor.*torch.float32"),
        (torch.tensor([True, False, True, False]), TypeError, "labels must be an integer tensor"),
        (torch.tensor([[0], [1], [0], [1]]), ValueError, r"labels must have shape \(N,\) = \(4,\).*\(4, 1\)"),
        (torch.tensor([0, 1, 0]), ValueError, r"\(4,\) for z1 of shape \(4, 3\), got \(3,\)"),
        (torch.tensor([0, 1, 0, 1], device="meta"), ValueError, "labels is on meta but z1 is on cpu"),
    ],
)
def test_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        fastssl.supcon_loss(torch.randn(4, 3), labels)


def test_bad_embeddings_and_temperature():
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape.*\(4, 3\).*\(4, 5\)"):
        fastssl.supcon_loss(torch.randn(4, 3), labels, z2=torch.randn(4, 5))
    with pytest.raises(ValueError, match="z1 must have 2 dimensions"):
        fastssl.supcon_loss(torch.randn(4, 2, 3), labels)
    with pytest.raises(ValueError, match="temperature"):
        fastssl.supcon_loss(torch.randn(4, 3), labels, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        fastssl.nn.SupConLoss(temperature=-1.0)
