"""The nn.Module wrappers: they hold state and hyper-parameters and agree with the functional API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import nn as fnn
from fastssl import reference
from tests.utils import CPU_BACKENDS, LIGHTLY_AVAILABLE


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_modules_equal_functional(backend):
    z1, z2 = torch.randn(12, 7), torch.randn(12, 7)
    cases = [
        (fnn.NTXentLoss(0.3, backend=backend), fastssl.nt_xent_loss(z1, z2, 0.3, backend="torch")),
        (fnn.DCLLoss(0.2, backend=backend), fastssl.dcl_loss(z1, z2, 0.2, backend="torch")),
        (fnn.DCLWLoss(0.2, sigma=0.4, backend=backend), fastssl.dcl_loss(z1, z2, 0.2, sigma=0.4, backend="torch")),
        (fnn.CLIPLoss(0.1, backend=backend), fastssl.clip_loss(z1, z2, 0.1, backend="torch")),
    ]
    for module, want in cases:
        torch.testing.assert_close(module(z1, z2), want, rtol=2e-5, atol=1e-6, msg=lambda m: f"{module}: {m}")


def test_defaults_match_lightly():
    assert fnn.NTXentLoss().temperature == 0.5 and not fnn.NTXentLoss().memory_bank.enabled
    assert fnn.DCLLoss().temperature == 0.1 and fnn.DCLLoss().weight_fn is None
    assert fnn.DCLWLoss().temperature == 0.1 and fnn.DCLWLoss().sigma == 0.5
    assert fnn.CLIPLoss().temperature == 0.07


def test_memory_bank_queue_semantics():
    """Seeded init as lightly's; the bank seen by a step is the one before it; FIFO with lightly's wrap."""
    torch.manual_seed(3)
    loss_fn = fnn.NTXentLoss(memory_bank_size=(10, 4))
    torch.manual_seed(3)
    assert torch.equal(loss_fn.memory_bank.bank, F.normalize(torch.randn(10, 4), dim=-1))

    out0 = torch.randn(4, 4, requires_grad=True)
    out1 = torch.randn(4, 4)
    bank_before = loss_fn.memory_bank.bank.clone()
    loss = loss_fn(out0, out1)
    torch.testing.assert_close(loss, reference.moco_loss(out0, out1, bank_before, 0.5))
    assert torch.equal(loss_fn.memory_bank.bank[:4], F.normalize(out1, dim=1))
    assert int(loss_fn.memory_bank.bank_ptr) == 4

    loss_fn(out0, torch.randn(4, 4))  # ptr 4 -> 8
    last = torch.randn(4, 4)
    loss_fn(out0, last)  # 8 + 4 >= 10: fills rows 8, 9, drops the rest, restarts at 0
    assert torch.equal(loss_fn.memory_bank.bank[8:], F.normalize(last, dim=1)[:2])
    assert int(loss_fn.memory_bank.bank_ptr) == 0

    frozen = loss_fn.memory_bank.bank.clone()
    with torch.no_grad():
        loss_fn(out0.detach(), torch.randn(4, 4))  # evaluation: no update
    assert torch.equal(loss_fn.memory_bank.bank, frozen)


def test_memory_bank_gradients_do_not_reach_bank():
    loss_fn = fnn.NTXentLoss(memory_bank_size=(6, 3))
    out0, out1 = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    loss_fn(out0, out1).backward()
    assert out0.grad is not None and out1.grad is not None
    assert not loss_fn.memory_bank.bank.requires_grad


def test_dcl_custom_weight_fn():
    """A custom weight_fn is called on normalised views (both orders) and scales the positive term."""
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    calls = []

    def weight_fn(a, b):
        calls.append((a, b))
        return torch.full((a.shape[0],), 2.0)

    value = fnn.DCLLoss(0.3, weight_fn=weight_fn, backend="torch")(z1, z2)
    n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    assert len(calls) == 2 and torch.allclose(calls[0][0], n1) and torch.allclose(calls[1][0], n2)
    positive = (n1 * n2).sum(1) / 0.3
    unweighted = fastssl.dcl_loss(z1, z2, 0.3, backend="torch")
    torch.testing.assert_close(value, unweighted - positive.mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no custom weight_fn"):
        fnn.DCLLoss(weight_fn=weight_fn, backend="reference")(z1, z2)


def test_clip_learnable_temperature():
    loss_fn = fnn.CLIPLoss(temperature=0.2, learnable_temperature=True, backend="torch")
    assert math.isclose(float(loss_fn.logit_scale.detach()), math.log(5.0), rel_tol=1e-6)
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    loss = loss_fn(z1, z2)
    torch.testing.assert_close(loss, fastssl.clip_loss(z1, z2, 0.2, backend="torch"), rtol=1e-5, atol=1e-6)
    loss.backward()
    scale = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    reference.clip_loss(z1.double(), z2.double(), torch.exp(-scale)).backward()
    torch.testing.assert_close(loss_fn.logit_scale.grad.double(), scale.grad, rtol=1e-4, atol=1e-6)


def test_extra_repr():
    assert "temperature=0.5" in repr(fnn.NTXentLoss()) and "backend='auto'" in repr(fnn.NTXentLoss())
    assert "memory_bank_size=(8, 2)" in repr(fnn.NTXentLoss(memory_bank_size=(8, 2)))
    assert "sigma=0.5" in repr(fnn.DCLWLoss())
    assert "temperature=learnable" in repr(fnn.CLIPLoss(learnable_temperature=True))


@pytest.mark.skipif(not LIGHTLY_AVAILABLE, reason="lightly is not installed (it needs torchvision, which does "
                    "not import beside the CPU torch 2.13 wheel); see README, 'Checking against lightly'")
@pytest.mark.parametrize("name", ["NTXentLoss", "DCLLoss", "DCLWLoss"])
def test_modules_match_lightly(name):
    import lightly.loss

    torch.manual_seed(7)
    ours = getattr(fnn, name)(backend="torch")
    theirs = getattr(lightly.loss, name)()
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    values, grads = [], []
    for module in (ours, theirs):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        value = module(a, b)
        value.backward()
        values.append(value)
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    for g_ours, g_theirs in zip(grads[0], grads[1]):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not LIGHTLY_AVAILABLE, reason="lightly is not installed (see test_modules_match_lightly)")
def test_memory_bank_training_matches_lightly():
    """Same seed, same steps: the same losses and the same bank, step after step."""
    import lightly.loss

    torch.manual_seed(11)
    ours = fnn.NTXentLoss(memory_bank_size=(20, 8), backend="torch")
    torch.manual_seed(11)
    theirs = lightly.loss.NTXentLoss(memory_bank_size=(20, 8))
    for _ in range(4):
        out0, out1 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8)
        torch.testing.assert_close(ours(out0, out1), theirs(out0, out1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)
