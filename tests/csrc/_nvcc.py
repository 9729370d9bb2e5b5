"""The compiler side of the tests in tests/csrc, in one place: finding nvcc and cuobjdump, compiling
csrc/ sources to objects with ptxas's report, reading that report and the objects' SASS, and building
and running a host probe (a program that includes a kernel file and prints its layout functions as
JSON)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")
NO_NVCC = "nvcc is not on PATH: the CUDA sources cannot be compiled here"


def require_nvcc() -> str:
    """nvcc's path, or skip the test with the reason."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    return NVCC


def cuobjdump() -> Optional[str]:
    """cuobjdump from the PATH, else the one Triton ships (tests/gpu reads its cubins with it)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 -- any failure means "no cuobjdump here"
        return None
    return path if path and Path(path).is_file() else None


def sass(obj: Path) -> str:
    """The SASS of an object (cuobjdump -sass), or skip the test where no cuobjdump is found."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: neither on PATH nor shipped with Triton")
    proc = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def compile_objects(sources: Sequence[Path], gencode: str, out_dir: Path, output: Optional[Path] = None,
                    optimise: bool = True) -> str:  # fmt: skip
    """Compile `sources` (csrc/ on the include path) with `gencode` into objects in `out_dir` (or into
    `output`, for one source) and return ptxas's `-v` report; the test fails with nvcc's message if
    it does not compile."""
    cmd = [require_nvcc(), "-std=c++17", *(["-O3"] if optimise else []), "-c", gencode, "-Xptxas", "-v",
           f"-I{CSRC}", *map(str, sources)]  # fmt: skip
    if output is not None:
        cmd += ["-o", str(output)]
    proc = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed ({gencode}):\n{proc.stderr[-4000:]}"
    return proc.stderr


def compile_error(source: Path, gencode: str, output: Path) -> str:
    """nvcc's message for a source that must NOT compile with `gencode` (the test fails if it does)."""
    cmd = [require_nvcc(), "-std=c++17", "-c", gencode, f"-I{CSRC}", str(source), "-o", str(output)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, f"{source.name} compiled with {gencode}"
    return proc.stderr


def ptxas_kernels(report: str) -> list[tuple[str, int, int, int]]:
    """[(kernel, spill stores, spill loads, stack frame bytes)] from a ptxas `-v` report, in its order."""
    kernels, current = [], None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_\w+'", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            kernels.append((current, int(m.group(2)), int(m.group(3)), int(m.group(1))))
            current = None
    return kernels


def host_probe(folder: Path, program: str, virtual_arch: str) -> dict:
    """Build `program` (which includes a kernel file) as a host executable, its device side as PTX for
    compute_<virtual_arch> only (no ptxas: the host program never launches a kernel), run it and
    return the JSON it prints."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the kernel's host-side layout functions cannot be compiled here")
    (folder / "probe.cu").write_text(program)
    cmd = [NVCC, "-std=c++17", f"-gencode=arch=compute_{virtual_arch},code=compute_{virtual_arch}", f"-I{CSRC}",
           str(folder / "probe.cu"), "-o", str(folder / "probe")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(folder / "probe")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)
