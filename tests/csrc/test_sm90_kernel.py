"""csrc/pairwise_lse_sm90.cu, the Hopper (sm_90a) pairwise-LSE forward and backward: the CPU proofs and the GPU checks.

CPU (nvcc, no GPU): the file compiles for sm_90a alone with no register spills or stack frame in
any kernel (forward, dx, dy and the symmetric x = y backward, bf16 and fp16) and no wgmma serialisation; its SASS holds the
instructions it was written for, HGMMA (wgmma), UTMALDG (TMA tensor loads), SYNCS (mbarrier) and
USETMAXREG (the register split); compiled for plain sm_90 it stops with its own #error; its object reaches the driver only through the runtime (no libcuda
symbol); prebuild and the JIT loader build it for arch 90 only, as sm_90a, and leave the sm_80 build
as it was; the forward takes it only on sm_90 with FASTSSL_CUDA_SM90=1.

GPU (`cuda` marker, sm_90 only): the kernel is taken exactly for the inputs TMA can read, and its
(lse, pos) and the gradients (dx and dy by the sm_90a kernels for D <= 256, one symmetric launch when
y is x) match the float64 oracle for every mode, ragged tiles, the bank and D up to 512; fp16 dy keeps
tiny column weights (the max|grad_lse| rescaling), in the dy and the symmetric kernel. tests/csrc/test_sm90_layout.py emulates its data layouts and pipeline on the CPU.
"""

from __future__ import annotations

import re
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch

from fastssl.kernels.cuda import _ext, prebuild
from fastssl.kernels.cuda._ext import SM90_ENV, launcher
from tests.csrc import _nvcc

CSRC = _ext.CSRC
SOURCE = CSRC / "pairwise_lse_sm90.cu"
SM90A = "-gencode=arch=compute_90a,code=sm_90a"


@pytest.fixture(scope="module")
def sm90a_build(tmp_path_factory):
    """(ptxas -v report, object path) of one nvcc call compiling pairwise_lse_sm90.cu for sm_90a."""
    out = tmp_path_factory.mktemp("sm90a") / "pairwise_lse_sm90.o"
    return _nvcc.compile_objects([SOURCE], SM90A, out.parent, out), out


@pytest.mark.slow  # nvcc
def test_compiles_for_sm90a_without_spills(sm90a_build):
    report, _ = sm90a_build
    kernels = re.findall(r"Compiling entry function '([^']+)' for 'sm_90a'", report)
    # kFwd (Li0E), kRows (Li1E), kCols (Li2E) and kSym (Li3E), each for bf16 and fp16
    assert sorted(re.search(r"pairwise_lse_sm90_kernelI\w+?(Li\dE)", k).group(1) for k in kernels) == ["Li0E"] * 2 + [
        "Li1E"] * 2 + ["Li2E"] * 2 + ["Li3E"] * 2, kernels  # fmt: skip
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) == len(kernels) and frames, report
    assert all(f == ("0", "0", "0") for f in frames), f"stack frame or spills (frame, stores, loads): {frames}"
    assert "serialized" not in report, f"ptxas serialises the wgmma:\n{report}"
    assert "injected" not in report, f"ptxas injects a wgmma wait (C7517):\n{report}"


@pytest.mark.slow  # nvcc
def test_sass_uses_wgmma_tma_and_mbarriers(sm90a_build):
    _, obj = sm90a_build
    sass = _nvcc.sass(obj)
    assert len(re.findall(r"\bHGMMA\.64x128x16\.F32\.BF16\b", sass)) >= 4, "no bf16 wgmma m64n128k16 in the SASS"
    assert len(re.findall(r"\bHGMMA\.64x128x16\.F32\b(?!\.)", sass)) >= 4, "no fp16 wgmma m64n128k16 in the SASS"
    assert re.search(r"\bUTMALDG\.2D\b", sass), "no TMA tensor load (UTMALDG) in the SASS"
    assert re.search(r"\bSYNCS\.ARRIVE\.TRANS64", sass), "no mbarrier arrive (SYNCS.ARRIVE) in the SASS"
    assert re.search(r"\bSYNCS\.PHASECHK\.TRANS64\.TRYWAIT\b", sass), "no mbarrier try_wait in the SASS"
    assert re.search(r"\bUSETMAXREG\b", sass), "no setmaxnreg register split in the SASS"
    # The fallback kernel's instructions are not in this file: the tensor cores are reached by wgmma only.
    assert not re.search(r"\bHMMA\.", sass), "mma.sync (HMMA) in the sm_90a kernel"


