"""The suite's cases on the CPU, the GPU set included (a CPU machine collects it and skips it): the
GPU sizes of the covariance losses and ArCL, who runs there on which route, the policy and run
order, and those cases' FLOPs by hand."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import flops
import providers
import specs

#: (N, D) of the covariance / Gram losses on the GPU: the Barlow Twins / VICReg target first.
COVARIANCE_ND = [(2048, 8192), (65536, 128), (256, 65536), (8192, 2048)]
COVARIANCE_LOSSES = ("barlow_twins", "vicreg", "spectral_contrastive", "vicreg_exp", "vicreg_ctr")
ARCL = ("arcl_m4", "arcl_m8")


@pytest.fixture
def default_env(monkeypatch):
    """The suite as configured by default: no FASTSSL_BENCH_* variable of this shell."""
    for name in [n for n in os.environ if n.startswith("FASTSSL_BENCH_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def on_a_gpu(monkeypatch, default_env):
    """specs.policy_skip as a GPU machine applies it (its first question is torch.cuda.is_available())."""
    monkeypatch.setattr(specs.torch.cuda, "is_available", lambda: True)


def _gpu_cases() -> list[specs.Case]:
    return [c for family in ("pairwise", "frobenius") for c in specs.suite_cases(family, device="cpu")
            if c.device == "cuda"]


def test_gpu_sizes_of_the_covariance_losses_and_arcl() -> None:
    large = specs.SIZE_SETS[("cuda", "large")]
    for loss in COVARIANCE_LOSSES:
        assert [(batch // 2, dim) for batch, dim in large[loss]] == COVARIANCE_ND, loss
    for loss in ARCL:
        assert large[loss] == [(2 * 65536, 128)]
    small = specs.SIZE_SETS[("cuda", "small")]
    assert set(small) == set(large) == set(specs.SPECS)
    assert all(small[loss] == large[loss][:1] for loss in specs.SPECS)


def test_the_gpu_covariance_and_arcl_cases_run_every_route_and_baseline(on_a_gpu) -> None:
    """At each of those sizes in bf16, both modes: fastssl's GPU backends (on both routes for the
    Frobenius family), the fp32 reference and the bf16 baseline eager and compiled all run; the bf16
    baselines skip the fp32 headline cases with their reason."""
    running: dict[tuple, set[str]] = {}
    for case in _gpu_cases():
        if case.loss not in COVARIANCE_LOSSES + ARCL:
            continue
        if specs.policy_skip(case) is None and (not case.provider.startswith("materialising")
                                                or providers.provider_unavailable(case.provider, "cuda", case.loss,
                                                                                  case.dim, case.dtype) is None):
            running.setdefault((case.loss, case.n_pairs, case.dim, case.dtype, case.mode), set()).add(
                case.implementation)
        if case.provider in providers.MATERIALISING and case.dtype == "float32":
            assert "take bf16 inputs" in providers.provider_unavailable(case.provider, "cuda", case.loss, case.dim,
                                                                          case.dtype)
    baselines = {"reference", "materialising-bf16", "materialising-bf16-compiled"}
    for loss in COVARIANCE_LOSSES + ARCL:
        frobenius = specs.SPECS[loss].family == "frobenius"
        fastssl = {f"fastssl-{b} ({r})" for b in ("triton", "cuda") for r in specs.FROBENIUS_ROUTES} if frobenius \
            else {"fastssl-triton", "fastssl-cuda"}
        sizes = COVARIANCE_ND if loss in COVARIANCE_LOSSES else [(65536, 128)]
        for n, d in sizes:
            for mode in specs.MODES:
                assert fastssl | baselines <= running[(loss, n, d, "bfloat16", mode)], (loss, n, d, mode)


def test_gpu_policy_keeps_the_cpu_fallback_at_the_headline(on_a_gpu) -> None:
    cases = [c for c in _gpu_cases() if c.loss == "barlow_twins" and c.provider == "fastssl-torch"]
    assert {c.n_pairs for c in cases if specs.policy_skip(c) is None} == {2048}
    assert all("headline size only" in specs.policy_skip(c) for c in cases if not c.headline)


@pytest.mark.parametrize("n,d", COVARIANCE_ND)
def test_gpu_covariance_flops_by_hand(n: int, d: int) -> None:
    """g = 2·N·D² (a D x D product over N), h = 2·N²·D (an N x N product over D); fwd+bwd."""
    g, h = 2 * n * d * d, 2 * n * n * d

    def case(loss: str, provider: str = "reference", route: str = "auto", mode: str = "fwd+bwd") -> specs.Case:
        return specs.Case(loss, provider, mode, 2 * n, d, "bfloat16", "cuda", route)

    for baseline in ("reference", "materialising-bf16", "materialising-bf16-compiled"):
        assert flops.model_flops(case("barlow_twins", baseline)) == 6 * n * d * d == 3 * g
        assert flops.model_flops(case("vicreg", baseline)) == 2 * 3 * g
        assert flops.model_flops(case("spectral_contrastive", baseline)) == 3 * h
        assert flops.model_flops(case("vicreg_exp", baseline)) == 2 * 3 * g
        assert flops.model_flops(case("vicreg_ctr", baseline)) == 2 * 3 * h
        assert flops.route_flops(case("barlow_twins", baseline)) == flops.model_flops(case("barlow_twins", baseline))
    for backend in ("fastssl-triton", "fastssl-cuda"):
        assert flops.route_flops(case("barlow_twins", backend, "covariance")) == 3 * g
        assert flops.route_flops(case("barlow_twins", backend, "gram")) == 4 * h
        assert flops.route_flops(case("barlow_twins", backend, "gram", "fwd")) == 2 * h
        assert flops.route_flops(case("vicreg", backend, "covariance")) == 2 * 2 * g
        assert flops.route_flops(case("vicreg", backend, "gram")) == 2 * 2 * h
        assert flops.route_flops(case("spectral_contrastive", backend, "gram")) == 3 * h
        assert flops.route_flops(case("spectral_contrastive", backend, "covariance")) == 4 * g
        assert flops.route_flops(case("vicreg_exp", backend)) == 2 * 3 * g
        assert flops.route_flops(case("vicreg_ctr", backend)) == 2 * 3 * h
        auto = "covariance" if d <= n else "gram"
        for loss in ("barlow_twins", "vicreg", "spectral_contrastive"):
            assert flops.route_flops(case(loss, backend)) == flops.route_flops(case(loss, backend, auto))


@pytest.mark.parametrize("m", (4, 8))
def test_gpu_arcl_flops_by_hand(m: int) -> None:
    """ArCL at N = 65,536, D = 128: Z Zᵀ over the 2N anchors and N per-sample m x m Grams."""
    n, d = 65536, 128
    logits, views = 2 * (2 * n) ** 2 * d, n * 2 * m * m * d
    ref = specs.Case(f"arcl_m{m}", "reference", "fwd+bwd", 2 * n, d, "bfloat16", "cuda")
    ours = dataclasses.replace(ref, provider="fastssl-triton")
    assert flops.model_flops(ref) == flops.route_flops(ref) == 3 * logits + 3 * views
    assert flops.model_flops(ours) == 3 * logits + 3 * views
    assert flops.route_flops(ours) == 3 * logits + views  # the worst pair's gradient is a row dot product
    assert flops.route_flops(dataclasses.replace(ours, mode="fwd")) == logits + views


def test_case_policy_and_order(default_env) -> None:

    bf16_cpu = specs.Case("nt_xent", "reference", "fwd", 64, 8, "bfloat16", "cpu")
    assert "bf16 on the CPU" in specs.policy_skip(bf16_cpu)
    assert specs.policy_skip(dataclasses.replace(bf16_cpu, mode="fwd+bwd")) is None
    if not torch.cuda.is_available():
        assert "GPU-only" in specs.policy_skip(dataclasses.replace(bf16_cpu, device="cuda"))
    headline = specs.Case("nt_xent", "reference", "fwd", 64, 8, "float32", "cpu")
    sweep_small = dataclasses.replace(headline, loss="dcl", headline=False, batch=128)
    sweep_big = dataclasses.replace(sweep_small, batch=1024)
    other = dataclasses.replace(headline, loss="dcl")
    second_dtype = dataclasses.replace(headline, dtype="bfloat16")
    ordered = sorted([second_dtype, sweep_big, other, sweep_small, headline], key=specs.priority)
    assert ordered == [headline, other, sweep_small, sweep_big, second_dtype]
    assert "Inf-CL computes the CLIP loss only" in providers.provider_unavailable("inf_cl", "cuda", "nt_xent")
