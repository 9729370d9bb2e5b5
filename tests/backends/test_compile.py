"""torch.compile(fullgraph=True) traces the public losses without graph breaks and matches eager.

On the CPU this goes through the `torch` backend; the Triton-backed ops are compiled in the cuda tests.
"""

from __future__ import annotations

import pytest
import torch

import fastssl

LOSSES = {
    "nt_xent": lambda a, b: fastssl.nt_xent_loss(a, b, 0.2, backend="torch"),
    "clip": lambda a, b: fastssl.clip_loss(a, b, 0.1, backend="torch"),
    "dclw": lambda a, b: fastssl.dcl_loss(a, b, 0.1, sigma=0.5, backend="torch"),
    "barlow_twins": lambda a, b: fastssl.barlow_twins_loss(a, b, route="gram", backend="torch"),
    "vicreg": lambda a, b: fastssl.vicreg_loss(a, b, route="covariance", backend="torch"),
    "spectral": lambda a, b: fastssl.spectral_contrastive_loss(a, b, backend="torch"),
    "vicreg_exp": lambda a, b: fastssl.vicreg_exp_loss(a, b, 0.2, backend="torch"),
    "arcl": lambda a, b: fastssl.arcl_loss([a, b, a - 0.5 * b], 0.3, backend="torch"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_compile_fullgraph_matches_eager(name):
    torch._dynamo.reset()
    fn = LOSSES[name]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if name != "nt_xent" else "inductor")
    z1, z2 = torch.randn(24, 16), torch.randn(24, 16)
    results = []
    for f in (fn, compiled):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = f(a, b)
        loss.backward()
        results.append((loss, a.grad, b.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def test_compile_with_learnable_temperature():
    torch._dynamo.reset()
    tau = torch.tensor(0.2, requires_grad=True)
    compiled = torch.compile(lambda a, b, t: fastssl.clip_loss(a, b, t, backend="torch"), fullgraph=True,
                             backend="aot_eager")
    z1, z2 = torch.randn(10, 6), torch.randn(10, 6)
    compiled(z1, z2, tau).backward()
    tau_eager = torch.tensor(0.2, requires_grad=True)
    fastssl.clip_loss(z1, z2, tau_eager, backend="torch").backward()
    torch.testing.assert_close(tau.grad, tau_eager.grad, rtol=1e-5, atol=1e-7)