@pytest.mark.slow  # nvcc
def test_sass_of_each_kernel(sm90a_build):
    """Per kernel: wgmma, TMA loads and mbarrier waits of its own; dy (kCols, Li2E) and x = y (kSym,
    Li3E) also wait on their warpgroup's named barrier (the column statistics: 128 threads); kSym's
    wgmma is m64n64k16 only, from shared memory (the logit halves) and with A in registers (the slice,
    transposed B), the other roles' m64n128k16 only."""
    _, obj = sm90a_build
    sections = re.split(r"\n\s*Function : ", _nvcc.sass(obj))[1:]
    kernels = {re.search(r"kernelI(\w+?)Li(\d)E", sec.split("\n", 1)[0]).groups(): sec for sec in sections}
    assert len(kernels) == 8, sorted(kernels)
    for (dtype, kind), code in kernels.items():
        name = f"{dtype} kind {kind}"
        assert re.search(r"\bUTMALDG\.2D\b", code) and "SYNCS.PHASECHK.TRANS64.TRYWAIT" in code, name
        named = re.search(r"\bBAR\.SYNC(\.DEFER_BLOCKING)? R\d+, 0x80\b", code)
        assert bool(named) == (kind in ("2", "3")), f"{name}: named barrier {named}"
        n64 = re.findall(r"\bHGMMA\.64x64x16\.F32\S* R\d+, (gdesc|R\d+)", code)
        n128 = re.findall(r"\bHGMMA\.64x128x16\.F32\S* R\d+, (gdesc|R\d+)", code)
        if kind == "3":
            assert not n128 and "gdesc" in n64 and any(a.startswith("R") for a in n64), f"{name}: {n64}"
        else:
            assert not n64 and n128, name
            assert any(a.startswith("R") for a in n128) == (kind != "0"), f"{name}: register-A wgmma"


def overlapped_issues(code: str) -> int:
    """How many HGMMA issues of a kernel's SASS are followed, in program order, by exp2 (MUFU.EX2) before
    any full wgmma wait (WARPGROUP.DEPBAR.LE gsb0, 0x0): exp2s that run while a GEMM is in flight."""
    events = re.findall(r"\b(HGMMA)\.|\b(MUFU\.EX2)\b|\bWARPGROUP\.DEPBAR\.LE gsb0, (0x0)\b", code)
    count, pending = 0, False
    for hgmma, ex2, wait_all in events:
        if hgmma:
            pending = True
        elif wait_all:
            pending = False
        elif ex2 and pending:
            count, pending = count + 1, False
    return count


def test_overlap_marker_reads_program_order():
    overlapped = "HGMMA.64x128x16.F32.BF16 R24\nMUFU.EX2 R1, R2 ;\nWARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n"
    serial = "HGMMA.64x128x16.F32.BF16 R24\nWARPGROUP.DEPBAR.LE gsb0, 0x1 ;\nWARPGROUP.DEPBAR.LE gsb0, 0x0 ;\nMUFU.EX2 R1"
    assert overlapped_issues(overlapped) == 1 and overlapped_issues(serial) == 0
    assert overlapped_issues(overlapped * 2) == 2


