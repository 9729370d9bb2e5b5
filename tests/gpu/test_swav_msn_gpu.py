"""SwaV and MSN on a GPU: the compiled Triton LSE passes (autotuning included) on shapes the interpreter
is too slow for, `torch.compile(fullgraph=True)`, and the memory at K = 65,536.

Every test is marked `cuda` and skipped (with the reason) on machines without a GPU; the same checks
run on the CPU in tests/backends/test_swav_msn.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl.ops.prototype_codes import sinkhorn_scaling
from tests.utils import assert_close

pytestmark = pytest.mark.cuda


def _rows(*shape, dtype, gen):
    return F.normalize(torch.randn(*shape, device="cuda", generator=gen), dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(4096, 3000, 128), (1000, 4099, 256), (300, 2000, 300)])
def test_sinkhorn_codes_match_float64(dtype, n, k, d):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, w = _rows(n, d, dtype=dtype, gen=gen), _rows(k, d, dtype=dtype, gen=gen)
    center, _ = sinkhorn_scaling(x, w, torch.tensor(20.0, device="cuda"), 3, backend="triton")
    want, _ = sinkhorn_scaling(x.double(), w.double(), torch.tensor(20.0, device="cuda", dtype=torch.float64), 3,
                               backend="torch")  # fmt: skip
    # Centres are defined up to a constant: compare the codes' logits, centred per prototype set.
    got_c, want_c = center - center.mean(), want - want.mean()
    assert_close(got_c, want_c, torch.float32, what=f"centre {dtype} N={n} K={k} D={d}", scale=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swav_loss_matches_float64(dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    high, low = _rows(2, 256, 128, dtype=dtype, gen=gen), _rows(6, 256, 128, dtype=dtype, gen=gen)
    queue, w = _rows(2, 512, 128, dtype=dtype, gen=gen), _rows(3000, 128, dtype=dtype, gen=gen)

    def run(backend, cast):
        h, v, p = (cast(t).requires_grad_() for t in (high, low, w))
        loss = fastssl.swav_loss(h, v, p, cast(queue), backend=backend)
        return (loss, *torch.autograd.grad(loss, (h, v, p)))

    got, want = run("triton", lambda t: t.clone()), run("torch", lambda t: t.double())
    for name, a, b in zip(("loss", "d high", "d low", "d prototypes"), got, want):
        assert_close(a, b, dtype, what=f"swav {name}", scale=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_msn_loss_matches_float64(dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    anchors = torch.randn(11 * 64, 256, device="cuda", generator=gen).to(dtype)
    targets = torch.randn(64, 256, device="cuda", generator=gen).to(dtype)
    w = torch.randn(1024, 256, device="cuda", generator=gen).to(dtype)

    def run(backend, cast):
        a, p = cast(anchors).requires_grad_(), cast(w).requires_grad_()
        loss = fastssl.msn_loss(a, cast(targets), p, backend=backend)
        return (loss, *torch.autograd.grad(loss, (a, p)))

    got, want = run("triton", lambda t: t.clone()), run("torch", lambda t: t.double())
    for name, a, b in zip(("loss", "d anchors", "d prototypes"), got, want):
        assert_close(a, b, dtype, what=f"msn {name}", scale=10)


def test_swav_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(3)
    high, low = _rows(2, 64, 128, dtype=torch.bfloat16, gen=gen), _rows(4, 64, 128, dtype=torch.bfloat16, gen=gen)
    w = _rows(3000, 128, dtype=torch.bfloat16, gen=gen)
    high.requires_grad_(), w.requires_grad_()
    fn = lambda h, p: fastssl.swav_loss(h, low, p, backend="triton")  # noqa: E731
    eager = fn(high, w)
    g_eager = torch.autograd.grad(eager, (high, w))
    compiled = torch.compile(fn, fullgraph=True)(high, w)
    g_compiled = torch.autograd.grad(compiled, (high, w))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


def test_swav_at_large_k_memory():
    """512 images x 8 crops and a queue of 1,536 per high-resolution crop against K = 65,536, D = 128:
    the crops' scores alone would be 1 GiB in fp32."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    high = _rows(2, 512, 128, dtype=torch.bfloat16, gen=gen).requires_grad_()
    low = _rows(6, 512, 128, dtype=torch.bfloat16, gen=gen).requires_grad_()
    queue = _rows(2, 1536, 128, dtype=torch.bfloat16, gen=gen)
    w = _rows(65536, 128, dtype=torch.bfloat16, gen=gen).requires_grad_()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fastssl.swav_loss(high, low, w, queue, backend="triton")
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 2**28, f"peak CUDA memory {peak / 2**20:.0f} MiB above the inputs; the scores alone are 1 GiB"
    assert bool(torch.isfinite(loss)) and all(bool(torch.isfinite(t.grad).all()) for t in (high, low, w))
