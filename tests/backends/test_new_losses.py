"""MACL, DirectCLR, FroSSL, TiCo and KoLeo (lightly 1.6's losses) and the pairwise-max op on every CPU backend.

Each backend against the spec (fastssl.reference) in float64: values and every gradient to the fp32
row of the tolerance table on odd shapes, N < D and N > D; half precision within its row; fp64
gradcheck of the torch backend; inputs never modified; bad input named in the error. Then what each
loss adds: MACL's tensor temperature, DirectCLR's strided truncation and memory bank, the Frobenius
routes of FroSSL and TiCo, TiCo's running covariance, the pairwise-max op's selection, ties and
gradient, and its Triton kernel compiled ahead of time for sm_90 and sm_80.
"""

from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import nn as fnn
from fastssl import reference
from tests.utils import CPU_BACKENDS, assert_close

ALL_BACKENDS = CPU_BACKENDS + ["reference"]


def _pair(n, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z1.to(dtype), (z1 + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)


def _value_and_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(value * -0.7, leaves)  # grad_output ≠ 1
    return value.detach(), grads


def _backend_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def assert_matches_reference(fn, ref_fn, inputs, backend, what):
    """fn on `backend` (fp64 inputs; fp32 for triton) against ref_fn in fp64: the fp32 row of the table."""
    got = _value_and_grads(fn, [t.to(_backend_dtype(backend)) for t in inputs])
    want = _value_and_grads(ref_fn, inputs)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1]), what
    assert_close(got[0], want[0], torch.float32, what=f"value {what}", scale=max(1.0, float(want[0].abs())))
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        assert g.dtype == _backend_dtype(backend), what
        assert_close(g, w, torch.float32, what=f"grad {i} {what}", scale=max(1e-3, float(w.abs().max())))


# ------------------------------------------------------------------------------------------------
# MACL
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n,d", [(3, 17), (19, 6)])
@pytest.mark.parametrize("tau,alpha,a0", [(0.1, 0.5, 0.0), (0.5, 1.0, 0.3), (0.05, 0.2, 1.0)])
def test_macl_matches_reference(backend, n, d, tau, alpha, a0):
    z1, z2 = _pair(n, d, seed=n * d)
    assert_matches_reference(lambda a, b: fastssl.macl_loss(a, b, tau, alpha, a0, backend=backend),
                             lambda a, b: reference.macl_loss(a, b, tau, alpha, a0), (z1, z2), backend,
                             f"macl/{backend} N={n} D={d} τ={tau} α={alpha} A_0={a0}")  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_macl_half_precision(backend, dtype):
    z1, z2 = _pair(24, 40, seed=1, dtype=dtype)
    got = _value_and_grads(lambda a, b: fastssl.macl_loss(a, b, 0.2, backend=backend), (z1, z2))
    want = _value_and_grads(lambda a, b: reference.macl_loss(a, b, 0.2), (z1.double(), z2.double()))
    assert got[0].dtype == torch.float32 and got[1][0].dtype == dtype
    assert_close(got[0], want[0], dtype, what=f"macl {backend} {dtype} value")
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, dtype, what=f"macl {backend} {dtype} grad", scale=float(w.abs().max()))


def assert_float64_exact(fn, ref_fn, inputs, what):
    """The torch backend in fp64 against the fp64 spec, to the fp64 row of the table. (For losses whose
    gradient is defined with stop-gradients — MACL's V and t, FroSSL's trace, TiCo's B, KoLeo's
    neighbour — gradcheck's numerical Jacobian differentiates through them and does not apply.)"""
    got, want = _value_and_grads(fn, inputs), _value_and_grads(ref_fn, inputs)
    assert_close(got[0], want[0], torch.float64, what=f"value {what}")
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, torch.float64, what=f"grad {what}", scale=float(w.abs().max()))


def test_macl_float64_torch_equals_spec():
    assert_float64_exact(lambda a, b: fastssl.macl_loss(a, b, 0.3, backend="torch"),
                         lambda a, b: reference.macl_loss(a, b, 0.3), _pair(9, 4, seed=2), "macl")  # fmt: skip


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_macl_tensor_temperature_gets_its_gradient(backend):
    z1, z2 = _pair(7, 9, seed=4, dtype=_backend_dtype(backend))
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fastssl.macl_loss(z1, z2, tau, backend=backend), tau)
    tau_ref = tau.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.macl_loss(z1.double(), z2.double(), tau_ref), tau_ref)
    assert_close(grad, want, torch.float32, what=f"d τ {backend}", scale=float(want.abs()))


