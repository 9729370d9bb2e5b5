"""The one benchmark routine shared by the bench_*.py suites: skip, warm up, measure peak memory, time.

Reads FASTSSL_BENCH_DEVICE / FASTSSL_BENCH_DTYPE / FASTSSL_BENCH_ROUNDS (benchmarks/README.md).
"""

from __future__ import annotations

import gc
import os
from typing import Callable, Optional

import pytest
import torch

import _common as common

DEVICE = common.default_device()
DTYPE = common.default_dtype(DEVICE)
ROUNDS = int(os.environ.get("FASTSSL_BENCH_ROUNDS", "10" if DEVICE == "cuda" else "3"))

# torch.compile's internals use torch.jit.script_method, deprecated in torch 2.13: not ours to fix.
COMPILE_WARNING_FILTER = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _warm_up(case: common.Case) -> tuple[Optional[Callable[[], None]], Optional[str]]:
    """(step, None) after one untimed call, or (None, why it cannot run: OOM or a compile failure)."""
    try:
        step = common.make_step(case)
        step()  # lazy initialisation, torch.compile, autotuning: kept out of the timings
        return step, None
    except Exception as exc:
        if common.is_oom(exc):
            return None, "OOM"
        if case.provider == "reference-compiled":
            return None, f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise



def run_case(benchmark, case: common.Case, peak_memory, results) -> None:
    """Benchmark one case with pytest-benchmark; extra_info as documented in benchmarks/README.md."""
    reason = common.provider_unavailable(case.provider, case.device, case.loss)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.label

    step, failure = _warm_up(case)
    if failure is not None:
        # Outside the except block, so the failed call's tensors are already unreferenced.
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()
        if failure == "OOM":
            results(case, None, "OOM", None)
        pytest.skip(f"{failure} ({case.provider}, {case.label})")

    peak = peak_memory(case, step)
    env = common.environment(case.device)
    benchmark.extra_info.update(
        loss=case.loss,
        provider=case.provider,
        mode=case.mode,
        batch_2n=case.batch,
        n_pairs=case.n_pairs,
        dim=case.dim,
        bank_rows=case.bank_rows,
        route=case.route,
        dtype=case.dtype,
        device=case.device,
        device_name=env["device_name"],
        torch=env["torch"],
        triton=env["triton"],
        peak_mib=peak,
        peak_method="torch.cuda.max_memory_allocated" if case.device == "cuda" else "rss_growth_helper_process",
        model_flops=common.model_flops(case),
        executed_flops=common.executed_flops(case),
    )

    # One more warm-up right before timing: the peak-memory call may have run elsewhere meanwhile.
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)

    median = benchmark.stats.stats.median if benchmark.stats else None  # None under --benchmark-disable
    tflops = common.model_flops(case) / median / 1e12 if median else None
    benchmark.extra_info["tflops"] = tflops
    results(case, median, peak, tflops)
