"""The prototype cross-entropy family on a GPU: the compiled Triton kernels (autotuning included) on the
shapes the interpreter is too slow for, `torch.compile(fullgraph=True)` and `opcheck` of the
Triton-backed custom ops, and DINO at its real head size (K = 65,536, D = 256) against float64.

Every test is marked `cuda` and skipped (with the reason) on machines without a GPU; the same checks
run on the CPU in tests/backends/test_prototype_ce.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import reference
from fastssl.kernels import PrototypeCEFlags
from tests.backends.test_prototype_ce import OUTPUTS, make_case, run_both
from tests.utils import assert_close

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,n_t,k,d", [(1000, 200, 4099, 256), (513, 77, 1000, 64), (300, 50, 2000, 300),
                                       (64, 9, 700, 1024)])  # fmt: skip
def test_op_matches_oracle(dtype, n, n_t, k, d):
    case = make_case(n, n_t, k, d, dtype, device="cuda")
    got, want = run_both("triton", case)
    for name, a, b in zip(OUTPUTS, got, want):
        assert_close(a, b, dtype, what=f"triton {name} N={n} K={k} D={d}", scale=10)


@pytest.mark.parametrize("temp", [0.01, 0.04])
def test_op_low_temperature(temp):
    case = make_case(500, 100, 3000, 128, torch.bfloat16, temp_s=temp, temp_t=temp, device="cuda")
    got, want = run_both("triton", case)
    assert all(bool(torch.isfinite(x).all()) for x in got)
    for name, a, b in zip(OUTPUTS, got, want):
        assert_close(a, b, torch.bfloat16, what=f"{name} τ={temp}", scale=1 / temp)


def test_opcheck_triton_ops():
    case = make_case(70, 20, 300, 64, torch.bfloat16, device="cuda")
    args = (case["s"], case["w"], case["t"], case["w_t"], case["center"], case["scale_s"], case["scale_t"])
    for flags in (PrototypeCEFlags(), PrototypeCEFlags(needs_ds=False)):
        torch.library.opcheck(torch.ops.fastssl.prototype_ce_fwd.default, (*args, flags.to_list(), "triton"))
    lse_s, _, lse_t, _ = torch.ops.fastssl.prototype_ce_fwd(*args, PrototypeCEFlags().to_list(), "triton")
    grads = (torch.randn(70, device="cuda"), torch.randn(20, 64, device="cuda"))
    torch.library.opcheck(torch.ops.fastssl.prototype_ce_bwd.default, (*args, lse_s, lse_t, *grads, "triton"))


def test_dino_compile_fullgraph():
    torch._dynamo.reset()
    s = F.normalize(torch.randn(6, 64, 128, device="cuda"), dim=-1).bfloat16().requires_grad_()
    t = F.normalize(torch.randn(2, 64, 128, device="cuda"), dim=-1).bfloat16()
    w = F.normalize(torch.randn(4096, 128, device="cuda"), dim=-1).bfloat16().requires_grad_()
    fn = lambda s, w: fastssl.dino_loss(s, t, w, backend="triton")  # noqa: E731
    eager = fn(s, w)
    g_eager = torch.autograd.grad(eager, (s, w))
    compiled = torch.compile(fn, fullgraph=True)(s, w)
    g_compiled = torch.autograd.grad(compiled, (s, w))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dino_at_head_size(dtype):
    """1,024 images x 12 crops against K = 65,536, D = 256: peak memory, and the value against float64
    (chunked torch) of the same (rounded) inputs within the dtype's tolerance (tests/utils.py)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(1024, 256, device="cuda", generator=gen)
    student = F.normalize(base + 0.8 * torch.randn(12, 1024, 256, device="cuda", generator=gen), dim=-1)
    teacher = F.normalize(student[:2] + 0.1 * torch.randn(2, 1024, 256, device="cuda", generator=gen), dim=-1)
    w = F.normalize(torch.randn(65536, 256, device="cuda", generator=gen), dim=1)
    w_t = F.normalize(w + 0.05 * torch.randn(65536, 256, device="cuda", generator=gen), dim=1)
    center = 0.1 * torch.randn(65536, device="cuda", generator=gen)
    s_in, w_in = student.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    torch.cuda.reset_peak_memory_stats()
    loss = fastssl.dino_loss(s_in, teacher.to(dtype), w_in, center, teacher_prototypes=w_t.to(dtype), backend="triton")
    loss.backward()
    peak = torch.cuda.max_memory_allocated()
    assert peak < 2 * 2**30, f"peak CUDA memory {peak / 2**30:.2f} GiB; the student logits alone would be 3 GiB"
    with torch.no_grad():
        loss64 = fastssl.dino_loss(s_in.detach().double(), teacher.to(dtype).double(), w_in.detach().double(),
                                   center.double(), teacher_prototypes=w_t.to(dtype).double(), backend="torch")
    assert_close(loss, loss64, dtype, what=f"DINO at head size ({dtype})")
    assert bool(torch.isfinite(s_in.grad).all()) and bool(torch.isfinite(w_in.grad).all())


def test_ibot_patch_loss_on_gpu():
    mask = torch.rand(32, 14, 14, device="cuda") < 0.4
    m = int(mask.sum())
    s, t = (F.normalize(torch.randn(m, 256, device="cuda"), dim=1).bfloat16() for _ in range(2))
    w = F.normalize(torch.randn(8192, 256, device="cuda"), dim=1).bfloat16()
    got = fastssl.ibot_patch_loss(s, t, w, mask, backend="triton")
    want = reference.ibot_patch_loss(s.double(), t.double(), w.double(), mask)
    assert_close(got, want, torch.bfloat16, what="iBOT patch loss")
