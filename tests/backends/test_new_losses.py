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
from tests.utils import CPU_BACKENDS, TOLERANCES, assert_close

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
