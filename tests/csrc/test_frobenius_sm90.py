"""csrc/frobenius_sm90.cu, the Hopper (sm_90a) fused ‖âᵀb̂‖²_F forward of both routes: CPU proofs, GPU checks.

CPU (nvcc, no GPU): the file compiles for sm_90a alone with no register spills or stack frame (three
kernels: inner, outer, outer with b̂ = â; bf16 and fp16) and no wgmma serialisation; per kernel its
SASS holds HGMMA with both operands MN-major (inner) or K-major (outer), UTMALDG, SYNCS and
USETMAXREG, and no mma.sync; plain sm_90 stops at its #error; its object reaches the driver only
through the runtime. A host program prints the kernel's constants, ring plans, descriptors of every
stage, tile walks, box counts, stage functions, fragment map and epilogue masks, and the emulation of
tests/csrc/test_sm90_layout.py (TMA 128-byte swizzle with zero fill, the K-major and CuTe's canonical
MN-major layouts, the ISA's accumulator table, the mbarrier protocol), imported from there, runs the
whole kernel on them: every tile's stages TMA-stored into one ring per CTA (skipped boxes keep stale
data, never-written memory is NaN), read back through the kernel's descriptors, multiplied as wgmma
does, then the epilogue's masks, weights and partial slots: tile by tile and in total the sums must be
exact (small integers) for ragged shapes, b̂ = â or not, 1 to 4 CTAs. Emulated breakages (K-major
MN operands, no mask, weight 1 off the diagonal) are caught.

GPU (`cuda` marker, sm_90 only): with FASTSSL_CUDA_SM90=1 the op on both routes and every Frobenius
loss on both routes match the float64 oracle (ragged, N < D and N > D, up to (N, D) = (2048, 8192)),
the result is deterministic and agrees with the cuBLAS chunks; inputs TMA cannot read are refused
by the support check (the adapter then keeps the cuBLAS chunks).
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import torch

from fastssl.kernels.cuda import _ext
from fastssl.kernels.cuda._ext import SM90_ENV
from tests.csrc import _nvcc
from tests.csrc.test_sm90_kernel import SM90A
from tests.csrc.test_sm90_layout import (SMEM_BASE, SMEM_LIMIT, Deadlock, decode_desc, emulate_pipeline, isa_acc,
                                         tma_store, wgmma_operand, wgmma_operand_mn, zero_filled_box)  # fmt: skip

CSRC = _ext.CSRC
SOURCE = CSRC / "frobenius_sm90.cu"

INNER = 0  # the kernel's Kind values
OUTER = 1
OUTER_SAME = 2

CASES = [  # (N, Da, Db, same, grid) of the inner route
    (64, 128, 128, False, 1),
    (100, 200, 136, False, 2),
    (150, 264, 264, True, 2),
    (77, 72, 320, False, 3),
    (130, 392, 392, True, 4),
]
OUTER_CASES = [  # (N, K, same, grid) of the outer route
    (100, 72, False, 1),
    (200, 136, False, 2),
    (264, 64, True, 2),
    (300, 200, False, 3),
    (130, 8, True, 1),
]


def _tiles(n: int) -> int:
    return -(-n // 128)


def _matrix(route: str, case: tuple) -> tuple[int, int, bool]:
    """(rows, cols, symmetric) of the matrix a case walks: C (Da x Db) or the Grams (N x N, symmetric)."""
    if route == "inner":
        _, da, db, same, _ = case
        return da, db, same
    return case[0], case[0], True


MATRICES = sorted({_matrix("inner", c) for c in CASES} | {_matrix("outer", c) for c in OUTER_CASES})
#: (tiles_a, tiles_b, symmetric) walks the probe prints: those of the cases and a few more.
WALKS = sorted({(_tiles(r), _tiles(c), s) for r, c, s in MATRICES}
               | {(3, 2, False), (2, 5, False), (1, 1, True), (7, 7, True)})  # fmt: skip


_HOST_PROGRAM = r"""
#include "frobenius_sm90.cu"
#include <cstdio>

using namespace fastssl;

// frobenius.cu's second pass, which the probe never reaches (it launches nothing).
cudaError_t fastssl::sum_partials(const float*, int64_t, float*, cudaStream_t) { return cudaErrorNotSupported; }

