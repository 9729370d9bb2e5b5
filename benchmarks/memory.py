"""Peak memory of one call: CUDA's allocator statistics, or on the CPU the resident-set growth
measured in a helper process (PeakRssProbe); and what counts as running out of memory.

Run as a script (``python benchmarks/memory.py --probe-worker``) this file is that helper process.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from env import REPO_ROOT, configure_threads
from providers import make_step
from specs import Case

MIB = 2**20


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` means the device (or host) ran out of memory."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def free_memory(device: str) -> None:
    """Return freed memory after an OOM or a large case (call outside any except block, so that
    the traceback's tensors are already unreferenced)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def cuda_peak_mib(step: Callable[[], None]) -> float:
    """Peak CUDA memory allocated by one call of `step`, above what was allocated before it (MiB)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def rss_peak_mib(step: Callable[[], None]) -> float:
    """Peak growth of this process's resident set during one call of `step` (MiB, Linux only).

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the current
    RSS, so VmHWM − VmRSS(before) is the call's peak. Only honest in a process whose allocator
    returns freed blocks to the OS (see PeakRssProbe): otherwise a call reuses pages an earlier
    call left resident and the growth reads too low.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) / 1024


class PeakRssProbe:
    """Measures CPU peak memory of cases in one helper process (this file run with --probe-worker).

    Why a helper: glibc malloc keeps freed blocks of up to 32 MiB resident for reuse, so in the
    benchmarking process an RSS reading depends on what ran before. The helper starts with
    MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, so every larger block is mmap'ed and unmapped on free;
    for each case it builds the inputs, runs one warm-up call (lazy initialisation, torch.compile),
    then measures one more call with rss_peak_mib. The timed process keeps the default allocator.
    The figure counts touched pages of everything the call allocates: tensors, and also oneDNN
    scratch buffers and other native memory.
    """

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--probe-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )

    def measure(self, case: Case) -> float | str:
        """Peak MiB of one call of `case`, or "OOM"; raises RuntimeError on any other failure."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        self._proc.stdin.write(case.to_json() + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:  # the helper died
            returncode = self._proc.wait(timeout=60)
            self.close()
            if returncode == -9:  # SIGKILL: on Linux, the kernel's OOM killer
                return "OOM"
            raise RuntimeError(f"peak-memory helper exited with status {returncode} on {case.label}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peak-memory probe failed for {case.label}: {reply['error']}")
        return reply["peak_mib"]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # end of input: the helper's loop ends and it exits
            self._proc.wait(timeout=60)
            self._proc.stdout.close()
        self._proc = None


def _probe_worker() -> None:
    """Helper-process loop: one JSON Case per stdin line, one JSON reply per stdout line."""
    # Replies get a private copy of stdout; anything else printed (warnings, C++ logs) goes to stderr.
    configure_threads("cpu")
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        case, step = Case.from_json(line), None
        try:
            step = make_step(case)
            step()  # warm-up
            reply = {"peak_mib": rss_peak_mib(step)}
        except Exception as exc:  # noqa: BLE001  (reported back, not swallowed)
            reply = {"peak_mib": "OOM"} if is_oom(exc) else {"error": f"{type(exc).__name__}: {exc}"[:500]}
        del step
        print(json.dumps(reply), file=replies, flush=True)



if __name__ == "__main__":
    if sys.argv[1:] == ["--probe-worker"]:
        _probe_worker()
    else:
        sys.exit("usage: python benchmarks/memory.py --probe-worker  (used by PeakRssProbe)")