def test_macl_alpha_zero_is_weighted_nt_xent():
    # α = 0: t = τ, and with V ≡ 1 the loss would be NT-Xent; V ≥ 1 weights every anchor up.
    z1, z2 = _pair(10, 8, seed=5)
    macl = fastssl.macl_loss(z1, z2, 0.5, alpha=0.0, backend="torch")
    nt_xent = fastssl.nt_xent_loss(z1, z2, 0.5, backend="torch")
    assert macl > nt_xent
    huge_eps = fastssl.macl_loss(z1, z2, 0.5, alpha=0.0, eps=1e12, backend="torch") * 1e12  # V ≈ 1/eps
    torch.testing.assert_close(huge_eps, nt_xent, rtol=1e-9, atol=0)


def test_macl_module_and_validation():
    z1, z2 = _pair(6, 5, seed=6, dtype=torch.float32)
    module = fnn.MACLLoss(0.2, alpha=0.7, A_0=0.1, backend="torch")
    torch.testing.assert_close(module(z1, z2), fastssl.macl_loss(z1, z2, 0.2, 0.7, 0.1, backend="torch"))
    assert "alpha=0.7" in repr(module) and "A_0=0.1" in repr(module)
    for kwargs, match in [({"temperature": 0.0}, "temperature"), ({"alpha": 1.5}, "alpha"), ({"A_0": -0.1}, "A_0")]:
        with pytest.raises(ValueError, match=match):
            fnn.MACLLoss(**kwargs)
        with pytest.raises(ValueError, match=match):
            fastssl.macl_loss(z1, z2, **kwargs)
    with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape.*\(6, 5\).*\(5, 5\)"):
        fastssl.macl_loss(z1, z2[:5])
    with pytest.raises(TypeError, match="alpha must be a float"):
        fastssl.macl_loss(z1, z2, alpha="0.5")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_macl_inputs_not_modified(backend):
    z1, z2 = (t.float().requires_grad_() for t in _pair(6, 5, seed=7))
    before = (z1.detach().clone(), z2.detach().clone())
    fastssl.macl_loss(z1, z2, backend=backend).backward()
    assert torch.equal(z1.detach(), before[0]) and torch.equal(z2.detach(), before[1])


# ------------------------------------------------------------------------------------------------
# DirectCLR
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n,d,loss_dim", [(5, 23, 9), (17, 6, 64)])
@pytest.mark.parametrize("with_bank", [False, True])
def test_directclr_matches_reference(backend, n, d, loss_dim, with_bank):
    z1, z2 = _pair(n, d, seed=n + d)
    k = min(d, loss_dim)
    bank = torch.nn.functional.normalize(torch.randn(13, k, dtype=torch.float64), dim=1) if with_bank else None
    b = None if bank is None else bank.to(_backend_dtype(backend))
    assert_matches_reference(lambda x, y: fastssl.directclr_loss(x, y, loss_dim, 0.2, bank=b, backend=backend),
                             lambda x, y: reference.directclr_loss(x, y, loss_dim, 0.2, bank=bank), (z1, z2),
                             backend, f"directclr/{backend} N={n} D={d} k={loss_dim} bank={with_bank}")  # fmt: skip


def test_directclr_float64_torch_equals_spec():
    assert_float64_exact(lambda a, b: fastssl.directclr_loss(a, b, 5, backend="torch"),
                         lambda a, b: reference.directclr_loss(a, b, 5), _pair(7, 12, seed=3), "directclr")  # fmt: skip


