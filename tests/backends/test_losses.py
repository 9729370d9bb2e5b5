"""The public contrastive losses on every CPU backend against the spec (fastssl.reference) in float64.

Values and every gradient must agree to relative 2e-4 in fp32 (the project's fp32 accuracy bar), on
awkward shapes and temperatures 0.01–2; half precision within the tolerance table; fp64 gradcheck
for the torch backend; extreme inputs stay finite.
"""

from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import reference
from tests.utils import CPU_BACKENDS, TOLERANCES, assert_close


def _bank(d, k=11):
    return torch.nn.functional.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)


# name -> (fastssl function(inputs, τ, backend), reference function(inputs, τ), number of embedding inputs)
LOSSES = {
    "nt_xent": (lambda z, t, b: fastssl.nt_xent_loss(z[0], z[1], t, backend=b),
                lambda z, t: reference.nt_xent_loss(z[0], z[1], t)),
    "moco": (lambda z, t, b: fastssl.moco_loss(z[0], z[1], z[2], t, backend=b),
             lambda z, t: reference.moco_loss(z[0], z[1], z[2], t)),
    "dcl": (lambda z, t, b: fastssl.dcl_loss(z[0], z[1], t, backend=b),
            lambda z, t: reference.dcl_loss(z[0], z[1], t)),
    "dclw": (lambda z, t, b: fastssl.dcl_loss(z[0], z[1], t, sigma=0.5, backend=b),
             lambda z, t: reference.dcl_loss(z[0], z[1], t, sigma=0.5)),
    "clip": (lambda z, t, b: fastssl.clip_loss(z[0], z[1], t, backend=b),
             lambda z, t: reference.clip_loss(z[0], z[1], t)),
    # uniformity's "temperature" is its t; the reference is the pdist form of Wang & Isola.
    "uniformity": (lambda z, t, b: fastssl.uniformity(z[0], 1.0 / t, backend=b),
                   lambda z, t: reference.uniformity(z[0], 1.0 / t)),
}


