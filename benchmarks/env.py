"""The benchmark process's environment: the repository on sys.path, the device and dtype, threads,
and the device name and versions recorded with every result.

Imported first by the other benchmark modules, so that ``python benchmarks/<script>.py`` finds the
checkout's fastssl without an install or PYTHONPATH.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # so that `python benchmarks/summary.py` finds fastssl
    sys.path.append(str(REPO_ROOT))

import fastssl  # noqa: E402


def default_device() -> str:
    """FASTSSL_BENCH_DEVICE, else "cuda" when a GPU is visible, else "cpu"."""
    return os.environ.get("FASTSSL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str) -> str:
    """The summary's dtype (the suite runs both, see suite_cases)."""
    return os.environ.get("FASTSSL_BENCH_DTYPE") or ("bfloat16" if device == "cuda" else "float32")


def configure_threads(device: str) -> None:
    """Set torch's intra-op threads for a benchmark process: FASTSSL_BENCH_THREADS, else 1 on the CPU.

    Why 1 by default on the CPU: on a shared machine, intra-op threads that wait at barriers for a
    descheduled sibling make timings swing by 10x or more (2N = 1024 NT-Xent forward+backward took
    18 ms on one thread and 716 ms on two, on a busy 2-core machine). Called by the entry points
    (conftest, summary, max_batch), never at import, so that importing this module changes no torch setting.
    The helper process of PeakRssProbe calls it too.
    """
    threads = os.environ.get("FASTSSL_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif device == "cpu":
        torch.set_num_threads(1)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{name} ({threads} thread{'' if threads == 1 else 's'})"


def environment(device: str) -> dict:
    """Device and versions, for extra_info, machine_info and the summary header."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fastssl": fastssl.__version__,
        "fastssl_backends": list(fastssl.available_backends()),
    }

