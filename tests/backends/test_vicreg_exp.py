"""VICReg-exp and VICReg-ctr (Garrido et al. 2023) on the pairwise-LSE op: every CPU backend against the float64
spec (fastssl.reference, itself checked against independent formulas in test_reference.py), N < D and
N > D, several temperatures, values and gradients; the duality ctr(z) = exp(zᵀ); modules; bad input.
"""

from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import nn as fnn
from fastssl import reference
from tests.utils import CPU_BACKENDS, assert_close

LOSSES = {"exp": (fastssl.vicreg_exp_loss, reference.vicreg_exp_loss),
          "ctr": (fastssl.vicreg_ctr_loss, reference.vicreg_ctr_loss)}  # fmt: skip


def _value_and_grads(fn, z1, z2):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    value = fn(a, b)
    (value * -0.8).backward()
    return value.detach(), a.grad, b.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("n,d", [(2, 2), (5, 3), (3, 5), (24, 9), (9, 24)])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 2.0])
def test_matches_float64_spec(backend, name, n, d, temperature):
    fused, spec = LOSSES[name]
    gen = torch.Generator().manual_seed(n * 100 + d)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    got = _value_and_grads(lambda a, b: fused(a, b, temperature, backend=backend), z1.float(), z2.float())
    want = _value_and_grads(lambda a, b: spec(a, b, temperature), z1, z2)
    what = f"vicreg_{name}/{backend} N={n} D={d} τ={temperature}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), what
        assert_close(g, w, torch.float32, what=f"output {i} {what}", scale=max(1.0, float(w.abs().max())) / temperature)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    z1, z2 = torch.randn(12, 10), torch.randn(12, 10)
    got = _value_and_grads(lambda a, b: fastssl.vicreg_exp_loss(a, b, 0.2, backend=backend), z1.to(dtype), z2.to(dtype))
    want = _value_and_grads(lambda a, b: reference.vicreg_exp_loss(a, b, 0.2), z1.to(dtype).double(),
                            z2.to(dtype).double())  # fmt: skip
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype, what=f"vicreg_exp {backend} {dtype} output {i}", scale=10 * float(w.abs().max()))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_fp64_torch_backend(name):
    fused, _ = LOSSES[name]
    z1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: fused(a, b, 0.3, backend="torch"), (z1, z2))


def test_duality_ctr_is_exp_of_the_transpose():
    z1, z2 = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    torch.testing.assert_close(fastssl.vicreg_ctr_loss(z1, z2, backend="torch"),
                               fastssl.vicreg_exp_loss(z1.T, z2.T, backend="torch"))  # fmt: skip


def test_collapsed_inputs_stay_finite():
    z = torch.randn(1, 8).expand(16, 8).clone()
    for fn in (fastssl.vicreg_exp_loss, fastssl.vicreg_ctr_loss):
        value, g1, g2 = _value_and_grads(lambda a, b: fn(a, b, 0.01, backend="torch"), z, z)
        assert torch.isfinite(value) and torch.isfinite(g1).all() and torch.isfinite(g2).all()


def test_modules_and_bad_input():
    z1, z2 = torch.randn(10, 6), torch.randn(10, 6)
    torch.testing.assert_close(fnn.VICRegExpLoss(backend="torch")(z1, z2),
                               reference.vicreg_exp_loss(z1, z2), rtol=2e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(fnn.VICRegCtrLoss(0.5, 1.0, backend="torch")(z1, z2),
                               reference.vicreg_ctr_loss(z1, z2, 0.5, 1.0), rtol=2e-5, atol=1e-5)  # fmt: skip
    assert "temperature=0.1" in repr(fnn.VICRegExpLoss()) and "temperature=0.1" in repr(fnn.VICRegCtrLoss())
    with pytest.raises(ValueError, match=r"needs D ≥ 2 .* shape \(4, 1\)"):
        fastssl.vicreg_exp_loss(torch.randn(4, 1), torch.randn(4, 1))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fastssl.vicreg_ctr_loss(z1, z2, 0.0)
    with pytest.raises(ValueError, match="nu_param must be a finite number >= 0"):
        fnn.VICRegExpLoss(nu_param=-1.0)