def make_inputs(loss, n, d, dtype, kind="random"):
    """Embedding inputs for `loss` in float64 (exact copies are cast to `dtype` by the caller)."""
    if kind == "random":
        z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    elif kind == "collapsed":  # every embedding identical
        z1 = torch.randn(1, d, dtype=torch.float64).expand(n, d).clone()
        z2 = z1.clone()
    elif kind == "zero":
        z1, z2 = torch.zeros(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
        z2[0] = 0
    elif kind == "aligned":  # views nearly equal: the positive dominates every row, the loss is ~1e-4
        z1 = torch.randn(n, d, dtype=torch.float64)
        z2 = z1 + 0.05 * torch.randn(n, d, dtype=torch.float64)
    elif kind == "huge":
        z1, z2 = 1e4 * torch.randn(n, d, dtype=torch.float64), 1e4 * torch.randn(n, d, dtype=torch.float64)
    if loss == "uniformity":  # a metric on normalised embeddings
        return [torch.nn.functional.normalize(z1, dim=1)]
    if loss == "moco":
        return [z1, z2, _bank(d)]
    return [z1, z2]


def value_and_grads(fn, inputs, temperature, grad_output=1.0):
    """fn(inputs, τ) and d(grad_output·loss)/d(each embedding input, not the bank)."""
    leaves = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    loss = fn(leaves, temperature)
    (loss * grad_output).backward()
    return loss.detach(), [t.grad for t in leaves if t.requires_grad]


def check_against_reference(loss, backend, n, d, temperature, dtype=torch.float32, kind="random", device="cpu"):
    """`loss` on `backend` with `dtype` inputs on `device` against the float64 spec on the CPU."""
    fused, spec = LOSSES[loss]
    inputs64 = make_inputs(loss, n, d, dtype, kind)
    inputs = [t.to(device, dtype) for t in inputs64]
    value, grads = value_and_grads(lambda z, t: fused(z, t, backend), inputs, temperature, grad_output=1.7)
    want64, want_grads64 = value_and_grads(spec, [t.to(torch.float64) for t in inputs], temperature, 1.7)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
    assert_close(value, want64, dtype, what=f"{loss}/{backend} loss N={n} D={d} τ={temperature}")
    for i, (g, g64) in enumerate(zip(grads, want_grads64)):
        assert g.dtype == dtype
        assert_close(g, g64, dtype, what=f"{loss}/{backend} grad {i} N={n} D={d} τ={temperature}",
                     scale=1.0 / temperature)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("n,d", [(2, 1), (5, 3), (33, 257), (1000, 16)])
@pytest.mark.parametrize("temperature", [0.01, 0.5, 2.0])
def test_fp32_matches_float64_spec(backend, loss, n, d, temperature):
    if backend == "triton" and n * d > 33 * 257:
        pytest.skip("the Triton interpreter is slow on CPU; N=1000 runs in the cuda tests")
    check_against_reference(loss, backend, n, d, temperature)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", ["nt_xent", "moco", "clip"])
def test_well_aligned_views_keep_gradient_precision(backend, loss):
    # lse ≈ pos ≈ 1/τ on every row: computing lse − pos from the two fp32 numbers kept ~3 digits of a
    # 1e-4 loss and of its 1 − P_pos gradient (relative error up to 1e-2 on the torch backend).
    # The losses use softplus(lse_negatives − pos), which keeps full fp32 relative precision.
    fused, spec = LOSSES[loss]
    inputs = make_inputs(loss, 96, 64, torch.float64, kind="aligned")
    value, grads = value_and_grads(lambda z, t: fused(z, t, backend), [t.float() for t in inputs], 0.07)
    want, want_grads = value_and_grads(spec, inputs, 0.07)
    assert float(want) < 1e-2  # the regime this test is about
    torch.testing.assert_close(value.double(), want, rtol=2e-5, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=2e-5 * float(w.abs().max()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_half_precision_matches_spec(backend, dtype, loss):
    check_against_reference(loss, backend, 17, 24, 0.2, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("loss", [name for name in LOSSES if name != "uniformity"])
@pytest.mark.parametrize("kind", ["collapsed", "zero", "huge"])
def test_extreme_inputs_stay_finite_at_tau_001(backend, loss, kind):
    # check_against_reference asserts finite values and gradients before comparing them.
    check_against_reference(loss, backend, 9, 6, 0.01, kind=kind)


# DCLW's weights are a stop-gradient by definition, so finite differences (which see them move)
# disagree with the true gradient by design; its gradients are checked against the spec above.
@pytest.mark.parametrize("loss", [name for name in LOSSES if name != "dclw"])
def test_gradcheck_fp64_torch_backend(loss):
    fused, _ = LOSSES[loss]
    inputs = make_inputs(loss, 4, 3, torch.float64)
    leaves = [t.clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    diff = [t for t in leaves if t.requires_grad]

    def fn(*ds):
        it = iter(ds)
        return fused([next(it) if t.requires_grad else t for t in leaves], 0.3, "torch")

    torch.autograd.gradcheck(fn, tuple(diff))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_learnable_temperature_gradient(backend):
    """CLIP with τ a tensor: dL/dτ matches the float64 spec's."""
    z1, z2 = torch.randn(13, 8), torch.randn(13, 8)
    tau = torch.tensor(0.3, requires_grad=True)
    fastssl.clip_loss(z1, z2, tau, backend=backend).backward()
    tau64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    reference.clip_loss(z1.double(), z2.double(), tau64).backward()
    assert_close(tau.grad, tau64.grad, torch.float32, what="dL/dτ")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_inputs_not_modified(backend, loss):
    fused, _ = LOSSES[loss]
    inputs = [t.float() for t in make_inputs(loss, 6, 5, torch.float32)]
    before = [t.clone() for t in inputs]
    value_and_grads(lambda z, t: fused(z, t, backend), inputs, 0.5)
    for a, b in zip(inputs, before):
        assert torch.equal(a, b)


def test_alignment_matches_spec():
    z1, z2 = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    for alpha in (1.0, 2.0, 3.0):
        torch.testing.assert_close(fastssl.alignment(z1, z2, alpha), reference.alignment(z1, z2, alpha))
    # identical views: zero, with a zero (not NaN) gradient
    z = torch.randn(4, 3, requires_grad=True)
    value = fastssl.alignment(z, z.detach())
    value.backward()
    assert value == 0 and torch.equal(z.grad, torch.zeros_like(z))


def test_strided_inputs_are_accepted():
    """Transposed views and column slices are valid inputs and give the contiguous answer."""
    base = torch.randn(10, 32)
    z1 = base[:, :16]  # a column slice (row stride 32)
    z2 = torch.randn(16, 10).T  # a transposed view
    want = fastssl.nt_xent_loss(z1.contiguous(), z2.contiguous(), backend="torch")
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(fastssl.nt_xent_loss(z1, z2, backend=backend), want, rtol=2e-5, atol=1e-6)


def test_tolerance_table_covers_every_dtype():
    assert set(TOLERANCES) == {torch.float16, torch.bfloat16, torch.float32, torch.float64}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["nt_xent", "moco", "dcl", "clip"])
def test_half_precision_gradient_through_the_normalisation(backend, dtype, name):
    """At D = 1 every normalised row is ±1, so the exact gradient is zero. A half-precision
    normalisation backward leaves an ulp of g/‖z‖ there (0.06 in fp16 at τ = 0.5); the losses
    normalise in fp32, which must leave at most a few ulps of the fp32-rounded result."""
    worst = 0.0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        z1, z2 = torch.randn(2, 1, generator=gen), torch.randn(2, 1, generator=gen)
        a, b = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
        if name == "moco":
            loss = fastssl.moco_loss(a, b, torch.ones(3, 1, dtype=dtype), 0.5, backend=backend)
        else:
            loss = getattr(fastssl, f"{name}_loss")(a, b, 0.5, backend=backend)
        loss.backward()
        worst = max(worst, a.grad.abs().max().item(), b.grad.abs().max().item())
    assert worst <= 1e-3, f"{name} {dtype}: |grad| up to {worst} where the exact gradient is 0"
