"""CPU emulation of the data layouts and the pipeline of csrc/pairwise_lse_sm90.cu (no GPU needed).

The Hopper forward never sees its operands in registers: TMA writes them to shared memory with the
128-byte swizzle, wgmma reads them through matrix descriptors, and the accumulators come back in
wgmma's fragment layout, on which the kernel applies its masks. A mistake in any of these is silent
garbage on a GPU, so each is checked here against the documentation, with the kernel's own values:
a small host program includes csrc/pairwise_lse_sm90.cu and prints its tile constants, its
descriptors (`sw128_desc`), its fragment map (`acc_row`, `acc_col`) and its pipeline stage/phase
function (`stage_of`); everything else below is written from the documents, independently:

  * TMA, CU_TENSOR_MAP_SWIZZLE_128B (CUDA programming guide, "swizzle modes" of the tensor memory
    accelerator): the 16-byte chunk index (address bits 4-6) is XORed with address bits 7-9, the row
    within the 1024-byte span of 8 rows of 128 bytes; out-of-bounds elements are filled with zeros.
  * The wgmma matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address bits 0-13,
    leading byte offset 16-29, stride byte offset 32-45, base offset 49-51, swizzle mode 62-63
    (1 = 128-byte), addresses in 16-byte units; the K-major 128-byte-swizzle canonical layout
    ((8, m), (T, 2k)) : ((8T, SBO), (1, T)) with T = 8 16-bit elements, the swizzle applied to the
    resulting address (the leading byte offset is unused: a k16 step never leaves a 128-byte row).
  * The accumulator fragment (PTX ISA, "wgmma .m64nNk16 register fragment layout for accumulator
    matrix D"): warp w of the warpgroup holds rows 16w..16w+15; within it, lane (g = lane/4,
    t = lane%4) holds d[4j + i] at row g + 8·(i/2), column 8j + 2t + i%2. Cross-checked against
    CuTe's SM90 accumulator layout ((4, 8, 4), (2, 2, N/8)) : ((128, 1, 16), (64, 8, 512)).
  * mbarrier phases (PTX ISA, "mbarrier.try_wait"): a phase completes when its pending arrivals and
    its transaction count reach zero; try_wait.parity(P) succeeds once the phase of parity P is the
    last completed one (on a fresh barrier, P = 1 succeeds at once).

What is mirrored from the kernel (keep in sync): the shared-memory map (x tile at the aligned base,
the ring after kMaxChunks chunks), the operand addresses `x_addr + kc·kChunkBytes + ks·kKStepBytes`
(x_addr = tile base + consumer·kConsumerRowBytes) and `ring + stage·kChunkBytes + ks·kKStepBytes`,
the producer/consumer loops with their waits and arrivals, and (dy, x = y) the column weights' masks,
the per-warpgroup staging of the column statistics (write, named barrier, read; `col_stats_offset`)
and the symmetric kernel's two passes over 64-column halves of each tile (`logit_width`, `slice_width`).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.csrc import _nvcc

pytestmark = pytest.mark.slow  # the host probe is an nvcc run (seconds), as the other compiler tests

SMEM_LIMIT = 227 * 1024  # sm_90 dynamic shared memory per block
SMEM_BASE = 4096  # an aligned dynamic shared-memory base for the emulation

_HOST_PROGRAM = r"""
#include "pairwise_lse_sm90.cu"
#include <cstdio>

using namespace fastssl;

template <int KIND>
void print_plan(const char* name) {
  using P = SmemPlan<KIND>;
  std::printf("\"%s\": {\"max_chunks\": %d, \"ring\": %u, \"slices\": %u, \"stats\": %u, \"barriers\": %u, "
              "\"n_barriers\": %d, \"bytes\": %zu},\n", name, P::kMaxChunks, P::kRingOffset, P::kSliceOffset,
              P::kStatsOffset, P::kBarrierOffset, P::kBarriers, P::kBytes);
}