// One kind's ring and descriptors (every stage at the emulation's base address): a_desc[stage][consumer]
// [ks][operand], b_desc[stage][ks][operand], and its stage function.
template <int KIND>
void print_kind(const char* sep) {
  using P = Plan<KIND>;
  std::printf("%s\"%d\": {\"box_rows\": %u, \"box_bytes\": %u, \"boxes\": %u, \"stage_bytes\": %u, \"stages\": %d, "
              "\"barrier_offset\": %u, \"n_barriers\": %d, \"smem\": %zu, \"a_desc\": [", sep, KIND, P::kBoxRows,
              P::kBoxBytes, P::kBoxes, P::kStageBytes, P::kStages, P::kBarrierOffset, P::kBarriers, P::kBytes);
  for (int s = 0; s < P::kStages; ++s)
    for (int c = 0; c < kConsumers; ++c)
      for (int ks = 0; ks < kBK / 16; ++ks)
        for (int op = 0; op < 2; ++op)
          std::printf("%s%llu", s + c + ks + op ? ", " : "",
                      static_cast<unsigned long long>(a_desc<KIND>(%SMEM_BASE% + s * P::kStageBytes, c, ks, op)));
  std::printf("], \"b_desc\": [");
  for (int s = 0; s < P::kStages; ++s)
    for (int ks = 0; ks < kBK / 16; ++ks)
      for (int op = 0; op < 2; ++op)
        std::printf("%s%llu", s + ks + op ? ", " : "",
                    static_cast<unsigned long long>(b_desc<KIND>(%SMEM_BASE% + s * P::kStageBytes, ks, op)));
  std::printf("], \"stage\": [");
  for (uint32_t it = 0; it < 256; ++it)
    std::printf("%s[%u, %u]", it ? ", " : "", stage_of<P::kStages>(it).index, stage_of<P::kStages>(it).parity);
  std::printf("]}");
}

