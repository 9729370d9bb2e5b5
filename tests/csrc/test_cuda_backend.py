"""The hand-written CUDA backend (csrc/, `fastssl._C`): what the CPU can check, and the GPU layer.

CPU (docs/design.md layer 4): every csrc/*.cu compiles with plain nvcc for sm_80 and sm_90 (one nvcc
call per architecture, nothing cached in the repository) and `ptxas -v` reports no register spills
in any kernel; the .cu/.cuh/.h files include no torch header; the bindings compile (syntax only)
against the installed torch headers; `backend="cuda"` where it cannot run raises a ValueError
that says why, and `auto` never picks it on the CPU.

GPU (`@pytest.mark.cuda`, docs/design.md layer 5): the cuda backend against the float64 dense oracle
(values, dx, dy, d scale) for every mask/flag combination, fp32/bf16/fp16, odd shapes, strided
inputs, the symmetric x = y backward against the two-kernel path, the losses against the spec, and
the Frobenius op and column statistics.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import fastssl
from fastssl.backends import available_backends, cuda_extension_usable, resolve_backend
from fastssl.kernels.cuda._ext import ARCH_SPECIFIC_SOURCES, PIPELINE_ENV, SM90_ENV
from tests.csrc import _nvcc
from tests.utils import assert_close

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
#: The portable kernel sources (every arch); the arch-specific ones (sm_90a) are tests/csrc/test_sm90_kernel.py's.
CU_FILES = sorted(p for p in CSRC.glob("*.cu") if p.name not in ARCH_SPECIFIC_SOURCES)

#: Kernels ptxas must see per architecture: the pairwise-LSE template (3 dtypes x fwd/rows/cols,
#: plus the symmetric backward for bf16 and fp16) and the Frobenius helpers.
EXPECTED_PAIRWISE_KERNELS = 11
#: The pipelined pairwise-LSE kernels (pairwise_lse_pipelined.cu): bf16 and fp16 x forward, dx, dy, symmetric.
EXPECTED_PIPELINED_KERNELS = 8


@pytest.fixture(scope="module", params=["80", "90"])
def ptxas_report(request, tmp_path_factory):
    """(arch, [(kernel, spill_stores, spill_loads, stack_frame)]) from one nvcc call compiling every .cu for sm_<arch>."""
    arch = request.param
    out = tmp_path_factory.mktemp(f"sm{arch}")
    report = _nvcc.compile_objects(CU_FILES, f"-gencode=arch=compute_{arch},code=sm_{arch}", out)
    return arch, _nvcc.ptxas_kernels(report)


def test_cu_files_compile_without_spills(ptxas_report):
    arch, kernels = ptxas_report
    names = [k[0] for k in kernels]
    pairwise = [k for k in names if "pairwise_lse_kernel" in k]
    assert len(pairwise) == EXPECTED_PAIRWISE_KERNELS, f"sm_{arch}: pairwise-LSE kernels seen by ptxas: {pairwise}"
    pipelined = [(k, frame) for k, _, _, frame in kernels if "pairwise_lse_pipe_kernel" in k]
    assert len(pipelined) == EXPECTED_PIPELINED_KERNELS, f"sm_{arch}: pipelined kernels seen by ptxas: {pipelined}"
    assert all(frame == 0 for _, frame in pipelined), f"sm_{arch}: stack frame in a pipelined kernel: {pipelined}"
    for helper in ("affine_columns", "sum_product_partial_kernel", "column_stats_partial_kernel", "worst_pair_kernel"):
        assert any(helper in k for k in names), f"sm_{arch}: no {helper} kernel in {names}"
    spilling = [(k, st, ld) for k, st, ld, _ in kernels if st or ld]
    assert not spilling, f"sm_{arch}: register spills (kernel, store bytes, load bytes): {spilling}"


def test_cu_uses_tensor_cores():
    """The pairwise-LSE kernels issue mma.sync for bf16, fp16 and tf32 (PTX of the sm_90 build)."""
    proc = subprocess.run([_nvcc.require_nvcc(), "-std=c++17", "-O1", "--ptx", "-arch=sm_90", f"-I{CSRC}",
                           str(CSRC / "pairwise_lse.cu"), "-o", "-"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for shape in ("m16n8k16.row.col.f32.bf16.bf16.f32", "m16n8k16.row.col.f32.f16.f16.f32",
                  "m16n8k8.row.col.f32.tf32.tf32.f32"):  # fmt: skip
        assert f"mma.sync.aligned.{shape}" in proc.stdout, f"no mma.sync {shape} in the PTX"


def test_kernel_sources_include_no_torch():
    for path in [*CU_FILES, *CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        includes = re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", path.read_text())
        bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
        assert not bad, f"{path.name} includes torch/pybind11 headers {bad}; only bindings.cpp may"


@pytest.mark.parametrize("defines", [[], ["-DFASTSSL_WITH_SM90"]], ids=["portable", "with-sm90"])
def test_bindings_compile_against_installed_torch_headers(tmp_path, defines):
    """Syntax check of csrc/bindings.cpp with g++ (a CPU-only torch ships the c10/cuda headers but
    not the CMake-generated c10/cuda/impl/cuda_cmake_macros.h, which a one-line shim stands in for),
    without and with the block of the sm_90a forward (compiled when pairwise_lse_sm90.cu is linked)."""
    from torch.utils.cpp_extension import include_paths

    gxx = shutil.which("g++")
    if gxx is None or _nvcc.NVCC is None:
        pytest.skip("g++ and nvcc (for cuda_runtime.h) are needed for the bindings syntax check")
    homes = [os.environ.get("CUDA_HOME", ""), str(Path(_nvcc.NVCC).resolve().parents[1]), "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").is_file()]
    if not found:
        pytest.skip(f"cuda_runtime.h not found under any of {homes}")
    cuda_include = found[0]
    torch_includes = [Path(p) for p in include_paths()]
    shim = []
    if not any((p / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in torch_includes):
        (tmp_path / "c10/cuda/impl").mkdir(parents=True)
        (tmp_path / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        shim = [f"-I{tmp_path}"]
    cmd = [gxx, "-fsyntax-only", "-std=c++20", *shim, *(f"-I{p}" for p in torch_includes),
           f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=_C",
           *defines, str(CSRC / "bindings.cpp")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bindings.cpp does not compile:\n{proc.stderr[-4000:]}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_cuda_backend_unavailable_is_a_clear_error():
    assert "cuda" not in available_backends()
    assert resolve_backend("auto", torch.zeros(2, 2)) == "torch"
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        fastssl.nt_xent_loss(z, z + 1, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        fastssl.barlow_twins_loss(z, z + 1, backend="cuda")


def test_auto_table_defaults_to_triton():
    """With no GPU measurement in fastssl/auto_gpu_table.json the table is empty and auto keeps triton."""
    from fastssl.backends import AUTO_GPU_TABLE, auto_gpu_backend

    assert set(AUTO_GPU_TABLE) == {"pairwise_lse", "sq_frobenius"}
    for op in AUTO_GPU_TABLE:
        assert auto_gpu_backend(op, torch.zeros(8, 4)) == "triton"


# ------------------------------------------------------------------------------------------------
# GPU layer

HALF = [torch.bfloat16, torch.float16]
OUTPUTS = ("lse", "pos", "dx", "dy", "dscale")


@pytest.fixture
def cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not cuda_extension_usable():
        from fastssl.backends import cuda_unavailable_reason

        pytest.fail(f"a GPU is present but the cuda backend does not load: {cuda_unavailable_reason()}")
    return "cuda"


@pytest.fixture(params=["default", "sm90", "pipelined"])
def forward_kernel(request, monkeypatch, cuda_backend):
    """Each pairwise-LSE test runs every kernel set: the default kernels, (FASTSSL_CUDA_SM90=1) the sm_90a
    forward, dx and dy of csrc/pairwise_lse_sm90.cu, which exist only on sm_90 GPUs, and
    (FASTSSL_CUDA_PIPELINE=1) the sm_80+ kernels of csrc/pairwise_lse_pipelined.cu."""
    monkeypatch.delenv(PIPELINE_ENV, raising=False)
    if request.param == "pipelined":
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            pytest.skip(f"the pipelined kernels need sm_80 or later; this GPU is sm_{major}{minor}")
        monkeypatch.delenv(SM90_ENV, raising=False)
        monkeypatch.setenv(PIPELINE_ENV, "1")
    elif request.param == "sm90":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) != (9, 0):
            pytest.skip(f"the sm_90a forward runs only on sm_90 GPUs (H100/H200); this one is sm_{major}{minor}")
        monkeypatch.setenv(SM90_ENV, "1")
    else:
        monkeypatch.delenv(SM90_ENV, raising=False)
    return request.param


def _compare(backend, mode, m, d, dtype, **kwargs):
    from tests.backends.test_pairwise_lse import make_case, run_both

    x, y, bank, scale, options = make_case(mode, m, d, dtype, device="cuda", **kwargs)
    got, want = run_both(backend, x, y, bank, scale, options)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    for name, a, b in zip(OUTPUTS, got, want):
        if b is not None:
            tol_scale = 1.0 if dtype == torch.float32 else 10.0
            if "temperature" in kwargs:
                tol_scale /= kwargs["temperature"]
            assert_close(a, b, dtype, what=f"cuda/{mode} {name} at M={m}, D={d}", scale=tol_scale)


MODES = ["simclr", "clip", "dcl", "moco", "bank+batch", "uniformity"]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,d", [(2, 1), (3, 7), (65, 33), (130, 257), (1000, 64), (513, 300), (257, 1100)])
def test_pairwise_lse_cuda_fp32(cuda_backend, forward_kernel, mode, m, d):
    if forward_kernel == "pipelined":
        pytest.skip("fp32 runs the default kernels under FASTSSL_CUDA_PIPELINE=1 too (covered by 'default')")
    if mode == "dcl" and m == 2:
        pytest.skip("DCL over one pair has no negatives (the public API requires N >= 2 pairs)")
    _compare(cuda_backend, mode, m, d, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,d", [(33, 40), (1000, 128), (300, 256), (129, 300), (300, 1024)])
def test_pairwise_lse_cuda_half(cuda_backend, forward_kernel, dtype, mode, m, d):
    _compare(cuda_backend, mode, m, d, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 2.0])
def test_pairwise_lse_cuda_strided(cuda_backend, forward_kernel, dtype, temperature):
    if forward_kernel == "pipelined" and dtype == torch.float32:
        pytest.skip("fp32 runs the default kernels under FASTSSL_CUDA_PIPELINE=1 too (covered by 'default')")
    _compare(cuda_backend, "clip", 300, 96, dtype, temperature=temperature, strided=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["simclr", "dcl"])
def test_symmetric_backward_matches_two_kernel_path(cuda_backend, forward_kernel, dtype, mode):
    """x = y in half precision runs the symmetric kernel; the same math through a copy of x (two
    distinct tensors) runs the row and column kernels. dx and dy must agree to rounding."""
    from fastssl.kernels import PairwiseLSEFlags
    from fastssl.kernels.cuda.pairwise_lse import pairwise_lse_backward, pairwise_lse_forward

    n, d = 515, 200
    x = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1).to(dtype)
    scale = torch.tensor(2.0, device="cuda")
    flags = PairwiseLSEFlags(pos_offset=n // 2 if mode == "simclr" else 0, exclude_self=True,
                             include_pos=mode == "simclr")  # fmt: skip
    lse, _ = pairwise_lse_forward(x, x, None, scale, flags)
    g_lse, g_pos = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    sym = pairwise_lse_backward(x, x, None, scale, lse, g_lse, g_pos, flags)
    two = pairwise_lse_backward(x, x.clone(), None, scale, lse, g_lse, g_pos, flags)
    for a, b, name in zip(sym, two, ("dx", "dy")):
        assert_close(a.float(), b.float(), dtype, what=f"symmetric vs two-kernel {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("loss", ["nt_xent", "moco", "dcl", "dclw", "clip", "uniformity"])
@pytest.mark.parametrize("n,d", [(2, 1), (33, 257), (1000, 128)])
def test_losses_cuda(cuda_backend, forward_kernel, dtype, loss, n, d):
    from tests.backends.test_losses import check_against_reference

    if forward_kernel == "pipelined" and dtype == torch.float32:
        pytest.skip("fp32 runs the default kernels under FASTSSL_CUDA_PIPELINE=1 too (covered by 'default')")

    check_against_reference(loss, cuda_backend, n, d, 0.5, dtype=dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral", "vicreg_weights"])
@pytest.mark.parametrize("route", ["auto", "covariance", "gram"])
@pytest.mark.parametrize("n,d", [(2, 1), (33, 70), (70, 33), (256, 1000), (1000, 256)])
def test_frobenius_losses_cuda_fp32(cuda_backend, name, route, n, d):
    from tests.backends.test_frobenius import check_loss

    check_loss(name, cuda_backend, route, n, d, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "spectral"])
@pytest.mark.parametrize("route", ["covariance", "gram"])
def test_frobenius_losses_cuda_half(cuda_backend, name, route, dtype):
    from tests.backends.test_frobenius import check_loss

    check_loss(name, cuda_backend, route, 300, 500, dtype=dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("unbiased", [False, True])
def test_column_mean_var_cuda(cuda_backend, dtype, unbiased):
    from fastssl.kernels.cuda.frobenius import column_mean_var

    z = (3.0 + 2.0 * torch.randn(3001, 77, device="cuda")).to(dtype)
    mean, var = column_mean_var(z.T.contiguous().T, unbiased=unbiased)  # strided (column-major) input
    var64, mean64 = torch.var_mean(z.double(), dim=0, correction=int(unbiased))
    assert_close(mean, mean64, torch.float32, what="column mean", scale=10)
    assert_close(var, var64, torch.float32, what="column var", scale=10)


@pytest.mark.cuda
def test_cuda_is_listed_when_it_loads(cuda_backend):
    assert "cuda" in available_backends()
    z = torch.randn(64, 32, device="cuda")
    assert resolve_backend("cuda", z) == "cuda"
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("cuda", z.double())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("n,m,d", [(3, 2, 1), (17, 4, 128), (9, 8, 300), (5, 64, 33)])
def test_worst_pair_cuda_matches_torch(cuda_backend, dtype, n, m, d):
    """csrc/worst_pair.cu against the torch kernel: the minimum in fp32 and the same (j, k), read
    through strides (a non-contiguous view), with exact ties resolved to the first pair."""
    from fastssl.kernels.cuda.worst_pair import worst_pair_forward as cuda_worst_pair
    from fastssl.kernels.torch.worst_pair import worst_pair_forward as torch_worst_pair

    v = torch.nn.functional.normalize(torch.randn(n, d, m), dim=1).transpose(1, 2).to(dtype)  # strided (N, m, D)
    v[0, m - 1] = v[0, 0]  # sample 0: pairs (0, j) and (j, m-1) tie; the first in (j, k) order must win
    got = cuda_worst_pair(v.cuda())
    want = torch_worst_pair(v)
    torch.testing.assert_close(got[0].cpu(), want[0].float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2]), (got, want)

