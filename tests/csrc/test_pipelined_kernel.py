"""csrc/pairwise_lse_pipelined.cu, the pipelined sm_80+ pairwise-LSE forward and backward: the CPU proofs and the GPU checks.

CPU (nvcc, no GPU): the file compiles for sm_80 and sm_90 with no register spills and no stack frame in
any of its kernels (forward, dx, dy and the symmetric x = y backward, bf16 and fp16); its SASS holds what it was written for: LDGSTS
(cp.async, 16 bytes, zero fill), LDSM.16.M88.4 and LDSM.16.MT88.4 (ldmatrix .x4 and .x4.trans), HMMA
m16n8k16 for bf16 and fp16, no shared-memory store (every tile comes from cp.async) and no other
shared-memory load (every fragment comes from ldmatrix; the dy and symmetric kernels read their column
statistics); prebuild and the JIT loader build it for both archs; the launcher
takes it only with FASTSSL_CUDA_PIPELINE=1 on sm_80+ (FASTSSL_CUDA_SM90=1 wins on sm_90).
tests/csrc/test_pipelined_layout.py emulates its ldmatrix maps, shared-memory layout and cp.async ring.

GPU (`cuda` marker, sm_80+): the kernels are taken exactly for the inputs they can read, and (lse, pos)
and the gradients (dx and dy by the pipelined kernels, one symmetric launch when y is x) match the float64 oracle for
every mode, ragged tiles, the bank and D up to 256; tests/csrc/test_cuda_backend.py runs its whole
pairwise-LSE parametrisation under the variable too.
"""

from __future__ import annotations

import re
import types

import pytest
import torch

from fastssl.kernels.cuda import _ext
from fastssl.kernels.cuda._ext import PIPELINE_ENV, SM90_ENV, launcher
from tests.csrc import _nvcc

CSRC = _ext.CSRC
SOURCE = CSRC / "pairwise_lse_pipelined.cu"


@pytest.fixture(scope="module", params=["80", "90"])
def build(request, tmp_path_factory):
    """(arch, ptxas -v report, object path) of one nvcc call compiling the file for sm_<arch>."""
    arch = request.param
    out = tmp_path_factory.mktemp(f"pipelined{arch}") / "pairwise_lse_pipelined.o"
    return arch, _nvcc.compile_objects([SOURCE], _ext.gencode_flag(arch), out.parent, out), out


@pytest.mark.slow  # nvcc
def test_compiles_without_spills_or_stack_frame(build):
    arch, report, _ = build
    kernels = re.findall(rf"Compiling entry function '([^']+)' for 'sm_{arch}'", report)
    # kFwd (Li0E), kRows (Li1E), kCols (Li2E) and kSym (Li3E), each for bf16 and fp16
    roles = sorted(re.search(r"pairwise_lse_pipe_kernelI\w+?(Li\dE)", k).group(1) for k in kernels)
    assert roles == ["Li0E"] * 2 + ["Li1E"] * 2 + ["Li2E"] * 2 + ["Li3E"] * 2, kernels
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) == len(kernels), report
    assert all(f == ("0", "0", "0") for f in frames), f"sm_{arch}: stack frame or spills (frame, stores, loads): {frames}"


@pytest.mark.slow  # nvcc
def test_sass_uses_cp_async_ldmatrix_and_tensor_cores(build):
    arch, _, obj = build
    sass = _nvcc.sass(obj)
    assert re.search(r"\bLDGSTS\.E\.BYPASS\.128\.ZFILL\b", sass), f"sm_{arch}: no 16-byte cp.async.cg (LDGSTS)"
    assert re.search(r"\bLDGDEPBAR\b", sass) and re.search(r"\bDEPBAR\.LE SB0, 0x1\b", sass), (
        f"sm_{arch}: no cp.async commit_group / wait_group 1 (LDGDEPBAR, DEPBAR.LE)")
    assert re.search(r"\bLDSM\.16\.M88\.4\b", sass), f"sm_{arch}: no ldmatrix .x4 (LDSM.16.M88.4)"
    assert re.search(r"\bLDSM\.16\.MT88\.4\b", sass), f"sm_{arch}: no ldmatrix .x4.trans (LDSM.16.MT88.4)"
    assert re.search(r"\bHMMA\.16816\.F32\.BF16\b", sass), f"sm_{arch}: no bf16 m16n8k16 HMMA"
    assert re.search(r"\bHMMA\.16816\.F32 ", sass), f"sm_{arch}: no fp16 m16n8k16 HMMA"
    # Any other shared-memory access would be a fragment or tile load that bypasses ldmatrix / cp.async
    # (`@!PT LDS RZ, [RZ]` is ptxas's never-executed filler after LDGSTS); the dy and symmetric kernels
    # (Li2E, Li3E) also read their column statistics (lse, grad_lse of the streamed rows) with LDS.
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    assert len(functions) == 8, f"sm_{arch}: {len(functions)} functions in the SASS"
    for body in functions:
        name = body.split()[0]
        shared = [ln.strip() for ln in body.splitlines() if re.search(r"\b(LDS|STS)(\.[\w.]+)?\s", ln)
                  and "@!PT LDS RZ, [RZ]" not in ln]  # fmt: skip
        if "Li2E" in name or "Li3E" in name:
            shared = [ln for ln in shared if "STS" in ln]
        assert not shared, f"sm_{arch} {name}: shared-memory accesses besides ldmatrix and cp.async: {shared[:5]}"


