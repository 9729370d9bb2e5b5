"""Ahead-of-time kernel objects (fastssl/kernels/cuda/prebuild.py): nvcc compiles the torch-free .cu
files here, incrementally, into objects that define the launchers bindings.cpp links against; the
extension loader takes them only when they are complete and newer than every source."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from fastssl.kernels.cuda import _ext, prebuild
from tests.csrc import _nvcc


def test_kernel_sources_are_every_cu_file():
    assert sorted(_ext.KERNEL_SOURCES) == sorted(p.name for p in _ext.CSRC.glob("*.cu"))


@pytest.mark.skipif(_nvcc.NVCC is None, reason=_nvcc.NO_NVCC)
def test_prebuild_is_incremental_and_defines_the_launcher(tmp_path):
    objects = prebuild.prebuild(tmp_path, ["90"], sources=("worst_pair.cu",))
    assert objects == [tmp_path / "sm_90" / "worst_pair.o"]
    built = objects[0].stat().st_mtime_ns
    symbols = subprocess.run(["nm", "-C", str(objects[0])], capture_output=True, text=True, check=True).stdout
    assert "T fastssl::worst_pair_forward(" in symbols, "the launcher bindings.cpp calls is not defined"
    time.sleep(0.01)
    prebuild.prebuild(tmp_path, ["90"], sources=("worst_pair.cu",))
    assert objects[0].stat().st_mtime_ns == built, "an up-to-date object was rebuilt"
    assert prebuild.stale(_ext.CSRC / "worst_pair.cu", objects[0]) is False
    os.utime(objects[0], (0, 0))  # older than the sources: stale
    assert prebuild.stale(_ext.CSRC / "worst_pair.cu", objects[0]) is True


def test_loader_takes_only_complete_fresh_objects(tmp_path):
    folder = tmp_path / "sm_90"
    folder.mkdir()
    paths = [folder / (Path(s).stem + ".o") for s in _ext.KERNEL_SOURCES]
    for path in paths[:-1]:
        path.write_bytes(b"")
    assert _ext.prebuilt_objects(["90"], tmp_path) is None  # one missing
    paths[-1].write_bytes(b"")
    assert _ext.prebuilt_objects(["90"], tmp_path) == paths
    assert _ext.prebuilt_objects(["80"], tmp_path) is None  # another arch
    assert _ext.prebuilt_objects(["80", "90"], tmp_path) is None  # a multi-arch JIT build compiles itself
    os.utime(paths[0], (0, 0))
    assert _ext.prebuilt_objects(["90"], tmp_path) is None  # older than its source


def test_nvcc_command_is_position_independent():
    cmd = prebuild.nvcc_command("nvcc", _ext.CSRC / "worst_pair.cu", Path("out.o"), "90")
    assert "-fPIC" in cmd and "-gencode=arch=compute_90,code=sm_90" in cmd and cmd[-2:] == ["-o", "out.o"]
