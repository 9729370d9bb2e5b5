"""The GPU layer of docs/design.md's checks: everything the CPU layers cover, with CUDA tensors and real kernels.

Every test here is marked `cuda` and skipped (with the reason) on machines without a GPU. On a GPU
it runs the compiled Triton kernels (autotuning included) on the shapes the interpreter is too slow
for: N = 1000, D up to 4096 (the D-loop tiling), half precision, a 2N = 262,144-row NT-Xent whose
logits (128 GiB in bf16) could never be stored, `torch.compile(fullgraph=True)` and `opcheck` of the
Triton-backed custom ops; and the Frobenius family on both routes, up to a Barlow Twins D = 65,536
and a spectral N = 262,144 whose matrices (16 GiB, 256 GiB in fp32) are never built.
"""

from __future__ import annotations

import pytest
import torch

import fastssl
import fastssl.nn as fnn
from fastssl.ops.pairwise_lse import PairwiseLSE
from tests.backends.test_frobenius import check_loss
from tests.backends.test_losses import LOSSES, check_against_reference
from tests.backends.test_pairwise_lse import MODES, make_case, run_both
from tests.utils import TOLERANCES, assert_close

pytestmark = pytest.mark.cuda

HALF = [torch.bfloat16, torch.float16]
OUTPUTS = ("lse", "pos", "dx", "dy", "dscale")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("m,d", [(2, 1), (130, 257), (1000, 64), (1000, 128), (513, 300), (257, 4096)])
def test_pairwise_lse_fp32(mode, m, d):
    if mode == "dcl" and m == 2:
        pytest.skip("DCL over one pair has no negatives (the public API requires N >= 2 pairs)")
    x, y, bank, scale, options = make_case(mode, m, d, torch.float32, device="cuda")
    got, want = run_both("triton", x, y, bank, scale, options)
    for name, a, b in zip(OUTPUTS, got, want):
        if b is not None:
            assert_close(a, b, torch.float32, what=f"triton/{mode} {name} at M={m}, D={d}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("m,d", [(1000, 128), (300, 256), (300, 1024)])
def test_pairwise_lse_half(dtype, mode, m, d):
    x, y, bank, scale, options = make_case(mode, m, d, dtype, device="cuda")
    got, want = run_both("triton", x, y, bank, scale, options)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    for name, a, b in zip(OUTPUTS, got, want):
        if b is not None:
            assert_close(a, b, dtype, what=f"triton/{mode} {name} at M={m}, D={d}", scale=10)


@pytest.mark.parametrize("temperature", [0.01, 0.1, 2.0])
def test_pairwise_lse_strided(temperature):
    x, y, bank, scale, options = make_case("clip", 300, 96, torch.float32, temperature=temperature, strided=True,
                                           device="cuda")  # fmt: skip
    assert not x.is_contiguous()
    got, want = run_both("triton", x, y, bank, scale, options)
    for name, a, b in zip(OUTPUTS, got, want):
        assert_close(a, b, torch.float32, what=f"{name} at τ={temperature}", scale=1 / temperature)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("n,d", [(2, 1), (33, 257), (1000, 16), (1000, 128), (200, 4096)])
@pytest.mark.parametrize("temperature", [0.01, 0.5, 2.0])
def test_losses_fp32(loss, n, d, temperature):
    check_against_reference(loss, "triton", n, d, temperature, device="cuda")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("n,d", [(17, 24), (1000, 128), (256, 2048)])
def test_losses_half(dtype, loss, n, d):
    check_against_reference(loss, "triton", n, d, 0.2, dtype=dtype, device="cuda")


@pytest.mark.parametrize("loss", [name for name in LOSSES if name != "uniformity"])
@pytest.mark.parametrize("kind", ["collapsed", "zero", "huge"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_extreme_inputs_stay_finite_at_tau_001(loss, kind, dtype):
    check_against_reference(loss, "triton", 64, 32, 0.01, dtype=dtype, kind=kind, device="cuda")


def test_auto_picks_triton_on_cuda():
    z = torch.randn(8, 4, device="cuda")
    assert fastssl.backends.resolve_backend("auto", z) == "triton"
    assert "triton" in fastssl.available_backends()


def test_nt_xent_262144_rows_bf16():
    """2N = 262,144 rows, D = 128, bf16: logits of 128 GiB, never stored; checked against fp64."""
    n, d = 131072, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(n, d, device="cuda", generator=gen)
    z2 = z1 + 0.5 * torch.randn(n, d, device="cuda", generator=gen)
    z1, z2 = z1.bfloat16().requires_grad_(), z2.bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fastssl.nt_xent_loss(z1, z2)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 2**30, f"peak {peak / 2**20:.0f} MiB above the inputs; the inputs are {2 * n * d * 2 / 2**20:.0f} MiB"
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all() and z1.grad.abs().sum() > 0
    with torch.no_grad():  # the same bf16 inputs, in float64, through the chunked torch backend
        want = fastssl.nt_xent_loss(z1.double(), z2.double(), backend="torch")
    rtol, _ = TOLERANCES[torch.bfloat16]
    assert abs(loss.item() - want.item()) <= rtol * abs(want.item()) / 10, (loss.item(), want.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_triton(dtype):
    torch._dynamo.reset()
    fn = lambda a, b: fastssl.nt_xent_loss(a, b, 0.2, backend="triton")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    z1, z2 = torch.randn(300, 128, device="cuda", dtype=dtype), torch.randn(300, 128, device="cuda", dtype=dtype)
    results = []
    for f in (fn, compiled):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = f(a, b)
        loss.backward()
        results.append((loss, a.grad, b.grad))
    for eager, comp in zip(*results):
        assert_close(comp, eager, dtype, what="compiled vs eager")


def test_compile_fullgraph_learnable_temperature():
    torch._dynamo.reset()
    tau = torch.tensor(0.2, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda a, b, t: fastssl.clip_loss(a, b, t, backend="triton"), fullgraph=True)
    z1, z2 = torch.randn(100, 64, device="cuda"), torch.randn(100, 64, device="cuda")
    compiled(z1, z2, tau).backward()
    tau_eager = torch.tensor(0.2, device="cuda", requires_grad=True)
    fastssl.clip_loss(z1, z2, tau_eager, backend="triton").backward()
    assert_close(tau.grad, tau_eager.grad, torch.float32, what="dL/dτ compiled vs eager")


@pytest.mark.parametrize("mode", ["simclr", "moco", "dcl"])
def test_opcheck_triton_ops(mode):
    x, y, bank, scale, options = make_case(mode, 40, 32, torch.float32, device="cuda")
    args = (x, None if x is y else y, bank, scale, options.to_list(), "triton")
    torch.library.opcheck(torch.ops.fastssl.pairwise_lse_fwd.default, args)
    lse, _ = torch.ops.fastssl.pairwise_lse_fwd(*args)
    g = torch.randn(40, device="cuda")
    torch.library.opcheck(torch.ops.fastssl.pairwise_lse_bwd.default, args[:4] + (lse, g, g) + args[4:])


def test_autograd_function_on_cuda_matches_torch_backend():
    x, _, _, scale, options = make_case("simclr", 64, 48, torch.float32, device="cuda")
    grads = []
    for backend in ("triton", "torch"):
        xr = x.detach().clone().requires_grad_()
        lse, pos = PairwiseLSE.apply(xr, None, None, scale, options, backend)
        (lse - pos).sum().backward()
        grads.append(xr.grad)
    assert_close(grads[0], grads[1], torch.float32, what="PairwiseLSE dx triton vs torch")


@pytest.mark.parametrize("name", ["NTXentLoss", "DCLLoss", "DCLWLoss", "CLIPLoss"])
def test_modules_on_cuda_match_cpu(name):
    torch.manual_seed(3)
    z1, z2 = torch.randn(96, 64), torch.randn(96, 64)
    gpu = getattr(fnn, name)()(z1.cuda(), z2.cuda())
    cpu = getattr(fnn, name)(backend="torch")(z1, z2)
    assert_close(gpu, cpu, torch.float32, what=f"{name} cuda vs cpu")


def test_memory_bank_on_cuda():
    torch.manual_seed(5)
    module = fnn.NTXentLoss(memory_bank_size=(64, 32)).cuda()
    for _ in range(3):
        loss = module(torch.randn(16, 32, device="cuda", requires_grad=True), torch.randn(16, 32, device="cuda"))
        assert torch.isfinite(loss)
    assert module.memory_bank.bank.is_cuda


# --------------------------------------------------------------------------------------------------
# the off-diagonal Frobenius family


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral", "vicreg_weights"])
@pytest.mark.parametrize("route", ["auto", "covariance", "gram"])
@pytest.mark.parametrize("n,d", [(2, 1), (33, 70), (70, 33), (256, 1000), (1000, 256)])
def test_frobenius_losses_fp32(name, route, n, d):
    check_loss(name, "triton", route, n, d, device="cuda")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral"])
@pytest.mark.parametrize("route", ["covariance", "gram"])
def test_frobenius_losses_half(name, route, dtype):
    check_loss(name, "triton", route, 300, 500, dtype=dtype, device="cuda")


@pytest.mark.parametrize("route", ["inner", "outer"])
@pytest.mark.parametrize("same", [False, True])
def test_frobenius_op_opcheck_triton(route, same):
    a, b = torch.randn(40, 24, device="cuda"), torch.randn(40, 24, device="cuda")
    shift, scale = torch.randn(24, device="cuda"), torch.rand(24, device="cuda")
    transform = (shift, scale, None, None) if same else (shift, None, None, scale)
    args = (a, None if same else b, *transform, route, "triton")
    torch.library.opcheck(torch.ops.fastssl.sq_frobenius_fwd.default, args)
    grad = torch.tensor(0.7, device="cuda")
    torch.library.opcheck(torch.ops.fastssl.sq_frobenius_bwd.default, (*args[:6], grad, route, "triton"))


def test_frobenius_compile_fullgraph_triton():
    torch._dynamo.reset()
    fn = lambda a, b: fastssl.barlow_twins_loss(a, b, route="gram", backend="triton")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    z1, z2 = torch.randn(128, 512, device="cuda"), torch.randn(128, 512, device="cuda")
    results = []
    for f in (fn, compiled):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = f(a, b)
        loss.backward()
        results.append((loss, a.grad, b.grad))
    for eager, comp in zip(*results):
        assert_close(comp, eager, torch.float32, what="compiled vs eager", scale=float(eager.abs().max()))


@pytest.mark.parametrize("loss,n,d", [("barlow_twins", 256, 65536), ("spectral", 262144, 64)])
def test_frobenius_large_bf16(loss, n, d):
    """A D x D (resp. N x N) matrix of 16 GiB (resp. 256 GiB) in fp32, never built; checked against fp64."""
    fn = {"barlow_twins": fastssl.barlow_twins_loss, "spectral": fastssl.spectral_contrastive_loss}[loss]
    gen = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(n, d, device="cuda", generator=gen) / d**0.5
    z2 = z1 + 0.5 * torch.randn(n, d, device="cuda", generator=gen) / d**0.5
    z1, z2 = z1.bfloat16().requires_grad_(), z2.bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    value = fn(z1, z2)
    value.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    inputs = 2 * n * d * 2
    assert peak < 16 * inputs + 2**30, f"{loss}: peak {peak / 2**20:.0f} MiB, inputs {inputs / 2**20:.0f} MiB"
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    with torch.no_grad():
        want = fn(z1.double(), z2.double(), backend="torch")
    rtol, _ = TOLERANCES[torch.bfloat16]
    assert abs(value.item() - want.item()) <= rtol * max(1.0, abs(want.item())), (value.item(), want.item())