@pytest.mark.slow  # nvcc
def test_sass_overlaps_softmax_with_a_running_gemm(sm90a_build):
    """FlashAttention-3's intra-warpgroup overlap. The forward (kFwd, Li0E): in both halves of its
    loop (the two accumulators' roles) the next tile's HGMMAs are issued before the exp2s of the
    softmax, with no full wait between; the wait of depth kStages − 1 = 3 lets D > 256 refill its ring.
    dx and dy (Li1E, Li2E): P·V_t's HGMMAs (A in registers) are followed by the exp2s of tile t + 1's
    weights before the full wait, after a wait of depth 1 (tile t + 1's logits retired). kSym (Li3E)
    keeps the serial order: 0. Built from the pre-overlap kernel every kernel has 0 such issues."""
    _, obj = sm90a_build
    sections = re.split(r"\n\s*Function : ", _nvcc.sass(obj))[1:]
    kernels = {re.search(r"kernelI(\w+?)Li(\d)E", sec.split("\n", 1)[0]).groups(): sec for sec in sections}
    for (dtype, kind), code in kernels.items():
        if kind == "0":
            assert overlapped_issues(code) >= 2, f"{dtype} forward: softmax not overlapped with the next GEMM"
            assert re.search(r"\bWARPGROUP\.DEPBAR\.LE gsb0, 0x3\b", code), f"{dtype} forward: no wait_group 3"
        elif kind in ("1", "2"):
            assert overlapped_issues(code) >= 1, f"{dtype} kind {kind}: weights not overlapped with P·V"
            assert re.search(r"\bWARPGROUP\.DEPBAR\.LE gsb0, 0x1\b", code), f"{dtype} kind {kind}: no wait_group 1"
        else:
            assert overlapped_issues(code) == 0, f"{dtype} kind {kind}"


@pytest.mark.slow  # nvcc
def test_plain_sm90_is_refused(tmp_path):
    """Without the arch-specific target nvcc stops at the file's #error (not at an obscure ptxas error)."""
    message = _nvcc.compile_error(SOURCE, "-gencode=arch=compute_90,code=sm_90", tmp_path / "x.o")
    assert "compile it with -gencode=arch=compute_90a,code=sm_90a only" in message, message[-2000:]


@pytest.mark.slow  # nvcc
def test_object_reaches_the_driver_through_the_runtime(sm90a_build):
    """cuTensorMapEncodeTiled comes from cudaGetDriverEntryPoint*: the object links no libcuda symbol,
    and defines the launchers bindings.cpp calls."""
    _, obj = sm90a_build
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\bcu[A-Z]\w*", undefined), f"driver API symbols linked directly: {undefined}"
    assert "cudaGetDriverEntryPoint" in undefined
    defined = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    for symbol in ("pairwise_lse_forward_sm90", "pairwise_lse_sm90_supported", "pairwise_lse_backward_rows_sm90",
                   "pairwise_lse_rows_sm90_supported", "pairwise_lse_backward_cols_sm90",
                   "pairwise_lse_cols_sm90_supported", "pairwise_lse_backward_sym_sm90",
                   "pairwise_lse_sym_sm90_supported"):  # fmt: skip
        assert f"T fastssl::{symbol}(" in defined, symbol


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
@pytest.mark.skipif(_nvcc.NVCC is None, reason=_nvcc.NO_NVCC)
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
    assert sm90_extension.pairwise_lse_sm90_supported(x, y, bank, role="rows") == (d <= 256), "the dx kernel: D <= 256"
    assert sm90_extension.pairwise_lse_sm90_supported(x, y, bank, role="cols") == (d <= 256), "the dy kernel: D <= 256"
    symmetric = x is y and flags.y_negatives and bank is None
    assert sm90_extension.pairwise_lse_sm90_supported(x, y, bank, role="sym") == (symmetric and d <= 256)
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
    assert not supported(x, y, None, role="rows")  # the dx kernel keeps x resident for D <= 256 only
    assert supported(x[:, :256], y[:, :256], None, role="rows")
    assert not supported(x, y, None, role="cols")  # the dy kernel keeps y resident for D <= 256 only
    assert supported(x[:, :256], y[:, :256], None, role="cols")
    assert not supported(x[:, :256].T.contiguous().T, y[:, :256], None, role="cols")  # it streams x through TMA
    bank = torch.randn(50, 256, device="cuda", dtype=torch.bfloat16).T.contiguous().T
    assert supported(x[:, :256], y[:, :256], bank, role="cols")  # dy never reads the bank
    assert not supported(x[:, :256], y[:, :256], bank, role="rows")
    z = x[:, :256]
    assert supported(z, z, None, role="sym") and not supported(z, z.clone(), None, role="sym")  # y must be x
    assert not supported(z, z, bank, role="sym") and not supported(x, x, None, role="sym")  # no bank; D <= 256
    with pytest.raises(ValueError, match="role"):
        supported(z, z, None, role="dx")
    # What it does not take runs the default kernel: the very same numbers.
    scale = torch.tensor(2.0, device="cuda")
    flags = PairwiseLSEFlags(pos_offset=7)
    xs = x.T.contiguous().T
    with_sm90 = pairwise_lse_forward(xs, y, None, scale, flags)
    default = sm90_extension.pairwise_lse_forward(xs, y, None, scale, 7, False, True, True)
    for a, b in zip(with_sm90, default):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["clip", "bank+batch", "uniformity", "simclr", "dcl"])
