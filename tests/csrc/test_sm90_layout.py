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
and the producer/consumer loops with their waits and arrivals.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the host probe is an nvcc run (seconds), as the other compiler tests

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")
SMEM_LIMIT = 227 * 1024  # sm_90 dynamic shared memory per block
SMEM_BASE = 4096  # an aligned dynamic shared-memory base for the emulation

_HOST_PROGRAM = r"""
#include "pairwise_lse_sm90.cu"
#include <cstdio>

int main() {
  using namespace fastssl;
  std::printf("{\"bm\": %d, \"bn\": %d, \"bk\": %d, \"stages\": %d, \"max_chunks\": %d, \"consumers\": %d, "
              "\"chunk_bytes\": %u, \"consumer_row_bytes\": %u, \"kstep_bytes\": %d, \"atom_bytes\": %d,\n",
              kBM, kBN, kBK, kStages, kMaxChunks, kConsumers, kChunkBytes, kConsumerRowBytes, sm90::kKStepBytes,
              sm90::kSwizzleAtomBytes);
  std::printf("\"acc\": [");
  for (int t = 0; t < 128; ++t)
    for (int r = 0; r < 64; ++r)
      std::printf("%s[%d, %d]", t + r ? ", " : "", sm90::acc_row(t, r), sm90::acc_col(t, r));
  std::printf("],\n\"stage\": [");
  for (uint32_t it = 0; it < 64; ++it)
    std::printf("%s[%u, %u]", it ? ", " : "", stage_of(it).index, stage_of(it).parity);
  std::printf("],\n\"desc\": [");
  for (uint32_t addr = 0; addr < 256 * 1024; addr += 16)
    std::printf("%s%llu", addr ? ", " : "", static_cast<unsigned long long>(sm90::sw128_desc(addr)));
  std::printf("]}\n");
  return 0;
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The kernel's constants, fragment map, stage function and descriptors, printed by a host program."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the kernel's host-side layout functions cannot be compiled here")
    folder = tmp_path_factory.mktemp("sm90_layout")
    (folder / "probe.cu").write_text(_HOST_PROGRAM)
    # PTX only for the device side (no ptxas): the host program never launches the kernel.
    cmd = [NVCC, "-std=c++17", "-gencode=arch=compute_90a,code=compute_90a", f"-I{CSRC}", str(folder / "probe.cu"),
           "-o", str(folder / "probe")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(folder / "probe")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads(run.stdout)
    info["acc"] = np.array(info["acc"]).reshape(128, 64, 2)
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


def test_shared_memory_map_fits_and_is_atom_aligned(kernel):
    atom, chunk = kernel["atom_bytes"], kernel["chunk_bytes"]
    assert atom == 8 * 128 and chunk == kernel["bm"] * kernel["bk"] * 2 == kernel["bn"] * kernel["bk"] * 2
    assert kernel["bk"] * 2 == 128, "one chunk row must be exactly the 128-byte swizzle span"
    assert chunk % atom == 0 and kernel["consumer_row_bytes"] % atom == 0
    assert kernel["consumer_row_bytes"] * kernel["consumers"] == chunk
    barriers = 8 * (1 + 2 * kernel["stages"])
    total = atom + (kernel["max_chunks"] + kernel["stages"]) * chunk + barriers  # launch<T>'s kSmemBytes
    assert total <= SMEM_LIMIT, total


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
    ring = SMEM_BASE + kernel["max_chunks"] * chunk
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
                     producer_flip: int = 1, consumer_flip: int = 0) -> None:  # fmt: skip
    """Run the kernel's producer and consumer loops under a random interleaving, with TMA copies that
    land at random later times; raise Deadlock if nothing can move, AssertionError on a data race
    (a stage refilled while a consumer still reads it, or a consumer reading another load's data)."""
    rnd = random.Random(seed)
    chunk = 1
    x_full = Barrier(1)
    full = [Barrier(1) for _ in range(stages)]
    empty = [Barrier(consumers) for _ in range(stages)]
    content = [None] * stages  # which load `it` a stage holds
    readers = [set() for _ in range(stages)]  # consumers whose wgmma may still read the stage
    in_flight = []  # TMA copies issued, not landed: (barrier, stage or None, it)

    def producer():
        x_full.arrive(expect_tx=chunks * chunk)
        in_flight.append((x_full, None, None, chunks * chunk))
        it = 0
        for _ in range(tiles):
            for _ in range(chunks):
                s, parity = stage[it]
                yield lambda s=s, parity=parity: empty[s].try_wait(parity ^ producer_flip)
                assert not readers[s], f"stage {s} refilled (load {it}) while consumers {readers[s]} read it"
                full[s].arrive(expect_tx=chunk)
                in_flight.append((full[s], s, it, chunk))
                it += 1

    def consumer(me):
        yield lambda: x_full.try_wait(0)
        it = 0
        for _ in range(tiles):
            prev = None
            for kc in range(chunks):
                s, parity = stage[it]
                yield lambda s=s, parity=parity: full[s].try_wait(parity ^ consumer_flip)
                assert content[s] == it, f"consumer {me} read stage {s} holding load {content[s]}, wanted {it}"
                readers[s].add(me)
                if kc > 0:  # wait_group 1: the previous chunk's wgmma retired
                    assert content[prev[0]] == prev[1]
                    readers[prev[0]].discard(me)
                    empty[prev[0]].arrive()
                prev = (s, it)
                it += 1
            assert content[prev[0]] == prev[1]
            readers[prev[0]].discard(me)
            empty[prev[0]].arrive()

    agents = {"producer": producer(), **{f"consumer{c}": consumer(c) for c in range(consumers)}}
    waiting = {name: None for name in agents}
    while agents or in_flight:
        runnable = [n for n in agents if waiting[n] is None or waiting[n]()]
        choices = runnable + (["tma"] if in_flight else [])
        if not choices:
            raise Deadlock(f"stuck: {sorted(agents)} wait, no copy in flight")
        pick = rnd.choice(choices)
        if pick == "tma":
            bar, s, it, nbytes = in_flight.pop(rnd.randrange(len(in_flight)))
            if s is not None:
                content[s] = it
            bar.complete_tx(nbytes)
            continue
        try:
            waiting[pick] = next(agents[pick])
        except StopIteration:
            del agents[pick], waiting[pick]


@pytest.mark.parametrize("tiles,chunks", [(1, 1), (3, 1), (3, 3), (2, 8), (5, 4), (7, 5)])
def test_pipeline_never_hangs_or_races(kernel, tiles, chunks):
    stage = kernel["stage"]
    assert tiles * chunks <= len(stage)
    for seed in range(30):
        emulate_pipeline(stage, kernel["stages"], tiles, chunks, kernel["consumers"], seed)


def test_stage_function_is_round_robin_with_flipping_parity(kernel):
    stages = kernel["stages"]
    assert kernel["stage"] == [[it % stages, (it // stages) % 2] for it in range(64)]


def test_pipeline_emulation_detects_wrong_parities(kernel):
    """The check has teeth: the producer waiting on the phase itself (no flip) deadlocks at once; a
    consumer waiting on the flipped parity reads a stage before its data landed."""
    stage, stages, consumers = kernel["stage"], kernel["stages"], kernel["consumers"]
    with pytest.raises(Deadlock):
        emulate_pipeline(stage, stages, 2, 3, consumers, seed=0, producer_flip=0)
    with pytest.raises(AssertionError, match="read stage"):
        for seed in range(30):
            emulate_pipeline(stage, stages, 2, 3, consumers, seed=seed, consumer_flip=1)
