"""The suite's cases for the recent losses (MACL, DirectCLR, SigLIP, SupCon, KoLeo, FroSSL, TiCo, DINO,
iBOT, SwaV, MSN): every case builds and runs at a tiny size, every provider computes the loss of
fastssl's functional (called here directly, not through the suite's adapters), the FLOP counts by
hand, and which cases the CPU and GPU sets hold."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import fastssl
import flops
import providers
import report
import specs
from tests.benchmarks.helpers import tiny_case
from tests.utils import TOLERANCES

RECENT = specs.RECENT_LOSSES
#: Providers that run on a CPU at fp32 (Triton under the interpreter that tests/conftest.py sets).
CPU_PROVIDERS = ("fastssl-torch", "fastssl-triton", "reference", "materialising")


@pytest.fixture
def default_env(monkeypatch):
    """The suite as configured by default: no FASTSSL_BENCH_* variable of this shell."""
    for name in [n for n in os.environ if n.startswith("FASTSSL_BENCH_")]:
        monkeypatch.delenv(name)


def _functional(loss: str, inputs: tuple) -> torch.Tensor:
    """fastssl's functional on the suite's inputs, written out per loss (the documented call)."""
    if loss == "frossl":
        return fastssl.frossl_loss(list(inputs))
    if loss == "supcon":
        z1, z2, labels = inputs
        return fastssl.supcon_loss(z1, labels, z2=z2)
    if loss == "dino":
        student, teacher, v, v_t, center = inputs
        return fastssl.dino_loss(student, teacher, v, center, teacher_prototypes=v_t, normalize_prototypes=True)
    if loss == "ibot":
        student, teacher, v, v_t, center, mask = inputs
        return fastssl.ibot_patch_loss(student, teacher, v, mask, center, teacher_prototypes=v_t,
                                       normalize_prototypes=True)  # fmt: skip
    return getattr(fastssl, specs.SPECS[loss].function)(*inputs)


def _value_and_grads(fn, inputs: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    value = fn(*inputs)
    grads = torch.autograd.grad(value * 0.7, [t for t in inputs if t.requires_grad])  # a grad_output ≠ 1
    return value.detach(), list(grads)


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("loss", RECENT)
def test_every_provider_computes_fastssls_loss(loss: str, provider: str) -> None:
    case = tiny_case(loss, provider)
    inputs = providers.make_inputs(case)
    want, want_grads = _value_and_grads(lambda *x: _functional(loss, x), inputs)
    value, grads = _value_and_grads(providers.loss_function(loss, provider, case.route), inputs)
    rtol, atol = TOLERANCES[torch.float32]
    assert value.dim() == 0 and torch.isfinite(value)
    torch.testing.assert_close(value, want, rtol=rtol, atol=atol)
    assert len(grads) == len(want_grads) > 0
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=atol * max(1.0, float(want_grad.abs().max())))


@pytest.mark.parametrize("route", specs.FROBENIUS_ROUTES)
@pytest.mark.parametrize("loss", ("frossl", "tico"))
def test_fastssl_runs_frossl_and_tico_on_each_route(loss: str, route: str) -> None:
    for batch, dim in ((48, 40), (96, 24)):  # N < D and N > D
        case = tiny_case(loss, "fastssl-torch", route=route, batch=batch, dim=dim)
        inputs = providers.make_inputs(case)
        torch.testing.assert_close(providers.loss_function(loss, "fastssl-torch", route)(*inputs),
                                   providers.loss_function(loss, "reference")(*inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", specs.MODES)
@pytest.mark.parametrize("loss", RECENT)
def test_every_case_builds_and_runs(loss: str, mode: str) -> None:
    """Each CPU provider's timed step at a tiny size, as the suite runs it (inputs, call, gradients)."""
    for provider in ("fastssl-torch", "reference", "materialising"):
        providers.make_step(tiny_case(loss, provider, mode))()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch.compile's, not ours
def test_compiled_formula_matches_eager() -> None:
    """One compile (SigLIP, fp32): the compiled provider is the formula under torch.compile."""
    case = tiny_case("siglip", "materialising-compiled")
    inputs = providers.make_inputs(case)
    compiled = providers.loss_function("siglip", "materialising-compiled")
    eager = providers.loss_function("siglip", "materialising")
    assert compiled.func._torchdynamo_orig_callable is eager.func
    value, grads = _value_and_grads(compiled, inputs)
    want, want_grads = _value_and_grads(eager, inputs)
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_prototype_inputs_have_the_documented_layout() -> None:
    dino = tiny_case("dino", "reference")
    student, teacher, v, v_t, center = providers.make_inputs(dino)
    assert student.shape == (12, dino.images, 40) and teacher.shape == (2, dino.images, 40)
    assert v.shape == v_t.shape == (dino.prototypes, 40) and center.shape == (dino.prototypes,)
    assert student.requires_grad and v.requires_grad and not teacher.requires_grad and not v_t.requires_grad
    torch.testing.assert_close(student.norm(dim=-1), torch.ones(12, dino.images))  # the head normalises before W
    ibot = tiny_case("ibot", "reference", batch=100)
    *_, mask = providers.make_inputs(ibot)
    assert mask.shape == (2, 14, 14) and mask.dtype == torch.bool
    assert mask.sum().item() == 100 and mask[0].sum().item() == specs.IBOT_MASKED_PER_IMAGE
    swav = tiny_case("swav", "reference")
    high, low, w = providers.make_inputs(swav)
    assert high.shape[0] == 2 and low.shape[0] == 6 and w.shape == (swav.prototypes, 40)
    msn = tiny_case("msn", "reference")
    anchors, targets, _ = providers.make_inputs(msn)
    assert anchors.shape[0] == 11 * targets.shape[0]