def test_directclr_gradcheck_torch():
    z1, z2 = (t.requires_grad_() for t in _pair(4, 7, seed=8))
    assert torch.autograd.gradcheck(lambda a, b: fastssl.directclr_loss(a, b, 3, 0.4, backend="torch"), (z1, z2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_directclr_half_precision(backend, dtype):
    z1, z2 = _pair(12, 48, seed=9, dtype=dtype)
    got = _value_and_grads(lambda a, b: fastssl.directclr_loss(a, b, 20, backend=backend), (z1, z2))
    want = _value_and_grads(lambda a, b: reference.directclr_loss(a, b, 20), (z1.double(), z2.double()))
    assert_close(got[0], want[0], dtype, what=f"directclr {backend} {dtype} value")
    for g, w in zip(got[1], want[1]):
        assert g.dtype == dtype
        assert_close(g, w, dtype, what=f"directclr {backend} {dtype} grad", scale=float(w.abs().max()))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_directclr_sees_only_the_leading_dimensions(backend):
    z1, z2 = _pair(9, 14, seed=10, dtype=_backend_dtype(backend))
    _, (g1, g2) = _value_and_grads(lambda a, b: fastssl.directclr_loss(a, b, 5, backend=backend), (z1, z2))
    assert g1[:, 5:].abs().max() == 0 and g2[:, 5:].abs().max() == 0
    assert g1[:, :5].abs().max() > 0 and g2[:, :5].abs().max() > 0
    changed = z1.clone()
    changed[:, 5:] = 1e3  # the trailing dimensions do not enter the loss
    torch.testing.assert_close(fastssl.directclr_loss(changed, z2, 5, backend=backend),
                               fastssl.directclr_loss(z1, z2, 5, backend=backend))  # fmt: skip


def test_directclr_truncation_is_a_view():
    from fastssl.functional import _leading_dims

    z = torch.randn(6, 10)
    view = _leading_dims(z, 4)
    assert view.data_ptr() == z.data_ptr() and view.stride() == (10, 1) and view.shape == (6, 4)
    images = torch.randn(6, 3, 2, 2)  # (N, C, H, W) backbone maps: flattened without a copy
    assert _leading_dims(images, 5).data_ptr() == images.data_ptr()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pairwise_lse_reads_strided_operands(backend):
    # What DirectCLR's strided rows would meet in the kernels: a column slice and a transposed view.
    from fastssl.ops.pairwise_lse import PairwiseLSEFlags, pairwise_lse

    flags = PairwiseLSEFlags(pos_offset=3, exclude_self=True)
    wide = torch.randn(11, 20)
    storage_t = torch.randn(7, 11)
    scale = torch.tensor(2.0)
    for x in (wide[:, 3:10], storage_t.T):
        assert not x.is_contiguous()
        xs = x.detach().requires_grad_()  # a strided leaf: the same view, no copy
        strided = pairwise_lse(xs, xs, None, scale, flags, backend=backend)
        xc = x.detach().contiguous().requires_grad_()
        contiguous = pairwise_lse(xc, xc, None, scale, flags, backend=backend)
        torch.testing.assert_close(strided[0], contiguous[0], rtol=1e-6, atol=1e-6)
        (g_strided,) = torch.autograd.grad(strided[0].sum() + strided[1].sum(), xs)
        (g_contig,) = torch.autograd.grad(contiguous[0].sum() + contiguous[1].sum(), xc)
        torch.testing.assert_close(g_strided, g_contig, rtol=1e-5, atol=1e-6)


def test_directclr_module_memory_bank_and_validation():
    torch.manual_seed(0)
    module = fnn.DirectCLRLoss(loss_dim=4, memory_bank_size=(10, 4), backend="torch")
    out0, out1 = torch.randn(3, 9, requires_grad=True), torch.randn(3, 9)
    bank = module.memory_bank.bank.clone()
    loss = module(out0, out1)
    torch.testing.assert_close(loss, reference.directclr_loss(out0, out1, 4, 0.5, bank=bank))
    # the truncated, normalised keys were enqueued
    torch.testing.assert_close(module.memory_bank.bank[:3], torch.nn.functional.normalize(out1[:, :4], dim=1))
    assert "loss_dim=4" in repr(module) and "temperature=0.5" in repr(module)
    with pytest.raises(ValueError, match="loss_dim must be >= 1"):
        fnn.DirectCLRLoss(loss_dim=0)
    with pytest.raises(TypeError, match="loss_dim must be an int"):
        fastssl.directclr_loss(out0, out1, 2.5)
    with pytest.raises(ValueError, match=r"query and bank must have the same embedding dimension.*\(3, 4\).*\(10, 9\)"):
        fastssl.directclr_loss(out0, out1, 4, bank=torch.randn(10, 9))
    with pytest.raises(ValueError, match=r"z1 must have 2 dimensions, got shape \(3,\)"):
        fastssl.directclr_loss(torch.randn(3), torch.randn(3))


# ------------------------------------------------------------------------------------------------
# FroSSL
# ------------------------------------------------------------------------------------------------


def _views(num_views, n, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return [(base + 0.6 * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(num_views)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n,d", [(3, 17), (21, 5)])
@pytest.mark.parametrize("route", ["auto", "covariance", "gram"])
@pytest.mark.parametrize("num_views", [2, 3])
def test_frossl_matches_reference(backend, n, d, route, num_views):
    views = _views(num_views, n, d, seed=n + d + num_views)
    assert_matches_reference(lambda *v: fastssl.frossl_loss(list(v), 0.7, route=route, backend=backend),
                             lambda *v: reference.frossl_loss(list(v), 0.7), views, backend,
                             f"frossl/{backend} N={n} D={d} V={num_views} route={route}")  # fmt: skip


def test_frossl_float64_torch_equals_spec():
    assert_float64_exact(lambda *v: fastssl.frossl_loss(list(v), backend="torch"),
                         lambda *v: reference.frossl_loss(list(v)), _views(3, 8, 5, seed=1), "frossl")  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frossl_half_precision(backend, dtype):
    views = _views(2, 40, 24, seed=2, dtype=dtype)
    got = _value_and_grads(lambda *v: fastssl.frossl_loss(list(v), backend=backend), views)
    want = _value_and_grads(lambda *v: reference.frossl_loss(list(v)), [v.double() for v in views])
    assert_close(got[0], want[0], dtype, what=f"frossl {backend} {dtype} value", scale=float(want[0].abs()))
    for g, w in zip(got[1], want[1]):
        assert g.dtype == dtype
        assert_close(g, w, dtype, what=f"frossl {backend} {dtype} grad", scale=float(w.abs().max()))


def test_frossl_is_invariant_to_column_scales():
    # ẑ normalises each dimension over the batch: rescaling columns changes nothing.
    views = _views(2, 10, 6, seed=3)
    scaled = [v * torch.linspace(0.1, 30.0, 6, dtype=torch.float64) for v in views]
    torch.testing.assert_close(fastssl.frossl_loss(scaled, backend="torch"), fastssl.frossl_loss(views, backend="torch"))


def test_frossl_module_and_validation():
    views = _views(3, 7, 4, seed=4, dtype=torch.float32)
    module = fnn.FroSSLLoss(0.5, route="gram", backend="torch")
    expected = fastssl.frossl_loss(views, 0.5, backend="torch")
    torch.testing.assert_close(module(views), expected)
    torch.testing.assert_close(module(*views), expected)
    assert "invariance_weight=0.5" in repr(module) and "route='gram'" in repr(module)
    with pytest.raises(ValueError, match="at least two views but found 1"):
        fastssl.frossl_loss(views[:1])
    with pytest.raises(TypeError, match="z_views must be a list or tuple"):
        fastssl.frossl_loss(views[0])
    with pytest.raises(ValueError, match=r"z_views\[0\] and z_views\[2\] must have the same shape.*\(7, 4\).*\(7, 3\)"):
        fastssl.frossl_loss([views[0], views[1], views[2][:, :3]])
    with pytest.raises(ValueError, match="invariance_weight must be a finite number >= 0"):
        fnn.FroSSLLoss(-1.0)
    with pytest.raises(ValueError, match="route must be one of"):
        fastssl.frossl_loss(views, route="diagonal")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frossl_inputs_not_modified(backend):
    views = [v.requires_grad_() for v in _views(2, 6, 9, seed=5, dtype=torch.float32)]
    before = [v.detach().clone() for v in views]
    fastssl.frossl_loss(views, backend=backend).backward()
    assert all(torch.equal(v.detach(), b) for v, b in zip(views, before))


# ------------------------------------------------------------------------------------------------
# TiCo
# ------------------------------------------------------------------------------------------------


def _state(d, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return m @ m.T / d  # symmetric PSD, as every running covariance


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n,d", [(3, 17), (21, 5)])
@pytest.mark.parametrize("route", ["auto", "covariance", "gram"])
@pytest.mark.parametrize("beta,with_state", [(0.9, True), (0.9, False), (0.0, True), (1.0, True)])
def test_tico_matches_reference(backend, n, d, route, beta, with_state):
    z_a, z_b = _pair(n, d, seed=n + d)
    state = _state(d, seed=d) if with_state else None
    assert_matches_reference(lambda a, b: fastssl.tico_loss(a, b, state, beta, 3.0, route=route, backend=backend),
                             lambda a, b: reference.tico_loss(a, b, state, beta, 3.0), (z_a, z_b), backend,
                             f"tico/{backend} N={n} D={d} route={route} β={beta} state={with_state}")  # fmt: skip


def test_tico_float64_torch_equals_spec():
    state = _state(6, seed=1)
    assert_float64_exact(lambda a, b: fastssl.tico_loss(a, b, state, backend="torch"),
                         lambda a, b: reference.tico_loss(a, b, state), _pair(9, 6, seed=2), "tico")  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tico_half_precision(backend, dtype):
    z_a, z_b = _pair(24, 40, seed=3, dtype=dtype)
    state = _state(40, seed=4)
    got = _value_and_grads(lambda a, b: fastssl.tico_loss(a, b, state, backend=backend), (z_a, z_b))
    want = _value_and_grads(lambda a, b: reference.tico_loss(a, b, state), (z_a.double(), z_b.double()))
    assert_close(got[0], want[0], dtype, what=f"tico {backend} {dtype} value", scale=float(want[0].abs()))
    for g, w in zip(got[1], want[1]):
        assert g.dtype == dtype
        assert_close(g, w, dtype, what=f"tico {backend} {dtype} grad", scale=float(w.abs().max()))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tico_module_state(backend):
    dtype = _backend_dtype(backend)
    module = fnn.TiCoLoss(beta=0.6, rho=2.0, backend=backend)
    assert module.C is None and "C" not in module.state_dict()
    z_a, z_b = _pair(7, 5, seed=5, dtype=dtype)
    # Without the update the loss is that of a zero state, and C becomes zeros (as lightly's).
    torch.testing.assert_close(module(z_a, z_b, update_covariance_matrix=False),
                               fastssl.tico_loss(z_a, z_b, None, 0.6, 2.0, backend=backend))  # fmt: skip
    assert torch.equal(module.C, torch.zeros(5, 5, dtype=dtype))
    expected_c = torch.zeros(5, 5, dtype=torch.float64)
    for step in range(3):
        z_a, z_b = _pair(7, 5, seed=10 + step, dtype=dtype)
        a = torch.nn.functional.normalize(z_a.double(), dim=1)
        expected_c = 0.6 * expected_c + 0.4 * a.T @ a / 7
        loss = module(z_a, z_b)
        # the loss is against the updated C: the spec with C_prev and β, or the new C and β = 1
        want = reference.tico_loss(z_a.double(), z_b.double(), expected_c, beta=1.0, rho=2.0)
        assert_close(loss, want, torch.float32, what=f"tico module loss step {step}", scale=float(want.abs()))
        assert_close(module.C, expected_c, torch.float32, what=f"tico C step {step}")
    before = module.C.clone()
    module(z_a, z_b, update_covariance_matrix=False)
    assert torch.equal(module.C, before)
    assert "C" not in module.state_dict() and module.double().C.dtype == torch.float64  # follows .to()


def test_tico_validation():
    z_a, z_b = _pair(6, 4, seed=6, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"covariance must be \(D, D\) = \(4, 4\) for z_a of shape \(6, 4\), got \(3, 3\)"):
        fastssl.tico_loss(z_a, z_b, torch.eye(3))
    with pytest.raises(ValueError, match=r"beta must be in the range \[0, 1\]"):
        fnn.TiCoLoss(beta=1.5)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        fastssl.tico_loss(z_a, z_b, rho=-1.0)
    with pytest.raises(ValueError, match=r"z_a and z_b must have the same shape"):
        fnn.TiCoLoss()(z_a, z_b[:, :3])
    module = fnn.TiCoLoss(backend="torch")
    module(z_a, z_b)
    with pytest.raises(ValueError, match=r"running covariance C is \(4, 4\) but z_a has shape \(6, 3\)"):
        module(z_a[:, :3], z_b[:, :3])
    assert "beta=0.9" in repr(module) and "rho=8.0" in repr(module)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tico_inputs_not_modified(backend):
    z_a, z_b = (t.float().requires_grad_() for t in _pair(6, 5, seed=7))
    state = _state(5, seed=8).float()
    before = (z_a.detach().clone(), z_b.detach().clone(), state.clone())
    fastssl.tico_loss(z_a, z_b, state, backend=backend).backward()
    assert all(torch.equal(x, y) for x, y in zip((z_a.detach(), z_b.detach(), state), before))


# ------------------------------------------------------------------------------------------------
# The pairwise-max op and KoLeo
# ------------------------------------------------------------------------------------------------


def _brute_force_max(x, y, exclude_self):
    sims = x.double() @ y.double().T
    if exclude_self:
        k = min(x.shape[0], y.shape[0])
        sims[torch.arange(k), torch.arange(k)] = float("-inf")
    return sims.max(dim=1).values, sims.argmax(dim=1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m,n_y,d", [(37, 37, 21), (5, 40, 300), (33, 3, 7)])  # resident D, the D loop, Ny < M
@pytest.mark.parametrize("same", [True, False])
def test_pairwise_max_selects_the_best_column(backend, m, n_y, d, same):
    from fastssl.ops.pairwise_max import pairwise_max

    x = torch.randn(m, d)
    y = x if same and m == n_y else torch.randn(n_y, d)
    for exclude_self in (True, False):
        value, index = pairwise_max(x, y, exclude_self=exclude_self, backend=backend)
        want_value, want_index = _brute_force_max(x, y, exclude_self)
        assert index.dtype == torch.long and torch.equal(index, want_index), (backend, exclude_self)
        torch.testing.assert_close(value.double(), want_value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pairwise_max_ties_go_to_the_first_column(backend):
    from fastssl.ops.pairwise_max import pairwise_max

    # Small integers: every dot product is exact, so equal columns tie exactly, across tiles too.
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(-2, 3, (40, 8), generator=gen).float()
    y[25] = y[3]  # copies of column 3 in a later 16-column tile of the interpreter's launch
    y[30] = y[3]
    x = torch.cat([y[3:4], torch.randint(-2, 3, (19, 8), generator=gen).float()])
    value, index = pairwise_max(x, y, backend=backend)
    want_value, want_index = _brute_force_max(x, y, False)
    assert torch.equal(index, want_index) and int(index[0]) == 3
    zeros = torch.zeros(6, 4)  # every similarity 0: row i picks 0, and row 0 picks 1 (itself excluded)
    _, index = pairwise_max(zeros, zeros, exclude_self=True, backend=backend)
    assert index.tolist() == [1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_pairwise_max_nan_ranks_above_every_number(backend, exclude_self):
    """As torch.argmax: the first NaN similarity of a row is its selection (value NaN), in a later tile
    too, so a NaN embedding makes KoLeo NaN instead of a plausible number."""
    from fastssl.ops.pairwise_max import pairwise_max

    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (20, 8), generator=gen).float()
    y = torch.randint(-2, 3, (40, 8), generator=gen).float()
    x[5, 0] = float("nan")  # row 5: every similarity NaN, column 0 (column 1 when 0 is itself) wins
    y[9, 7] = y[33, 2] = float("nan")  # columns 9 and 33 (a later tile): 9 wins for every other row
    value, index = pairwise_max(x, y, exclude_self=exclude_self, backend=backend)
    want_value, want_index = _brute_force_max(x, y, exclude_self)
    assert torch.equal(index, want_index), (index.tolist(), want_index.tolist())
    assert torch.isnan(value).all() and torch.isnan(want_value).all()
    value, index = pairwise_max(x[6:], y[10:], exclude_self=exclude_self, backend=backend)  # NaN in tile 2 only
    assert torch.equal(index, torch.full((14,), 23)) and torch.isnan(value).all()
    assert torch.isnan(fastssl.koleo_loss(x, backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("same", [True, False])
def test_pairwise_max_gradient_flows_through_the_selected_pair(backend, same):
    from fastssl.ops.pairwise_max import pairwise_max

    x = torch.randn(9, 6, dtype=torch.float32, requires_grad=True)
    y = x if same else torch.randn(14, 6, requires_grad=True)
    weights = torch.randn(9)
    value, index = pairwise_max(x, y, exclude_self=same, backend=backend)
    leaves = (x,) if same else (x, y)
    got = torch.autograd.grad((value * weights).sum(), leaves)
    # the same selection, differentiated by autograd through plain indexing
    xd = x.detach().clone().requires_grad_()
    yd = xd if same else y.detach().clone().requires_grad_()
    want = torch.autograd.grad(((xd * yd[index]).sum(1) * weights).sum(), (xd,) if same else (xd, yd))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_pairwise_max_torch_backend_gradcheck():
    from fastssl.ops.pairwise_max import pairwise_max

    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_max(a, b, backend="torch")[0], (x, y))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pairwise_max_reads_strided_operands(backend):
    from fastssl.ops.pairwise_max import pairwise_max

    x = torch.randn(12, 23).T  # (23, 12), strides (1, 23)
    y = torch.randn(40, 30)[5:35:2, 3:15]  # (15, 12), strides (60, 1): a row step and a column slice
    assert not x.is_contiguous() and not y.is_contiguous()
    got = pairwise_max(x, y, backend=backend)
    want = pairwise_max(x.contiguous(), y.contiguous(), backend=backend)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


def _pairs_of_neighbours(n, d, seed, dtype=torch.float64):
    """Rows in pairs (2k, 2k + 1) far closer to each other than to any other row: a clear neighbour."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n // 2 + 1, d, generator=gen, dtype=torch.float64)
    x = centres.repeat_interleave(2, dim=0)[:n] + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n,d", [(3, 17), (37, 6), (20, 300)])
@pytest.mark.parametrize("p,eps", [(2, 1e-8), (1, 1e-8), (3.0, 1e-3)])
def test_koleo_matches_reference(backend, n, d, p, eps):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d), dtype=torch.float64)
    assert_matches_reference(lambda z: fastssl.koleo_loss(z, p, eps, backend=backend),
                             lambda z: reference.koleo_loss(z, p, eps), (x,), backend,
                             f"koleo/{backend} N={n} D={d} p={p} eps={eps}")  # fmt: skip


def test_koleo_float64_torch_equals_spec():
    assert_float64_exact(lambda z: fastssl.koleo_loss(z, backend="torch"), lambda z: reference.koleo_loss(z),
                         (torch.randn(11, 4, dtype=torch.float64),), "koleo")  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_koleo_half_precision(backend, dtype):
    x = _pairs_of_neighbours(30, 40, seed=1, dtype=dtype)
    got = _value_and_grads(lambda z: fastssl.koleo_loss(z, backend=backend), (x,))
    want = _value_and_grads(lambda z: reference.koleo_loss(z), (x.double(),))
    assert got[0].dtype == torch.float32 and got[1][0].dtype == dtype
    assert_close(got[0], want[0], dtype, what=f"koleo {backend} {dtype} value", scale=float(want[0].abs()))
    assert_close(got[1][0], want[1][0], dtype, what=f"koleo {backend} {dtype} grad", scale=float(want[1][0].abs().max()))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_koleo_gradient_flows_through_the_selected_neighbours_only(backend):
    # Rows in mutual-neighbour pairs (2k, 2k + 1) plus one far row 8 whose neighbour j* is a pair
    # member. A pair that row 8 did not select enters the loss only through its own two terms, so
    # its gradient is (2/9)·that of the pair alone (N = 2); the selected pair also gets row 8's term.
    x = _pairs_of_neighbours(8, 5, seed=2, dtype=_backend_dtype(backend))
    x = torch.cat([x, 10 * torch.randn(1, 5, generator=torch.Generator().manual_seed(0), dtype=x.dtype)])
    _, (grad,) = _value_and_grads(lambda z: fastssl.koleo_loss(z, backend=backend), (x,))
    u = torch.nn.functional.normalize(x.double(), dim=1)
    sims = (u @ u.T).fill_diagonal_(-2)
    selected = int(sims[8].argmax())
    for i in range(0, 8, 2):
        assert int(sims[i].argmax()) == i + 1 and int(sims[i + 1].argmax()) == i
        _, (alone,) = _value_and_grads(lambda z: fastssl.koleo_loss(z, backend=backend), (x[i : i + 2],))
        pair_grad, expected = grad[i : i + 2], alone * 2 / 9
        if selected in (i, i + 1):
            assert not torch.allclose(pair_grad, expected, rtol=1e-3, atol=1e-6)
        else:
            assert_close(pair_grad, expected, torch.float32, what=f"pair {i}", scale=float(expected.abs().max()))


def test_koleo_collapsed_and_zero_rows_stay_finite():
    for x in (torch.ones(6, 4), torch.zeros(6, 4), torch.cat([torch.zeros(2, 4), torch.randn(4, 4)])):
        value, (grad,) = _value_and_grads(lambda z: fastssl.koleo_loss(z, backend="torch"), (x,))
        want = reference.koleo_loss(x)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        torch.testing.assert_close(value, want)


def test_koleo_module_and_validation():
    x = torch.randn(10, 6)
    module = fnn.KoLeoLoss(p=1, eps=1e-6, backend="torch")
    torch.testing.assert_close(module(x), fastssl.koleo_loss(x, 1, 1e-6, backend="torch"))
    assert "p=1" in repr(module) and "eps=1e-06" in repr(module)
    with pytest.raises(ValueError, match="p must be a number > 0"):
        fnn.KoLeoLoss(p=0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        fastssl.koleo_loss(x, eps=0.0)
    with pytest.raises(ValueError, match=r"x needs at least 2 rows \(samples\), got shape \(1, 6\)"):
        fastssl.koleo_loss(x[:1])
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        fastssl.koleo_loss(x.long())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_koleo_inputs_not_modified(backend):
    x = torch.randn(9, 5).requires_grad_()
    before = x.detach().clone()
    fastssl.koleo_loss(x, backend=backend).backward()
    assert torch.equal(x.detach(), before)


# ------------------------------------------------------------------------------------------------
# torch.compile and the custom op's registration (the torch backend on the CPU)
# ------------------------------------------------------------------------------------------------

COMPILED = {
    "macl": lambda a, b: fastssl.macl_loss(a, b, 0.2, backend="torch"),
    "directclr": lambda a, b: fastssl.directclr_loss(a, b, 9, backend="torch"),
    "frossl": lambda a, b: fastssl.frossl_loss([a, b], route="gram", backend="torch"),
    "tico": lambda a, b: fastssl.tico_loss(a, b, torch.eye(16) / 16, route="covariance", backend="torch"),
    "koleo": lambda a, b: fastssl.koleo_loss(a, backend="torch") + fastssl.koleo_loss(b, p=1, backend="torch"),
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_compile_fullgraph_matches_eager(name):
    torch._dynamo.reset()
    fn = COMPILED[name]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    z1, z2 = _pair(24, 16, seed=11, dtype=torch.float32)
    eager, comp = _value_and_grads(fn, (z1, z2)), _value_and_grads(compiled, (z1, z2))
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-5, atol=1e-6)
    for g_comp, g_eager in zip(comp[1], eager[1]):
        torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6)


def test_pairwise_max_opcheck():
    x, y = torch.randn(9, 5), torch.randn(13, 5)
    for args in ((x, y, False, "torch"), (x, None, True, "torch")):
        torch.library.opcheck(torch.ops.fastssl.pairwise_max_fwd, args)


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped without one): the same checks with CUDA tensors, at sizes that fill real tiles
# ------------------------------------------------------------------------------------------------

CUDA_CASES = {
    "macl": (lambda z, b: fastssl.macl_loss(z[0], z[1], 0.1, backend=b), lambda z: reference.macl_loss(z[0], z[1], 0.1)),
    "directclr": (lambda z, b: fastssl.directclr_loss(z[0], z[1], 64, backend=b),
                  lambda z: reference.directclr_loss(z[0], z[1], 64)),
    "frossl": (lambda z, b: fastssl.frossl_loss([z[0], z[1]], backend=b), lambda z: reference.frossl_loss([z[0], z[1]])),
    "tico": (lambda z, b: fastssl.tico_loss(z[0], z[1], torch.eye(z[0].shape[1], device=z[0].device) / 8, backend=b),
             lambda z: reference.tico_loss(z[0], z[1], torch.eye(z[0].shape[1], dtype=z[0].dtype) / 8)),
    "koleo": (lambda z, b: fastssl.koleo_loss(z[0], backend=b), lambda z: reference.koleo_loss(z[0])),
}


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(300, 200), (1000, 96)])
def test_cuda_matches_float64_spec(name, dtype, n, d):
    fn, ref_fn = CUDA_CASES[name]
    # KoLeo's rows come in clear neighbour pairs, so that rounding to bf16 cannot change a selection.
    inputs = [_pairs_of_neighbours(n, d, seed=1, dtype=dtype)] if name == "koleo" else list(_pair(n, d, 2, dtype))
    want = _value_and_grads(lambda *z: ref_fn(z), [t.double() for t in inputs])
    for backend in [b for b in fastssl.available_backends() if b in ("triton", "cuda")]:
        got = _value_and_grads(lambda *z: fn(z, backend), [t.cuda() for t in inputs])
        what = f"{name} {backend} {dtype} N={n} D={d}"
        assert_close(got[0], want[0], dtype, what=f"{what} value", scale=max(1.0, float(want[0].abs())))
        for g, w in zip(got[1], want[1]):
            assert g.dtype == dtype and g.is_cuda
            assert_close(g, w, dtype, what=f"{what} grad", scale=float(w.abs().max()))
