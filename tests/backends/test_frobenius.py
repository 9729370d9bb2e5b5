"""The off-diagonal Frobenius family (docs/design.md, family 2): the op and Barlow Twins, VICReg, spectral.

The op ‖aᵀb‖²_F is checked against a dense float64 product on both routes; the losses against the
float64 spec (fastssl.reference, itself checked against independent formulas in test_reference.py)
on every route × CPU backend, for N < D, N > D and N = D, values and every gradient, with a random
grad_output. Routes must agree with each other; fp64 gradcheck on the torch backend.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import fastssl
import fastssl.kernels.torch.frobenius as torch_kernels
from fastssl import nn as fnn
from fastssl import reference
from fastssl.ops.frobenius import SqFrobenius, choose_side, op_route, sq_frobenius
from fastssl.ops.reductions import column_dot
from tests.utils import CPU_BACKENDS, LIGHTLY_AVAILABLE, assert_close

from fastssl._common import OP_ROUTES  # noqa: E402
LOSS_ROUTES = ("auto", "covariance", "gram")
SHAPES = [(2, 1), (5, 3), (3, 5), (7, 7), (33, 70), (70, 33)]  # (N, D): N > D, N < D, N = D, odd

# name -> (fastssl function(z1, z2, route, backend), spec(z1, z2))
LOSSES = {
    "barlow_twins": (lambda a, b, r, be: fastssl.barlow_twins_loss(a, b, route=r, backend=be),
                     reference.barlow_twins_loss),
    "barlow_twins_lambda": (lambda a, b, r, be: fastssl.barlow_twins_loss(a, b, 0.3, route=r, backend=be),
                            lambda a, b: reference.barlow_twins_loss(a, b, 0.3)),
    "vicreg": (lambda a, b, r, be: fastssl.vicreg_loss(a, b, route=r, backend=be), reference.vicreg_loss),
    "vicreg_weights": (lambda a, b, r, be: fastssl.vicreg_loss(a, b, 2.0, 3.0, 5.0, 1e-2, route=r, backend=be),
                       lambda a, b: reference.vicreg_loss(a, b, 2.0, 3.0, 5.0, 1e-2)),
    "spectral": (lambda a, b, r, be: fastssl.spectral_contrastive_loss(a, b, route=r, backend=be),
                 reference.spectral_contrastive_loss),
    "spectral_mu": (lambda a, b, r, be: fastssl.spectral_contrastive_loss(a, b, 4.0, route=r, backend=be),
                    lambda a, b: reference.spectral_contrastive_loss(a, b, 4.0)),
}


def _interpreter_too_slow(backend, *sizes):
    if backend == "triton" and max(sizes) > 40:
        pytest.skip("the Triton interpreter is slow on CPU; larger shapes run in the cuda tests")


# --------------------------------------------------------------------------------------------------
# the op


def _dense(a, b):
    return (a.double().T @ b.double()).square().sum()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("route", OP_ROUTES)
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("r,k", [(2, 1), (5, 3), (3, 5), (37, 70), (70, 37)])
@pytest.mark.parametrize("strided", [False, True])
def test_op_matches_dense_float64(backend, route, same, r, k, strided):
    _interpreter_too_slow(backend, r, k)
    a = torch.randn(k, r).T if strided else torch.randn(r, k)  # strided: a transposed view
    b = a if same else torch.randn(r, k)
    grad = torch.tensor(-1.7)
    a_ = a.detach().clone().requires_grad_()
    b_ = a_ if same else b.detach().clone().requires_grad_()
    value = sq_frobenius(a_, b_, route=route, backend=backend)
    (value * grad).backward()
    a64 = a.double().requires_grad_()
    b64 = a64 if same else b.double().requires_grad_()
    want = _dense(a64, b64)
    (want * grad.double()).backward()
    what = f"{backend}/{route} same={same} ({r}, {k}) strided={strided}"
    assert value.dtype == torch.float32
    assert_close(value, want, torch.float32, what=f"value {what}")
    assert_close(a_.grad, a64.grad, torch.float32, what=f"da {what}", scale=float(a64.grad.abs().max()))
    if not same:
        assert_close(b_.grad, b64.grad, torch.float32, what=f"db {what}", scale=float(b64.grad.abs().max()))


def _transform(x, shift, scale):
    return (x - (0 if shift is None else shift)) * (1 if scale is None else scale)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("route", OP_ROUTES)
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("which", ["shift", "scale", "both"])
def test_op_with_column_transform(backend, route, same, which):
    """The folded transform â = (a − shift)·scale: value and gradients w.r.t. a, b, shifts and scales."""
    r, k = 9, 7
    a, b = 3 + torch.randn(r, k, dtype=torch.float64), torch.randn(r, k, dtype=torch.float64)
    vecs = {n: torch.randn(k, dtype=torch.float64) for n in ("a_shift", "a_scale", "b_shift", "b_scale")}
    kw = {n: v for n, v in vecs.items() if which == "both" or n.endswith(which)}
    if same:
        kw = {n: v for n, v in kw.items() if n.startswith("a_")}
    grad = torch.tensor(0.6, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (a, b, *kw.values())]
        x, y, *ts = leaves
        value = fn(x, x if same else y, dict(zip(kw, ts)))
        (value * grad.to(dtype)).backward()
        return [value] + [t.grad for t in leaves if t.grad is not None]

    got = run(lambda x, y, t: sq_frobenius(x, y, **t, route=route, backend=backend), torch.float32)
    want = run(lambda x, y, t: _dense(_transform(x, t.get("a_shift"), t.get("a_scale")),
                                      _transform(y, t.get("b_shift"), t.get("b_scale")) if not same
                                      else _transform(x, t.get("a_shift"), t.get("a_scale"))), torch.float64)  # fmt: skip
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.float32, what=f"{backend}/{route} {which} same={same} output {i}",
                     scale=float(w.abs().max()))  # fmt: skip


@pytest.mark.parametrize("route", OP_ROUTES)
@pytest.mark.parametrize("same", [False, True])
def test_op_gradcheck_fp64(route, same):
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    shift, scale = torch.randn(4, dtype=torch.float64, requires_grad=True), torch.rand(4, dtype=torch.float64) + 0.5
    scale.requires_grad_()
    if same:
        torch.autograd.gradcheck(lambda x, s, c: SqFrobenius.apply(x, None, s, c, None, None, route, "torch"),
                                 (a, shift, scale))  # fmt: skip
    else:
        b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda x, y, s, c: SqFrobenius.apply(x, y, s, None, None, c, route, "torch"),
                                 (a, b, shift, scale))  # fmt: skip


@pytest.mark.parametrize("same", [False, True])
def test_column_dot(same):
    """column_dot: the diagonal of âᵀb̂ with the same transform, its gradients, saving only its inputs."""
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    shift, scale = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    args = (a, None if same else b, shift, scale) + ((None, None) if same else (shift.flip(0), scale.flip(0)))
    leaves = [t.clone().requires_grad_() if t is not None else None for t in args]
    torch.autograd.gradcheck(lambda *xs: column_dot(*xs), tuple(leaves))
    a_hat = _transform(a, shift, scale)
    b_hat = a_hat if same else _transform(b, shift.flip(0), scale.flip(0))
    torch.testing.assert_close(column_dot(*args), (a_hat * b_hat).sum(0))


@pytest.mark.parametrize("route", OP_ROUTES)
def test_op_chunks_agree(monkeypatch, route):
    """Many small chunks give the same numbers as one chunk (no seams in the chunk loops)."""
    a, b = torch.randn(23, 17, dtype=torch.float64), torch.randn(23, 17, dtype=torch.float64)
    g = torch.tensor(0.7, dtype=torch.float64)
    results = []
    for chunk_bytes in (8 * 23 * 3, 2**30):  # 3 rows per chunk, then one chunk
        monkeypatch.setattr(torch_kernels, "_CHUNK_BYTES", chunk_bytes)
        none = (None, None, None, None)
        results.append((torch_kernels.sq_frobenius_forward(a, b, *none, route),
                        *torch_kernels.sq_frobenius_backward(a, b, *none, g, route)))  # fmt: skip
    for small, whole in zip(*results):
        torch.testing.assert_close(small, whole, rtol=1e-12, atol=1e-12)


def test_op_opcheck():
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    shift, scale = torch.randn(5), torch.rand(5)
    for args in ((a, b, shift, scale, None, scale, "inner", "torch"), (a, None, None, scale, None, None, "outer", "torch")):
        torch.library.opcheck(torch.ops.fastssl.sq_frobenius_fwd.default, args)
        grad = torch.tensor(1.3)
        torch.library.opcheck(torch.ops.fastssl.sq_frobenius_bwd.default, (*args[:6], grad, *args[6:]))


def test_route_choice():
    assert choose_side(512, 32768, "auto") == "gram"  # Barlow Twins at D >> N: the N x N side
    assert choose_side(65536, 64, "auto") == "covariance"  # spectral at N >> D: the D x D side
    assert choose_side(64, 64, "auto") == "covariance"
    assert choose_side(10, 20, "covariance") == "covariance"
    # Rows are samples (a = z): D x D is aᵀb. Rows are dimensions (a = zᵀ): D x D is aaᵀ.
    assert op_route("covariance", True) == "inner" and op_route("gram", True) == "outer"
    assert op_route("covariance", False) == "outer" and op_route("gram", False) == "inner"


# --------------------------------------------------------------------------------------------------
# the losses


def _value_and_grads(fn, z1, z2, grad_output):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    value = fn(a, b)
    (value * grad_output).backward()
    return value.detach(), a.grad, b.grad


def check_loss(name, backend, route, n, d, dtype=torch.float32, kind="random", device="cpu", spec_device="cpu"):
    """`name` on `backend`/`route` with `dtype` inputs on `device` against the float64 spec (on the CPU, or
    on `spec_device` for sizes whose float64 matrix is slow there)."""
    fused, spec = LOSSES[name]
    gen = torch.Generator().manual_seed(n * 1000 + d)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # correlated views
    if kind == "collapsed":
        z1 = z1[:1].expand(n, d).clone()
        z2 = z1.clone()
    elif kind == "huge":
        z1, z2 = 1e4 * z1, 1e4 * z2
    z1, z2 = z1.to(dtype), z2.to(dtype)
    value, g1, g2 = _value_and_grads(lambda a, b: fused(a, b, route, backend), z1.to(device), z2.to(device), -1.3)
    want, w1, w2 = _value_and_grads(spec, z1.double().to(spec_device), z2.double().to(spec_device), -1.3)
    what = f"{name}/{backend}/{route} N={n} D={d} {kind}"
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(value) and torch.isfinite(g1).all() and torch.isfinite(g2).all(), what
    assert g1.dtype == dtype and g2.dtype == dtype
    assert_close(value, want, dtype, what=f"value {what}", scale=max(1.0, float(want.abs())))
    for i, (g, w) in enumerate(((g1, w1), (g2, w2))):
        # atol as in test_losses (the table's, ×1), times the gradient's size when that is above 1:
        # Barlow Twins' gradients grow with D. With D = 1 or a collapsed batch the true gradient is ~0
        # (the normalisations cancel it) and both sides are rounding noise of O(1) terms.
        assert_close(g, w, dtype, what=f"grad {i} {what}", scale=max(1.0, float(w.abs().max())))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("route", LOSS_ROUTES)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("n,d", SHAPES)
def test_losses_fp32_match_float64_spec(name, backend, route, n, d):
    _interpreter_too_slow(backend, n, d)
    check_loss(name, backend, route, n, d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", ["covariance", "gram"])
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral"])
def test_losses_half_precision(name, backend, route, dtype):
    check_loss(name, backend, route, 24, 17, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral"])
@pytest.mark.parametrize("kind", ["collapsed", "huge"])
def test_extreme_inputs_stay_finite(name, backend, kind):
    # Barlow Twins' batch norm of a collapsed batch divides 0 by sqrt(eps): finite, as in lightly.
    check_loss(name, backend, "auto", 9, 6, kind=kind)


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral"])
def test_routes_agree(name):
    fused, _ = LOSSES[name]
    z1, z2 = torch.randn(50, 20), torch.randn(50, 20)
    cov = _value_and_grads(lambda a, b: fused(a, b, "covariance", "torch"), z1, z2, 1.0)
    gram = _value_and_grads(lambda a, b: fused(a, b, "gram", "torch"), z1, z2, 1.0)
    for c, g in zip(cov, gram):
        torch.testing.assert_close(c, g, rtol=2e-4, atol=1e-6 * float(g.abs().max()))


@pytest.mark.parametrize("route", ["covariance", "gram"])
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral"])
def test_gradcheck_fp64_torch_backend(name, route):
    fused, _ = LOSSES[name]
    z1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: fused(a, b, route, "torch"), (z1, z2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral"])
def test_inputs_not_modified(name, backend):
    fused, _ = LOSSES[name]
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    before = (z1.clone(), z2.clone())
    _value_and_grads(lambda a, b: fused(a, b, "auto", backend), z1, z2, 1.0)
    assert torch.equal(z1, before[0]) and torch.equal(z2, before[1])


def test_spectral_norm_clip():
    """Rows longer than √μ are scaled back: the loss of 10·z equals that of √μ·n(z); short rows stay."""
    z1, z2 = torch.randn(12, 5), torch.randn(12, 5)
    n1, n2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    big = fastssl.spectral_contrastive_loss(10 * z1, 10 * z2, mu=2.0, backend="torch")
    on_sphere = fastssl.spectral_contrastive_loss(2**0.5 * n1, 2**0.5 * n2, mu=2.0, backend="torch")
    torch.testing.assert_close(big, on_sphere, rtol=1e-5, atol=1e-6)
    small = fastssl.spectral_contrastive_loss(0.5 * n1, 0.5 * n2, mu=2.0, backend="torch")
    assert not torch.allclose(small, on_sphere)


# --------------------------------------------------------------------------------------------------
# validation and modules


@pytest.mark.parametrize("fn", [fastssl.barlow_twins_loss, fastssl.vicreg_loss, fastssl.spectral_contrastive_loss])
def test_unknown_route(fn):
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"route must be one of \('auto', 'covariance', 'gram'\), got 'dxd'"):
        fn(z, z, route="dxd")


def test_bad_weights():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="lambda_param must be a finite number >= 0, got -1"):
        fastssl.barlow_twins_loss(z, z, -1.0)
    with pytest.raises(ValueError, match="nu_param must be a finite number >= 0, got nan"):
        fastssl.vicreg_loss(z, z, nu_param=float("nan"))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        fastssl.vicreg_loss(z, z, eps=0.0)
    with pytest.raises(ValueError, match="mu must be a finite number > 0"):
        fastssl.spectral_contrastive_loss(z, z, mu=-1.0)
    with pytest.raises(TypeError, match="lambda_param must be a float, got str"):
        fnn.BarlowTwinsLoss("0.1")
    with pytest.raises(ValueError, match="'ring' is for the pairwise-LSE"):
        fnn.VICRegLoss(gather_distributed="ring")
    with pytest.raises(ValueError, match="route must be one of"):
        fnn.SpectralContrastiveLoss(route="N")


def test_modules_match_functional():
    z1, z2 = torch.randn(10, 6), torch.randn(10, 6)
    pairs = [
        (fnn.BarlowTwinsLoss(0.01, route="gram", backend="torch"),
         fastssl.barlow_twins_loss(z1, z2, 0.01, backend="reference")),
        (fnn.VICRegLoss(1.0, 2.0, 3.0, False, 1e-3, backend="torch"),
         fastssl.vicreg_loss(z1, z2, 1.0, 2.0, 3.0, 1e-3, backend="reference")),
        (fnn.SpectralContrastiveLoss(2.0, backend="torch"),
         fastssl.spectral_contrastive_loss(z1, z2, 2.0, backend="reference")),
    ]  # fmt: skip
    for module, want in pairs:
        torch.testing.assert_close(module(z1, z2), want, rtol=2e-5, atol=1e-6)
    assert "lambda_param=0.01, route='gram'" in repr(pairs[0][0])
    assert "eps=0.001" in repr(pairs[1][0]) and "mu=2.0" in repr(pairs[2][0])


@pytest.mark.skipif(not LIGHTLY_AVAILABLE, reason="lightly is not installed (it needs torchvision, which does "
                    "not import beside the CPU torch 2.13 wheel); see README, 'Checking against lightly'")
@pytest.mark.parametrize("name", ["BarlowTwinsLoss", "VICRegLoss"])
@pytest.mark.parametrize("route", LOSS_ROUTES)
def test_modules_match_lightly(name, route):
    import lightly.loss

    ours = getattr(fnn, name)(route=route, backend="torch")
    theirs = getattr(lightly.loss, name)()
    for n, d in ((16, 32), (40, 12)):
        z1, z2 = torch.randn(n, d), torch.randn(n, d)
        results = [_value_and_grads(module, z1, z2, 1.0) for module in (ours, theirs)]
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@settings(max_examples=40, deadline=None)
@given(
    r=st.integers(1, 40),
    k=st.integers(1, 40),
    same=st.booleans(),
    route=st.sampled_from(OP_ROUTES),
    seed=st.integers(0, 2**16),
)
def test_op_any_shape_property(r, k, same, route, seed):
    """Any (R, K), either route, shared or separate operands: the torch backend equals the dense value."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, k, generator=gen, dtype=torch.float64)
    b = a if same else torch.randn(r, k, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sq_frobenius(a, b, route=route, backend="torch"), _dense(a, b), rtol=1e-10, atol=1e-12)