def test_built_for_both_archs_like_the_portable_sources():
    name = SOURCE.name
    assert name in _ext.SOURCES and name not in _ext.ARCH_SPECIFIC_SOURCES
    assert name in _ext.kernel_sources_for("80") and name in _ext.kernel_sources_for("90")
    assert _ext.bindings_defines([name]) == []  # always linked: bindings.cpp exposes it unconditionally


@pytest.mark.parametrize("name", ["pairwise_lse_forward", "pairwise_lse_backward"])
def test_selection_is_opt_in_and_sm80_plus(monkeypatch, name):
    ext = types.SimpleNamespace(**{name: "default", f"{name}_sm90": "sm90", f"{name}_pipelined": "pipelined"})
    monkeypatch.delenv(SM90_ENV, raising=False)
    monkeypatch.delenv(PIPELINE_ENV, raising=False)
    for cap in [(8, 0), (8, 6), (9, 0)]:
        assert launcher(ext, cap, name) == "default"
    monkeypatch.setenv(PIPELINE_ENV, "0")
    assert launcher(ext, (8, 0), name) == "default"
    monkeypatch.setenv(PIPELINE_ENV, "1")
    for cap in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0)]:
        assert launcher(ext, cap, name) == "pipelined", cap
    assert launcher(ext, (7, 5), name) == "default"  # cp.async and ldmatrix .x4 need sm_80
    # An op without a pipelined variant (the Frobenius forward, cuBLAS by default) keeps its route.
    assert launcher(types.SimpleNamespace(), (8, 0), "sq_frobenius_forward") is None
    monkeypatch.setenv(SM90_ENV, "1")  # both asked for: the Hopper kernels on sm_90, the pipelined elsewhere
    assert launcher(ext, (9, 0), name) == "sm90"
    assert launcher(ext, (8, 0), name) == "pipelined"


def test_adapter_and_bindings_agree_on_the_names():
    defined = set(re.findall(r'm\.def\("(\w+)"', (CSRC / "bindings.cpp").read_text()))
    for name in ("pairwise_lse_forward", "pairwise_lse_backward"):
        assert f"{name}_pipelined" in defined
    assert "pairwise_lse_pipelined_supported" in defined


# ------------------------------------------------------------------------------------------------
# GPU layer (sm_80 and later)


@pytest.fixture
def pipelined_extension(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip(f"cp.async and ldmatrix need sm_80 or later; this GPU is sm_{major}{minor}")
    monkeypatch.delenv(SM90_ENV, raising=False)
    monkeypatch.setenv(PIPELINE_ENV, "1")
    return _ext.extension()


MODES = ["simclr", "clip", "dcl", "moco", "bank+batch", "uniformity"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,d", [(1, 8), (127, 64), (129, 40), (300, 200), (513, 136), (1000, 256)])
def test_pipelined_matches_oracle(pipelined_extension, dtype, mode, m, d):
    from tests.backends.test_pairwise_lse import make_case, run_both
    from tests.utils import assert_close

    if mode == "dcl" and m == 1:
        pytest.skip("DCL over one row has no negatives")
    x, y, bank, scale, flags = make_case(mode, m, d, dtype, device="cuda")
    assert pipelined_extension.pairwise_lse_pipelined_supported(x, y, bank), "these inputs should take the pipelined kernels"
    got, want = run_both("cuda", x, y, bank, scale, flags)
    for name, a, b in zip(("lse", "pos", "dx", "dy", "dscale"), got, want):
        if b is not None:
            assert_close(a, b, dtype, what=f"pipelined/{mode} {name} at M={m}, D={d}", scale=10.0)


@pytest.mark.cuda
def test_pipelined_takes_only_what_it_can_read(pipelined_extension):
    from fastssl.kernels import PairwiseLSEFlags
    from fastssl.kernels.cuda.pairwise_lse import pairwise_lse_forward

    supported = pipelined_extension.pairwise_lse_pipelined_supported
    x = torch.randn(300, 136, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(200, 136, device="cuda", dtype=torch.bfloat16)
    assert supported(x, y, None)
    assert not supported(x.float(), y.float(), None)  # fp32: the 3xTF32 kernel
    assert not supported(x.T.contiguous().T, y, None)  # column-major rows
    assert not supported(x[:, 1:], y[:, 1:], None)  # base 2 bytes off 16-byte alignment
    assert supported(x[:, :130], y[:, :130], None)  # a column slice: the row stride (272 bytes) stays aligned
    d70 = torch.randn(64, 70, device="cuda", dtype=torch.bfloat16)
    assert not supported(d70, d70, None)  # row stride 140 bytes
    wide = torch.randn(64, 264, device="cuda", dtype=torch.bfloat16)
    assert not supported(wide, wide, None)  # D > 256: the own tile would not stay resident
    assert not supported(x, y, wide[:, :136].T.contiguous().T)  # a bank it cannot read
    # What it does not take runs the default kernel: the very same numbers.
    scale = torch.tensor(2.0, device="cuda")
    flags = PairwiseLSEFlags(pos_offset=7)
    xs = x.T.contiguous().T
    with_pipeline = pairwise_lse_forward(xs, y, None, scale, flags)
    default = pipelined_extension.pairwise_lse_forward(xs, y, None, scale, 7, False, True, True)
    for a, b in zip(with_pipeline, default):
        assert torch.equal(a, b)