def test_sm90_dy_keeps_tiny_fp16_weights(sm90_extension, mode):
    """grad_lse ~ 1e-3: the column weights grad_lse_i·P_ij (~1e-6) are fp16 subnormals unless the dy
    kernel (simclr, dcl: the symmetric one) divides them by max|grad_lse| before rounding them for the
    tensor cores and multiplies the accumulator back. dy (~1e-3) is compared relative to its size, as
    the sigmoid kernels' test does; with y = x the oracle's dy is the y side of a two-tensor run."""
    from fastssl.kernels.cuda.pairwise_lse import pairwise_lse_backward, pairwise_lse_forward
    from tests.backends.test_pairwise_lse import dense_oracle, make_case

    m = 300
    x, y, bank, scale, flags = make_case(mode, m, 128, torch.float16, device="cuda")
    role = "sym" if x is y else "cols"
    assert sm90_extension.pairwise_lse_sm90_supported(x, y, bank, role=role), f"these inputs should take {role}"
    gen = torch.Generator().manual_seed(3)
    g_lse = 1e-3 * torch.randn(m, generator=gen, dtype=torch.float64)
    g_pos = torch.zeros(m, dtype=torch.float64)
    lse, _ = pairwise_lse_forward(x, y, bank, scale, flags)
    _, dy = pairwise_lse_backward(x, y, bank, scale, lse, g_lse.float().cuda(), g_pos.float().cuda(), flags)
    yr = y.double().cpu().requires_grad_()
    lse64, pos64 = dense_oracle(x.double().cpu(), yr, None if bank is None else bank.double().cpu(),
                                scale.double().cpu(), flags)  # fmt: skip
    ((lse64 * g_lse).sum() + (pos64 * g_pos).sum()).backward()
    rel = float((dy.double().cpu() - yr.grad).norm() / yr.grad.norm())
    assert rel < 5e-3, f"fp16 dy with tiny weights ({mode}): relative error {rel:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["simclr", "dcl"])
