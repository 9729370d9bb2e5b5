"""CPU emulation of the ldmatrix fragment loads, the shared-memory layout and the cp.async ring of
csrc/pairwise_lse_pipelined.cu (no GPU needed).

A small host program includes the kernel file and prints its constants (tile sizes, row padding, ring
depth, prefetch distance, wait depth), its ldmatrix address maps (`ldsm_a_row/col`, `ldsm_b_row/col`)
and its ring stage function (`ring_stage`). Written here from the PTX ISA, independently of the kernel:

  * ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 ("Warp-level matrix load instruction: ldmatrix"):
    lanes 8i .. 8i + 7 supply the addresses of rows 0..7 of matrix i (8 contiguous 16-bit elements
    each); lane l receives in register i the elements (l / 4, 2(l % 4)) and (l / 4, 2(l % 4) + 1) of
    matrix i, with .trans those of its transpose, (2(l % 4), l / 4) and (2(l % 4) + 1, l / 4);
  * the mma.m16n8k16 fragment tables and the warp-wide product: tests/csrc/test_mma_layout.py's;
  * shared memory has 32 banks of 4 bytes; a 16-byte access by 8 lanes (one ldmatrix matrix, one
    128-byte phase of cp.async stores) is conflict-free when the 8 addresses fall in distinct 16-byte
    groups of a 128-byte line;
  * cp.async.commit_group / cp.async.wait_group N (PTX ISA, "cp.async.wait_group"): a thread's copies
    complete at any time after their issue, in any order; wait_group N returns once at most the N most
    recent groups of that thread are pending; other threads see the data after a barrier.

What is mirrored from the kernel (keep in sync): the operand addresses of `logits_chunk_ldsm`
(A: sA + (wr0 + a_row)·lda + a_col + k; B: sB + b_row·ld + b_col + nb·8·ld + k, registers 0, 1 for block
nb and 2, 3 for nb + 1) and `weighted_sum_ldsm` (V: sV + a_row·ld + a_col + kk·16·ld + nb·8, .trans),
the A packing of the weights, `copy_async`'s thread-to-piece map, and the prologue / `next_chunk`
order of the ring (kPrefetch issues; per chunk: wait, barrier, issue chunk + kPrefetch, read). dy's
column statistics join the commit group of their tile's last logit chunk, in that chunk's stage, and
are read (the weights) before the next barrier: within that chunk's read window here.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.csrc import _nvcc
from tests.csrc.test_mma_layout import LANES, _gt, _zeros, mma, ptx_a_k16, ptx_b_k16, tile_of

pytestmark = pytest.mark.slow  # the host probe is an nvcc run (seconds), as the other compiler tests

SM86_SMEM = 99 * 1024  # the most dynamic shared memory one block may opt into on sm_86/sm_89
SM80_SMEM = 163 * 1024  # on sm_80

_HOST_PROGRAM = r"""
#include "pairwise_lse_pipelined.cu"
#include <cstdio>

using namespace fastssl::pipe;

