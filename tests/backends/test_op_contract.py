"""Contracts of the ops below the losses that no value test would notice if broken: which gradients
the pairwise-LSE backward is asked for, and the two column-statistics branches agreeing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl.kernels.torch import pairwise_lse as torch_kernels
from fastssl.ops.reductions import column_mean_var


@pytest.fixture
def recorded_flags(monkeypatch):
    """The PairwiseLSEFlags each torch-backend backward call receives."""
    calls = []
    real = torch_kernels.pairwise_lse_backward

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(torch_kernels, "pairwise_lse_backward", spy)
    return calls


def test_moco_key_without_gradient_skips_dy(recorded_flags):
    query = torch.randn(6, 4, requires_grad=True)
    key, bank = torch.randn(6, 4), F.normalize(torch.randn(9, 4), dim=1)
    fastssl.moco_loss(query, key, bank, backend="torch").backward()
    assert [(f.needs_dx, f.needs_dy) for f in recorded_flags] == [(True, False)]
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_frozen_tower_skips_its_gradient(recorded_flags):
    """CLIP with a frozen text tower: neither call computes the frozen side's gradient."""
    image = torch.randn(6, 4, requires_grad=True)
    text = torch.randn(6, 4)
    fastssl.clip_loss(image, text, backend="torch").backward()
    # rows = image against text columns; then text rows against image columns
    assert sorted((f.needs_dx, f.needs_dy) for f in recorded_flags) == [(False, True), (True, False)]


def test_learnable_temperature_alone_still_needs_dx(recorded_flags):
    """d scale is read off dx (Σ x·dx / scale), so a temperature-only gradient still computes dx."""
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    tau = torch.tensor(0.3, requires_grad=True)
    fastssl.clip_loss(z1, z2, tau, backend="torch").backward()
    assert all(f.needs_dx and not f.needs_dy for f in recorded_flags)
    z1r, z2r = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    tau_ref = torch.tensor(0.3, requires_grad=True)
    fastssl.clip_loss(z1r, z2r, tau_ref, backend="torch").backward()
    torch.testing.assert_close(tau.grad, tau_ref.grad)


def test_skipped_gradient_changes_nothing_else():
    """The gradient that is computed is the same whether or not its partner is."""
    query, key = torch.randn(7, 5), torch.randn(7, 5)
    bank = F.normalize(torch.randn(11, 5), dim=1)
    q1 = query.clone().requires_grad_()
    fastssl.moco_loss(q1, key, bank, backend="torch").backward()
    q2, k2 = query.clone().requires_grad_(), key.clone().requires_grad_()
    fastssl.moco_loss(q2, k2, bank, backend="torch").backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("unbiased", [True, False])
def test_column_statistics_one_and_two_pass_agree(dtype, unbiased):
    """The GPU's one-pass (Welford) branch, run here on the CPU, against the two-pass branch."""
    z = (torch.randn(37, 11, dtype=torch.float64) * 3 + 5).to(dtype)
    results = []
    for one_pass in (True, False):
        zr = z.clone().requires_grad_()
        mean, var = column_mean_var(zr, unbiased=unbiased, one_pass=one_pass)
        (mean.sum() + (var * torch.arange(11, dtype=var.dtype)).sum()).backward()
        results.append((mean, var, zr.grad))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b.double(), **tol)
