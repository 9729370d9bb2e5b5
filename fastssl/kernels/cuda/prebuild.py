"""Compile csrc/*.cu to object files ahead of time, on a machine without a GPU.

The .cu files include no torch header (csrc/README.md), so nvcc alone compiles them, here or on any
CPU machine with the CUDA toolkit. A GPU machine then compiles only csrc/bindings.cpp and links these
objects (fastssl/kernels/cuda/_ext.py looks for them), which turns minutes of nvcc into seconds.

    python -m fastssl.kernels.cuda.prebuild [--arch 90 --arch 80] [--out build/csrc] [--jobs 2]

writes ``<out>/sm_<arch>/<name>.o`` (the Hopper kernels of pairwise_lse_sm90.cu and frobenius_sm90.cu
only for arch 90, as sm_90a) and rebuilds only what is older than its source or any csrc header (incremental). ``FASTSSL_CSRC_OBJECTS`` points the extension loader at another ``<out>``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from fastssl.kernels.cuda._ext import ARCH_SPECIFIC_SOURCES, CSRC, KERNEL_SOURCES, OBJECTS_DIR, gencode_flag

#: nvcc flags for an object that links into a Python extension (position-independent host code).
NVCC_FLAGS = ("-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC")


def nvcc_command(nvcc: str, source: Path, output: Path, arch: str) -> list[str]:
    """The nvcc call that compiles one kernel source for sm_<arch> (sm_90a for the Hopper kernels) into `output`."""
    return [nvcc, *NVCC_FLAGS, gencode_flag(arch, source.name in ARCH_SPECIFIC_SOURCES), f"-I{CSRC}", "-c",
            str(source), "-o", str(output)]  # fmt: skip


def stale(source: Path, output: Path) -> bool:
    """Whether `output` is missing or older than `source` or any header of csrc/."""
    if not output.is_file():
        return True
    newest = max(p.stat().st_mtime for p in [source, *CSRC.glob("*.h"), *CSRC.glob("*.cuh")])
    return output.stat().st_mtime < newest


def prebuild(out: Path, archs: Sequence[str], jobs: int = 2, nvcc: Optional[str] = None,
             sources: Sequence[str] = KERNEL_SOURCES) -> list[Path]:  # fmt: skip
    """Compile the kernel `sources` for every arch (only the stale ones); return all object paths."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    todo, outputs = [], []
    for arch in archs:
        folder = out / f"sm_{arch}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in sources:
            if ARCH_SPECIFIC_SOURCES.get(name, arch) != arch:
                continue  # another arch's kernel (the *_sm90.cu files are built for 90 only)
            source, output = CSRC / name, folder / (Path(name).stem + ".o")
            outputs.append(output)
            if stale(source, output):
                todo.append(nvcc_command(nvcc, source, output, arch))

    def run(cmd: list[str]) -> None:
        print("+", " ".join(cmd[-5:]), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run, todo))
    return outputs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability without the dot, e.g. 90 (repeatable; "
                        "default 80 and 90)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OBJECTS_DIR, help=f"output folder (default {OBJECTS_DIR})")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    args = parser.parse_args(argv)
    objects = prebuild(args.out, args.arch or ["80", "90"], args.jobs)
    print(f"fastssl: {len(objects)} kernel objects under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