def test_recent_flops_by_hand() -> None:
    n, d = 32, 8  # N > D: FroSSL and TiCo's auto route is the covariance side

    def case(loss: str, mode: str, provider: str = "reference", route: str = "auto") -> specs.Case:
        return specs.Case(loss, provider, mode, 2 * n, d, route=route)

    zz = 2 * (2 * n) ** 2 * d  # Z Zᵀ over the 2N rows
    for loss in ("macl", "supcon", "directclr"):  # DirectCLR: D = 8 < loss_dim, all of it
        assert flops.model_flops(case(loss, "fwd")) == zz
        assert flops.model_flops(case(loss, "fwd+bwd")) == 3 * zz
    assert flops.model_flops(dataclasses.replace(case("directclr", "fwd"), dim=128)) == 2 * (2 * n) ** 2 * 64
    assert flops.model_flops(case("siglip", "fwd+bwd")) == 3 * 2 * n * n * d
    assert flops.model_flops(case("koleo", "fwd")) == flops.model_flops(case("koleo", "fwd+bwd")) == zz
    g = 2 * n * d * d  # a D x D product over N
    h = 2 * n * n * d  # an N x N product over D
    assert flops.model_flops(case("frossl", "fwd")) == 2 * g  # one Gram per view
    assert flops.model_flops(case("frossl", "fwd+bwd")) == 2 * 3 * g
    assert flops.route_flops(case("frossl", "fwd+bwd", "fastssl-torch", "covariance")) == 2 * 2 * g
    assert flops.route_flops(case("frossl", "fwd+bwd", "fastssl-torch", "gram")) == 2 * 2 * h
    assert flops.model_flops(case("tico", "fwd")) == g + g  # B = aᵀa, then a·C
    assert flops.model_flops(case("tico", "fwd+bwd")) == g + 2 * g
    assert flops.route_flops(case("tico", "fwd+bwd", "fastssl-torch", "covariance")) == 2 * g + 2 * g
    assert flops.route_flops(case("tico", "fwd", "fastssl-torch", "gram")) == h + g

    k, images = 16, 2

    def head(loss: str, mode: str, rows: int) -> specs.Case:
        return specs.Case(loss, "fastssl-torch", mode, rows, d, prototypes=k)

    logits = 2 * k * d  # per row against the K prototypes
    dino_pairs = 2 * 2 * 12 * images * k  # the T x S crop-pair cross-entropy over B·K
    assert flops.model_flops(head("dino", "fwd", 12 * images)) == 24 * logits + 4 * logits + dino_pairs
    assert flops.model_flops(head("dino", "fwd+bwd", 12 * images)) == 3 * 24 * logits + 4 * logits + 2 * dino_pairs
    assert flops.model_flops(head("ibot", "fwd+bwd", 100)) == 3 * 100 * logits + 100 * logits
    assert flops.model_flops(head("swav", "fwd+bwd", 8 * images)) == 3 * 16 * logits
    assert flops.model_flops(head("msn", "fwd", 11 * images)) == 22 * logits + images * logits
    for loss, rows in (("dino", 24), ("ibot", 100), ("swav", 16), ("msn", 22)):
        ours = head(loss, "fwd+bwd", rows)
        assert flops.route_flops(ours) == flops.model_flops(ours)  # the fused op computes each logit at least once


def test_the_gpu_sizes_of_the_recent_losses() -> None:
    large = specs.SIZE_SETS[("cuda", "large")]
    assert large["dino"] == [(12288, 256)] and specs.PROTOTYPES["cuda"]["dino"] == 65536
    assert large["siglip"] == [(2 * 32768, 512)]
    dino = specs.Case("dino", "materialising-bf16", "fwd+bwd", 12288, 256, "bfloat16", "cuda", prototypes=65536)
    assert dino.images == 1024
    assert 12288 * 65536 * 4 / 1e9 == pytest.approx(3.2, abs=0.05)  # lightly's fp32 student logits, GB
    assert flops.model_flops(dino) == 3 * 2 * 12288 * 65536 * 256 + 2 * 2048 * 65536 * 256 + 2 * 2 * 2 * 12 * 1024 * 65536