int main() {
  std::printf("{\"bm\": %d, \"bn\": %d, \"bk\": %d, \"box_cols\": %d, \"consumers\": %d, \"warps\": %d, "
              "\"partials_per_tile\": %d, \"ring_bytes\": %u, \"mn_step_bytes\": %u, \"k_step_bytes\": %d, "
              "\"consumer_row_bytes\": %u, \"atom_bytes\": %d,\n",
              kBM, kBN, kBK, kBoxCols, kConsumers, kWarpsPerConsumer, kPartialsPerTile, kRingBytes, kMnStepBytes,
              sm90::kKStepBytes, kConsumerRowBytes, sm90::kSwizzleAtomBytes);
  std::printf("\"kinds\": {");
  print_kind<kInner>("");
  print_kind<kOuter>(", ");
  print_kind<kOuterSame>(", ");
  std::printf("},\n\"acc\": [");
  for (int t = 0; t < 128; ++t)
    for (int r = 0; r < 64; ++r)
      std::printf("%s[%d, %d]", t + r ? ", " : "", sm90::acc_row(t, r), sm90::acc_col(t, r));
  std::printf("],\n\"boxes_in\": [");
  for (int cols = 0; cols <= 400; ++cols)
    for (int col0 = 0; col0 <= 384; col0 += 128)
      std::printf("%s%u", cols + col0 ? ", " : "", boxes_in(cols, col0, 2));
  std::printf("],\n\"partials\": [%lld, %lld, %lld, %lld],\n",
              static_cast<long long>(sq_frobenius_sm90_partials(5, 200, 136, false, false)),
              static_cast<long long>(sq_frobenius_sm90_partials(5, 1000, 1000, true, false)),
              static_cast<long long>(sq_frobenius_sm90_partials(300, 64, 64, false, true)),
              static_cast<long long>(sq_frobenius_sm90_partials(300, 64, 64, true, true)));
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
  // The epilogue's mask of every (tile, consumer) of each (rows, cols, symmetric) matrix, 4 registers
  // per hex digit (thread-major).
  std::printf("},\n\"masks\": {");
  const long long bounds[][3] = {%BOUNDS%};
  first = true;
  for (const auto& c : bounds) {
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
    folder = tmp_path_factory.mktemp("frobenius_sm90_layout")
    walks = ", ".join(f"{{{a}, {b}, {int(sym)}}}" for a, b, sym in WALKS)
    bounds = ", ".join(f"{{{r}, {c}, {int(sym)}}}" for r, c, sym in MATRICES)
    program = _HOST_PROGRAM.replace("%SMEM_BASE%", f"{SMEM_BASE}u").replace("%WALKS%", walks)
    info = _nvcc.host_probe(folder, program.replace("%BOUNDS%", bounds), "90a")
    info["acc"] = np.array(info["acc"]).reshape(128, 64, 2)
    c, k = info["consumers"], info["bk"] // 16
    for kind in info["kinds"].values():
        kind["a_desc"] = np.array(kind["a_desc"], dtype=np.uint64).reshape(kind["stages"], c, k, 2)
        kind["b_desc"] = np.array(kind["b_desc"], dtype=np.uint64).reshape(kind["stages"], k, 2)
    info["kinds"] = {int(key): kind for key, kind in info["kinds"].items()}
    info["boxes_in"] = np.array(info["boxes_in"]).reshape(401, 4)
    info["masks"] = {key: [_unpack_mask(m) for m in masks] for key, masks in info["masks"].items()}
    return info


@pytest.fixture(scope="module")
def sm90a_build(tmp_path_factory):
    """(ptxas -v report, object path) of one nvcc call compiling frobenius_sm90.cu for sm_90a."""
    out = tmp_path_factory.mktemp("frobenius_sm90a") / "frobenius_sm90.o"
    return _nvcc.compile_objects([SOURCE], SM90A, out.parent, out), out


# ---- the compiled kernel --------------------------------------------------------------------------


@pytest.mark.slow  # nvcc
def test_compiles_for_sm90a_without_spills(sm90a_build):
    report, _ = sm90a_build
    kernels = re.findall(r"Compiling entry function '([^']+)' for 'sm_90a'", report)
    # inner (Li0E), outer (Li1E), outer with b = a (Li2E), each for bf16 and fp16
    found = sorted(re.search(r"sq_frobenius_sm90_kernelI(\w+?)(Li\dE)EEv", k).groups() for k in kernels)
    assert found == sorted((t, f"Li{kind}E") for t in ("13__nv_bfloat16", "6__half") for kind in range(3)), kernels
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) == len(kernels) and frames, report
    assert all(f == ("0", "0", "0") for f in frames), f"stack frame or spills (frame, stores, loads): {frames}"
    assert "serialized" not in report, f"ptxas serialises the wgmma:\n{report}"


@pytest.mark.slow  # nvcc
def test_sass_uses_wgmma_tma_and_mbarriers(sm90a_build):
    """Per kernel: the inner route's wgmma read both operands MN-major (tnspA.tnspB), the outer
    route's both K-major (no transpose); bf16 and fp16; TMA loads, mbarriers and setmaxnreg."""
    _, obj = sm90a_build
    functions = re.split(r"\n\s*Function : ", _nvcc.sass(obj))[1:]
    kernels = {re.search(r"kernelI(\w+?)Li(\d)E", f).groups(): f for f in functions if "sq_frobenius_sm90_kernel" in f}
    assert len(kernels) == 6, sorted(kernels)
    for (dtype, kind), sass in kernels.items():
        what = f"{dtype} kind {kind}"
        suffix = r"\.BF16" if "bfloat16" in dtype else r"(?!\.)"
        hgmma = re.findall(rf"\bHGMMA\.64x128x16\.F32{suffix}[^;]*", sass)
        assert len(hgmma) >= (8 if kind == "1" else 4), f"{what}: too few wgmma m64n128k16: {len(hgmma)}"
        transposed = [h for h in hgmma if ".tnspA.tnspB" in h]
        assert transposed == (hgmma if kind == "0" else []), f"{what}: operand majorness: {hgmma[:2]}"
        for instruction in (r"\bUTMALDG\.2D\b", r"\bSYNCS\.ARRIVE\.TRANS64", r"\bSYNCS\.PHASECHK\.TRANS64\.TRYWAIT\b",
                            r"\bUSETMAXREG\b"):  # fmt: skip
            assert re.search(instruction, sass), f"{what}: no {instruction} in the SASS"
        assert not re.search(r"\bHMMA\.", sass), f"{what}: mma.sync (HMMA) in an sm_90a kernel"


@pytest.mark.slow  # nvcc
def test_plain_sm90_is_refused(tmp_path):
    message = _nvcc.compile_error(SOURCE, "-gencode=arch=compute_90,code=sm_90", tmp_path / "x.o")
    assert "frobenius_sm90.cu uses wgmma and TMA" in message, message[-2000:]


@pytest.mark.slow  # nvcc
def test_object_reaches_the_driver_through_the_runtime(sm90a_build):
    _, obj = sm90a_build
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\bcu[A-Z]\w*", undefined), f"driver API symbols linked directly: {undefined}"
    assert "cudaGetDriverEntryPoint" in undefined
    assert re.search(r"fastssl\w*sum_partials", undefined), "the second pass should be frobenius.cu's sum_partials"
    defined = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    for name in ("sq_frobenius_sm90", "sq_frobenius_sm90_supported", "sq_frobenius_sm90_partials"):
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

    from fastssl.kernels.cuda._ext import launcher

    name = "sq_frobenius_forward"
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
@pytest.mark.parametrize("kind_id", [INNER, OUTER, OUTER_SAME])
def test_shared_memory_plan_fits_and_boxes_are_atom_aligned(kernel, kind_id):
    atom, kind = kernel["atom_bytes"], kernel["kinds"][kind_id]
    assert kernel["box_cols"] * 2 == 128, "a box row must be exactly the 128-byte swizzle span"
    assert kernel["bm"] == kernel["consumers"] * kernel["box_cols"] and kernel["bn"] == 2 * kernel["box_cols"]
    # inner: kBK rows of N per box, 2 of â and 2 of b̂; outer: 128 rows per box, rows I and J of each operand
    assert kind["box_rows"] == (kernel["bk"] if kind_id == INNER else kernel["bm"])
    assert kind["boxes"] == (2 if kind_id == OUTER_SAME else 4)
    assert kind["box_bytes"] == kind["box_rows"] * 128 and kind["box_bytes"] % atom == 0
    assert kind["stage_bytes"] == kind["boxes"] * kind["box_bytes"]
    assert kind["stages"] == kernel["ring_bytes"] // kind["stage_bytes"] >= 3
    assert kind["barrier_offset"] == kind["stages"] * kind["stage_bytes"] and kind["n_barriers"] == 2 * kind["stages"]
    assert kind["smem"] == atom + kind["barrier_offset"] + 8 * kind["n_barriers"] <= SMEM_LIMIT


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("kind_id", [INNER, OUTER, OUTER_SAME])
def test_descriptors(kernel, kind_id):
    """inner: MN-major, A = the consumer's box of â, B = b̂'s two boxes one box apart (leading byte
    offset), a k16 step = 16 rows; outer: K-major, A = the consumer's 64 rows of the rows-I box of â
    (b̂: the third box), B = the rows-J box, a k16 step = 32 bytes."""
    kind, atom = kernel["kinds"][kind_id], kernel["atom_bytes"]
    box = kind["box_bytes"]
    for s in range(kind["stages"]):
        stage = SMEM_BASE + s * kind["stage_bytes"]
        for ks in range(kernel["bk"] // 16):
            for op in range(2 if kind_id == OUTER else 1):
                for c in range(kernel["consumers"]):
                    d = decode_desc(int(kind["a_desc"][s, c, ks, op]))
                    if kind_id == INNER:
                        want = {"start": stage + c * box + ks * kernel["mn_step_bytes"], "lbo": box}
                    else:
                        want = {"start": stage + 2 * op * box + c * kernel["consumer_row_bytes"] +
                                ks * kernel["k_step_bytes"], "lbo": 16}  # fmt: skip
                    assert d == {**want, "sbo": atom, "base_offset": 0, "swizzle": 1}, (s, c, ks, op)
                d = decode_desc(int(kind["b_desc"][s, ks, op]))
                if kind_id == INNER:
                    want = {"start": stage + 2 * box + ks * kernel["mn_step_bytes"], "lbo": box}
                else:
                    want = {"start": stage + (2 * op + 1) * box + ks * kernel["k_step_bytes"], "lbo": 16}
                assert d == {**want, "sbo": atom, "base_offset": 0, "swizzle": 1}, (s, ks, op)
    assert kernel["mn_step_bytes"] == 16 * 128 and kernel["k_step_bytes"] == 32
    assert kernel["consumer_row_bytes"] == 64 * 128


@pytest.mark.slow  # the host probe is an nvcc run
def test_fragment_map_and_stage_functions(kernel):
    for thread in range(128):
        for reg in range(64):
            assert tuple(kernel["acc"][thread, reg]) == isa_acc(thread, reg), (thread, reg)
    for kind in kernel["kinds"].values():
        s = kind["stages"]
        assert kind["stage"] == [[it % s, (it // s) % 2] for it in range(256)]


@pytest.mark.slow  # the host probe is an nvcc run
def test_tile_walks_cover_the_matrix_once_with_the_right_weights(kernel):
    """Non-symmetric: every (i, j) once, weight 1. Symmetric: every i ≤ j once, weight 1 on the
    diagonal and 2 off it, so Σ over the walk of weight·(tile sum) = the whole sum of a symmetric matrix."""
    for a, b, sym in WALKS:
        walk = kernel["walks"][f"{a},{b},{int(sym)}"]
        cells = [(i, j) for i, j, _ in walk]
        if sym:
            assert sorted(cells) == [(i, j) for i in range(a) for j in range(i, a)]
            assert all(w == (1.0 if i == j else 2.0) for i, j, w in walk)
        else:
            assert sorted(cells) == [(i, j) for i in range(a) for j in range(b)] and all(w == 1.0 for *_, w in walk)
        assert cells == sorted(cells), "row by row: a CTA's consecutive tiles share the row panel"


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("rows,cols,symmetric", MATRICES)
def test_epilogue_masks_keep_exactly_the_entries_of_the_matrix(kernel, rows, cols, symmetric):
    """The kernel's in_c at each register's (row, column) of the ISA's accumulator table: row < rows and
    column < cols, across every tile of the walk (the diagonal tiles of symmetric walks included)."""
    walk = kernel["walks"][f"{_tiles(rows)},{_tiles(cols)},{int(symmetric)}"]
    masks = kernel["masks"][f"{rows},{cols},{int(symmetric)}"]
    assert len(masks) == len(walk) * kernel["consumers"]
    for t, (i, j, _) in enumerate(walk):
        for c in range(kernel["consumers"]):
            want = np.array([[128 * i + 64 * c + isa_acc(th, r)[0] < rows and 128 * j + isa_acc(th, r)[1] < cols
                              for r in range(64)] for th in range(128)])  # fmt: skip
            assert (masks[t * kernel["consumers"] + c] == want).all(), (t, c)


@pytest.mark.slow  # the host probe is an nvcc run
def test_boxes_in_counts_the_boxes_that_reach_the_matrix(kernel):
    for cols in range(401):
        for n, col0 in enumerate(range(0, 385, 128)):
            want = sum(1 for h in range(2) if col0 + 64 * h < cols)
            assert kernel["boxes_in"][cols, n] == want, (cols, col0)


def emulate_kernel(kernel, route, a, b, same, grid, mutate=None):
    """Run the kernel's producer and consumers for every CTA of a `grid` on â = a (N, Da), b̂ = b:
    TMA as the kernel issues its boxes (zero-filled past the tensor; boxes it skips keep what the ring
    held before; never-written shared memory is NaN), wgmma reading the operands through the kernel's
    descriptors (inner: the MN-major canonical layout, outer: K-major), the epilogue with the kernel's
    masks and weights. Returns the partials in their slots. `mutate` breaks one thing, for the tests
    that show the emulation notices."""
    bm, bn, bk, box_cols = kernel["bm"], kernel["bn"], kernel["bk"], kernel["box_cols"]
    n = a.shape[0]
    kind_id = INNER if route == "inner" else (OUTER_SAME if same else OUTER)
    kind = kernel["kinds"][kind_id]
    box, stage_bytes = kind["box_bytes"], kind["stage_bytes"]
    rows, cols, symmetric = (a.shape[1], b.shape[1], same) if route == "inner" else (n, n, True)
    walk = [tuple(t) for t in kernel["walks"][f"{_tiles(rows)},{_tiles(cols)},{int(symmetric)}"]]
    masks = kernel["masks"][f"{rows},{cols},{int(symmetric)}"]
    chunks = -(-(n if route == "inner" else a.shape[1]) // bk)
    partials = np.full(len(walk) * kernel["partials_per_tile"], np.nan)
    acc = kernel["acc"]
    for cta in range(grid):
        smem = np.full(SMEM_LIMIT // 2, np.nan)
        it = 0
        for t in range(cta, len(walk), grid):
            i, j, weight = walk[t]
            if mutate == "weight":
                weight = 1.0
            r0, c0 = i * bm, j * bn
            d = np.zeros((kernel["consumers"], 2, 64, bn))  # per consumer: the tile of C or ââᵀ, then of b̂b̂ᵀ
            for kc in range(chunks):
                s, _ = kind["stage"][it]
                stage = SMEM_BASE + s * stage_bytes
                if route == "inner":  # TMA boxes of kBK rows of N x 64 columns, the kernel's boxes_in
                    for h in range(kernel["boxes_in"][rows, r0 // bm]):
                        tma_store(smem, stage + h * box, zero_filled_box(a, kc * bk, r0 + h * box_cols, bk))
                    for h in range(kernel["boxes_in"][cols, c0 // bn]):
                        tma_store(smem, stage + (2 + h) * box, zero_filled_box(b, kc * bk, c0 + h * box_cols, bk))
                else:  # TMA boxes of 128 rows x kBK columns of K: rows I, J of â, then of b̂
                    for h, (m, row0) in enumerate([(a, r0), (a, c0), (b, r0), (b, c0)][: kind["boxes"]]):
                        tma_store(smem, stage + h * box, zero_filled_box(m, row0, kc * bk, bm))
                for c in range(kernel["consumers"]):
                    for ks in range(bk // 16):
                        for op in range(2 if kind_id == OUTER else 1):
                            da, db_ = int(kind["a_desc"][s, c, ks, op]), int(kind["b_desc"][s, ks, op])
                            if route == "inner" and mutate != "k_major":
                                x, y = wgmma_operand_mn(smem, da, 64).T, wgmma_operand_mn(smem, db_, bn)
                            elif route == "inner":
                                x, y = wgmma_operand(smem, da, 64), wgmma_operand_mn(smem, db_, bn)
                            else:
                                x, y = wgmma_operand(smem, da, 64), wgmma_operand(smem, db_, bn).T
                            with np.errstate(invalid="ignore"):
                                d[c, op] += x @ y
                it += 1
            for c in range(kernel["consumers"]):
                mask = masks[t * kernel["consumers"] + c]  # the kernel's in_c
                other = d[c, 1] if kind_id == OUTER else d[c, 0]
                for warp in range(4):
                    total = 0.0
                    for thread in range(32 * warp, 32 * warp + 32):
                        for reg in range(64):
                            if mask[thread, reg] or mutate == "no_mask":
                                at = tuple(acc[thread, reg])
                                total += d[c, 0][at] * other[at]
                    partials[(t * kernel["consumers"] + c) * 4 + warp] = weight * total
    return partials


def _operands(n, da, db, same, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-4, 5, size=(n, da)).astype(np.float64)  # exact in bf16 and in every sum
    b = a if same else rng.integers(-4, 5, size=(n, db)).astype(np.float64)
    return a, b


def _check_partials(kernel, partials, tile_sums, walk):
    assert not np.isnan(partials).any(), "a partial slot unwritten, or a NaN of unwritten memory summed"
    per = kernel["partials_per_tile"]
    for t, (i, j, w) in enumerate(walk):
        assert partials[t * per : (t + 1) * per].sum() == w * tile_sums(i, j), (t, i, j)


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("n,da,db,same,grid", CASES)
def test_emulated_inner_kernel_is_the_squared_frobenius_norm(kernel, n, da, db, same, grid):
    """The inner route's kernel, emulated with its own constants: each tile's partials are
    weight·‖C_ij‖², and their sum is ‖âᵀb̂‖²_F exactly."""
    a, b = _operands(n, da, db, same, seed=n)
    partials = emulate_kernel(kernel, "inner", a, b, same, grid)
    c = a.T @ b
    walk = kernel["walks"][f"{_tiles(da)},{_tiles(db)},{int(same)}"]
    _check_partials(kernel, partials, lambda i, j: (c[128 * i : 128 * i + 128, 128 * j : 128 * j + 128] ** 2).sum(), walk)
    assert partials.sum() == (c**2).sum()


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("n,k,same,grid", OUTER_CASES)
def test_emulated_outer_kernel_is_the_squared_frobenius_norm(kernel, n, k, same, grid):
    """The outer route's kernel: each tile's partials are weight·Σ (ââᵀ)_IJ ∘ (b̂b̂ᵀ)_IJ, and their sum
    is ‖âᵀb̂‖²_F exactly (Garrido et al. 2023's identity)."""
    a, b = _operands(n, k, k, same, seed=n + k)
    partials = emulate_kernel(kernel, "outer", a, b, same, grid)
    ga, gb = a @ a.T, b @ b.T
    walk = kernel["walks"][f"{_tiles(n)},{_tiles(n)},1"]

    def tile_sum(i, j):
        rows, cols = slice(128 * i, 128 * i + 128), slice(128 * j, 128 * j + 128)
        return (ga[rows, cols] * gb[rows, cols]).sum()

    _check_partials(kernel, partials, tile_sum, walk)
    assert partials.sum() == ((a.T @ b) ** 2).sum()


@pytest.mark.slow  # the host probe is an nvcc run
def test_partial_counts(kernel):
    per = kernel["partials_per_tile"]
    assert per == kernel["consumers"] * kernel["warps"] == 8
    # inner 200 x 136: 2 x 2 tiles; inner 1000 with b = a: 8·9/2; outer N = 300: 3·4/2 either way
    assert kernel["partials"] == [per * 4, per * 36, per * 6, per * 6]


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("route,mutation", [("inner", "k_major"), ("inner", "no_mask"), ("inner", "weight"),
                                            ("outer", "weight")])  # fmt: skip
def test_emulation_detects_a_broken_kernel(kernel, route, mutation):
    """The check has teeth: K-major descriptors for the inner route's â, an inner epilogue without the
    (row, column) masks (it sums entries past C: NaN of never-loaded boxes, or stale ones), or weight 1
    off the diagonal of a symmetric walk, each changes the result. (The outer route loads every box, so
    the entries past N are TMA zeros and its masks only restate that.)"""
    if route == "inner":
        n, da, db, same, grid = (150, 264, 264, True, 2) if mutation == "weight" else (100, 200, 136, False, 1)
    else:
        n, da, same, grid = 200, 72, False, 1
        db = da
    a, b = _operands(n, da, db, same, seed=7)
    partials = emulate_kernel(kernel, route, a, b, same, grid, mutate=mutation)
    assert np.isnan(partials).any() or partials.sum() != ((a.T @ b) ** 2).sum()


@pytest.mark.slow  # the host probe is an nvcc run
@pytest.mark.parametrize("kind_id", [INNER, OUTER])
@pytest.mark.parametrize("tiles,chunks", [(1, 1), (1, 9), (3, 2), (4, 7), (6, 5)])
def test_pipeline_never_hangs_or_races(kernel, kind_id, tiles, chunks):
    """The ring protocol of the kernel's loops (one stage per kBK of the reduction, numbered across a
    CTA's tiles; release after wait_group 1) under random interleavings, with test_sm90_layout's
    emulator (whose extra resident-tile barrier this kernel does not have: it only adds a first wait),
    for the 6-stage and the 3-stage rings."""
    kind = kernel["kinds"][kind_id]
    for seed in range(30):
        emulate_pipeline(kind["stage"], kind["stages"], tiles, chunks, kernel["consumers"], seed)
    with pytest.raises(Deadlock):
        emulate_pipeline(kind["stage"], kind["stages"], 2, 3, kernel["consumers"], 0, producer_flip=0)


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
    assert hasattr(ext, "sq_frobenius_forward_sm90"), "fastssl._C on an sm_90 GPU lacks the sm_90a kernel"
    monkeypatch.setenv(SM90_ENV, "1")
    return ext


def _dense64(a, b):
    return (a.double().T @ (a if b is None else b).double()).square().sum()


@pytest.mark.cuda
@pytest.mark.parametrize("route", ["inner", "outer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("n,d", [(1, 8), (100, 136), (1000, 200), (513, 264), (200, 1000), (2048, 1024),
                                 (2048, 8192)])  # fmt: skip
def test_sm90_op_matches_float64(sm90_extension, monkeypatch, route, dtype, same, n, d):
    """The fused kernel (it must be the one taken) against the float64 product of the same rounded
    operands: only fp32 accumulation separates them; the cuBLAS route agrees; two runs are bitwise equal."""
    from fastssl.kernels.cuda.frobenius import sq_frobenius_forward
    from tests.utils import assert_close

    gen = torch.Generator(device="cuda").manual_seed(n + d)
    a = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    b = None if same else (0.5 * a.float() + torch.randn(n, d, device="cuda", generator=gen)).to(dtype)
    assert sm90_extension.sq_frobenius_sm90_supported(a, b, route == "outer")
    got = sq_frobenius_forward(a, b, None, None, None, None, route)
    want = _dense64(a, b)
    what = f"sm90 {route} ‖aᵀb‖² same={same} ({n}, {d}) {dtype}"
    assert got.dtype == torch.float32 and got.shape == ()
    assert_close(got, want, torch.float32, what=what)
    assert torch.equal(got, sq_frobenius_forward(a, b, None, None, None, None, route)), f"not deterministic: {what}"
    monkeypatch.delenv(SM90_ENV)
    cublas = sq_frobenius_forward(a, b, None, None, None, None, route)
    assert_close(got, cublas, torch.float32, what=f"{what} vs cuBLAS")


@pytest.mark.cuda
@pytest.mark.parametrize("route", ["inner", "outer"])
def test_sm90_with_column_transform(sm90_extension, route):
    """The transform is applied before the kernel (affine_columns), as on the cuBLAS route."""
    from fastssl.kernels.cuda.frobenius import sq_frobenius_forward
    from fastssl.kernels.torch.frobenius import apply_transform
    from tests.utils import assert_close

    a = (3 + torch.randn(300, 264, device="cuda")).to(torch.bfloat16)
    b = torch.randn(300, 264, device="cuda").to(torch.bfloat16)
    shift, scale = a.float().mean(0), 1 / (a.float().std(0) + 1e-3)
    got = sq_frobenius_forward(a, b, shift, scale, None, scale, route)
    want = _dense64(apply_transform(a, shift, scale), apply_transform(b, None, scale))
    assert_close(got, want, torch.float32, what=f"sm90 {route} with a column transform")


@pytest.mark.cuda
def test_sm90_inner_takes_rectangular_operands(sm90_extension):
    from tests.utils import assert_close

    a = torch.randn(300, 264, device="cuda").to(torch.bfloat16)
    c = torch.randn(300, 72, device="cuda").to(torch.bfloat16)
    assert_close(sm90_extension.sq_frobenius_forward_sm90(a, c, False), _dense64(a, c), torch.float32,
                 what="sm90 inner, Da != Db")  # fmt: skip
    assert not sm90_extension.sq_frobenius_sm90_supported(a, c, True), "the outer route needs equal widths"


@pytest.mark.cuda
@pytest.mark.parametrize("outer", [False, True])
def test_sm90_takes_only_what_tma_can_read(sm90_extension, outer):
    supported = sm90_extension.sq_frobenius_sm90_supported
    a = torch.randn(300, 264, device="cuda", dtype=torch.bfloat16)
    assert supported(a, None, outer) and supported(a, a.clone(), outer)
    assert not supported(a.float(), None, outer)  # fp32: cuBLAS
    assert not supported(a[:, 1:], None, outer)  # base off 16-byte alignment
    odd = torch.randn(300, 100, device="cuda", dtype=torch.bfloat16)
    assert not supported(odd, None, outer)  # row stride 200 bytes
    with pytest.raises(ValueError, match="same number of rows"):
        supported(a, a[:10], outer)
    with pytest.raises(TypeError, match="must be"):
        supported(a, a.half(), outer)
    with pytest.raises(ValueError, match="TMA"):
        sm90_extension.sq_frobenius_forward_sm90(odd, None, outer)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", ["covariance", "gram"])
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg", "vicreg_weights", "spectral"])
@pytest.mark.parametrize("n,d", [(256, 1000), (1000, 256), (512, 2048)])
def test_sm90_losses_match_the_spec(sm90_extension, dtype, route, name, n, d):
    from tests.backends.test_frobenius import check_loss

    check_loss(name, "cuda", route, n, d, dtype=dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("route", ["covariance", "gram"])
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_sm90_losses_at_the_benchmark_size(sm90_extension, route, name):
    """(N, D) = (2048, 8192) in bf16, the benchmark size, against the float64 spec (run on the GPU)."""
    from tests.backends.test_frobenius import check_loss

    check_loss(name, "cuda", route, 2048, 8192, dtype=torch.bfloat16, device="cuda", spec_device="cuda")
