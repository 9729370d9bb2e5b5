"""Test-session setup: the Triton interpreter on GPU-less machines, the `cuda` marker, pytest-xdist
groups and thread shares, the `slow` tests, shared fixtures.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at collection.

The README's command runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`); every
test also passes without xdist. Under xdist:
* each worker uses its share of the cores as torch threads (two workers with two threads each on two
  cores spend most of their time waiting for each other: a tiny training run took 10 s instead of
  0.7 s). The processes that tests start keep torch's default, all cores: the largest of them,
  tests/backends/test_large.py's, are the longest single job of the run;
* the tests of each module in XDIST_GROUPS run on one worker (`--dist loadgroup`).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NO_CUDA_REASON = "needs a CUDA GPU; this machine has none (tests/backends runs the same checks on the CPU: docs/design.md, \"Correctness without a GPU\")"

#: Test modules whose tests share one xdist worker under `--dist loadgroup` (the README's command), and why;
#: `_xdist_group` adds the modules that follow a pattern.
XDIST_GROUPS = {
    # module-level work that a second worker would redo: the gloo launch of each world size (a module
    # cache), a benchmark-suite subprocess, the nvcc builds of csrc/
    "tests/distributed/test_distributed.py": "distributed",
    "tests/benchmarks/test_report_tools.py": "benchmark-suite",
    "tests/csrc/test_cuda_backend.py": "nvcc",
    "tests/csrc/test_sm90_kernel.py": "nvcc-sm90",  # one sm_90a object, compiled by a module fixture
    "tests/csrc/test_sm90_layout.py": "nvcc-sm90-probe",  # one host probe of the kernel's layouts
    "tests/csrc/test_pairwise_sigmoid_max_build.py": "nvcc-sigmoid-max",
}


def _xdist_group(path: str):
    """The xdist group of a test module (None: xdist's default, per test)."""
    if path in XDIST_GROUPS:
        return XDIST_GROUPS[path]
    if path.startswith("tests/gpu/") and path.endswith("_aot.py"):
        return path  # one AOT compile of a kernel family per module (its fixture), one worker each
    if path.endswith("_large.py") or path.startswith("tests/distributed/"):
        return path  # one subprocess launch per case: the module's cases on one worker, in order
    return None


def _starts_first(nodeid: str) -> bool:
    """The longest groups (the large-size subprocess cases, minutes each): under xdist they are
    collected, and so started, first."""
    return nodeid.split("::", 1)[0].endswith("_large.py")

#: Tests marked `slow` here, besides those marked in their files (tests/backends/test_large.py): the
#: compiler runs, seconds to half a minute each on an idle 2-core machine. CI runs them;
#: `pytest -m "not slow"` leaves them out of a quick local loop.
SLOW = (
    "tests/gpu/test_triton_aot.py::",  # one AOT compile of ~100 Triton kernel configurations, ~30 s
    "tests/gpu/test_pairwise_max_aot.py::",  # the AOT compiles of the other kernel families
    "tests/gpu/test_pairwise_sigmoid_aot.py::",
    "tests/gpu/test_prototype_ce_aot.py::",
    "tests/gpu/test_prototype_codes_aot.py::",
    "tests/csrc/test_cuda_backend.py::test_cu_files_compile_without_spills",  # nvcc, per architecture
    "tests/csrc/test_cuda_backend.py::test_cu_uses_tensor_cores",  # nvcc to PTX
    "tests/csrc/test_cuda_backend.py::test_bindings_compile_against_installed_torch_headers",  # g++ on torch's headers
)


def _share_the_cores_between_xdist_workers() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // workers))


_share_the_cores_between_xdist_workers()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: no error where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` that also keeps each module of XDIST_GROUPS on one worker.

    The groups are given here, by test path, rather than as xdist_group markers: pytest-xdist 3.8 reads
    those from a node-id suffix that pytest 9.2 no longer lets it set, so with pytest 9.2 they are
    silently ignored (an open pytest-xdist bug). This scheduler runs in the controlling process and
    groups the node ids it is given.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    config.option.loadscopereorder = False  # work in collection order (the large cases first), not largest group first

    class Scheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_group(nodeid.split("::", 1)[0]) or super()._split_scope(nodeid)

    return Scheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers collect; the scheduler keeps their order
        items.sort(key=lambda item: not _starts_first(item.nodeid))  # stable: the rest keep their order
    skip_no_cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
        if skip_no_cuda is not None and "cuda" in item.keywords:
            item.add_marker(skip_no_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
