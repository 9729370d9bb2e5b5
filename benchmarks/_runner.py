"""The one benchmark routine shared by the bench_*.py suites: skip, warm up, measure peak memory, time.

What each case records (extra_info) is documented in benchmarks/README.md, "extra_info". A case
whose provider runs out of memory is a result, not an error: it is recorded as a placeholder
benchmark (a no-op call, timed once, so that pytest-benchmark writes it to the JSON) with
``extra_info["status"] == "OOM"``; report.py and the summary table show it as OOM.

Reads FASTSSL_BENCH_ROUNDS, FASTSSL_BENCH_TARGET_S and FASTSSL_BENCH_BUDGET_S (benchmarks/README.md).
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import pytest

import env
import flops
import memory
import providers
import specs

DEVICE = env.default_device()
SESSION_START = time.perf_counter()  # imported at collection: the start of the run, near enough
#: Wall-clock budget of the run in seconds (FASTSSL_BENCH_BUDGET_S; default 300 on CUDA, none on the
#: CPU; 0 = none): cases that start after it are skipped with the reason, so that a run under an
#: outer timeout (scripts/gpu_check.sh sets it below its step's) still ends and writes its JSON.
BUDGET_S = float(os.environ.get("FASTSSL_BENCH_BUDGET_S") or (300 if DEVICE == "cuda" else 0))
#: Timed rounds per case: FASTSSL_BENCH_ROUNDS if set; else as many as fit in TARGET_S (from the
#: warm-up call's time), between MIN_ROUNDS and 10 on CUDA / 3 on the CPU.
ROUNDS = int(os.environ["FASTSSL_BENCH_ROUNDS"]) if os.environ.get("FASTSSL_BENCH_ROUNDS") else None
TARGET_S = float(os.environ.get("FASTSSL_BENCH_TARGET_S", "1.0"))
MIN_ROUNDS = 3

# torch.compile's internals use torch.jit.script_method, deprecated in torch 2.13: not ours to fix.
COMPILE_WARNING_FILTER = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

#: Exceptions by which a fastssl backend says it does not implement an op (e.g. the csrc/ backend
#: that covers only the hottest ops): a skip with its message, not a failure.
_UNSUPPORTED = (NotImplementedError,)


def _warm_up(case: specs.Case) -> tuple[Optional[Callable[[], None]], Optional[str], float]:
    """(step, None, seconds of the untimed call) or (None, why it cannot run, 0).

    The first call absorbs lazy initialisation, torch.compile and Triton autotuning.
    """
    try:
        step = providers.make_step(case)
        start = time.perf_counter()
        step()
        return step, None, time.perf_counter() - start
    except Exception as exc:
        if memory.is_oom(exc):
            return None, "OOM", 0.0
        if case.provider.endswith("-compiled"):
            return None, f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", 0.0
        if case.provider.startswith("fastssl-") and isinstance(exc, _UNSUPPORTED):
            return None, f"{case.provider} does not implement this op: {str(exc).splitlines()[0][:200]}", 0.0
        raise


def rounds_for(seconds: float, device: str) -> int:
    """Timed rounds for a call that took `seconds`: ROUNDS, or as many as fit in TARGET_S (3 to 10)."""
    if ROUNDS is not None:
        return ROUNDS
    most = 10 if device == "cuda" else MIN_ROUNDS
    return max(MIN_ROUNDS, min(most, math.ceil(TARGET_S / max(seconds, 1e-9))))


def case_info(case: specs.Case, peak: "float | str", matmul_peak: dict) -> dict:
    """extra_info of `case` before timing (README "extra_info"); time-derived fields come after."""
    machine = env.environment(case.device)
    return dict(
        loss=case.loss,
        family=case.spec.family,
        provider=case.provider,
        implementation=case.implementation,
        provider_note=providers.PROVIDER_NOTES.get(case.provider),
        mode=case.mode,
        batch_2n=case.batch,
        n_pairs=case.n_pairs,
        dim=case.dim,
        bank_rows=case.bank_rows,
        views=case.spec.views,
        prototypes=case.prototypes,
        route=case.route,
        dtype=case.dtype,
        device=case.device,
        headline=case.headline,
        status="OOM" if peak == "OOM" else "ok",
        peak_mib=peak,
        peak_method="torch.cuda.max_memory_allocated" if case.device == "cuda" else "rss_growth_helper_process",
        model_flops=flops.model_flops(case),
        route_flops=flops.route_flops(case),
        matmul_peak_tflops=matmul_peak["tflops"],
        matmul_peak=matmul_peak["description"],
        **machine,
    )


def _oom_placeholder() -> None:
    """Timed once for an OOM case, so that the case is in the JSON; its stats mean nothing."""


def run_case(benchmark, case: specs.Case, peak_memory, results, matmul_peak: dict) -> None:
    """Benchmark one case with pytest-benchmark; extra_info as documented in benchmarks/README.md."""
    reason = specs.policy_skip(case) or providers.provider_unavailable(case.provider, case.device, case.loss, case.dim,
                                                                       case.dtype)
    if reason:
        pytest.skip(reason)
    if BUDGET_S and time.perf_counter() - SESSION_START > BUDGET_S:
        pytest.skip(f"time budget of the run reached (FASTSSL_BENCH_BUDGET_S={BUDGET_S:g} s; 0 = no budget)")
    benchmark.group = case.label

    step, failure, first_s = _warm_up(case)
    if failure is not None:
        memory.free_memory(case.device)  # outside the except block: the failed call's tensors are unreferenced
        if failure != "OOM":
            pytest.skip(failure)
        benchmark.extra_info.update(case_info(case, "OOM", matmul_peak), median_s=None, tflops=None,
                                    route_tflops=None, fraction_of_peak=None)
        benchmark.pedantic(_oom_placeholder, rounds=1, iterations=1)
        results(case, None, "OOM", None, None)
        return

    peak = peak_memory(case, step)
    benchmark.extra_info.update(case_info(case, peak, matmul_peak))

    # One more warm-up right before timing: the peak-memory call may have run elsewhere meanwhile.
    rounds = rounds_for(first_s, case.device)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    del step
    if case.device == "cuda":
        memory.free_memory(case.device)  # the next case may be the one that needs every byte

    median = benchmark.stats.stats.median if benchmark.stats else None  # None under --benchmark-disable
    tflops = flops.model_flops(case) / median / 1e12 if median else None
    route_tflops = flops.route_flops(case) / median / 1e12 if median else None
    fraction = route_tflops / matmul_peak["tflops"] if route_tflops is not None else None
    benchmark.extra_info.update(median_s=median, tflops=tflops, route_tflops=route_tflops, fraction_of_peak=fraction)
    results(case, median, peak, tflops, fraction)