int main() {
  std::printf("{\"bm\": %d, \"bn\": %d, \"bk\": %d, \"stages\": %d, \"consumers\": %d, \"dv\": %d, \"vstages\": %d, "
              "\"chunk_bytes\": %u, \"consumer_row_bytes\": %u, \"vstage_bytes\": %u, \"kstep_bytes\": %d, "
              "\"atom_bytes\": %d,\n",
              kBM, kBN, kBK, kStages, kConsumers, kDV, kVStages, kChunkBytes, kConsumerRowBytes, kVStageBytes,
              sm90::kKStepBytes, sm90::kSwizzleAtomBytes);
  print_plan<kFwd>("fwd");
  print_plan<kRows>("rows");
  print_plan<kCols>("cols");
  print_plan<kSym>("sym");
  std::printf("\"widths\": {\"fwd\": [%d, %d], \"rows\": [%d, %d], \"cols\": [%d, %d], \"sym\": [%d, %d]},\n",
              slice_width(kFwd), logit_width(kFwd), slice_width(kRows), logit_width(kRows), slice_width(kCols),
              logit_width(kCols), slice_width(kSym), logit_width(kSym));
  std::printf("\"stats_bytes\": %u, \"stats_offset\": [", kColStatsBytes);
  for (int c = 0; c < kConsumers; ++c)
    for (int t = 0; t < 8; ++t) std::printf("%s%u", c + t ? ", " : "", col_stats_offset(c, t));
  std::printf("],\n");
  std::printf("\"acc\": [");
  for (int t = 0; t < 128; ++t)
    for (int r = 0; r < 64; ++r)
      std::printf("%s[%d, %d]", t + r ? ", " : "", sm90::acc_row(t, r), sm90::acc_col(t, r));
  std::printf("],\n\"a_reg\": [");
  for (int kk = 0; kk < 8; ++kk)
    for (int q = 0; q < 4; ++q)
      for (int half = 0; half < 2; ++half)
        std::printf("%s%d", kk + q + half ? ", " : "", sm90::acc_reg_of_a(kk, q, half));
  std::printf("],\n\"stage\": [");
  for (uint32_t it = 0; it < 64; ++it)
    std::printf("%s[%u, %u]", it ? ", " : "", stage_of<kStages>(it).index, stage_of<kStages>(it).parity);
  std::printf("],\n\"vstage\": [");
  for (uint32_t it = 0; it < 64; ++it)
    std::printf("%s[%u, %u]", it ? ", " : "", stage_of<kVStages>(it).index, stage_of<kVStages>(it).parity);
  std::printf("],\n\"desc\": [");
  for (uint32_t addr = 0; addr < 256 * 1024; addr += 16)
    std::printf("%s%llu", addr ? ", " : "", static_cast<unsigned long long>(sm90::sw128_desc(addr)));
  std::printf("],\n\"mn_desc\": [");  // as the dx kernel builds them: N blocks one chunk apart
  for (uint32_t addr = 0; addr < 256 * 1024; addr += 16)
    std::printf("%s%llu", addr ? ", " : "", static_cast<unsigned long long>(sm90::sw128_mn_desc(addr, kChunkBytes)));
  std::printf("]}\n");
  return 0;
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The kernel's constants, fragment map, stage function and descriptors, printed by a host program."""
    info = _nvcc.host_probe(tmp_path_factory.mktemp("sm90_layout"), _HOST_PROGRAM, "90a")
    info["acc"] = np.array(info["acc"]).reshape(128, 64, 2)
    info["a_reg"] = np.array(info["a_reg"]).reshape(8, 4, 2)
    info["stats_offset"] = np.array(info["stats_offset"]).reshape(info["consumers"], 8)
    return info


# ---- the documents, in Python ---------------------------------------------------------------------


def isa_acc(thread: int, reg: int) -> tuple[int, int]:
    """PTX ISA: (row, col) of accumulator register `reg` of warpgroup thread `thread` (m64nN, fp32)."""
    warp, lane = divmod(thread, 32)
    g, t = divmod(lane, 4)
    j, i = divmod(reg, 4)
    return 16 * warp + g + 8 * (i // 2), 8 * j + 2 * t + i % 2


def cute_acc(thread: int, reg: int) -> tuple[int, int]:
    """CuTe's SM90 CLayout_64xN ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)) -> (m, n), column-major 64 x N."""
    t0, t1, t2 = thread % 4, (thread // 4) % 8, thread // 32
    v0, v1, v2 = reg % 2, (reg // 2) % 2, reg // 4
    index = 128 * t0 + t1 + 16 * t2 + 64 * v0 + 8 * v1 + 512 * v2
    return index % 64, index // 64


def swizzle128(addr: np.ndarray) -> np.ndarray:
    """The 128-byte swizzle on shared-memory byte addresses: bits 4-6 ^= bits 7-9."""
    return addr ^ (((addr >> 7) & 7) << 4)


def tma_store(smem: np.ndarray, base: int, tile: np.ndarray) -> None:
    """TMA box (rows x 64 two-byte elements, zero-filled past the tensor) into byte-addressed `smem`
    (one value per 2-byte element slot), 128-byte swizzle."""
    rows, cols = tile.shape
    r, k = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    addr = swizzle128(base + r * 128 + 2 * k)
    smem[addr // 2] = tile


def decode_desc(desc: int) -> dict:
    return {
        "start": (desc & 0x3FFF) << 4,
        "lbo": ((desc >> 16) & 0x3FFF) << 4,
        "sbo": ((desc >> 32) & 0x3FFF) << 4,
        "base_offset": (desc >> 49) & 7,
        "swizzle": desc >> 62,
    }


def wgmma_operand(smem: np.ndarray, desc: int, rows: int) -> np.ndarray:
    """The rows x 16 K-major operand a wgmma reads through `desc` (128-byte swizzle)."""
    d = decode_desc(desc)
    assert d["swizzle"] == 1 and d["base_offset"] == 0, d
    r, k = np.meshgrid(np.arange(rows), np.arange(16), indexing="ij")
    addr = d["start"] + (r // 8) * d["sbo"] + (r % 8) * 128 + 2 * k
    return smem[swizzle128(addr) // 2]


def zero_filled_box(m: np.ndarray, row0: int, k0: int, rows: int) -> np.ndarray:
    box = np.zeros((rows, 64))
    part = m[row0 : row0 + rows, k0 : k0 + 64]
    box[: part.shape[0], : part.shape[1]] = part
    return box


# ---- layouts --------------------------------------------------------------------------------------


def test_isa_and_cute_accumulator_tables_agree():
    for thread in range(128):
        for reg in range(64):
            assert isa_acc(thread, reg) == cute_acc(thread, reg), (thread, reg)


def test_kernel_fragment_map_is_the_isa_layout(kernel):
    acc = kernel["acc"]
    for thread in range(128):
        for reg in range(64):
            assert tuple(acc[thread, reg]) == isa_acc(thread, reg), (thread, reg)
    # Each of the 64 x 128 elements is held once, and the masks' "two rows per thread" holds.
    assert len({tuple(x) for x in acc.reshape(-1, 2)}) == 64 * 128
    assert (acc[:, 0::4, 0] == acc[:, 1::4, 0]).all() and (acc[:, 2::4, 0] == acc[:, 0::4, 0] + 8).all()


def test_descriptors_encode_the_isa_fields(kernel):
    for addr in (0, 1024, 1024 + 32, 65536 + 96, 200 * 1024):
        d = decode_desc(kernel["desc"][addr // 16])
        assert d == {"start": addr, "lbo": 16, "sbo": kernel["atom_bytes"], "base_offset": 0, "swizzle": 1}, (addr, d)


@pytest.mark.parametrize("kind", ["fwd", "rows", "cols", "sym"])
def test_shared_memory_plan_fits_and_is_atom_aligned(kernel, kind):
    atom, chunk, plan = kernel["atom_bytes"], kernel["chunk_bytes"], kernel[kind]
    assert atom == 8 * 128 and chunk == kernel["bm"] * kernel["bk"] * 2 == kernel["bn"] * kernel["bk"] * 2
    assert kernel["bk"] * 2 == 128, "one chunk row must be exactly the 128-byte swizzle span"
    assert chunk % atom == 0 and kernel["consumer_row_bytes"] % atom == 0
    assert kernel["consumer_row_bytes"] * kernel["consumers"] == chunk
    assert plan["ring"] == plan["max_chunks"] * chunk and plan["slices"] == plan["ring"] + kernel["stages"] * chunk
    # Every TMA destination (x tile, ring stages, slice stages) sits on a 1024-byte swizzle atom.
    assert plan["ring"] % atom == 0 and plan["slices"] % atom == 0 and kernel["vstage_bytes"] % atom == 0
    backward = kind != "fwd"
    slice_bytes = kernel["vstages"] * kernel["vstage_bytes"] if backward else 0
    stats_bytes = 2 * kernel["consumers"] * kernel["stats_bytes"] if kind in ("cols", "sym") else 0
    assert plan["stats"] == plan["slices"] + slice_bytes and plan["stats"] % 16 == 0
    assert plan["barriers"] == plan["stats"] + stats_bytes and plan["barriers"] % 8 == 0
    assert kernel["vstage_bytes"] == kernel["dv"] // kernel["bk"] * chunk
    n_barriers = 1 + 2 * kernel["stages"] + (2 * kernel["vstages"] if backward else 0)
    assert plan["n_barriers"] == n_barriers
    assert plan["bytes"] == atom + plan["barriers"] + 8 * n_barriers <= SMEM_LIMIT, plan


@pytest.mark.parametrize("rows_x,rows_y,depth", [(128, 128, 64), (100, 77, 150), (128, 128, 512)])
def test_emulated_tile_gemm_lands_where_the_masks_look(kernel, rows_x, rows_y, depth):
    """TMA-store x and one column tile (zero-filled past the tensor), read them back through the
    kernel's descriptors and addresses, multiply as wgmma does, hand the result out by the ISA's
    fragment table, and compare each thread's registers with X·Yᵀ at the kernel's (acc_row, acc_col)."""
    rng = np.random.default_rng(0)
    x = rng.integers(-8, 8, size=(rows_x, depth)).astype(np.float64)  # exact in bf16 and in the sums
    y = rng.integers(-8, 8, size=(rows_y, depth)).astype(np.float64)
    bm, bn, bk, chunk = kernel["bm"], kernel["bn"], kernel["bk"], kernel["chunk_bytes"]
    chunks = -(-depth // bk)
    smem = np.full(SMEM_LIMIT // 2, np.nan)
    x_tile = SMEM_BASE
    ring = SMEM_BASE + kernel["fwd"]["ring"]
    for kc in range(chunks):
        tma_store(smem, x_tile + kc * chunk, zero_filled_box(x, 0, kc * bk, bm))
    want = x @ y.T
    acc = kernel["acc"]
    for consumer in range(kernel["consumers"]):
        d = np.zeros((64, bn))
        x_addr = x_tile + consumer * kernel["consumer_row_bytes"]
        for kc in range(chunks):
            stage, _ = kernel["stage"][kc]
            tma_store(smem, ring + stage * chunk, zero_filled_box(y, 0, kc * bk, bn))
            for ks in range(bk // 16):
                a = wgmma_operand(smem, kernel["desc"][(x_addr + kc * chunk + ks * kernel["kstep_bytes"]) // 16], 64)
                b = wgmma_operand(smem, kernel["desc"][(ring + stage * chunk + ks * kernel["kstep_bytes"]) // 16], bn)
                assert not np.isnan(a).any() and not np.isnan(b).any(), "read outside what TMA wrote"
                d += a @ b.T
        for thread in range(128):
            for reg in range(64):
                held = d[isa_acc(thread, reg)]
                row, col = 64 * consumer + acc[thread, reg, 0], acc[thread, reg, 1]
                expected = want[row, col] if row < rows_x and col < rows_y else 0.0
                assert held == expected, (consumer, thread, reg, row, col, held, expected)


def isa_a(thread: int, q: int, half: int) -> tuple[int, int]:
    """PTX ISA: (row, k) of the A element in register q (its lower or upper 16 bits, `half`) of
    warpgroup thread `thread`, wgmma m64nNk16 with A in registers (16-bit types)."""
    warp, lane = divmod(thread, 32)
    g, t = divmod(lane, 4)
    return 16 * warp + g + 8 * (q % 2), 2 * t + half + 8 * (q // 2)


def wgmma_operand_mn(smem: np.ndarray, desc: int, mn: int) -> np.ndarray:
    """The 16 x mn MN-major operand (k, n) a wgmma reads through `desc` with the transpose flag, 128-byte
    swizzle: CuTe's canonical ((8, n), (8, k)) : ((1, LBO), (8, SBO)) in 16-byte units (make_gmma_desc)."""
    d = decode_desc(desc)
    assert d["swizzle"] == 1 and d["base_offset"] == 0, d
    k, n = np.meshgrid(np.arange(16), np.arange(mn), indexing="ij")
    unit = n // 8
    addr = d["start"] + (unit % 8) * 16 + (unit // 8) * d["lbo"] + (k % 8) * 128 + (k // 8) * d["sbo"] + (n % 8) * 2
    return smem[swizzle128(addr) // 2]


def test_kernel_a_fragment_is_the_isa_layout(kernel):
    """The dx kernel feeds accumulator registers acc_reg_of_a(kk, q, half) of the logit tile to wgmma as
    A register q: they must hold the A element the ISA puts there (columns 16kk.. of the tile)."""
    acc, a_reg = kernel["acc"], kernel["a_reg"]
    for thread in range(128):
        for kk in range(8):
            for q in range(4):
                for half in range(2):
                    row, col = acc[thread, a_reg[kk, q, half]]
                    want_row, want_k = isa_a(thread, q, half)
                    assert (row, col) == (want_row, 16 * kk + want_k), (thread, kk, q, half)


def test_mn_descriptors_encode_the_isa_fields(kernel):
    for addr in (0, 1024, 2048 * 3, 65536 + 1024):
        d = decode_desc(kernel["mn_desc"][addr // 16])
        assert d == {"start": addr, "lbo": kernel["chunk_bytes"], "sbo": kernel["atom_bytes"], "base_offset": 0,
                     "swizzle": 1}, (addr, d)  # fmt: skip


@pytest.mark.parametrize("rows_y,depth,slice_index", [(128, 128, 0), (77, 200, 1), (128, 256, 1)])
def test_emulated_dx_gemm_lands_where_the_epilogue_looks(kernel, rows_y, depth, slice_index):
    """The dx kernel's second GEMM: the weights P in the logit accumulators (the kernel's fragment map),
    packed into A registers by acc_reg_of_a and read as the ISA's A fragment; the slice of the column
    tile TMA-stored as two chunks and read MN-major through the kernel's descriptors; the product handed
    out by the accumulator table must be P · Y[:, slice] at each register's (acc_row, acc_col)."""
    rng = np.random.default_rng(2)
    bn, bk, dv, chunk = kernel["bn"], kernel["bk"], kernel["dv"], kernel["chunk_bytes"]
    y = rng.integers(-8, 8, size=(rows_y, depth)).astype(np.float64)
    weights = rng.integers(-4, 4, size=(64, bn)).astype(np.float64)
    weights[:, rows_y:] = 0.0  # the masks zero the columns past the tile
    acc_map, a_reg = kernel["acc"], kernel["a_reg"]
    regs = np.array([[weights[tuple(acc_map[t, r])] for r in range(64)] for t in range(128)])  # s[] per thread
    smem = np.full(SMEM_LIMIT // 2, np.nan)
    stage = 1
    base = SMEM_BASE + kernel["rows"]["slices"] + stage * kernel["vstage_bytes"]
    dv0 = slice_index * dv
    for h in range(dv // bk):
        tma_store(smem, base + h * chunk, zero_filled_box(y, 0, dv0 + h * bk, bn))
    d = np.zeros((64, dv))
    for kk in range(bn // 16):
        a = np.full((64, 16), np.nan)
        for thread in range(128):
            for q in range(4):
                for half in range(2):
                    a[isa_a(thread, q, half)] = regs[thread, a_reg[kk, q, half]]
        b = wgmma_operand_mn(smem, kernel["mn_desc"][(base + kk * 16 * 128) // 16], dv)
        assert not np.isnan(a).any() and not np.isnan(b).any()
        d += a @ b
    padded = np.zeros((bn, dv))
    part = y[:, dv0 : dv0 + dv]
    padded[: part.shape[0], : part.shape[1]] = part
    want = weights @ padded
    for thread in range(128):
        for reg in range(64):
            assert d[isa_acc(thread, reg)] == want[tuple(acc_map[thread, reg])], (thread, reg)


def emulated_logits(kernel, own: np.ndarray, streamed: np.ndarray, plan: str, consumer: int,
                    pass_: int = 0) -> np.ndarray:  # fmt: skip
    """Thread registers (128 x n/2) of consumer `consumer`'s logit tile own[64c : 64c + 64] ·
    streamed[n·pass : n·pass + n]ᵀ, n = the role's logit width: both TMA-stored (zero-filled past the
    tensors, a whole 128-row tile of `streamed`) into `plan`'s own tile and chunk ring, read through
    the kernel's descriptors and addresses (B: pass·n rows into the stage), multiplied as wgmma does,
    handed out by the ISA's table."""
    bm, bn, bk, chunk = kernel["bm"], kernel["bn"], kernel["bk"], kernel["chunk_bytes"]
    width = kernel["widths"][plan][1]
    chunks = -(-own.shape[1] // bk)
    smem = np.full(SMEM_LIMIT // 2, np.nan)
    ring = SMEM_BASE + kernel[plan]["ring"]
    for kc in range(chunks):
        tma_store(smem, SMEM_BASE + kc * chunk, zero_filled_box(own, 0, kc * bk, bm))
    d = np.zeros((64, width))
    x_addr = SMEM_BASE + consumer * kernel["consumer_row_bytes"]
    for kc in range(chunks):
        stage, _ = kernel["stage"][kc]
        b_addr = ring + stage * chunk + pass_ * width * 128
        tma_store(smem, ring + stage * chunk, zero_filled_box(streamed, 0, kc * bk, bn))
        for ks in range(bk // 16):
            a = wgmma_operand(smem, kernel["desc"][(x_addr + kc * chunk + ks * kernel["kstep_bytes"]) // 16], 64)
            b = wgmma_operand(smem, kernel["desc"][(b_addr + ks * kernel["kstep_bytes"]) // 16], width)
            assert not np.isnan(a).any() and not np.isnan(b).any(), "read outside what TMA wrote"
            d += a @ b.T
    return np.array([[d[isa_acc(t, r)] for r in range(width // 2)] for t in range(128)])


def emulated_weighted_sum(kernel, regs: np.ndarray, streamed: np.ndarray, plan: str, slice_index: int,
                          stage: int = 1, pass_: int = 0) -> np.ndarray:  # fmt: skip
    """The backward's second GEMM: weights in the logit registers `regs` (128 x n/2, n the role's
    logit width) packed into A by acc_reg_of_a, the role's slice (width dv) of the streamed tile
    TMA-stored into `plan`'s slice ring and read MN-major from row pass·n on; returns the accumulator
    registers (128 x dv/2) by the ISA's table."""
    bn, bk, chunk = kernel["bn"], kernel["bk"], kernel["chunk_bytes"]
    dv, width = kernel["widths"][plan]
    smem = np.full(SMEM_LIMIT // 2, np.nan)
    base = SMEM_BASE + kernel[plan]["slices"] + stage * kernel["vstage_bytes"]
    for h in range(dv // bk):
        tma_store(smem, base + h * chunk, zero_filled_box(streamed, 0, slice_index * dv + h * bk, bn))
    d = np.zeros((64, dv))
    v = base + pass_ * width * 128
    for kk in range(width // 16):
        a = np.full((64, 16), np.nan)
        for thread in range(128):
            for q in range(4):
                for half in range(2):
                    a[isa_a(thread, q, half)] = regs[thread, kernel["a_reg"][kk, q, half]]
        b = wgmma_operand_mn(smem, kernel["mn_desc"][(v + kk * 16 * 128) // 16], dv)
        assert not np.isnan(a).any() and not np.isnan(b).any()
        d += a @ b
    return np.array([[d[isa_acc(t, r)] for r in range(dv // 2)] for t in range(128)])


def column_weights(kernel, logits, consumer, g, positive, m, ny, exclude_self, cbase=0):
    """The dy kernel's weight of each register, as it computes it: own row j = 64·consumer + acc_row
    (a y row; kSym: an x row), streamed column i = cbase + acc_col (an x row) with its staged
    statistics; G_ij/g_max with exp(s − lse) replaced by the logit itself (the layout, not the
    exponential, is under test)."""
    w = np.zeros_like(logits)
    for t in range(128):
        for r in range(logits.shape[1]):
            j = 64 * consumer + kernel["acc"][t, r, 0]
            i = cbase + kernel["acc"][t, r, 1]
            ok = j < ny and i < m and j != positive[i] and not (exclude_self and i == j)
            w[t, r] = g[i] * logits[t, r] if ok else 0.0
    return w


@pytest.mark.parametrize("m,ny,depth,slice_index,offset,exclude_self", [
    (128, 128, 128, 0, 0, False), (100, 77, 200, 1, 5, True), (128, 60, 256, 1, 59, True)])  # fmt: skip
def test_emulated_dy_gemm_lands_where_the_epilogue_looks(kernel, m, ny, depth, slice_index, offset, exclude_self):
    """The dy kernel end to end on one tile: the logits Yᵀ-side (own y rows) times the streamed x chunks,
    the column weights with the masks of pairwise_lse.cu's kCols at each register's (acc_row, acc_col),
    then W · X[:, slice] through the slice ring. Each register must hold, at the (own row, column of D)
    where the dy epilogue stores it, the dense Σ_i W_ji x_i of the same masks."""
    rng = np.random.default_rng(4)
    x = rng.integers(-4, 4, size=(m, depth)).astype(np.float64)
    y = rng.integers(-4, 4, size=(ny, depth)).astype(np.float64)
    g = rng.integers(-3, 4, size=128).astype(np.float64)
    g[m:] = 0.0  # the staging writes 0 past M
    positive = np.array([(i + offset) % ny if i < m else -1 for i in range(128)])
    s = y @ x.T  # (own j, streamed i)
    jj, ii = np.meshgrid(np.arange(ny), np.arange(m), indexing="ij")
    mask = (jj != positive[ii]) & ~(exclude_self & (ii == jj))
    dense = (np.where(mask, g[None, :m] * s, 0.0)) @ x[:, slice_index * kernel["dv"] : (slice_index + 1) * kernel["dv"]]
    for consumer in range(kernel["consumers"]):
        logits = emulated_logits(kernel, y, x, "cols", consumer)
        weights = column_weights(kernel, logits, consumer, g, positive, m, ny, exclude_self)
        acc = emulated_weighted_sum(kernel, weights, x, "cols", slice_index)
        for t in range(128):
            for r in range(64):
                row = 64 * consumer + kernel["acc"][t, r, 0]  # the epilogue's row[h]
                col = kernel["acc"][t, r, 1]  # and its column dv0 + acc_col, within the slice
                if row < ny and col < dense.shape[1]:
                    assert acc[t, r] == dense[row, col], (consumer, t, r, row, col)


def test_dy_emulation_detects_a_transposed_tile(kernel):
    """The check has teeth: weights indexed as if the accumulator held X·Yᵀ (the dx role's layout:
    the own row as the column statistic) put other numbers where the dy epilogue looks."""
    rng = np.random.default_rng(5)
    x = rng.integers(-4, 4, size=(128, 64)).astype(np.float64)
    y = rng.integers(-4, 4, size=(128, 64)).astype(np.float64)
    g = rng.integers(1, 4, size=128).astype(np.float64)
    positive = np.arange(128)
    logits = emulated_logits(kernel, y, x, "cols", 0)
    right = emulated_weighted_sum(kernel, column_weights(kernel, logits, 0, g, positive, 128, 128, False), x, "cols", 0)
    swapped = kernel.copy()
    swapped["acc"] = kernel["acc"][:, :, ::-1]  # (row, col) read as (col, row)
    wrong = emulated_weighted_sum(kernel, column_weights(swapped, logits, 0, g, positive, 128, 128, False), x,
                                  "cols", 0)  # fmt: skip
    assert not np.array_equal(right, wrong)


def row_weights(kernel, logits, consumer, positive, m, exclude_self, cbase=0):
    """The dx side's weight of each register (kRows, kSym): own row i = 64·consumer + acc_row, column
    j = cbase + acc_col; the LSE's masks (positive and self out), the logit standing in for P."""
    w = np.zeros_like(logits)
    for t in range(128):
        for r in range(logits.shape[1]):
            i = 64 * consumer + kernel["acc"][t, r, 0]
            j = cbase + kernel["acc"][t, r, 1]
            ok = i < m and j < m and j != positive[i] and not (exclude_self and i == j)
            w[t, r] = logits[t, r] if ok else 0.0
    return w


@pytest.mark.parametrize("m,depth,slice_index,offset,exclude_self", [
    (128, 64, 0, 64, True), (100, 200, 1, 50, True), (77, 256, 3, 1, False)])  # fmt: skip
def test_emulated_symmetric_tile_lands_where_both_epilogues_look(kernel, m, depth, slice_index, offset, exclude_self):
    """kSym on one tile (x is y), as the kernel walks it: per pass, the logit half X_I · X_J[64p : 64p + 64]ᵀ
    (wgmma n64 from 64p rows into the stage), row weights into A → acc (dx), column weights into A →
    acc2 (dy), both against the slice's rows 64p.. (MN-major). After both passes each register of acc
    must hold the dense dx side Σ_j P_ij x_j and of acc2 the dy side Σ_j G_ji x_j (the column
    statistics: (G_JI)ᵀ), at the (own row, column of D) where the two epilogues store."""
    rng = np.random.default_rng(6)
    x = rng.integers(-4, 4, size=(m, depth)).astype(np.float64)
    g = rng.integers(-3, 4, size=128).astype(np.float64)
    g[m:] = 0.0
    positive = np.array([(i + offset) % m if i < m else -1 for i in range(128)])
    dv, width = kernel["widths"]["sym"]
    assert width * 2 == kernel["bn"] and dv * 2 == kernel["dv"], "two passes, half the slice"
    s = x @ x.T
    ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    keep = (jj != positive[ii]) & ~(exclude_self & (ii == jj))  # keep[i, j]: s_ij in lse_i
    xs = x[:, slice_index * dv : (slice_index + 1) * dv]
    dense_dx = np.where(keep, s, 0.0) @ xs
    dense_dy = np.where(keep, g[:m, None] * s, 0.0).T @ xs  # Σ_j G_ji x_j, G_ji = g_j·s_ji (j's row)
    for consumer in range(kernel["consumers"]):
        acc = np.zeros((128, dv // 2))
        acc2 = np.zeros((128, dv // 2))
        for pass_ in range(kernel["bn"] // width):
            logits = emulated_logits(kernel, x, x, "sym", consumer, pass_)
            cbase = pass_ * width
            p_w = row_weights(kernel, logits, consumer, positive, m, exclude_self, cbase)
            h_w = column_weights(kernel, logits, consumer, g, positive, m, m, exclude_self, cbase)
            acc += emulated_weighted_sum(kernel, p_w, x, "sym", slice_index, pass_=pass_)
            acc2 += emulated_weighted_sum(kernel, h_w, x, "sym", slice_index, pass_=pass_)
        for t in range(128):
            for r in range(dv // 2):
                row = 64 * consumer + kernel["acc"][t, r, 0]
                col = kernel["acc"][t, r, 1]
                if row < m and col < xs.shape[1]:
                    assert acc[t, r] == dense_dx[row, col], ("dx", consumer, t, r, row, col)
                    assert acc2[t, r] == dense_dy[row, col], ("dy", consumer, t, r, row, col)


def test_symmetric_emulation_detects_a_missing_pass_offset(kernel):
    """The check has teeth: the second pass reading the stage's first 64 rows again (no pass·64-row
    offset in the B address) gives other logits."""
    rng = np.random.default_rng(7)
    x = rng.integers(-4, 4, size=(128, 64)).astype(np.float64)
    second = emulated_logits(kernel, x, x, "sym", 0, pass_=1)
    first = emulated_logits(kernel, x, x, "sym", 0, pass_=0)
    want = x[:64] @ x[64:128].T
    assert all(second[t, r] == want[isa_acc(t, r)] for t in range(128) for r in range(32))
    assert not np.array_equal(first, second)


def test_emulation_detects_a_wrong_swizzle_or_step(kernel):
    """The check has teeth: a 64-byte k step (or no swizzle on the read side) reads other elements."""
    rng = np.random.default_rng(1)
    tile = rng.integers(-8, 8, size=(64, 64)).astype(np.float64)
    smem = np.full(SMEM_LIMIT // 2, np.nan)
    tma_store(smem, SMEM_BASE, tile)
    right = wgmma_operand(smem, kernel["desc"][(SMEM_BASE + 32) // 16], 64)
    assert (right == tile[:, 16:32]).all()
    wrong_step = wgmma_operand(smem, kernel["desc"][(SMEM_BASE + 64) // 16], 64)
    assert not (wrong_step == tile[:, 16:32]).all()
    r, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    unswizzled = smem[(SMEM_BASE + r * 128 + 32 + 2 * k) // 2]
    assert not (unswizzled == tile[:, 16:32]).all()


# ---- the mbarrier pipeline --------------------------------------------------------------------------


class Deadlock(Exception):
    pass


class Barrier:
    """An mbarrier: `count` arrivals plus a transaction count complete a phase (PTX ISA semantics)."""

    def __init__(self, count: int):
        self.count, self.pending, self.tx, self.completed = count, count, 0, 0

    def _maybe_complete(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.completed += 1
            self.pending = self.count

    def arrive(self, expect_tx: int = 0) -> None:
        self.tx += expect_tx
        self.pending -= 1
        assert self.pending >= 0
        self._maybe_complete()

    def complete_tx(self, nbytes: int) -> None:
        self.tx -= nbytes
        self._maybe_complete()

    def try_wait(self, parity: int) -> bool:
        return (self.completed & 1) != parity


def emulate_pipeline(stage, stages: int, tiles: int, chunks: int, consumers: int, seed: int,
                     vstage=None, vstages: int = 0, producer_flip: int = 1, consumer_flip: int = 0,
                     passes: int = 1, early_release: bool = False, overlap: bool = False,
                     release_before_wait: bool = False) -> None:  # fmt: skip
    """Run the kernel's producer and consumer loops under a random interleaving, with TMA copies that
    land at random later times; raise Deadlock if nothing can move, AssertionError on a data race
    (a stage refilled while a consumer still reads it, or a consumer reading another load's data).
    With `overlap` each consumer runs the kernel's overlapped loop instead, with wgmma groups that
    retire in order at random later times and wait_group N blocking until at most N of its groups are
    in flight. The forward (no `vstage`): one group per chunk, tile t + 1's issued before tile t's
    softmax. dx and dy (`vstage`): tile t + 1's logit groups, then P·V_t's group (reading slice t),
    wait_group 1, tile t + 1's weights while P·V_t runs, wait_group 0. A stage is released after the
    wait that retires the group reading it (with `release_before_wait`, the mutation: before). A stage
    refilled while an unretired group reads it, or a group that retires over data that changed, is a
    race.
    With `vstage` (the backward kernels) each tile also sends its slice through the second ring. With
    `passes` = 2 (kSym) each consumer reads a tile's chunks once per pass, waits on them in the first,
    waits on the slice after the first pass's logits, and releases both in the last pass (with
    `early_release`, the mutation: the chunks in the first)."""
    rnd = random.Random(seed)
    x_full = Barrier(1)
    rings = {"chunk": (stage, stages), "slice": (vstage, vstages)}
    full = {r: [Barrier(1) for _ in range(n)] for r, (_, n) in rings.items()}
    empty = {r: [Barrier(consumers) for _ in range(n)] for r, (_, n) in rings.items()}
    content = {r: [None] * n for r, (_, n) in rings.items()}  # which load a stage holds
    readers = {r: [set() for _ in range(n)] for r, (_, n) in rings.items()}  # consumers still reading it
    in_flight = []  # TMA copies issued, not landed: (barrier, ring, stage, load)
    groups = {c: [] for c in range(consumers)}  # per consumer, its wgmma groups in flight: (ring, stage, load)

    def produce(ring, it):
        s, parity = rings[ring][0][it]
        yield lambda: empty[ring][s].try_wait(parity ^ producer_flip)
        assert not readers[ring][s], f"{ring} stage {s} refilled (load {it}) while {readers[ring][s]} read it"
        assert not any((ring, s) == g[:2] for gs in groups.values() for g in gs), (
            f"{ring} stage {s} refilled (load {it}) while a wgmma group in flight reads it")
        full[ring][s].arrive(expect_tx=1)
        in_flight.append((full[ring][s], ring, s, it))

    def producer():
        x_full.arrive(expect_tx=1)
        in_flight.append((x_full, None, None, None))
        it = 0
        for tile in range(tiles):
            for _ in range(chunks):
                yield from produce("chunk", it)
                it += 1
            if vstage is not None:
                yield from produce("slice", tile)

    def acquire(ring, it, me):
        s, parity = rings[ring][0][it]
        yield lambda: full[ring][s].try_wait(parity ^ consumer_flip)
        assert content[ring][s] == it, f"consumer {me} read {ring} stage {s} holding load {content[ring][s]}, wanted {it}"
        readers[ring][s].add(me)
        return s

    def release(ring, s, it, me):  # after the wgmma reading it retired
        assert content[ring][s] == it
        assert (ring, s, it) not in groups[me], f"consumer {me} released {ring} stage {s} under its wgmma group"
        readers[ring][s].discard(me)
        empty[ring][s].arrive()

    def consumer(me):
        yield lambda: x_full.try_wait(0)
        it = 0
        for tile in range(tiles):
            held, slice_stage = [], None
            for pass_ in range(passes):
                release_now = pass_ == (0 if early_release else passes - 1)
                prev = None
                for kc in range(chunks):
                    if pass_ == 0:
                        held.append((yield from acquire("chunk", it + kc, me)))
                    else:  # read again: the stage must still hold this tile's chunk
                        s = held[kc]
                        assert content["chunk"][s] == it + kc, f"consumer {me}'s pass {pass_} read a refilled stage"
                        yield None
                    if kc > 0 and release_now:  # wait_group 1: the previous chunk's wgmma retired
                        release("chunk", held[kc - 1], it + kc - 1, me)
                    prev = (held[kc], it + kc)
                if release_now:
                    release("chunk", *prev, me)
                if vstage is not None:
                    if pass_ == 0:
                        slice_stage = yield from acquire("slice", tile, me)
                    if pass_ == passes - 1:
                        release("slice", slice_stage, tile, me)
            it += chunks

    def wait_group(me, n):
        yield lambda: len(groups[me]) <= n

    def overlapped_consumer(me):  # kFwd's loop: issue, retire, online_lse
        yield lambda: x_full.try_wait(0)

        def issue(tile):
            it0 = tile * chunks
            for kc in range(chunks):
                if kc >= stages:  # chunk kc needs chunk kc − stages's stage
                    yield from wait_group(me, stages - 1)
                    release("chunk", stage[it0 + kc - stages][0], it0 + kc - stages, me)
                s = yield from acquire("chunk", it0 + kc, me)
                groups[me].append(("chunk", s, it0 + kc))  # wgmma ... commit_group

        def retire(tile):
            it0 = tile * chunks
            held = [(stage[it0 + kc][0], it0 + kc) for kc in range(max(chunks - stages, 0), chunks)]
            if release_before_wait:
                for s, it in held:
                    release("chunk", s, it, me)
            yield from wait_group(me, 0)
            if not release_before_wait:
                for s, it in held:
                    release("chunk", s, it, me)

        yield from issue(0)
        yield from retire(0)
        for tile in range(tiles - 1):
            yield from issue(tile + 1)
            yield None  # tile's softmax, while tile + 1's groups run
            yield from retire(tile + 1)

    def overlapped_backward(me):  # dx's and dy's loop: logits t + 1, P·V_t, weights t + 1 under P·V_t
        yield lambda: x_full.try_wait(0)
        assert chunks <= stages, "the kernel's static_assert"

        def issue_logits(tile):
            for kc in range(chunks):
                s = yield from acquire("chunk", tile * chunks + kc, me)
                groups[me].append(("chunk", s, tile * chunks + kc))

        def release_chunks(tile):
            for kc in range(chunks):
                release("chunk", stage[tile * chunks + kc][0], tile * chunks + kc, me)

        def issue_pv(tile):
            s = yield from acquire("slice", tile, me)
            groups[me].append(("slice", s, tile))

        def release_slice(tile, wait):
            if release_before_wait:
                release("slice", vstage[tile][0], tile, me)
            yield from wait
            if not release_before_wait:
                release("slice", vstage[tile][0], tile, me)

        yield from issue_logits(0)
        yield from wait_group(me, 0)
        release_chunks(0)
        yield None  # tile 0's weights
        tile = 0
        while True:
            if tile > 0:
                yield from release_slice(tile - 1, wait_group(me, 0))
            else:
                yield from wait_group(me, 0)
            if tile + 1 == tiles:
                break
            yield from issue_logits(tile + 1)
            yield from issue_pv(tile)
            yield from wait_group(me, 1)
            release_chunks(tile + 1)
            yield None  # tile t + 1's weights, while P·V_t runs
            tile += 1
        yield from issue_pv(tiles - 1)
        yield from release_slice(tiles - 1, wait_group(me, 0))

    make = (overlapped_backward if vstage is not None else overlapped_consumer) if overlap else consumer
    agents = {"producer": producer(), **{f"consumer{c}": make(c) for c in range(consumers)}}
    waiting = {name: None for name in agents}
    while agents or in_flight or any(groups.values()):
        runnable = [n for n in agents if waiting[n] is None or waiting[n]()]
        choices = runnable + (["tma"] if in_flight else []) + [f"wgmma{c}" for c, gs in groups.items() if gs]
        if not choices:
            raise Deadlock(f"stuck: {sorted(agents)} wait, no copy in flight")
        pick = rnd.choice(choices)
        if pick.startswith("wgmma"):  # the oldest group of that consumer retires
            ring, s, it = groups[int(pick[5:])].pop(0)
            assert content[ring][s] == it, f"a wgmma group read {ring} stage {s} while load {content[ring][s]} landed"
            continue
        if pick == "tma":
            bar, ring, s, it = in_flight.pop(rnd.randrange(len(in_flight)))
            if ring is not None:
                content[ring][s] = it
            bar.complete_tx(1)
            continue
        try:
            waiting[pick] = next(agents[pick])
        except StopIteration:
            del agents[pick], waiting[pick]


@pytest.mark.parametrize("kind", ["fwd", "rows", "cols", "sym"])
@pytest.mark.parametrize("tiles,chunks", [(1, 1), (3, 1), (3, 3), (2, 8), (5, 4), (7, 5)])
def test_pipeline_never_hangs_or_races(kernel, kind, tiles, chunks):
    """dx and dy walk the same two rings (dy's streamed tiles are x's) in their overlapped loop, the
    forward its own; kSym reads each tile's chunks in two passes and holds them meanwhile. kSym, dx and
    dy need a tile's chunks to fit the ring (chunks <= stages, the kernel's static_assert): kSym
    deadlocks without it, dx and dy refuse it."""
    stage = kernel["stage"]
    assert tiles * chunks <= len(stage)
    passes = kernel["bn"] // kernel["widths"][kind][1]
    slices = {"vstage": kernel["vstage"], "vstages": kernel["vstages"]} if kind != "fwd" else {}
    if kind != "fwd" and chunks > kernel["stages"]:
        assert kernel[kind]["max_chunks"] <= kernel["stages"]  # the kernel's static_assert
        with pytest.raises(Deadlock if passes > 1 else AssertionError):
            emulate_pipeline(stage, kernel["stages"], tiles, chunks, kernel["consumers"], 0, passes=passes,
                             overlap=passes == 1, **slices)  # fmt: skip
        return
    for seed in range(30):
        emulate_pipeline(stage, kernel["stages"], tiles, chunks, kernel["consumers"], seed, passes=passes,
                         overlap=passes == 1, **slices)  # fmt: skip


@pytest.mark.parametrize("tiles,chunks", [(1, 1), (2, 1), (3, 2), (3, 4), (4, 5), (3, 8), (2, 8)])
def test_overlapped_forward_pipeline_never_hangs_or_races(kernel, tiles, chunks):
    """kFwd's loop (tile t + 1's GEMM issued before tile t's softmax; D up to 512 = 8 chunks, twice the
    ring): 1, 2 and 3 tiles (prologue and epilogue), under random interleavings and group retirements."""
    stage = kernel["stage"]
    assert tiles * chunks <= len(stage) and kernel["fwd"]["max_chunks"] >= chunks
    for seed in range(40):
        emulate_pipeline(stage, kernel["stages"], tiles, chunks, kernel["consumers"], seed, overlap=True)


@pytest.mark.parametrize("tiles,chunks", [(6, 1), (3, 4), (2, 6)])
def test_overlapped_pipeline_emulation_detects_an_early_release(kernel, tiles, chunks):
    """Releasing a tile's stages before the wait that retires its groups lets the producer refill a
    stage a wgmma still reads (given more loads than stages, so that a stage is refilled at all)."""
    assert tiles * chunks > kernel["stages"]
    with pytest.raises(AssertionError, match="wgmma group"):
        for seed in range(40):
            emulate_pipeline(kernel["stage"], kernel["stages"], tiles, chunks, kernel["consumers"], seed,
                             overlap=True, release_before_wait=True)  # fmt: skip


@pytest.mark.parametrize("tiles,chunks", [(1, 1), (2, 2), (3, 4), (5, 1), (6, 3)])
def test_overlapped_backward_pipeline_never_hangs_or_races(kernel, tiles, chunks):
    """dx's and dy's loop (tile t + 1's logits and P·V_t in flight together, the weights of t + 1 under
    P·V_t): 1, 2, 3 and more tiles, under random interleavings and group retirements."""
    assert kernel["rows"]["max_chunks"] == kernel["cols"]["max_chunks"] == kernel["stages"] >= chunks
    for seed in range(40):
        emulate_pipeline(kernel["stage"], kernel["stages"], tiles, chunks, kernel["consumers"], seed, kernel["vstage"],
                         kernel["vstages"], overlap=True)  # fmt: skip


@pytest.mark.parametrize("tiles,chunks", [(4, 1), (3, 4)])
def test_overlapped_backward_emulation_detects_an_early_release(kernel, tiles, chunks):
    """Releasing P·V_t's slice before the wait that retires the group reading it lets the producer
    refill a stage a wgmma still reads."""
    with pytest.raises(AssertionError, match="wgmma group"):
        for seed in range(40):
            emulate_pipeline(kernel["stage"], kernel["stages"], tiles, chunks, kernel["consumers"], seed,
                             kernel["vstage"], kernel["vstages"], overlap=True, release_before_wait=True)  # fmt: skip


def test_stage_function_is_round_robin_with_flipping_parity(kernel):
    for key, stages in (("stage", kernel["stages"]), ("vstage", kernel["vstages"])):
        assert kernel[key] == [[it % stages, (it // stages) % 2] for it in range(64)]


def test_pipeline_emulation_detects_wrong_parities(kernel):
    """The check has teeth: the producer waiting on the phase itself (no flip) deadlocks at once; a
    consumer waiting on the flipped parity reads a stage before its data landed."""
    stage, stages, consumers = kernel["stage"], kernel["stages"], kernel["consumers"]
    with pytest.raises(Deadlock):
        emulate_pipeline(stage, stages, 2, 3, consumers, seed=0, producer_flip=0)
    with pytest.raises(AssertionError, match="read chunk stage"):
        for seed in range(30):
            emulate_pipeline(stage, stages, 2, 3, consumers, seed=seed, consumer_flip=1)
    # kSym releasing its chunks after the first pass lets the producer refill what the second reads.
    with pytest.raises(AssertionError, match="refilled"):
        for seed in range(30):
            emulate_pipeline(stage, stages, 3, 4, consumers, seed, kernel["vstage"], kernel["vstages"], passes=2,
                             early_release=True)  # fmt: skip


# ---- the dy kernel's column statistics: staged per warpgroup, published by a named barrier ----------


def emulate_column_stats(offset_of, tiles: int, threads: int, columns: int, seed: int) -> None:
    """One consumer warpgroup's per-tile protocol, run with `threads` emulated threads under a random
    interleaving: thread k writes column k's statistics of tile t at offset_of(t), the logit GEMM runs,
    the named barrier (all threads) is passed, then each thread reads `columns` entries one at a time
    (its weights). AssertionError when a read sees another tile's value (a buffer overwritten while
    still read)."""
    rnd = random.Random(seed)
    memory: dict = {}
    arrived = [0] * tiles  # the named barrier: one generation per tile

    def thread(me):
        for t in range(tiles):
            memory[(offset_of(t), me)] = t
            yield None  # the logit GEMM
            arrived[t] += 1
            yield lambda t=t: arrived[t] == threads
            for k in rnd.sample(range(threads), columns):
                seen = memory[(offset_of(t), k)]
                assert seen == t, f"thread {me} read tile {seen}'s statistic of column {k} in tile {t}"
                yield None

    agents = {k: thread(k) for k in range(threads)}
    waiting = {k: None for k in agents}
    while agents:
        runnable = [k for k in agents if waiting[k] is None or waiting[k]()]
        if not runnable:
            raise Deadlock("column statistics: every thread waits")
        pick = rnd.choice(runnable)
        try:
            waiting[pick] = next(agents[pick])
        except StopIteration:
            del agents[pick], waiting[pick]


def test_column_stats_buffers_are_disjoint_and_in_the_plan(kernel):
    offsets, size = kernel["stats_offset"], kernel["stats_bytes"]
    assert size == kernel["bn"] * 12  # lse·log2(e), grad_lse/g_max (fp32) and the positive (int32) per column
    used = {(c, int(o)) for c in range(kernel["consumers"]) for o in offsets[c]}
    spans = sorted(o for _, o in used)
    assert len(spans) == 2 * kernel["consumers"], "two buffers per warpgroup"
    assert all(b - a >= size for a, b in zip(spans, spans[1:])), "buffers overlap"
    assert spans[-1] + size == kernel["cols"]["barriers"] - kernel["cols"]["stats"], "the region the plan reserves"
    for c in range(kernel["consumers"]):
        assert offsets[c][0] != offsets[c][1] and (offsets[c][::2] == offsets[c][0]).all()


@pytest.mark.parametrize("tiles,threads,columns", [(1, 4, 4), (5, 4, 3), (9, 6, 6)])
def test_column_stats_protocol_never_races(kernel, tiles, threads, columns):
    offsets = kernel["stats_offset"][0]
    for seed in range(40):
        emulate_column_stats(lambda t: int(offsets[t % 8]), tiles, threads, columns, seed)


def test_column_stats_emulation_detects_a_single_buffer(kernel):
    """The check has teeth: one buffer for every tile lets a fast thread overwrite statistics that a
    slow one still reads."""
    with pytest.raises(AssertionError, match="read tile"):
        for seed in range(40):
            emulate_column_stats(lambda t: 0, 5, 4, 4, seed)
