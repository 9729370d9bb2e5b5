"""csrc/frobenius_sm90.cu, the Hopper (sm_90a) fused ‖âᵀb̂‖²_F forward: the CPU proofs and the GPU checks.

CPU (nvcc, no GPU): the file compiles for sm_90a alone with no register spills or stack frame (bf16
and fp16) and no wgmma serialisation; its SASS holds HGMMA with both operands transposed (MN-major),
UTMALDG, SYNCS and USETMAXREG and no mma.sync; plain sm_90 stops at its #error; its object reaches
the driver only through the runtime. A host program prints the kernel's constants, descriptors, tile
walk, box counts, stage function and fragment map, and the emulation of tests/csrc/test_sm90_layout.py
(TMA 128-byte swizzle with zero fill, CuTe's canonical MN-major layout, the ISA's accumulator table,
the mbarrier protocol), imported from there, runs the whole kernel on them: every tile's stages
TMA-stored into one ring (stale boxes left in place, uninitialised memory NaN), read back through the
kernel's descriptors, multiplied as wgmma does, then the epilogue's masks, weights and partial slots:
the sum must be ‖âᵀb̂‖²_F exactly (small integers) for ragged N, Da, Db, with b̂ = â or not. Mutations
(K-major descriptors, no mask, weight 1 off the diagonal) are caught.

GPU (`cuda` marker, sm_90 only): with FASTSSL_CUDA_SM90=1 the op and every Frobenius loss on the
covariance route match the float64 oracle (ragged and large D, up to (N, D) = (2048, 8192)), the result
is deterministic and agrees with the cuBLAS route; inputs TMA cannot read keep the cuBLAS route.
"""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import torch

from fastssl.kernels.cuda import _ext
from fastssl.kernels.cuda.pairwise_lse import SM90_ENV
from tests.csrc.test_sm90_kernel import NO_NVCC, NVCC, SM90A, _cuobjdump
from tests.csrc.test_sm90_layout import (SMEM_BASE, SMEM_LIMIT, Deadlock, decode_desc, emulate_pipeline, isa_acc,
                                         tma_store, wgmma_operand, wgmma_operand_mn, zero_filled_box)  # fmt: skip

CSRC = _ext.CSRC
SOURCE = CSRC / "frobenius_sm90.cu"

