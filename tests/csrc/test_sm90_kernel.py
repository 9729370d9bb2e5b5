"""csrc/pairwise_lse_sm90.cu, the Hopper (sm_90a) pairwise-LSE forward and dx: the CPU proofs and the GPU checks.

CPU (nvcc, no GPU): the file compiles for sm_90a alone with no register spills or stack frame in
any kernel (forward and dx, bf16 and fp16) and no wgmma serialisation; its SASS holds the
instructions it was written for, HGMMA (wgmma), UTMALDG (TMA tensor loads), SYNCS (mbarrier) and
USETMAXREG (the register split); compiled for plain sm_90 it stops with its own #error; its object reaches the driver only through the runtime (no libcuda
symbol); prebuild and the JIT loader build it for arch 90 only, as sm_90a, and leave the sm_80 build
as it was; the forward takes it only on sm_90 with FASTSSL_CUDA_SM90=1.

GPU (`cuda` marker, sm_90 only): the kernel is taken exactly for the inputs TMA can read, and its
(lse, pos) and the gradients (dx by the sm_90a kernel for D <= 256) match the float64 oracle for every
mode, ragged tiles, the bank and D up to 512. tests/csrc/test_sm90_layout.py emulates its data layouts and pipeline on the CPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch

from fastssl.kernels.cuda import _ext, prebuild
from fastssl.kernels.cuda.pairwise_lse import SM90_ENV, launcher

CSRC = _ext.CSRC
SOURCE = CSRC / "pairwise_lse_sm90.cu"
NVCC = shutil.which("nvcc")
NO_NVCC = "nvcc is not on PATH: the CUDA sources cannot be compiled here"
SM90A = "-gencode=arch=compute_90a,code=sm_90a"


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # Triton ships one
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 -- any failure means "no cuobjdump here"
        return None


@pytest.fixture(scope="module")
def sm90a_build(tmp_path_factory):
    """(ptxas -v report, object path) of one nvcc call compiling pairwise_lse_sm90.cu for sm_90a."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    out = tmp_path_factory.mktemp("sm90a") / "pairwise_lse_sm90.o"
    cmd = [NVCC, "-std=c++17", "-O3", "-c", SM90A, "-Xptxas", "-v", f"-I{CSRC}", str(SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for sm_90a:\n{proc.stderr[-4000:]}"
    return proc.stderr, out


@pytest.mark.slow  # nvcc
def test_compiles_for_sm90a_without_spills(sm90a_build):
    report, _ = sm90a_build
    kernels = re.findall(r"Compiling entry function '([^']+)' for 'sm_90a'", report)
    # kFwd (Li0E) and kRows (Li1E), each for bf16 and fp16
    assert sorted(re.search(r"pairwise_lse_sm90_kernelI\w+?(Li\dE)", k).group(1) for k in kernels) == ["Li0E"] * 2 + [
        "Li1E"] * 2, kernels  # fmt: skip
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) == len(kernels) and frames, report
    assert all(f == ("0", "0", "0") for f in frames), f"stack frame or spills (frame, stores, loads): {frames}"
    assert "serialized" not in report, f"ptxas serialises the wgmma:\n{report}"


@pytest.mark.slow  # nvcc
def test_sass_uses_wgmma_tma_and_mbarriers(sm90a_build):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: neither on PATH nor shipped with Triton")
    _, obj = sm90a_build
    proc = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sass = proc.stdout
    assert len(re.findall(r"\bHGMMA\.64x128x16\.F32\.BF16\b", sass)) >= 4, "no bf16 wgmma m64n128k16 in the SASS"
    assert len(re.findall(r"\bHGMMA\.64x128x16\.F32\b(?!\.)", sass)) >= 4, "no fp16 wgmma m64n128k16 in the SASS"
    assert re.search(r"\bUTMALDG\.2D\b", sass), "no TMA tensor load (UTMALDG) in the SASS"
    assert re.search(r"\bSYNCS\.ARRIVE\.TRANS64", sass), "no mbarrier arrive (SYNCS.ARRIVE) in the SASS"
    assert re.search(r"\bSYNCS\.PHASECHK\.TRANS64\.TRYWAIT\b", sass), "no mbarrier try_wait in the SASS"
    assert re.search(r"\bUSETMAXREG\b", sass), "no setmaxnreg register split in the SASS"
    # The fallback kernel's instructions are not in this file: the tensor cores are reached by wgmma only.
    assert not re.search(r"\bHMMA\.", sass), "mma.sync (HMMA) in the sm_90a kernel"


@pytest.mark.slow  # nvcc
def test_plain_sm90_is_refused(tmp_path):
    """Without the arch-specific target nvcc stops at the file's #error (not at an obscure ptxas error)."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    cmd = [NVCC, "-std=c++17", "-c", "-gencode=arch=compute_90,code=sm_90", f"-I{CSRC}", str(SOURCE), "-o",
           str(tmp_path / "x.o")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "compile it with -gencode=arch=compute_90a,code=sm_90a only" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # nvcc
def test_object_reaches_the_driver_through_the_runtime(sm90a_build):
    """cuTensorMapEncodeTiled comes from cudaGetDriverEntryPoint*: the object links no libcuda symbol,
    and defines the launchers bindings.cpp calls."""
    _, obj = sm90a_build
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\bcu[A-Z]\w*", undefined), f"driver API symbols linked directly: {undefined}"
    assert "cudaGetDriverEntryPoint" in undefined
    defined = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    for launcher in ("pairwise_lse_forward_sm90", "pairwise_lse_sm90_supported", "pairwise_lse_backward_rows_sm90",
                     "pairwise_lse_rows_sm90_supported"):  # fmt: skip
        assert f"T fastssl::{launcher}(" in defined, launcher


def test_prebuild_and_jit_build_it_for_arch_90_only(tmp_path, monkeypatch):
    name = SOURCE.name
    assert name in _ext.KERNEL_SOURCES and _ext.ARCH_SPECIFIC_SOURCES[name] == "90"
    assert set(_ext.ARCH_SPECIFIC_SOURCES.values()) == {"90"}  # frobenius_sm90.cu is the other one
    assert name in _ext.kernel_sources_for("90") and name not in _ext.kernel_sources_for("80")
    assert set(_ext.kernel_sources_for("80")) == set(_ext.KERNEL_SOURCES) - set(_ext.ARCH_SPECIFIC_SOURCES)
    assert SM90A in prebuild.nvcc_command("nvcc", SOURCE, Path("o.o"), "90")
    assert "-gencode=arch=compute_90,code=sm_90" in prebuild.nvcc_command("nvcc", CSRC / "pairwise_lse.cu",
                                                                          Path("o.o"), "90")  # fmt: skip
    # For arch 80 the source is skipped before any nvcc runs (`false` would fail the build).
    assert prebuild.prebuild(tmp_path, ["80"], nvcc="false", sources=(name,)) == []
    # A JIT build takes it only when it builds for arch 90 alone, and then defines its bindings.
    monkeypatch.setenv("FASTSSL_CUDA_ARCH_LIST", "9.0")
    sources = _ext._jit_sources(_ext._archs())
    assert name in sources and _ext._arch_flags(sources) == [SM90A]
    assert _ext.bindings_defines(list(sources)) == ["-DFASTSSL_WITH_SM90"]
    assert _ext.bindings_defines(["pairwise_lse_sm90.o", "worst_pair.o"]) == ["-DFASTSSL_WITH_SM90"]
    monkeypatch.setenv("FASTSSL_CUDA_ARCH_LIST", "8.0;9.0")
    sources = _ext._jit_sources(_ext._archs())
    assert name not in sources and _ext.bindings_defines(list(sources)) == []
    assert _ext._arch_flags(sources) == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    # Prebuilt sm_80 objects are complete without it.
    folder = tmp_path / "objects" / "sm_80"
    folder.mkdir(parents=True)
    for s in _ext.kernel_sources_for("80"):
        (folder / (Path(s).stem + ".o")).write_bytes(b"")
    assert _ext.prebuilt_objects(["80"], tmp_path / "objects") is not None


#: The bound on a full ahead-of-time build (every kernel for sm_80 and sm_90) on a 2-core machine.
PREBUILD_BUDGET_S = 300


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason=NO_NVCC)
def test_full_prebuild_of_both_archs_stays_within_budget(tmp_path):
    start = time.monotonic()
    objects = prebuild.prebuild(tmp_path, ["80", "90"], jobs=2)
    elapsed = time.monotonic() - start
    want = [f"sm_{a}/{Path(s).stem}.o" for a in ("80", "90") for s in _ext.kernel_sources_for(a)]
    assert sorted(o.relative_to(tmp_path).as_posix() for o in objects) == sorted(want)
    assert all(o.stat().st_size > 0 for o in objects)
    assert elapsed < PREBUILD_BUDGET_S, f"prebuild --arch 80 --arch 90 took {elapsed:.0f} s"


@pytest.mark.parametrize("name", ["pairwise_lse_forward", "pairwise_lse_backward"])
def test_selection_is_opt_in_and_sm90_only(monkeypatch, name):
    ext = types.SimpleNamespace(**{name: "default", f"{name}_sm90": "sm90"})
    monkeypatch.delenv(SM90_ENV, raising=False)
    assert launcher(ext, (9, 0), name) == "default"
    monkeypatch.setenv(SM90_ENV, "0")
    assert launcher(ext, (9, 0), name) == "default"
    monkeypatch.setenv(SM90_ENV, "1")
    assert launcher(ext, (9, 0), name) == "sm90"
    assert launcher(ext, (8, 0), name) == "default"
    assert launcher(ext, (10, 0), name) == "default"
    with pytest.raises(RuntimeError, match=SM90_ENV):  # asked for, but not built into this extension
        launcher(types.SimpleNamespace(**{name: "default"}), (9, 0), name)


# ------------------------------------------------------------------------------------------------
# GPU layer (sm_90 only)


@pytest.fixture
def sm90_extension(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        pytest.skip(f"the sm_90a kernel runs only on sm_90 GPUs (H100/H200); this one is sm_{major}{minor}")
    ext = _ext.extension()
    assert hasattr(ext, "pairwise_lse_forward_sm90"), "fastssl._C on an sm_90 GPU was built without the sm_90a kernel"
    monkeypatch.setenv(SM90_ENV, "1")
    return ext


MODES = ["simclr", "clip", "dcl", "moco", "bank+batch", "uniformity"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,d", [(1, 8), (127, 64), (300, 200), (513, 136), (1000, 512)])
def test_sm90_forward_matches_oracle(sm90_extension, dtype, mode, m, d):
    from tests.backends.test_pairwise_lse import make_case, run_both
    from tests.utils import assert_close

    if mode == "dcl" and m == 1:
        pytest.skip("DCL over one row has no negatives")
    x, y, bank, scale, flags = make_case(mode, m, d, dtype, device="cuda")
    assert sm90_extension.pairwise_lse_sm90_supported(x, y, bank), "these inputs should take the sm_90a forward"
    assert sm90_extension.pairwise_lse_sm90_supported(x, y, bank, rows=True) == (d <= 256), "the dx kernel: D <= 256"
    got, want = run_both("cuda", x, y, bank, scale, flags)
    for name, a, b in zip(("lse", "pos", "dx", "dy", "dscale"), got, want):
        if b is not None:
            assert_close(a, b, dtype, what=f"sm90/{mode} {name} at M={m}, D={d}", scale=10.0)


@pytest.mark.cuda
def test_sm90_takes_only_what_tma_can_read(sm90_extension):
    from fastssl.kernels import PairwiseLSEFlags
    from fastssl.kernels.cuda.pairwise_lse import pairwise_lse_forward

    supported = sm90_extension.pairwise_lse_sm90_supported
    x = torch.randn(300, 264, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(200, 264, device="cuda", dtype=torch.bfloat16)
    assert supported(x, y, None)
    assert not supported(x.float(), y.float(), None)  # fp32: the 3xTF32 kernel
    assert not supported(x.T.contiguous().T, y, None)  # column-major rows
    assert not supported(x[:, 1:], y[:, 1:], None)  # base 2 bytes off 16-byte alignment
    assert supported(x[:, :260], y[:, :260], None)  # a column slice: the row stride (528 bytes) stays aligned
    d300 = torch.randn(64, 300, device="cuda", dtype=torch.bfloat16)
    assert not supported(d300, d300, None)  # row stride 600 bytes
    wide = torch.randn(64, 520, device="cuda", dtype=torch.bfloat16)
    assert not supported(wide, wide, None)  # D > 512
    assert not supported(x, y, None, rows=True)  # the dx kernel keeps x resident for D <= 256 only
    assert supported(x[:, :256], y[:, :256], None, rows=True)
    # What it does not take runs the default kernel: the very same numbers.
    scale = torch.tensor(2.0, device="cuda")
    flags = PairwiseLSEFlags(pos_offset=7)
    xs = x.T.contiguous().T
    with_sm90 = pairwise_lse_forward(xs, y, None, scale, flags)
    default = sm90_extension.pairwise_lse_forward(xs, y, None, scale, 7, False, True, True)
    for a, b in zip(with_sm90, default):
        assert torch.equal(a, b)