@pytest.mark.parametrize("m,d", [(1, 8), (127, 64), (300, 200), (513, 256)])
def test_sm90_symmetric_matches_oracle_per_side(sm90_extension, dtype, mode, m, d):
    """The symmetric launch's dx and dy separately (the op adds them): each against the float64 oracle's
    x side and y side of the same loss over two tensors, ragged tiles and both 64-wide slices."""
    from fastssl.kernels.cuda.pairwise_lse import pairwise_lse_backward, pairwise_lse_forward
    from tests.backends.test_pairwise_lse import dense_oracle, make_case
    from tests.utils import assert_close

    if mode == "dcl" and m == 1:
        pytest.skip("DCL over one row has no negatives")
    x, _, _, scale, flags = make_case(mode, m, d, dtype, device="cuda")
    assert sm90_extension.pairwise_lse_sm90_supported(x, x, None, role="sym")
    gen = torch.Generator().manual_seed(5)
    g_lse = torch.randn(m, generator=gen, dtype=torch.float64)
    g_pos = torch.randn(m, generator=gen, dtype=torch.float64)
    lse, _ = pairwise_lse_forward(x, x, None, scale, flags)
    dx, dy = pairwise_lse_backward(x, x, None, scale, lse, g_lse.float().cuda(), g_pos.float().cuda(), flags)
    xr, yr = x.double().cpu().requires_grad_(), x.double().cpu().requires_grad_()
    lse64, pos64 = dense_oracle(xr, yr, None, scale.double().cpu(), flags)
    ((lse64 * g_lse).sum() + (pos64 * g_pos).sum()).backward()
    assert_close(dx, xr.grad, dtype, what=f"sm90 sym/{mode} dx at M={m}, D={d}", scale=10.0)
    assert_close(dy, yr.grad, dtype, what=f"sm90 sym/{mode} dy at M={m}, D={d}", scale=10.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ny", [100, 200, 300])
@pytest.mark.parametrize("d", [64, 200, 320, 512])
@pytest.mark.parametrize("bank_rows", [0, 70])
def test_sm90_forward_overlap_prologue_and_epilogue(sm90_extension, dtype, ny, d, bank_rows):
    """The forward's overlapped loop over 1, 2 and 3 column tiles of y (and one more of the bank): its
    prologue (tile 0 alone), both halves of its unrolled loop and both exits, with 1 to 8 chunks (D > 256
    waits inside the issue for the ring); M = 130 leaves the second CTA 2 rows and its second consumer
    none. Against the float64 oracle, exclude_self and the positive at every column tile."""
    from fastssl.kernels import PairwiseLSEFlags
    from fastssl.kernels.cuda.pairwise_lse import pairwise_lse_forward
    from tests.backends.test_pairwise_lse import dense_oracle
    from tests.utils import assert_close

    gen = torch.Generator().manual_seed(ny + d + bank_rows)

    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to("cuda", dtype)

    x, y = unit(130), unit(ny)
    bank = unit(bank_rows) if bank_rows else None
    scale = torch.tensor(1.0 / 0.3, device="cuda")
    flags = PairwiseLSEFlags(pos_offset=97 % ny, exclude_self=True, include_pos=True, y_negatives=True)
    assert sm90_extension.pairwise_lse_sm90_supported(x, y, bank), "these inputs should take the sm_90a forward"
    lse, pos = pairwise_lse_forward(x, y, bank, scale, flags)
    want_lse, want_pos = dense_oracle(x.double().cpu(), y.double().cpu(), None if bank is None else bank.double().cpu(),
                                      scale.double().cpu(), flags)  # fmt: skip
    what = f"sm90 forward, Ny={ny}, D={d}, bank={bank_rows}"
    assert_close(lse, want_lse, dtype, what=f"{what}: lse", scale=10.0)
    assert_close(pos, want_pos, dtype, what=f"{what}: pos", scale=10.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,ny", [(130, 100), (130, 200), (130, 300), (100, 130), (300, 130)])
@pytest.mark.parametrize("d", [64, 136, 256])
@pytest.mark.parametrize("bank_rows", [0, 70])
def test_sm90_backward_overlap_prologue_and_epilogue(sm90_extension, dtype, m, ny, d, bank_rows):
    """dx's and dy's overlapped loop (tile t + 1's logits and P·V_t in flight together) over 1, 2 and 3
    streamed tiles each (dx streams y and the bank, dy streams x), 1 to 4 chunks, against the float64
    oracle's gradients under a random cotangent."""
    from fastssl.kernels import PairwiseLSEFlags
    from fastssl.kernels.cuda.pairwise_lse import pairwise_lse_backward, pairwise_lse_forward
    from tests.backends.test_pairwise_lse import dense_oracle
    from tests.utils import assert_close

    gen = torch.Generator().manual_seed(m + ny + d + bank_rows)

    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to("cuda", dtype)

    x, y = unit(m), unit(ny)
    bank = unit(bank_rows) if bank_rows else None
    scale = torch.tensor(1.0 / 0.3, device="cuda")
    flags = PairwiseLSEFlags(pos_offset=97 % ny, exclude_self=True, include_pos=True, y_negatives=True)
    for role in ("rows", "cols"):
        assert sm90_extension.pairwise_lse_sm90_supported(x, y, bank, role=role), f"these inputs should take {role}"
    g_lse = torch.randn(m, generator=gen, dtype=torch.float64)
    g_pos = torch.randn(m, generator=gen, dtype=torch.float64)
    lse, _ = pairwise_lse_forward(x, y, bank, scale, flags)
    dx, dy = pairwise_lse_backward(x, y, bank, scale, lse, g_lse.float().cuda(), g_pos.float().cuda(), flags)
    xr, yr = x.double().cpu().requires_grad_(), y.double().cpu().requires_grad_()
    lse64, pos64 = dense_oracle(xr, yr, None if bank is None else bank.double().cpu(), scale.double().cpu(), flags)
    ((lse64 * g_lse).sum() + (pos64 * g_pos).sum()).backward()
    what = f"sm90 backward, M={m}, Ny={ny}, D={d}, bank={bank_rows}"
    assert_close(dx, xr.grad, dtype, what=f"{what}: dx", scale=10.0)
    assert_close(dy, yr.grad, dtype, what=f"{what}: dy", scale=10.0)