def test_cpu_set_runs_every_recent_loss_and_baseline(default_env) -> None:
    """On the CPU every recent loss has a headline case that fastssl-torch, the reference and the
    fp32 formula run, in both modes; the bf16 baselines and Triton say why they do not."""
    cases = [c for family in ("pairwise", "frobenius", "prototype") for c in specs.suite_cases(family, "cpu")
             if c.loss in RECENT]
    running = {(c.loss, c.implementation.split(" ")[0], c.mode) for c in cases
               if c.device == "cpu" and specs.policy_skip(c) is None
               and providers.provider_unavailable(c.provider, "cpu", c.loss, c.dim, c.dtype) is None}
    for loss in RECENT:
        for provider in ("fastssl-torch", "reference", "materialising"):
            for mode in specs.MODES:
                assert (loss, provider, mode) in running, (loss, provider, mode)
    gpu = [c for c in cases if c.device == "cuda"]
    assert {c.loss for c in gpu} == set(RECENT)
    if not torch.cuda.is_available():
        assert all("GPU-only" in specs.policy_skip(c) for c in gpu)
    assert "GPU speed baselines" in providers.provider_unavailable("materialising-bf16", "cpu", "dino", 128, "bfloat16")
    assert "materialising-bf16" in providers.provider_unavailable("materialising", "cuda", "dino", 256, "bfloat16")
    assert "no 'cuda' kernels" in providers.provider_unavailable("fastssl-cuda", "cuda", "dino", 256, "bfloat16")
    for has_cuda_kernels in ("siglip", "koleo"):  # csrc/pairwise_sigmoid.cu, csrc/pairwise_max.cu
        reason = providers.provider_unavailable("fastssl-cuda", "cuda", has_cuda_kernels, 512, "bfloat16")
        assert reason is None or "no 'cuda' kernels" not in reason


def test_cpu_compiles_the_formula_only_where_the_table_says(default_env) -> None:
    compiled = specs.Case("dino", "materialising-compiled", "fwd+bwd", 768, 128, prototypes=4096)
    assert "torch.compile of the fp32 reference or formula" in specs.policy_skip(compiled)
    on_gpu = dataclasses.replace(compiled, device="cuda", dtype="float32", batch=12288, dim=256, prototypes=65536)
    reason = specs.policy_skip(on_gpu)
    assert reason is None or "GPU-only" in reason  # on CUDA it runs wherever its provider does


def test_explicit_sizes_round_to_whole_images(monkeypatch, default_env) -> None:
    monkeypatch.setenv("FASTSSL_BENCH_SIZES", "1000x64")
    monkeypatch.setenv("FASTSSL_BENCH_LOSSES", "dino,msn,ibot")
    batches = {c.loss: c.batch for c in specs.suite_cases("prototype", "cpu")}
    assert batches == {"dino": 996, "msn": 990, "ibot": 1000}
    with pytest.raises(ValueError, match="whole number of images"):
        specs.Case("dino", "reference", "fwd", 1000, 64, prototypes=16)
    with pytest.raises(ValueError, match="prototypes"):
        specs.Case("dino", "reference", "fwd", 996, 64)


def test_the_dino_baseline_is_the_weight_normalised_head_then_the_loss() -> None:
    """The bf16/fp32 formula's logits are x·n(v)ᵀ: scaling a row of v changes nothing."""
    case = tiny_case("dino", "materialising")
    student, teacher, v, v_t, center = providers.make_inputs(case)
    fn = providers.loss_function("dino", "materialising")
    scale = torch.rand(v.shape[0], 1) + 0.5
    torch.testing.assert_close(fn(student, teacher, v * scale, v_t / scale, center), fn(student, teacher, v, v_t, center))
    shifted = center + torch.arange(v.shape[0]) / v.shape[0]  # the teacher's centre enters the loss
    assert not torch.allclose(fn(student, teacher, v, v_t, center), fn(student, teacher, v, v_t, shifted))


def _row(provider: str, seconds: float, prototypes: int = 4096) -> report.Row:
    return report.Row(loss="dino", family="prototype", provider=provider, implementation=provider, mode="fwd+bwd",
                      dtype="float32", batch_2n=768, n_pairs=384, dim=128, prototypes=prototypes, oom=False,
                      median_s=seconds, peak_mib=10.0, model_flops=10**9, route_flops=10**9, matmul_peak_tflops=1.0,
                      info={})  # fmt: skip


def test_report_tables_of_the_prototype_family() -> None:
    """rows, K, D columns; the formula baselines' columns; a size with another K is another size."""
    rows = [_row("fastssl-torch", 0.1), _row("reference", 0.2), _row("materialising", 0.3),
            _row("materialising-compiled", 0.25), _row("materialising", 0.05, prototypes=8192)]
    lines = report.loss_tables(rows)["dino"].splitlines()
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert headers[2:5] == ["rows", "K", "D"]
    assert "vs formula eager" in headers and "vs formula compiled" in headers
    ours = next(line for line in lines if "fastssl-torch" in line)
    cells = dict(zip(headers, (cell.strip() for cell in ours.strip("|").split("|"))))
    assert (cells["K"], cells["vs reference"], cells["vs formula eager"], cells["vs formula compiled"]) == (
        "4,096", "2.00×", "3.00×", "2.50×")