int main() {
  std::printf("{\"threads\": %d, \"bm\": %d, \"bn\": %d, \"bk\": %d, \"dv\": %d, \"max_d\": %d, \"pad\": %d, "
              "\"chunk_ld\": %d, \"chunk_elems\": %d, \"stages\": %d, \"prefetch\": %d, \"wait_depth\": %d, "
              "\"stat_floats\": %d,\n",
              kThreads, kBM, kBN, kBK, kDV, kMaxD, kPad, kChunkLd, kChunkElems, kStages, kPrefetch, kWaitDepth,
              kStatFloats);
  std::printf("\"own_ld\": {");
  for (int d = 64; d <= kMaxD; d += 64) std::printf("%s\"%d\": %d", d > 64 ? ", " : "", d, own_ld(d));
  std::printf("}, \"smem\": {");
  for (int d = 64; d <= kMaxD; d += 64) std::printf("%s\"%d\": %d", d > 64 ? ", " : "", d, smem_bytes(d, false));
  std::printf("}, \"smem_stats\": {");
  for (int d = 64; d <= kMaxD; d += 64) std::printf("%s\"%d\": %d", d > 64 ? ", " : "", d, smem_bytes(d, true));
  std::printf("},\n\"a\": [");
  for (int l = 0; l < 32; ++l) std::printf("%s[%d, %d]", l ? ", " : "", ldsm_a_row(l), ldsm_a_col(l));
  std::printf("], \"b\": [");
  for (int l = 0; l < 32; ++l) std::printf("%s[%d, %d]", l ? ", " : "", ldsm_b_row(l), ldsm_b_col(l));
  std::printf("], \"stage\": [");
  for (int it = 0; it < 64; ++it) std::printf("%s%d", it ? ", " : "", ring_stage(it));
  std::printf("]}\n");
  return 0;
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The kernel's constants, ldmatrix maps and ring stage function, printed by a host program."""
    info = _nvcc.host_probe(tmp_path_factory.mktemp("pipelined_layout"), _HOST_PROGRAM, "80")
    info["own_ld"] = {int(k): v for k, v in info["own_ld"].items()}
    info["smem"] = {int(k): v for k, v in info["smem"].items()}
    info["smem_stats"] = {int(k): v for k, v in info["smem_stats"].items()}
    return info


# ---- the PTX ISA's ldmatrix ------------------------------------------------------------------------


def ldmatrix_x4(mem: np.ndarray, addrs: list[int], trans: bool) -> list[list[list[float]]]:
    """Per lane, 4 registers of 2 elements, from flat 16-bit shared memory `mem` and the 32 row addresses
    (element indices) the lanes supply."""
    mats = [np.stack([mem[addrs[8 * i + r] : addrs[8 * i + r] + 8] for r in range(8)]) for i in range(4)]
    out = []
    for lane in range(LANES):
        g, t = _gt(lane)
        if trans:
            out.append([[m[2 * t, g], m[2 * t + 1, g]] for m in mats])
        else:
            out.append([[m[g, 2 * t], m[g, 2 * t + 1]] for m in mats])
    return out


def conflict_free(byte_addrs: list[int]) -> bool:
    """8 lanes' 16-byte accesses hit 8 distinct 16-byte groups of the 128-byte bank line."""
    return len({(a // 16) % 8 for a in byte_addrs}) == len(byte_addrs)


# ---- the kernel's loads (mirrors of csrc/pairwise_lse_pipelined.cu) ---------------------------------


def logits_chunk(s, own: np.ndarray, lda: int, col0: int, chunk: np.ndarray, ld: int, wr0: int, info, b_map=None):
    """logits_chunk_ldsm: s += own[wr0:wr0+16, col0:col0+kBK] · chunk[:64, :kBK]ᵀ through ldmatrix."""
    b_map = b_map or info["b"]
    for k in range(0, info["bk"], 16):
        a_addr = [(wr0 + info["a"][lane][0]) * lda + col0 + info["a"][lane][1] + k for lane in range(LANES)]
        a = ldmatrix_x4(own, a_addr, trans=False)
        a_regs = [[v for reg in a[lane] for v in reg] for lane in range(LANES)]
        for nb in range(0, 8, 2):
            b_addr = [b_map[lane][0] * ld + b_map[lane][1] + nb * 8 * ld + k for lane in range(LANES)]
            b = ldmatrix_x4(chunk, b_addr, trans=False)
            for j in range(2):
                mma([s[lane][nb + j] for lane in range(LANES)], a_regs,
                    [b[lane][2 * j] + b[lane][2 * j + 1] for lane in range(LANES)], ptx_a_k16, ptx_b_k16, 16)  # fmt: skip


def weighted_sum(acc, w_mat: np.ndarray, chunk: np.ndarray, ld: int, info, trans=True):
    """weighted_sum_ldsm: acc += W · chunk[:64, :kBK], W's fragments packed from the logit layout."""

    def w(lane, nb, e):
        g, t = _gt(lane)
        return w_mat[g + 8 * (e >> 1), nb * 8 + 2 * t + (e & 1)]

    for kk in range(info["bn"] // 16):
        # w[kk][0] = pack(p(2kk, 0), p(2kk, 1)), [1] = (2kk: 2, 3), [2] = (2kk + 1: 0, 1), [3] = (2kk + 1: 2, 3)
        a_regs = [[w(lane, 2 * kk, 0), w(lane, 2 * kk, 1), w(lane, 2 * kk, 2), w(lane, 2 * kk, 3),
                   w(lane, 2 * kk + 1, 0), w(lane, 2 * kk + 1, 1), w(lane, 2 * kk + 1, 2), w(lane, 2 * kk + 1, 3)]
                  for lane in range(LANES)]  # fmt: skip
        for nb in range(0, info["bk"] // 8, 2):
            v_addr = [info["a"][lane][0] * ld + info["a"][lane][1] + kk * 16 * ld + nb * 8 for lane in range(LANES)]
            b = ldmatrix_x4(chunk, v_addr, trans=trans)
            for j in range(2):
                mma([acc[lane][nb + j] for lane in range(LANES)], a_regs,
                    [b[lane][2 * j] + b[lane][2 * j + 1] for lane in range(LANES)], ptx_a_k16, ptx_b_k16, 16)  # fmt: skip


def padded(rng, rows: int, cols: int, ld: int) -> tuple[np.ndarray, np.ndarray]:
    """A random integer matrix (exact in float64) and its flat shared-memory image with leading dimension ld
    (the padding holds NaN, so reading it would show)."""
    m = rng.integers(-4, 5, size=(rows, cols)).astype(np.float64)
    flat = np.full((rows, ld), np.nan)
    flat[:, :cols] = m
    return m, flat.reshape(-1)


@pytest.mark.parametrize("d_pad", [64, 256])
def test_logit_gemm_through_ldmatrix(kernel, d_pad):
    """Every warp's 16 x 64 logits from the own tile (resident, lda = own_ld) and a ring chunk are
    X_I·Y_Jᵀ in the accumulator layout the masks index (row g + 8h, column nb·8 + 2t + e)."""
    rng = np.random.default_rng(d_pad)
    lda, ld = kernel["own_ld"][d_pad], kernel["chunk_ld"]
    own, own_mem = padded(rng, kernel["bm"], d_pad, lda)
    for kc in range(d_pad // kernel["bk"]):
        ys, chunk_mem = padded(rng, kernel["bn"], kernel["bk"], ld)
        for wr0 in range(0, kernel["bm"], 16):
            s = _zeros(8)
            logits_chunk(s, own_mem, lda, kc * kernel["bk"], chunk_mem, ld, wr0, kernel)
            want = own[wr0 : wr0 + 16, kc * kernel["bk"] : (kc + 1) * kernel["bk"]] @ ys.T
            np.testing.assert_array_equal(tile_of(s, 8), want)


def test_weighted_sum_through_ldmatrix_trans(kernel):
    """P·V with V's fragments by ldmatrix.trans from the chunk (streamed rows j, D along the row) and P
    packed from the logit accumulators: W @ V in the accumulator layout of dx."""
    rng = np.random.default_rng(5)
    ld = kernel["chunk_ld"]
    w_mat = rng.integers(-4, 5, size=(16, kernel["bn"])).astype(np.float64)
    v, v_mem = padded(rng, kernel["bn"], kernel["bk"], ld)
    acc = _zeros(kernel["bk"] // 8)
    weighted_sum(acc, w_mat, v_mem, ld, kernel)
    np.testing.assert_array_equal(tile_of(acc, kernel["bk"] // 8), w_mat @ v)


def test_emulation_detects_wrong_ldmatrix_maps(kernel):
    """The checks have teeth: B through A's address map (matrices 1 and 2 swapped), or V without .trans,
    give wrong products."""
    rng = np.random.default_rng(6)
    lda, ld = kernel["own_ld"][64], kernel["chunk_ld"]
    own, own_mem = padded(rng, kernel["bm"], 64, lda)
    ys, chunk_mem = padded(rng, kernel["bn"], kernel["bk"], ld)
    s = _zeros(8)
    logits_chunk(s, own_mem, lda, 0, chunk_mem, ld, 0, kernel, b_map=kernel["a"])
    assert not np.array_equal(tile_of(s, 8), own[:16] @ ys.T)
    w_mat = rng.integers(-4, 5, size=(16, kernel["bn"])).astype(np.float64)
    acc = _zeros(kernel["bk"] // 8)
    weighted_sum(acc, w_mat, chunk_mem, ld, kernel, trans=False)
    assert not np.array_equal(tile_of(acc, kernel["bk"] // 8), w_mat @ ys)


def test_shared_memory_layout_is_aligned_and_conflict_free(kernel):
    """Every ldmatrix row address and cp.async destination is 16-byte aligned; the 8 rows of each 8 x 8
    matrix and each 8-lane phase of cp.async stores fall in distinct bank groups (the +16-byte row
    padding); the ring starts 128-byte aligned after the own tile; the plan fits sm_86 and sm_80."""
    ld = kernel["chunk_ld"]
    for d_pad, lda in kernel["own_ld"].items():
        ring_base = kernel["bm"] * lda * 2
        assert ring_base % 128 == 0, f"D={d_pad}: ring at byte {ring_base}"
        stats_base = ring_base + kernel["stages"] * kernel["chunk_elems"] * 2  # dy's column statistics
        assert kernel["smem"][d_pad] == stats_base and stats_base % 16 == 0
        assert kernel["smem_stats"][d_pad] == stats_base + 4 * kernel["stages"] * kernel["stat_floats"]
        assert kernel["stat_floats"] <= kernel["threads"]  # copy_stats_async: one thread per value
        assert kernel["smem_stats"][d_pad] <= SM86_SMEM <= SM80_SMEM, f"D={d_pad}: {kernel['smem_stats'][d_pad]} bytes"
        maps = [(lda, kernel["a"], wr0 * lda + k) for wr0 in range(0, kernel["bm"], 16) for k in range(0, d_pad, 16)]
        maps += [(ld, kernel["b"], nb * 8 * ld + k) for nb in range(0, 8, 2) for k in range(0, kernel["bk"], 16)]
        maps += [(ld, kernel["a"], kk * 16 * ld + nb * 8) for kk in range(4) for nb in range(0, kernel["bk"] // 8, 2)]
        for stride, amap, offset in maps:
            addrs = [2 * (offset + r * stride + c) for r, c in amap]
            assert all(a % 16 == 0 for a in addrs)
            for i in range(4):
                assert conflict_free(addrs[8 * i : 8 * i + 8]), f"ldmatrix matrix {i} conflicts: {addrs[8 * i: 8 * i + 8]}"
        # copy_async: idx = tid + k·kThreads -> row idx / pieces, column (idx % pieces)·8
        for stride, rows, cols in ((lda, kernel["bm"], d_pad), (ld, kernel["bn"], kernel["bk"])):
            pieces = cols // 8
            dst = [2 * ((idx // pieces) * stride + (idx % pieces) * 8) for idx in range(rows * pieces)]
            assert all(a % 16 == 0 for a in dst)
            for p0 in range(0, len(dst), 8):
                assert conflict_free(dst[p0 : p0 + 8]), f"cp.async stores conflict at piece {p0}"
    assert kernel["dv"] % kernel["bk"] == 0 and kernel["max_d"] % kernel["bk"] == 0


# ---- the cp.async ring ----------------------------------------------------------------------------


def ring_program(n_chunks: int, prefetch: int, wait_depth: int, stage, barrier: bool = True) -> list[tuple]:
    """One thread's ring operations, in the kernel's order: the prologue's kPrefetch issues (own tile in
    group 0), then per chunk `it`: wait_group, __syncthreads, issue(it + kPrefetch), the reads of stage(it)."""
    ops = [("issue", n) for n in range(prefetch)]
    for it in range(n_chunks):
        ops += [("wait", wait_depth)] + ([("barrier",)] if barrier else []) + [("issue", it + prefetch)]
        ops += [("read_begin", it, stage(it)), ("read_end", it, stage(it))]
    return ops


def run_ring(n_chunks: int, stages: int, program, threads: int, rng: random.Random, policy: str) -> None:
    """Interleave `threads` copies of `program`; each thread's copies into a stage land at a time the
    policy picks ("eager": at issue, "lazy": only when a wait forces them, "random"). Raises AssertionError
    on a read of a stage that does not hold, for every thread's share, the chunk expected."""
    pc = [0] * threads
    pending: list[list[tuple[int, int]]] = [[] for _ in range(threads)]  # per thread: (group, chunk) in flight
    groups = [0] * threads
    slot = [[-1] * threads for _ in range(stages)]  # slot[stage][thread]: whose share of which chunk is there
    reading: list[set] = [set() for _ in range(threads)]
    at_barrier: set[int] = set()

    def land(th: int, item: tuple[int, int]) -> None:
        pending[th].remove(item)
        chunk = item[1]
        if chunk < n_chunks:
            st = chunk % stages
            for other in range(threads):
                for s_read in reading[other]:
                    assert s_read != st, f"chunk {chunk} (thread {th}) lands in stage {st} while thread {other} reads it"
            slot[st][th] = chunk

    while any(pc[th] < len(program) for th in range(threads)):
        runnable = [th for th in range(threads) if pc[th] < len(program) and th not in at_barrier]
        if not runnable:  # everyone waits at the barrier
            at_barrier.clear()
            continue
        if policy != "lazy" and rng.random() < 0.3:
            th = rng.randrange(threads)
            if pending[th]:
                land(th, rng.choice(pending[th]))
        th = rng.choice(runnable)
        op = program[pc[th]]
        pc[th] += 1
        if op[0] == "issue":
            item = (groups[th], op[1])
            groups[th] += 1
            pending[th].append(item)
            if policy == "eager":
                land(th, item)
        elif op[0] == "wait":  # all but the op[1] most recently committed groups complete
            for item in [p for p in pending[th] if p[0] < groups[th] - op[1]]:
                land(th, item)
        elif op[0] == "barrier":
            at_barrier.add(th)  # released when every thread has arrived (above)
        elif op[0] == "read_begin":
            _, chunk, st = op
            for other in range(threads):
                assert slot[st][other] == chunk, f"thread {th} reads chunk {chunk} in stage {st}: thread {other}'s share is chunk {slot[st][other]}"
            reading[th].add(st)
        else:
            _, chunk, st = op
            reading[th].discard(st)
            for other in range(threads):
                assert slot[st][other] == chunk, f"chunk {chunk} in stage {st} was overwritten during thread {th}'s read"


def check_ring(kernel, n_chunks: int, prefetch: int, wait_depth: int, barrier: bool = True, trials: int = 60) -> None:
    stages = kernel["stages"]
    program = ring_program(n_chunks, prefetch, wait_depth, lambda it: kernel["stage"][it], barrier)
    rng = random.Random(0)
    for policy in ("eager", "lazy"):
        run_ring(n_chunks, stages, program, 2, rng, policy)
    for _ in range(trials):
        run_ring(n_chunks, stages, program, 3, rng, "random")


@pytest.mark.parametrize("n_chunks", [0, 1, 2, 5, 17])
def test_ring_reads_each_chunk_whole_and_never_overwrites_a_read(kernel, n_chunks):
    """The kernel's ring: each chunk is in shared memory (every thread's share) before any thread reads it,
    and no copy lands in a stage while a thread reads it, whatever the copy timing and interleaving."""
    assert kernel["stage"] == [it % kernel["stages"] for it in range(64)]
    assert kernel["stages"] >= 3 and kernel["prefetch"] == kernel["stages"] - 1
    check_ring(kernel, n_chunks, kernel["prefetch"], kernel["wait_depth"])


def test_ring_emulation_detects_wrong_waits_and_prefetch(kernel):
    """Mutations the emulation must catch: one wait_group too shallow (the chunk about to be read may be in
    flight), a prefetch distance of kStages (the issue targets the stage being read), no barrier."""
    with pytest.raises(AssertionError, match="reads chunk"):
        check_ring(kernel, 9, kernel["prefetch"], kernel["wait_depth"] + 1)
    with pytest.raises(AssertionError, match="lands in stage|overwritten|reads chunk"):
        check_ring(kernel, 9, kernel["stages"], kernel["wait_depth"] + 1)
    with pytest.raises(AssertionError, match="lands in stage|overwritten|reads chunk"):
        check_ring(kernel, 9, kernel["prefetch"], kernel["wait_depth"], barrier=False)


# ---- dy's positive columns --------------------------------------------------------------------------


def mod_ny(a: int, n: int) -> int:
    """pairwise_tiles.cuh's mod_ny: a double-precision quotient truncated toward zero, then corrected."""
    r = a - int(float(a) * (1.0 / n)) * n
    while r < 0:
        r += n
    while r >= n:
        r -= n
    return r


def positives_mask(j: int, c0: int, ny: int, pos_offset: int, bn: int) -> int:
    """The kCols kernel's mask of the tile's x rows c0 .. c0 + bn whose positive is own y row j:
    pcol = mod_ny(j + Ny − pos_offset), then c from c0 + mod_ny(pcol − c0) in steps of Ny."""
    pcol = mod_ny(j + ny - pos_offset, ny)
    mask, c = 0, c0 + mod_ny(pcol - c0, ny)
    while c < c0 + bn:
        mask |= 1 << (c - c0)
        c += ny
    return mask


@pytest.mark.parametrize("ny", [1, 3, 63, 64, 65, 1000])
def test_dy_positive_mask_is_the_definition(kernel, ny):
    """Bit c − c0 is set exactly when p(c) = (c + pos_offset) mod Ny is the own row j (any number of
    wraps M / Ny, negative c0 − pcol, Ny below and above the tile width)."""
    rng = random.Random(ny)
    bn = kernel["bn"]
    for _ in range(200):
        pos_offset = rng.randrange(ny)
        j = rng.randrange(ny)
        c0 = bn * rng.randrange(0, 40)
        want = sum(1 << (c - c0) for c in range(c0, c0 + bn) if (c + pos_offset) % ny == j)
        assert positives_mask(j, c0, ny, pos_offset, bn) == want, (ny, pos_offset, j, c0)
