"""SigLIP (`fastssl.siglip_loss`, `fastssl.nn.SigLIPLoss`) on every CPU backend against the float64 spec.

The spec itself is checked against per-pair loops in tests/spec/test_siglip_supcon_spec.py. Here:
values and gradients (z1, z2, t, b) on odd shapes, t from 1 to 100 (τ = 0.01), half precision,
extreme inputs, fp64 gradcheck on the torch backend, the module's learnable t' and b, bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastssl
from fastssl import reference
from tests.utils import CPU_BACKENDS, assert_close

#: (t, b): SigLIP's initialisation, τ = 0.01 with no bias, and a plain t = 1 with a positive bias.
SCALES = [(10.0, -10.0), (100.0, 0.0), (1.0, 2.0)]


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


def _run(fn, z1, z2, t, b, grad_output=1.7):
    """fn's loss and d(grad_output·loss)/d(z1, z2, t, b), with t and b as tensors of z1's compute dtype."""
    stat = torch.float64 if z1.dtype == torch.float64 else torch.float32
    leaves = [z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_(),
              torch.tensor(t, dtype=stat, requires_grad=True), torch.tensor(b, dtype=stat, requires_grad=True)]  # fmt: skip
    loss = fn(*leaves)
    (loss * grad_output).backward()
    return loss.detach(), [x.grad for x in leaves]


def check(backend, n, d, t, b, dtype=torch.float32, kind="random"):
    z1, z2 = _inputs(n, d, kind)
    value, grads = _run(lambda *a: fastssl.siglip_loss(*a, backend=backend), z1.to(dtype), z2.to(dtype), t, b)
    want, want_grads = _run(reference.siglip_loss, z1, z2, t, b)
    what = f"siglip/{backend} N={n} D={d} t={t} b={b} {kind}"
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads), what
    assert_close(value, want, dtype, what=f"{what} loss", scale=max(1.0, abs(float(want))))
    for name, g, w in zip(("dz1", "dz2"), grads[:2], want_grads[:2]):
        assert g.dtype == dtype
        assert_close(g, w, dtype, what=f"{what} {name}", scale=t)
    for name, g, w in zip(("dt", "db"), grads[2:], want_grads[2:]):  # sums over N² pairs
        assert_close(g, w, dtype, what=f"{what} {name}", scale=n)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("n,d", [(2, 1), (5, 3), (33, 257), (300, 16)])
@pytest.mark.parametrize("t,b", SCALES)
def test_fp32_matches_float64_spec(backend, n, d, t, b):
    if backend == "triton" and n > 33:
        pytest.skip("the Triton interpreter is slow on CPU (10 s at N=300); the large N is for the other backends")
    check(backend, n, d, t, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,b", SCALES[:2])
def test_half_precision_matches_spec(backend, dtype, t, b):
    check(backend, 17, 24, t, b, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("kind", ["collapsed", "zero", "huge"])
def test_extreme_inputs_stay_finite_at_tau_001(backend, kind):
    check(backend, 9, 6, 100.0, -10.0, kind=kind)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float_scale_and_bias_equal_tensor_ones(backend):
    z1, z2 = torch.randn(11, 7), torch.randn(11, 7)
    as_floats = fastssl.siglip_loss(z1, z2, 3.0, -1.5, backend=backend)
    as_tensors = fastssl.siglip_loss(z1, z2, torch.tensor(3.0), torch.tensor([-1.5]), backend=backend)
    torch.testing.assert_close(as_floats, as_tensors, rtol=0, atol=0)
    default = fastssl.siglip_loss(z1, z2, backend=backend)
    torch.testing.assert_close(default, fastssl.siglip_loss(z1, z2, 10.0, -10.0, backend=backend), rtol=0, atol=0)


def test_gradcheck_fp64_torch_backend():
    z1, z2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    leaves = (z1.requires_grad_(), z2.requires_grad_(), torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
              torch.tensor(-1.0, dtype=torch.float64, requires_grad=True))  # fmt: skip
    torch.autograd.gradcheck(lambda *a: fastssl.siglip_loss(*a, backend="torch"), leaves)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_inputs_not_modified(backend):
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    t, b = torch.tensor(4.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    before = [x.detach().clone() for x in (z1, z2, t, b)]
    fastssl.siglip_loss(z1.requires_grad_(), z2, t, b, backend=backend).backward()
    for x, y in zip((z1, z2, t, b), before):
        assert torch.equal(x.detach(), y)


# --------------------------------------------------------------------------------------------------
# The module: t = exp(t') and b as parameters.


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_module_learnable_parameters_get_the_spec_gradients(backend):
    module = fastssl.nn.SigLIPLoss(backend=backend)
    assert [name for name, _ in module.named_parameters()] == ["logit_scale", "logit_bias"]
    assert float(module.logit_scale.detach()) == pytest.approx(math.log(10.0)) and float(module.logit_bias.detach()) == -10.0
    z1, z2 = torch.randn(13, 8), torch.randn(13, 8)
    module(z1, z2).backward()
    t_prime = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    reference.siglip_loss(z1.double(), z2.double(), t_prime.exp(), b).backward()
    assert_close(module.logit_scale.grad, t_prime.grad, torch.float32, what="dL/dt'", scale=13)
    assert_close(module.logit_bias.grad, b.grad, torch.float32, what="dL/db", scale=13)


def test_module_optimiser_step_moves_t_and_b():
    module = fastssl.nn.SigLIPLoss(init_temperature=5.0, init_bias=-3.0, backend="torch")
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    before = module(z1, z2)
    before.backward()
    t_prime, b = float(module.logit_scale.detach()), float(module.logit_bias.detach())
    grads = float(module.logit_scale.grad), float(module.logit_bias.grad)
    opt.step()
    assert float(module.logit_scale.detach()) == pytest.approx(t_prime - 0.1 * grads[0])
    assert float(module.logit_bias.detach()) == pytest.approx(b - 0.1 * grads[1])
    assert float(module(z1, z2).detach()) < float(before.detach())  # a small step down the gradient lowers the loss


def test_module_fixed_parameters_and_repr():
    fixed = fastssl.nn.SigLIPLoss(init_temperature=4.0, init_bias=-2.0, learnable=False, backend="torch")
    assert list(fixed.parameters()) == []
    z1, z2 = torch.randn(6, 3), torch.randn(6, 3)
    torch.testing.assert_close(fixed(z1, z2), fastssl.siglip_loss(z1, z2, 4.0, -2.0, backend="torch"))
    assert "t=4, b=-2" in repr(fixed)
    assert "learnable, t=10, b=-10" in repr(fastssl.nn.SigLIPLoss())


def test_compile_fullgraph_with_learnable_parameters():
    torch._dynamo.reset()
    module = fastssl.nn.SigLIPLoss(backend="torch")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    z1, z2 = torch.randn(10, 6), torch.randn(10, 6)
    compiled(z1, z2).backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    module(z1, z2).backward()
    for g, p in zip(grads, module.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale=torch.ones(2)), ValueError, "scale"),
        (dict(bias=float("nan")), ValueError, "bias"),
        (dict(bias="-10"), TypeError, "bias"),
        (dict(bias=torch.tensor([1, 2])), ValueError, "bias"),
        (dict(gather_distributed="yes"), ValueError, "gather_distributed"),
        (dict(backend="cuda-ish"), ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(error, match=match):
        fastssl.siglip_loss(z1, z2, **kwargs)


def test_bad_embeddings():
    with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape.*\(4, 3\).*\(5, 3\)"):
        fastssl.siglip_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="z2 is torch.float64"):
        fastssl.siglip_loss(torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fastssl.siglip_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="init_temperature"):
        fastssl.nn.SigLIPLoss(init_temperature=0.0)
    with pytest.raises(ValueError, match="init_bias"):
        fastssl.nn.SigLIPLoss(init_bias=float("inf"))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not importable here")
def test_float64_on_triton_is_refused():
    z = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        fastssl.siglip_loss(z, z.clone(), backend="triton")