CASES = [  # (N, Da, Db, symmetric, grid)
    (64, 128, 128, False, 1),
    (100, 200, 136, False, 2),
    (150, 264, 264, True, 2),
    (77, 72, 320, False, 3),
    (130, 392, 392, True, 4),
]
#: (tiles_a, tiles_b, symmetric) walks the probe prints: those of CASES and a few more.
WALKS = sorted({(-(-da // 128), -(-db // 128), s) for _, da, db, s, _ in CASES}
               | {(3, 2, False), (2, 5, False), (1, 1, True), (7, 7, True)})  # fmt: skip

_HOST_PROGRAM = r"""
#include "frobenius_sm90.cu"
#include <cstdio>

using namespace fastssl;

// frobenius.cu's second pass, which the probe never reaches (it launches nothing).
cudaError_t fastssl::sum_partials(const float*, int64_t, float*, cudaStream_t) { return cudaErrorNotSupported; }

int main() {
  std::printf("{\"bm\": %d, \"bn\": %d, \"bk\": %d, \"box_cols\": %d, \"stages\": %d, \"consumers\": %d, "
              "\"warps\": %d, \"partials_per_tile\": %d, \"box_bytes\": %u, \"stage_bytes\": %u, \"b_offset\": %u, "
              "\"kstep_bytes\": %u, \"atom_bytes\": %d, \"barrier_offset\": %u, \"n_barriers\": %d, \"smem\": %zu,\n",
              kBM, kBN, kBK, kBoxCols, kStages, kConsumers, kWarpsPerConsumer, kPartialsPerTile, kBoxBytes,
              kStageBytes, kBOffset, kKStepBytes, sm90::kSwizzleAtomBytes, SmemPlan::kBarrierOffset,
              SmemPlan::kBarriers, SmemPlan::kBytes);
  std::printf("\"acc\": [");
  for (int t = 0; t < 128; ++t)
    for (int r = 0; r < 64; ++r)
      std::printf("%s[%d, %d]", t + r ? ", " : "", sm90::acc_row(t, r), sm90::acc_col(t, r));
  std::printf("],\n\"stage\": [");
  for (uint32_t it = 0; it < 256; ++it)
    std::printf("%s[%u, %u]", it ? ", " : "", stage_of<kStages>(it).index, stage_of<kStages>(it).parity);
  // Descriptors of every stage at the emulation's base address: [stage][consumer][ks], [stage][ks].
  std::printf("],\n\"a_desc\": [");
  for (int s = 0; s < kStages; ++s)
    for (int c = 0; c < kConsumers; ++c)
      for (int ks = 0; ks < kBK / 16; ++ks)
        std::printf("%s%llu", s + c + ks ? ", " : "",
                    static_cast<unsigned long long>(a_desc(%SMEM_BASE% + s * kStageBytes, c, ks)));
  std::printf("],\n\"b_desc\": [");
  for (int s = 0; s < kStages; ++s)
    for (int ks = 0; ks < kBK / 16; ++ks)
      std::printf("%s%llu", s + ks ? ", " : "", static_cast<unsigned long long>(b_desc(%SMEM_BASE% + s * kStageBytes, ks)));
  std::printf("],\n\"boxes_in\": [");
  for (int cols = 0; cols <= 400; ++cols)
    for (int col0 = 0; col0 <= 384; col0 += 128)
      std::printf("%s%u", cols + col0 ? ", " : "", boxes_in(cols, col0, 2));
  std::printf("],\n\"partials\": [%lld, %lld, %lld],\n", static_cast<long long>(sq_frobenius_inner_sm90_partials(200, 136, false)),
              static_cast<long long>(sq_frobenius_inner_sm90_partials(1000, 1000, true)),
              static_cast<long long>(sq_frobenius_inner_sm90_partials(128, 129, false)));
  std::printf("\"walks\": {");
  const int walks[][3] = {%WALKS%};
  bool first = true;
  for (const auto& w : walks) {
    std::printf("%s\"%d,%d,%d\": [", first ? "" : ", ", w[0], w[1], w[2]);
    first = false;
    const int64_t n = w[2] ? int64_t{w[0]} * (w[0] + 1) / 2 : int64_t{w[0]} * w[1];
    for (int64_t t = 0; t < n; ++t) {
      const Tile tile = tile_of(t, w[0], w[1], w[2] != 0);
      std::printf("%s[%d, %d, %g]", t ? ", " : "", tile.i, tile.j, tile.weight);
    }
    std::printf("]");
  }
  // The epilogue's mask of every (tile, consumer) of each case, 4 registers per hex digit (thread-major).
  std::printf("},\n\"masks\": {");
  const long long cases[][3] = {%CASES%};
  first = true;
  for (const auto& c : cases) {
    const int ta = static_cast<int>((c[0] + kBM - 1) / kBM), tb = static_cast<int>((c[1] + kBN - 1) / kBN);
    const int64_t n = c[2] ? int64_t{ta} * (ta + 1) / 2 : int64_t{ta} * tb;
    std::printf("%s\"%lld,%lld,%lld\": [", first ? "" : ", ", c[0], c[1], c[2]);
    first = false;
    for (int64_t t = 0; t < n; ++t)
      for (int consumer = 0; consumer < kConsumers; ++consumer) {
        std::printf("%s\"", t + consumer ? ", " : "");
        const Tile tile = tile_of(t, ta, tb, c[2] != 0);
        for (int tid = 0; tid < 128; ++tid)
          for (int r = 0; r < 64; r += 4) {
            int nibble = 0;
            for (int b = 0; b < 4; ++b) nibble |= in_c(tile, consumer, tid, r + b, c[0], c[1]) << b;
            std::printf("%x", nibble);
          }
        std::printf("\"");
      }
    std::printf("]");
  }
  std::printf("}}\n");
  return 0;
}
"""


def _unpack_mask(hexes: str) -> np.ndarray:
    """(128, 64) booleans of one printed mask: bit b of hex digit q is register 4(q mod 16) + b of thread q / 16."""
    digits = np.array([int(h, 16) for h in hexes]).reshape(128, 16)
    return ((digits[:, :, None] >> np.arange(4)) & 1).reshape(128, 64).astype(bool)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The kernel's constants, descriptors, tile walks, box counts and stage function (a host program)."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the kernel's host-side layout functions cannot be compiled here")
    folder = tmp_path_factory.mktemp("frobenius_sm90_layout")
    walks = ", ".join(f"{{{a}, {b}, {int(s)}}}" for a, b, s in WALKS)
    cases = ", ".join(f"{{{da}, {db}, {int(s)}}}" for _, da, db, s, _ in CASES)
    program = _HOST_PROGRAM.replace("%SMEM_BASE%", f"{SMEM_BASE}u").replace("%WALKS%", walks).replace("%CASES%", cases)
    (folder / "probe.cu").write_text(program)
    cmd = [NVCC, "-std=c++17", "-gencode=arch=compute_90a,code=compute_90a", f"-I{CSRC}", str(folder / "probe.cu"),
           "-o", str(folder / "probe")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(folder / "probe")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads(run.stdout)
    info["acc"] = np.array(info["acc"]).reshape(128, 64, 2)
    s, c, k = info["stages"], info["consumers"], info["bk"] // 16
    info["a_desc"] = np.array(info["a_desc"], dtype=np.uint64).reshape(s, c, k)
    info["b_desc"] = np.array(info["b_desc"], dtype=np.uint64).reshape(s, k)
    info["boxes_in"] = np.array(info["boxes_in"]).reshape(401, 4)
    info["masks"] = {key: [_unpack_mask(m) for m in masks] for key, masks in info["masks"].items()}
    return info


@pytest.fixture(scope="module")
def sm90a_build(tmp_path_factory):
    """(ptxas -v report, object path) of one nvcc call compiling frobenius_sm90.cu for sm_90a."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    out = tmp_path_factory.mktemp("frobenius_sm90a") / "frobenius_sm90.o"
    cmd = [NVCC, "-std=c++17", "-O3", "-c", SM90A, "-Xptxas", "-v", f"-I{CSRC}", str(SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for sm_90a:\n{proc.stderr[-4000:]}"
    return proc.stderr, out


# ---- the compiled kernel --------------------------------------------------------------------------


@pytest.mark.slow  # nvcc
def test_compiles_for_sm90a_without_spills(sm90a_build):
    report, _ = sm90a_build
    kernels = re.findall(r"Compiling entry function '([^']+)' for 'sm_90a'", report)
    assert sorted(re.search(r"sq_frobenius_inner_sm90_kernelI(\w+?)EEv", k).group(1) for k in kernels) == [
        "13__nv_bfloat16", "6__half"], kernels  # fmt: skip
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) == len(kernels) and frames, report
    assert all(f == ("0", "0", "0") for f in frames), f"stack frame or spills (frame, stores, loads): {frames}"
    assert "serialized" not in report, f"ptxas serialises the wgmma:\n{report}"


@pytest.mark.slow  # nvcc
def test_sass_uses_transposed_wgmma_tma_and_mbarriers(sm90a_build):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: neither on PATH nor shipped with Triton")
    _, obj = sm90a_build
    proc = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sass = proc.stdout
    types = re.findall(r"\bHGMMA\.64x128x16\.F32(\.BF16)? ", sass)  # "" for fp16
    assert types.count(".BF16") >= 4, "no bf16 wgmma m64n128k16 in the SASS"
    assert types.count("") >= 4, "no fp16 wgmma m64n128k16 in the SASS"
    both = re.findall(r"\bHGMMA\.64x128x16\.F32(?:\.BF16)? [^;]*gdesc\[[^]]+\]\.tnspA\.tnspB", sass)
    assert len(both) == len(re.findall(r"\bHGMMA\.", sass)) >= 8, "every wgmma must read both operands MN-major"
    assert re.search(r"\bUTMALDG\.2D\b", sass), "no TMA tensor load (UTMALDG) in the SASS"
    assert re.search(r"\bSYNCS\.ARRIVE\.TRANS64", sass), "no mbarrier arrive (SYNCS.ARRIVE) in the SASS"
    assert re.search(r"\bSYNCS\.PHASECHK\.TRANS64\.TRYWAIT\b", sass), "no mbarrier try_wait in the SASS"
    assert re.search(r"\bUSETMAXREG\b", sass), "no setmaxnreg register split in the SASS"
    assert not re.search(r"\bHMMA\.", sass), "mma.sync (HMMA) in the sm_90a kernel"


@pytest.mark.slow  # nvcc
def test_plain_sm90_is_refused(tmp_path):
    if NVCC is None:
        pytest.skip(NO_NVCC)
    cmd = [NVCC, "-std=c++17", "-c", "-gencode=arch=compute_90,code=sm_90", f"-I{CSRC}", str(SOURCE), "-o",
           str(tmp_path / "x.o")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "frobenius_sm90.cu uses wgmma and TMA" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # nvcc
def test_object_reaches_the_driver_through_the_runtime(sm90a_build):
    _, obj = sm90a_build
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\bcu[A-Z]\w*", undefined), f"driver API symbols linked directly: {undefined}"
    assert "cudaGetDriverEntryPoint" in undefined
    assert re.search(r"fastssl\w*sum_partials", undefined), "the second pass should be frobenius.cu's sum_partials"
    defined = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    for name in ("sq_frobenius_inner_sm90", "sq_frobenius_inner_sm90_supported", "sq_frobenius_inner_sm90_partials"):
        assert f"T fastssl::{name}(" in defined, name


def test_built_for_arch_90_only_with_the_sm90_bindings(monkeypatch):
    name = SOURCE.name
    assert _ext.ARCH_SPECIFIC_SOURCES[name] == "90" and name in _ext.KERNEL_SOURCES
    assert name in _ext.kernel_sources_for("90") and name not in _ext.kernel_sources_for("80")
    assert _ext.bindings_defines([name, "pairwise_lse_sm90.o", "worst_pair.o"]) == ["-DFASTSSL_WITH_SM90"]
    monkeypatch.setenv("FASTSSL_CUDA_ARCH_LIST", "9.0")
    assert name in _ext._jit_sources(_ext._archs())
    monkeypatch.setenv("FASTSSL_CUDA_ARCH_LIST", "8.0;9.0")
    assert name not in _ext._jit_sources(_ext._archs())


def test_adapter_selects_it_only_when_asked(monkeypatch):
    """The selection is pairwise-LSE's (one switch): None, i.e. the cuBLAS chunks, unless
    FASTSSL_CUDA_SM90=1 on sm_90; asked for on an extension without it is an error."""
    import types

    from fastssl.kernels.cuda.pairwise_lse import launcher

    name = "sq_frobenius_inner_forward"
    ext = types.SimpleNamespace(**{f"{name}_sm90": "sm90"})
    monkeypatch.delenv(SM90_ENV, raising=False)
    assert launcher(ext, (9, 0), name) is None
    monkeypatch.setenv(SM90_ENV, "1")
    assert launcher(ext, (9, 0), name) == "sm90"
    assert launcher(ext, (8, 0), name) is None
    with pytest.raises(RuntimeError, match=SM90_ENV):
        launcher(types.SimpleNamespace(), (9, 0), name)


# ---- layouts and the emulated kernel --------------------------------------------------------------

@pytest.mark.slow  # the host probe is an nvcc run
def test_shared_memory_plan_fits_and_boxes_are_atom_aligned(kernel):
    atom, box = kernel["atom_bytes"], kernel["box_bytes"]
    assert kernel["box_cols"] * 2 == 128, "a box row must be exactly the 128-byte swizzle span"
    assert box == kernel["bk"] * 128 and box % atom == 0 and kernel["stage_bytes"] % atom == 0
    assert kernel["bm"] == kernel["consumers"] * kernel["box_cols"] and kernel["bn"] == 2 * kernel["box_cols"]
    assert kernel["stage_bytes"] == (kernel["bm"] + kernel["bn"]) // kernel["box_cols"] * box
    assert kernel["b_offset"] == kernel["bm"] // kernel["box_cols"] * box
    assert kernel["kstep_bytes"] == 16 * 128
    assert kernel["barrier_offset"] == kernel["stages"] * kernel["stage_bytes"] and kernel["n_barriers"] == 2 * kernel[
        "stages"]  # fmt: skip
    assert kernel["smem"] == atom + kernel["barrier_offset"] + 8 * kernel["n_barriers"] <= SMEM_LIMIT


@pytest.mark.slow  # the host probe is an nvcc run
def test_descriptors_are_mn_major_with_one_box_between_blocks(kernel):
    for s in range(kernel["stages"]):
        stage = SMEM_BASE + s * kernel["stage_bytes"]
        for ks in range(kernel["bk"] // 16):
            for c in range(kernel["consumers"]):
                d = decode_desc(int(kernel["a_desc"][s, c, ks]))
                assert d == {"start": stage + c * kernel["box_bytes"] + ks * kernel["kstep_bytes"],
                             "lbo": kernel["box_bytes"], "sbo": kernel["atom_bytes"], "base_offset": 0, "swizzle": 1}
            d = decode_desc(int(kernel["b_desc"][s, ks]))
            assert d == {"start": stage + kernel["b_offset"] + ks * kernel["kstep_bytes"], "lbo": kernel["box_bytes"],
                         "sbo": kernel["atom_bytes"], "base_offset": 0, "swizzle": 1}  # fmt: skip


@pytest.mark.slow  # the host probe is an nvcc run
def test_fragment_map_and_stage_function(kernel):
    for thread in range(128):
        for reg in range(64):
            assert tuple(kernel["acc"][thread, reg]) == isa_acc(thread, reg), (thread, reg)
    s = kernel["stages"]
    assert kernel["stage"] == [[it % s, (it // s) % 2] for it in range(256)]


@pytest.mark.slow  # the host probe is an nvcc run
def test_tile_walks_cover_c_once_with_the_right_weights(kernel):
    """Non-symmetric: every (i, j) once, weight 1. b̂ = â: every i ≤ j once, weight 1 on the diagonal
    and 2 off it, so Σ over the walk of weight·‖C_ij‖² = ‖C‖² for a symmetric C."""
    for a, b, sym in WALKS:
        walk = kernel["walks"][f"{a},{b},{int(sym)}"]
        cells = [(i, j) for i, j, _ in walk]
        if sym:
            assert sorted(cells) == [(i, j) for i in range(a) for j in range(i, a)]
            assert all(w == (1.0 if i == j else 2.0) for i, j, w in walk)
        else:
            assert sorted(cells) == [(i, j) for i in range(a) for j in range(b)] and all(w == 1.0 for *_, w in walk)
        assert cells == sorted(cells), "row by row: a CTA's consecutive tiles share the â panel"


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("n,da,db,symmetric,grid", CASES)
def test_epilogue_masks_keep_exactly_the_entries_of_c(kernel, n, da, db, symmetric, grid):
    """The kernel's in_c at each register's (row, column) of the ISA's accumulator table: row < Da and
    column < Db of C, across every tile of the walk (the diagonal tiles of b̂ = â included)."""
    walk = kernel["walks"][f"{-(-da // 128)},{-(-db // 128)},{int(symmetric)}"]
    masks = kernel["masks"][f"{da},{db},{int(symmetric)}"]
    assert len(masks) == len(walk) * kernel["consumers"]
    for t, (i, j, _) in enumerate(walk):
        for c in range(kernel["consumers"]):
            want = np.array([[128 * i + 64 * c + isa_acc(th, r)[0] < da and 128 * j + isa_acc(th, r)[1] < db
                              for r in range(64)] for th in range(128)])  # fmt: skip
            assert (masks[t * kernel["consumers"] + c] == want).all(), (t, c)


@pytest.mark.slow  # the host probe is an nvcc run
def test_boxes_in_counts_the_boxes_that_reach_the_matrix(kernel):
    for cols in range(401):
        for n, col0 in enumerate(range(0, 385, 128)):
            want = sum(1 for h in range(2) if col0 + 64 * h < cols)
            assert kernel["boxes_in"][cols, n] == want, (cols, col0)


def emulate_kernel(kernel, a, b, symmetric, grid, mutate=None):
    """Run the kernel's producer and consumers for every CTA of a `grid` on â = a (N, Da), b̂ = b,
    emulating TMA (boxes as the kernel issues them, zero-filled; boxes it skips keep what the ring held
    before; never-written shared memory is NaN) and wgmma (operands read through the kernel's
    descriptors with the MN-major canonical layout); return the partials in their slots.
    `mutate` breaks one thing, for the tests that show the emulation notices."""
    bm, bn, bk, box_cols = kernel["bm"], kernel["bn"], kernel["bk"], kernel["box_cols"]
    box, stage_bytes, b_off = kernel["box_bytes"], kernel["stage_bytes"], kernel["b_offset"]
    n, da = a.shape
    db = b.shape[1]
    tiles_a, tiles_b = -(-da // bm), -(-db // bn)
    walk = [tuple(t) for t in kernel["walks"][f"{tiles_a},{tiles_b},{int(symmetric)}"]]
    chunks = -(-n // bk)
    masks = kernel["masks"][f"{da},{db},{int(symmetric)}"]
    partials = np.full(len(walk) * kernel["partials_per_tile"], np.nan)
    acc = kernel["acc"]
    for cta in range(grid):
        smem = np.full(SMEM_LIMIT // 2, np.nan)
        it = 0
        for t in range(cta, len(walk), grid):
            i, j, weight = walk[t]
            if mutate == "weight":
                weight = 1.0
            a0, b0 = i * bm, j * bn
            na, nb = kernel["boxes_in"][da, a0 // bm], kernel["boxes_in"][db, b0 // bn]  # the kernel's boxes_in
            d = np.zeros((kernel["consumers"], 64, bn))
            for kc in range(chunks):
                s, _ = kernel["stage"][it]
                stage = SMEM_BASE + s * stage_bytes
                for h in range(na):  # TMA box (kBK rows of N) x (64 columns), rows are N
                    tma_store(smem, stage + h * box, zero_filled_box(a, kc * bk, a0 + h * box_cols, bk))
                for h in range(nb):
                    tma_store(smem, stage + b_off + h * box, zero_filled_box(b, kc * bk, b0 + h * box_cols, bk))
                for c in range(kernel["consumers"]):
                    for ks in range(bk // 16):
                        if mutate == "k_major":
                            ta = wgmma_operand(smem, int(kernel["a_desc"][s, c, ks]), 64).T
                        else:
                            ta = wgmma_operand_mn(smem, int(kernel["a_desc"][s, c, ks]), 64)  # (k, m)
                        tb = wgmma_operand_mn(smem, int(kernel["b_desc"][s, ks]), bn)  # (k, n)
                        with np.errstate(invalid="ignore"):
                            d[c] += ta.T @ tb
                it += 1
            for c in range(kernel["consumers"]):
                mask = masks[t * kernel["consumers"] + c]  # the kernel's in_c
                for warp in range(4):
                    total = 0.0
                    for thread in range(32 * warp, 32 * warp + 32):
                        for reg in range(64):
                            if mask[thread, reg] or mutate == "no_mask":
                                total += d[c][tuple(acc[thread, reg])] ** 2
                    partials[(t * kernel["consumers"] + c) * 4 + warp] = weight * total
    return partials


def _operands(n, da, db, symmetric, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-4, 5, size=(n, da)).astype(np.float64)  # exact in bf16 and in every sum
    b = a if symmetric else rng.integers(-4, 5, size=(n, db)).astype(np.float64)
    return a, b


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("n,da,db,symmetric,grid", CASES)
def test_emulated_kernel_is_the_squared_frobenius_norm(kernel, n, da, db, symmetric, grid):
    """The whole kernel, emulated with its own constants: the fixed-order sum of the partials is
    ‖âᵀb̂‖²_F exactly, each tile's partials are weight·‖C_ij‖², and no slot is left unwritten."""
    a, b = _operands(n, da, db, symmetric, seed=n)
    partials = emulate_kernel(kernel, a, b, symmetric, grid)
    assert not np.isnan(partials).any(), "a partial slot unwritten, or a NaN of unwritten memory summed"
    c = a.T @ b
    assert partials.sum() == (c**2).sum()
    walk = kernel["walks"][f"{-(-da // 128)},{-(-db // 128)},{int(symmetric)}"]
    per = kernel["partials_per_tile"]
    for t, (i, j, w) in enumerate(walk):
        assert partials[t * per : (t + 1) * per].sum() == w * (c[128 * i : 128 * i + 128, 128 * j : 128 * j + 128] ** 2).sum()


@pytest.mark.slow  # the host probe is an nvcc run
def test_partial_counts(kernel):
    per = kernel["partials_per_tile"]
    assert per == kernel["consumers"] * kernel["warps"] == 8
    assert kernel["partials"] == [per * 2 * 2, per * 8 * 9 // 2, per * 1 * 2]


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("mutation", ["k_major", "no_mask", "weight"])
def test_emulation_detects_a_broken_kernel(kernel, mutation):
    """The check has teeth: K-major descriptors for â, an epilogue without the (row, column) masks
    (it sums entries past Da/Db: NaN of never-loaded boxes, or stale ones), or weight 1 off the
    diagonal of a symmetric walk, each changes the result."""
    n, da, db, symmetric, grid = (150, 264, 264, True, 2) if mutation == "weight" else (100, 200, 136, False, 1)
    a, b = _operands(n, da, db, symmetric, seed=7)
    partials = emulate_kernel(kernel, a, b, symmetric, grid, mutate=mutation)
    assert np.isnan(partials).any() or partials.sum() != ((a.T @ b) ** 2).sum()


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("tiles,chunks", [(1, 1), (1, 9), (3, 2), (4, 7), (6, 5)])
def test_pipeline_never_hangs_or_races(kernel, tiles, chunks):
    """The ring protocol of the kernel's loops (one stage per kBK rows of N, numbered across a CTA's
    tiles; release after wait_group 1) under random interleavings, with test_sm90_layout's emulator
    (whose extra resident-tile barrier this kernel does not have: it only adds a first wait)."""
    for seed in range(30):
        emulate_pipeline(kernel["stage"], kernel["stages"], tiles, chunks, kernel["consumers"], seed)
    with pytest.raises(Deadlock):
        emulate_pipeline(kernel["stage"], kernel["stages"], 2, 3, kernel["consumers"], 0, producer_flip=0)


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
    assert hasattr(ext, "sq_frobenius_inner_forward_sm90"), "fastssl._C on an sm_90 GPU lacks the sm_90a kernel"
    monkeypatch.setenv(SM90_ENV, "1")
    return ext


def _dense64(a, b):
    return (a.double().T @ (a if b is None else b).double()).square().sum()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("n,d", [(1, 8), (100, 136), (1000, 200), (513, 264), (2048, 1024), (2048, 8192)])
def test_sm90_op_matches_float64(sm90_extension, monkeypatch, dtype, same, n, d):
    """The fused kernel (it must be the one taken) against the float64 product of the same rounded
    operands: only fp32 accumulation separates them; the cuBLAS route agrees; two runs are bitwise equal."""
    from fastssl.kernels.cuda.frobenius import sq_frobenius_forward
    from tests.utils import assert_close

    gen = torch.Generator(device="cuda").manual_seed(n + d)
    a = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    b = None if same else (0.5 * a.float() + torch.randn(n, d, device="cuda", generator=gen)).to(dtype)
    assert sm90_extension.sq_frobenius_inner_sm90_supported(a, b)
    got = sq_frobenius_forward(a, b, None, None, None, None, "inner")
    want = _dense64(a, b)
    assert got.dtype == torch.float32 and got.shape == ()
    assert_close(got, want, torch.float32, what=f"sm90 ‖aᵀb‖² same={same} ({n}, {d})")
    assert torch.equal(got, sq_frobenius_forward(a, b, None, None, None, None, "inner")), "not deterministic"
    monkeypatch.delenv(SM90_ENV)
    cublas = sq_frobenius_forward(a, b, None, None, None, None, "inner")
    assert_close(got, cublas, torch.float32, what=f"sm90 vs cuBLAS same={same} ({n}, {d})")


@pytest.mark.cuda
def test_sm90_with_column_transform_and_rectangular_operands(sm90_extension):
    """The transform is applied before the kernel (affine_columns), and Da ≠ Db through the binding."""
    from fastssl.kernels.cuda.frobenius import sq_frobenius_forward
    from fastssl.kernels.torch.frobenius import apply_transform
    from tests.utils import assert_close

    a = (3 + torch.randn(300, 264, device="cuda")).to(torch.bfloat16)
    b = torch.randn(300, 264, device="cuda").to(torch.bfloat16)
    shift, scale = a.float().mean(0), 1 / (a.float().std(0) + 1e-3)
    got = sq_frobenius_forward(a, b, shift, scale, None, scale, "inner")
    want = _dense64(apply_transform(a, shift, scale).to(torch.bfloat16), apply_transform(b, None, scale).to(torch.bfloat16))
    assert_close(got, want, torch.float32, what="sm90 with a column transform")
    c = torch.randn(300, 72, device="cuda").to(torch.bfloat16)
    rect = sm90_extension.sq_frobenius_inner_forward_sm90(a, c)
    assert_close(rect, _dense64(a, c), torch.float32, what="sm90 Da != Db")


@pytest.mark.cuda
def test_sm90_takes_only_what_tma_can_read(sm90_extension):
    supported = sm90_extension.sq_frobenius_inner_sm90_supported
    a = torch.randn(300, 264, device="cuda", dtype=torch.bfloat16)
    assert supported(a, None) and supported(a, a.clone())
    assert not supported(a.float(), None)  # fp32: cuBLAS
    assert not supported(a[:, 1:], None)  # base off 16-byte alignment
    odd = torch.randn(300, 100, device="cuda", dtype=torch.bfloat16)
    assert not supported(odd, None)  # row stride 200 bytes
    with pytest.raises(ValueError, match="same number of rows"):
        supported(a, a[:10])
    with pytest.raises(TypeError, match="must be"):
        supported(a, a.half())
    with pytest.raises(ValueError, match="TMA"):
        sm90_extension.sq_frobenius_inner_forward_sm90(odd, None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "vicreg_weights", "spectral"])
@pytest.mark.parametrize("n,d", [(256, 1000), (1000, 256), (512, 2048)])
def test_sm90_losses_match_the_spec(sm90_extension, dtype, name, n, d):
    from tests.backends.test_frobenius import check_loss

    check_loss(name, "cuda", "covariance", n, d, dtype=dtype, device="cuda")
