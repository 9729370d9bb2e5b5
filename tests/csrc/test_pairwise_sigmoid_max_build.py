"""csrc/pairwise_sigmoid.cu and csrc/pairwise_max.cu on the CPU (docs/design.md layer 4): what nvcc,
ptxas and cuobjdump can check without a GPU, and the wiring of backend="cuda" for SigLIP and KoLeo.

* nvcc compiles both files for sm_80 and sm_90; ptxas -v reports every kernel (3 roles x 3 dtypes of
  the sigmoid template, 3 dtypes of the max) with 0 spill bytes; the SASS (cuobjdump) has the
  tensor-core instructions of each dtype: HMMA.16816 for bf16 and fp16, HMMA.1688 .TF32 for fp32.
* the tile GEMMs live once, in csrc/pairwise_tiles.cuh, which pairwise_lse.cu includes too, so the CPU
  emulation of their fragment layouts (tests/csrc/test_mma_layout.py) covers every pairwise kernel.
* the ops dispatch "cuda" to the new adapters; setup.py builds the same sources as the JIT loader;
  every extension function the adapters call is defined in bindings.cpp; `auto` keeps triton.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from fastssl.kernels.cuda import _ext
from tests.csrc import _nvcc

ROOT = Path(__file__).resolve().parents[2]
CSRC = _nvcc.CSRC
NEW_SOURCES = ("pairwise_sigmoid.cu", "pairwise_max.cu")

#: Kernels per file that ptxas must see: the sigmoid template's forward, rows and columns roles for
#: fp32, fp16 and bf16; the max kernel for the three dtypes.
EXPECTED_KERNELS = {"pairwise_sigmoid_kernel": 9, "pairwise_max_kernel": 3}
#: SASS mnemonic of each dtype's tensor-core product (fp16 carries no type suffix).
HMMA = {"bf16": "HMMA.16816.F32.BF16", "fp16": "HMMA.16816.F32 ", "tf32": "HMMA.1688.F32.TF32"}


@pytest.fixture(scope="module", params=["80", "90"])
def build(request, tmp_path_factory):
    """(arch, ptxas kernel report [(name, spill stores, spill loads)], {source: object path}) from one
    nvcc call compiling both new files for sm_<arch>."""
    arch = request.param
    out = tmp_path_factory.mktemp(f"sm{arch}")
    report = _nvcc.compile_objects([CSRC / s for s in NEW_SOURCES], f"-gencode=arch=compute_{arch},code=sm_{arch}", out)
    kernels = [(name, stores, loads) for name, stores, loads, _ in _nvcc.ptxas_kernels(report)]
    return arch, kernels, {s: out / (Path(s).stem + ".o") for s in NEW_SOURCES}


@pytest.mark.slow
def test_new_kernels_compile_without_spills(build):
    arch, kernels, _ = build
    names = [k for k, _, _ in kernels]
    for kernel, count in EXPECTED_KERNELS.items():
        seen = [k for k in names if kernel in k]
        assert len(seen) == count, f"sm_{arch}: {kernel} instances seen by ptxas: {seen}"
    spilling = [(k, st, ld) for k, st, ld in kernels if st or ld]
    assert not spilling, f"sm_{arch}: register spills (kernel, store bytes, load bytes): {spilling}"


@pytest.mark.slow
@pytest.mark.parametrize("source", NEW_SOURCES)
def test_new_kernels_use_tensor_cores(build, source):
    arch, _, objects = build
    sass = _nvcc.sass(objects[source])
    for dtype, mnemonic in HMMA.items():
        assert mnemonic in sass, f"sm_{arch} {source}: no {mnemonic.strip()} ({dtype} tensor cores) in the SASS"


@pytest.mark.parametrize("name", ["logits_chunk", "weighted_sum", "mod_ny", "vec_ok"])
def test_pairwise_lse_uses_the_shared_tile_helpers(name):
    """The layouts tests/csrc/test_mma_layout.py emulates are the tile GEMMs of pairwise_tiles.cuh, which
    pairwise_lse.cu includes: it must not keep a copy of its own that could drift from them."""
    lse = (CSRC / "pairwise_lse.cu").read_text()
    tiles = (CSRC / "pairwise_tiles.cuh").read_text()
    assert '#include "pairwise_tiles.cuh"' in lse and "using namespace tiles;" in lse
    assert re.search(rf"\b{name}\(", tiles), f"{name} is not defined in pairwise_tiles.cuh"
    assert not re.search(rf"^(?:__device__ __forceinline__ |inline )?\w[\w:<>]* {name}\(", lse, re.M), (
        f"pairwise_lse.cu defines its own {name}")


def test_setup_builds_the_loader_sources():
    """bindings.cpp calls every launcher: an extension built without one of the .cu files fails to
    import (undefined symbol). setup.py and the JIT loader must list the same sources."""
    text = (ROOT / "setup.py").read_text()
    listed = re.search(r"^CSRC_SOURCES = \[(.*?)\]", text, re.S | re.M).group(1)
    assert sorted(re.findall(r'"csrc/([^"]+)"', listed)) == sorted(_ext.SOURCES)
    for source in NEW_SOURCES:
        assert source in _ext.KERNEL_SOURCES


@pytest.mark.parametrize("adapter", ["pairwise_sigmoid", "pairwise_max"])
def test_adapters_call_functions_that_bindings_define(adapter):
    called = set(re.findall(r"extension\(\)\.(\w+)\(", (ROOT / f"fastssl/kernels/cuda/{adapter}.py").read_text()))
    defined = set(re.findall(r'm\.def\("(\w+)"', (CSRC / "bindings.cpp").read_text()))
    assert called and called <= defined, f"called {sorted(called)}, defined {sorted(defined)}"


@pytest.mark.parametrize("op", ["pairwise_sigmoid", "pairwise_max"])
def test_ops_dispatch_cuda_to_the_csrc_adapters(op):
    """backend="cuda" reaches fastssl/kernels/cuda/<op>.py, whose functions are the torch kernel's."""
    ops = importlib.import_module(f"fastssl.ops.{op}")
    assert ops._KERNEL_MODULES["cuda"] == f"fastssl.kernels.cuda.{op}"
    cuda_kernels = importlib.import_module(f"fastssl.kernels.cuda.{op}")  # imports no extension yet
    torch_kernels = importlib.import_module(f"fastssl.kernels.torch.{op}")
    public = {n for n in dir(torch_kernels) if n.startswith(op) and callable(getattr(torch_kernels, n))}
    assert public and all(callable(getattr(cuda_kernels, n, None)) for n in public), public


@pytest.mark.parametrize("op", ["pairwise_sigmoid", "pairwise_max"])
def test_auto_never_picks_cuda_without_a_measurement(op):
    from fastssl.backends import AUTO_GPU_TABLE, auto_gpu_backend, resolve_backend

    assert not AUTO_GPU_TABLE.get(op), "a rule for this op needs GPU timings of cuda against triton"
    assert auto_gpu_backend(op, torch.zeros(8, 4)) == "triton"
    assert resolve_backend("auto", torch.zeros(8, 4), op=op) == "torch"  # CPU tensors


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_cuda_backend_for_siglip_and_koleo_is_a_clear_error_here():
    import fastssl

    z = torch.randn(6, 5)
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        fastssl.siglip_loss(z, z + 1, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        fastssl.koleo_loss(z, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        fastssl.nn.SigLIPLoss(backend="cuda")(z, z + 1)
