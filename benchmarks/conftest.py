"""pytest plumbing for the fastssl benchmarks: collection of bench_*.py, peak memory, reporting.

Run: ``pytest benchmarks/ --benchmark-only`` (see benchmarks/README.md).
"""

from __future__ import annotations

from typing import Callable

import pytest

import _common as common


def pytest_collect_file(file_path, parent):
    # Benchmark modules are named bench_*.py so that a plain test run never mistakes them for tests.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    device = common.default_device()
    env = common.environment(device)
    return [
        f"fastssl benchmarks: {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
        f"dtype {common.default_dtype(device)}, sizes (2N, D) {common.bench_sizes(device)}"
    ]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastssl"] = common.environment(common.default_device())


@pytest.fixture(scope="session")
def peak_memory() -> Callable[[common.Case, Callable[[], None]], "float | str"]:
    """peak_memory(case, step) -> MiB (or "OOM") of one call above its inputs.

    CUDA: torch.cuda.max_memory_allocated in this process. CPU: RSS growth in a helper process
    (common.PeakRssProbe explains why), which rebuilds the case from its description.
    """
    probe = common.PeakRssProbe()

    def measure(case: common.Case, step: Callable[[], None]) -> "float | str":
        if case.device == "cuda":
            return common.cuda_peak_mib(step)
        return probe.measure(case)

    yield measure
    probe.close()


_ROWS: list[list[object]] = []


@pytest.fixture(scope="session")
def results() -> Callable[..., None]:
    """results(case, median_s, peak, tflops): one row of the table printed at the end of the run.

    N is the number of pairs (rows of each view; NT-Xent's Z has 2N rows); fastssl's Frobenius-family
    providers show their route.
    """

    def add(case: common.Case, median_s: "float | None", peak: "float | str", tflops: "float | None") -> None:
        frobenius = case.loss in common.FROBENIUS_LOSSES and case.provider.startswith("fastssl-")
        _ROWS.append([
            f"{case.loss} {case.mode}",
            case.n_pairs,
            case.dim,
            f"{case.provider} ({case.route})" if frobenius else case.provider,
            "—" if median_s is None else f"{median_s * 1e3:.2f}",
            peak if isinstance(peak, str) else f"{peak:.1f}",
            "—" if tflops is None else f"{tflops:.3g}",
        ])

    return add


def pytest_terminal_summary(terminalreporter):
    if _ROWS:
        headers = ["case", "N", "D", "provider", "median ms", "peak MiB", "TFLOP/s"]
        terminalreporter.write_sep("-", "fastssl: time, peak memory above inputs, model TFLOP/s")
        terminalreporter.write_line(common.format_table(headers, _ROWS))
