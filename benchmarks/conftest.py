"""pytest plumbing for the fastssl benchmarks: collection of bench_*.py, the same-run matmul peak,
peak memory, and the table printed at the end.

Run: ``pytest benchmarks/ --benchmark-only`` (see benchmarks/README.md).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import pytest

import env
import formatting
import memory
import peak
import specs

_START = time.perf_counter()


def pytest_configure(config):
    env.configure_threads(env.default_device())
    # An outer `timeout` sends SIGTERM: turn it into KeyboardInterrupt, which pytest handles by
    # finishing the session, so pytest-benchmark still writes the JSON of the cases that ran.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: stopping; the JSON keeps the cases that ran")


def pytest_collection_modifyitems(config, items):
    # Most important cases first (specs.priority): a run cut short by its budget or a timeout keeps them.
    def key(item):
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        return specs.priority(case) if isinstance(case, specs.Case) else (9, 0)

    items.sort(key=key)  # stable: the suites' own order within a tier


def pytest_collect_file(file_path, parent):
    # Benchmark modules are named bench_*.py so that a plain test run never mistakes them for tests.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    device = env.default_device()
    machine = env.environment(device)
    return [
        f"fastssl benchmarks: {machine['device_name']}, torch {machine['torch']}, triton {machine['triton']}, "
        f"fastssl backends {machine['fastssl_backends']}, size set {specs.size_set_name(device)!r} "
        f"(NT-Xent (2N, D): {specs.bench_sizes(device)})"
    ]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastssl"] = env.environment(env.default_device())


@pytest.fixture(scope="session")
def matmul_peak() -> dict:
    """The machine's practical peak, measured once in this run: TFLOP/s of one torch.matmul
    (bf16 8192³ on CUDA, fp32 1024³ on the CPU; peak.PEAK_MATMUL says why)."""
    return peak.matmul_peak(env.default_device())


@pytest.fixture(scope="session")
def peak_memory() -> Callable[[specs.Case, Callable[[], None]], "float | str"]:
    """peak_memory(case, step) -> MiB (or "OOM") of one call above its inputs.

    CUDA: torch.cuda.max_memory_allocated after a reset, in this process. CPU: RSS growth in a
    helper process (memory.PeakRssProbe explains why), which rebuilds the case from its description.
    """
    probe = memory.PeakRssProbe()

    def measure(case: specs.Case, step: Callable[[], None]) -> "float | str":
        if case.device == "cuda":
            return memory.cuda_peak_mib(step)
        return probe.measure(case)

    yield measure
    probe.close()


_ROWS: list[list[object]] = []
_PEAK: list[str] = []


@pytest.fixture(scope="session")
def results(matmul_peak) -> Callable[..., None]:
    """results(case, median_s, peak, tflops, fraction): one row of the table printed at the end.

    tflops: model FLOPs / time; fraction: route FLOPs / time / the matmul peak (flops.py), printed
    by formatting.format_share. N is the number of pairs (rows of each view; NT-Xent's Z has 2N
    rows), or for the prototype family the student rows and K; fastssl's Frobenius-family providers
    show their route.
    """
    _PEAK[:] = [f"{matmul_peak['description']}: {matmul_peak['tflops']:.3g} TFLOP/s"]

    def add(case: specs.Case, median_s, peak, tflops, fraction) -> None:
        _ROWS.append([
            f"{case.loss} {case.mode}",
            f"{case.batch} rows, K {case.prototypes}" if case.spec.family == "prototype" else case.n_pairs,
            case.dim,
            formatting.SHORT_DTYPE[case.dtype],
            case.implementation,
            "OOM" if peak == "OOM" else ("—" if median_s is None else f"{median_s * 1e3:.2f}"),
            peak if isinstance(peak, str) else f"{peak:.1f}",
            "—" if tflops is None else f"{tflops:.3g}",
            formatting.format_share(fraction),
        ])

    return add


def pytest_terminal_summary(terminalreporter):
    if _ROWS:
        headers = ["case", "N", "D", "dtype", "implementation", "median ms", "peak MiB", "model TFLOP/s", "% peak"]
        terminalreporter.write_sep("-", "fastssl: time, peak memory above inputs, model TFLOP/s, % of the matmul peak "
                                        "(route FLOPs)")
        terminalreporter.write_line(formatting.format_table(headers, _ROWS))
        terminalreporter.write_line(f"matmul peak of this run: {_PEAK[0] if _PEAK else '—'}")
        terminalreporter.write_line(f"benchmark session wall time: {time.perf_counter() - _START:.0f} s")
