"""Pairwise LogSumExp in Triton: FlashAttention-style fused kernels (docs/design.md, kernel family 1).

For rows x (M, D), columns y (Ny, D) and optional bank columns (K, D), with logits
s_ij = scale·x_i·y_j, s_ik = scale·x_i·bank_k and positive column p(i) = (i + pos_offset) mod Ny:

    pos_i = s_i,p(i)
    lse_i = LSE over {s_i,p(i)} (INCLUDE_POS) ∪ {s_ij : j ≠ p(i), j ≠ i if EXCLUDE_SELF} (Y_NEGATIVES)
                     ∪ {s_ik : all k} (HAS_BANK)

The forward streams column tiles through an online max/sum and writes only lse and pos (O(M));
the backward recomputes the logit tiles from x, y, bank and the stored lse:

    P_ij = exp(s_ij − lse_i) on the columns of lse_i,  G_ij = grad_lse_i·P_ij + grad_pos_i·[j = p(i)]
    dx_i = scale·(Σ_j G_ij y_j + Σ_k G_ik bank_k),     dy_j = scale·Σ_i G_ij x_i

The positive pair is always handled apart from the tiles: its logit is a row-wise dot of x_i with
the gathered row y_p(i), and the tile masks drop column p(i). So MoCo (Y_NEGATIVES=False) never
touches the other columns of y, and the forward and backward see the very same positive logit.

Tiling. D ≤ 256 (bf16/fp16) or ≤ 128 (fp32) is "resident": one BLOCK_K = next_pow2(D) chunk, so a
row block of x (or column block of y) is loaded once and the column loop is the pipelined loop, as
in FlashAttention. Larger D loops over BLOCK_K chunks inside each logit tile (the forward, and the
blocked backward's weights kernel).

Backward routes (`backward_route`). "fused", for resident D in bf16/fp16: one pass recomputes each logit tile
once and feeds dx and dy from it (FlashAttention-2's backward, Dao 2023): with the forward, four
logit-sized products (forward logits, recomputed logits, dx, dy), three when x is y (the symmetric
kernel: one weighted sum serves both roles). "blocked", for larger D and fp32: per block of rows a Triton
kernel writes the weights G into a scratch bounded by SCRATCH_BYTES and torch.matmul (cuBLAS on a
GPU) forms dx = G·y and dy += Gᵀ·x; the logits are computed once there too. Memory stays
O((M + Ny + K)·D), plus the scratch on the blocked route, in every case.

Small batches. When the row blocks cannot fill the GPU, the forward splits each row block's column
tiles over grid axis 1 (Flash-Decoding's split-K, Dao et al. 2023): partial base-2 LSEs go to an
(S, M) fp32 scratch and a merge kernel combines them (`forward_splits` chooses S). In its column loop
only the tiles holding a dropped column (ragged edge, positive, self) are masked.

Hopper variants. Each resident kernel is one jit body (`_fwd_program`, ...) with two entries: today's
kernel, and a Hopper entry with two switches, TMA descriptors for the streamed tiles (built in the
kernel, or on the host with TMA stores of the backward's outputs too) and per-loop pipelining, on
only when FASTSSL_LSE_HOPPER asks (`HopperVariant`, `variant_kernel`). With both off it is today's
code, which the forward also runs on a GPU in its own configs where today's spilled (fp32, odd D:
`forward_configs`).

Launchers allocate outputs, take strides (non-contiguous inputs are read in place, x may be y; the
backward first copies rows that are not 16-byte aligned, `aligned_rows`), read `scale` on the device
(no host sync) and launch on the current stream.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl._common import device_ctx
from fastssl.kernels import PairwiseLSEFlags
from fastssl.kernels.triton._utils import (
    autotune,
    device_smem_limit,
    interpreting,
    logits_loop,
    mm,
    round_to,
    row_bin,
    rowdot_loop,
)

#: fp32 inputs must match an fp32 reference to ~1e-5, so their dots run in full fp32 (CUDA cores).
#: "tf32x3" (three TF32 tensor-core products, ~1e-6 relative per product) is the fast alternative.
FP32_DOT_PRECISION = "ieee"

#: Largest D (after rounding up to a power of two) kept resident in one BLOCK_K chunk, per itemsize.
RESIDENT_D_MAX = {2: 256, 4: 128}
#: Chunk of D per tl.dot when D is not resident. LOOP_BLOCK_DOUT, the width of the output D slices of
#: the former backward, is only returned by `tile_dims` now (no kernel slices D).
LOOP_BLOCK_K = {2: 64, 4: 32}
LOOP_BLOCK_DOUT = {2: 128, 4: 128}

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

_FLAGS = ["HAS_BANK", "EXCLUDE_SELF", "INCLUDE_POS", "Y_NEGATIVES"]
_KEY = ["ROW_BIN", "BLOCK_K", "SINGLE_K", *_FLAGS]
# Sizes only feed masks, so their ==1 / %16 specialisations would only multiply compiles (D and the
# strides keep theirs: they decide vector widths and cp.async pipelining).
_NO_SPECIALIZE = ["M", "NY", "NB", "pos_offset", "ROW_BIN"]


def _configs(shapes):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M always counts rows of x and BLOCK_N columns of y
# (or of the bank); which of the two a program owns and which it streams is said per kernel.
FWD_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 2)]
)
# The backward's (see "backward" below). "rows" owns x rows and keeps the dx block in registers next
# to each transient dy tile; "sym" owns x rows (x is y); "dy" owns y columns (dy only); "weights"
# writes G tiles for the blocked route. Configs whose live fp32 values would spill are pruned
# (`live_fp32_per_thread`): at D = 256 "rows" keeps its 16-column tiles (two (·, 256) fp32 blocks
# are live), "sym" and "dy" their 8-warp ones. Each list was compiled with ptxas for sm_90 and sm_80
# (tests/gpu/test_triton_aot.py) and kept only where nothing spills. A program's own block has 64
# rows at least: below, sm_90 has no wgmma for its products ("rows"' dy tiles of 16 and 32 columns
# take mma.sync).
BWD_ROWS_CONFIGS = _configs(
    [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2), (64, 16, 8, 3)]
)
BWD_SYM_CONFIGS = _configs(
    [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2), (64, 32, 4, 3), (64, 32, 8, 2), (64, 32, 8, 3)]
)
BWD_DY_CONFIGS = _configs(
    [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (32, 64, 8, 2),
     (64, 64, 8, 2)]
)
BWD_WEIGHTS_CONFIGS = _configs(
    [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4)]
)
CONFIGS = {"fwd": FWD_CONFIGS, "rows": BWD_ROWS_CONFIGS, "sym": BWD_SYM_CONFIGS, "dy": BWD_DY_CONFIGS,
           "weights": BWD_WEIGHTS_CONFIGS}  # fmt: skip
#: The forward's configs for fp32 inputs, any D, on a GPU (`forward_configs`): 8 warps, since CUDA-core
#: ("ieee") dots on 4 warps ran out of registers and spilled; these do not (benchmarks/RESULTS.md,
#: "Measurements behind design choices"; tests/gpu/test_triton_hopper_aot.py).
FWD_FP32_CONFIGS = _configs([(64, 64, 8, 2), (64, 64, 8, 3)])
#: The forward's configs for half-precision rows that Triton loads element by element (`vector_rows`
#: fails: an odd D such as 70, one 64-bit address per element), where today's spilled: 8 warps, and
#: 32-row blocks at the widest resident chunk (BLOCK_K = 256). Same sources as FWD_FP32_CONFIGS.
FWD_UNALIGNED_CONFIGS = _configs([(64, 64, 8, 2), (64, 64, 8, 3)])
FWD_UNALIGNED_WIDE_K_CONFIGS = _configs([(32, 64, 8, 2), (32, 64, 4, 2)])
#: The "wide" Hopper variant's extra configs (`HopperVariant`), autotuned together with CONFIGS: larger
#: tiles, each compiled for sm_90 without spills where pruning keeps it (tests/gpu/test_triton_hopper_aot.py).
#: No 16-warp ones (128 registers a thread) and none for "dy": those spilled (benchmarks/RESULTS.md).
HOPPER_CONFIGS = {
    "fwd": _configs([(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4), (256, 64, 8, 3)]),
    "rows": _configs([(128, 32, 8, 3)]),
    "sym": _configs([(128, 32, 8, 3)]),
    "dy": [],
}
#: Under the interpreter: small tiles, so that the odd test sizes hit several tiles and every mask.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
#: fp32 dots run on CUDA cores (FP32_DOT_PRECISION = "ieee"): big tiles buy nothing there and take
#: ~20 s each to compile, so fp32 keeps the tiles of at most this many logits.
FP32_MAX_TILE = 64 * 64


def smem_estimate(kind: str, block_m: int, block_n: int, block_k: int, single_k: bool, itemsize: int, stages: int,
                  block_dout: int = 0, fp32_precision: Optional[str] = None, tma: bool = False) -> int:
    """Upper estimate of the shared memory (bytes) of one program; the pruning relies on it.

    Resident operands (SINGLE_K) count once, streamed ones once per pipeline stage, plus the
    (BLOCK_M, BLOCK_N) tiles of weights that a backward product reads from shared memory ("rows"
    stages more: see there). Exact for the resident forward kernel on sm_90, above the compiled
    figure elsewhere (tests/gpu/test_triton_aot.py checks). `block_dout` is no longer read: no
    kernel slices the output's D since the blocked route took D > resident. `tma`: the TMA copies'
    barriers, one 8-byte mbarrier per stage (benchmarks/RESULTS.md), plus one to spare; "host_tma"'s
    TMA stores add nothing, their staging tile reusing the loops' buffers (benchmarks/RESULTS.md).
    """
    if single_k:
        if kind == "fwd":
            est = itemsize * block_k * (block_m + stages * block_n)
        elif kind == "rows":
            # x twice (left operand of the logits, right one of dy's product), y once more in the layout
            # of dx's right operand, two weight tiles and a layout-conversion scratch of one more.
            est = itemsize * (block_k * (2 * block_m + (stages + 1) * block_n) + 2 * block_m * block_n)
            est += 4 * block_m * block_n
        elif kind == "sym":
            est = itemsize * (block_k * (block_m + stages * block_n) + block_m * block_n)
        else:
            est = itemsize * (block_k * (block_n + stages * block_m) + block_m * block_n)
    else:  # the D loop: "fwd", and "weights", whose G tile is stored straight from registers
        est = itemsize * stages * block_k * (block_m + block_n)
    if itemsize == 4 and (fp32_precision or FP32_DOT_PRECISION) != "ieee":
        est = est * 3 // 2  # TF32 splits stage extra operand copies (benchmarks/RESULTS.md, "Measurements behind design choices")
    if tma:
        est += 8 * (stages + 1)
    return est


def live_fp32_per_thread(kind: str, block_m: int, block_n: int, block_k: int, num_warps: int,
                         needs_dy: bool = True) -> int:
    """fp32 values per thread that a backward program keeps live at once: its (rows, D) output
    accumulator, "rows"' transient (BLOCK_N, D) dy tile, and the (BLOCK_M, BLOCK_N) logit tile (two
    in "sym": the row and the column weights). 0 for the forward and "weights", whose one tile is
    bounded by the config lists themselves."""
    tile = block_m * block_n
    live = {
        "rows": block_m * block_k + (block_n * block_k if needs_dy else 0) + tile,
        "sym": block_m * block_k + 2 * tile,
        "dy": block_n * block_k + tile,
    }.get(kind, 0)
    return live // (32 * num_warps)


#: Most live fp32 values per thread (`live_fp32_per_thread`) a backward config may have. Measured
#: with ptxas (tests/gpu/test_triton_aot.py, sm_90 and sm_80): 104 spilled ("rows" 64 x 32 on 8
#: warps at D = 256), 84 did not; the other 150-odd of the 255 registers a thread has go to
#: operands, addresses, masks and the epilogue's gathered rows.
MAX_LIVE_FP32 = 100


def candidate_configs(kind: str, itemsize: int, block_k: int, single_k: bool, block_dout: int,
                      smem_limit: int, needs_dy: bool = True, configs: Optional[list] = None,
                      tma: bool = False) -> list:
    """The configs of kernel `kind` (a key of CONFIGS) that autotuning may pick for these tiles, out of
    `configs` (default CONFIGS[kind]; the "wide" variant adds HOPPER_CONFIGS[kind]); `tma`: loads
    through descriptors. `needs_dy` only matters to "rows", whose dx-only variant keeps no dy tile."""
    configs = CONFIGS[kind] if configs is None else configs
    keep = [
        c
        for c in configs
        if (itemsize < 4 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= FP32_MAX_TILE)
        and smem_estimate(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_k, single_k, itemsize, c.num_stages,
                          block_dout, tma=tma) <= smem_limit
        and live_fp32_per_thread(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_k, c.num_warps,
                                 needs_dy) <= MAX_LIVE_FP32
    ]
    smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
    return keep or [smallest]


def wide_candidates(kind: str, itemsize: int, block_k: int, single_k: bool, smem_limit: int,
                    needs_dy: bool = True) -> list:
    """The HOPPER_CONFIGS of `kind` that the "wide" variant's pruning keeps for these tiles (with TMA)."""
    kept = candidate_configs(kind, itemsize, block_k, single_k, 0, smem_limit, needs_dy,
                             HOPPER_CONFIGS[kind] + CONFIGS[kind], tma=True)  # fmt: skip
    return [c for c in kept if any(c is h for h in HOPPER_CONFIGS[kind])]


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        x = named_args["X"]
        limit = device_smem_limit(x.device.index or 0)  # CUDA tensors always carry their index
        # The backward kernels have no SINGLE_K: "weights" always loops over D, the others never do.
        return candidate_configs(kind, x.element_size(), kwargs["BLOCK_K"], kwargs.get("SINGLE_K", kind != "weights"),
                                 kwargs.get("BLOCK_DOUT", 0), limit, kwargs.get("NEEDS_DY", True), configs,
                                 kwargs.get("TMA", False))  # fmt: skip

    return prune


# ---------------------------------------------------------------------------------------------------
# tl helpers


@triton.jit
def _online_update(m_i, l_i, qk):
    """Fold a (BLOCK_M, BLOCK_N) tile of base-2 logits (-inf where masked) into the running max/sum."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    # A row with no column yet has m = -inf; shift by 0 instead so that -inf - -inf never appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(tl.exp2(qk - m_safe[:, None]), axis=1)
    return m_new, l_i


# ---------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _split_columns(NY, NB, split, N_SPLIT, Y_NEGATIVES: tl.constexpr, HAS_BANK: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Column ranges [y_lo, y_hi) of y and [b_lo, b_hi) of the bank walked by column split `split`.

    The y tiles (if Y_NEGATIVES) and then the bank tiles (if HAS_BANK), BLOCK_N columns each, are
    numbered as one sequence and cut into N_SPLIT runs of ⌈tiles / N_SPLIT⌉ tiles; the last runs may
    be short or empty (an empty run gives an empty range).
    """
    n_y = 0
    if Y_NEGATIVES:
        n_y = tl.cdiv(NY, BLOCK_N)
    n_b = 0
    if HAS_BANK:
        n_b = tl.cdiv(NB, BLOCK_N)
    per = tl.cdiv(n_y + n_b, N_SPLIT)
    t_lo = tl.minimum(split * per, n_y + n_b)
    t_hi = tl.minimum(t_lo + per, n_y + n_b)
    y_lo = tl.minimum(t_lo, n_y) * BLOCK_N
    y_hi = tl.minimum(t_hi, n_y) * BLOCK_N
    b_lo = (tl.maximum(t_lo, n_y) - n_y) * BLOCK_N
    b_hi = (tl.maximum(t_hi, n_y) - n_y) * BLOCK_N
    return y_lo, y_hi, b_lo, b_hi


@triton.jit
def _y_tile_needs_mask(start_n, row0, p0, NY, EXCLUDE_SELF: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Whether y tile [start_n, start_n + BLOCK_N) of the row block [row0, row0 + BLOCK_M) holds a
    column that the forward drops: one past Ny (the ragged edge), a positive p(i) (the band
    {p0 + t mod Ny : 0 ≤ t < BLOCK_M}, p0 = p(row0), which wraps past Ny or covers all of y when
    BLOCK_M ≥ Ny), or, if EXCLUDE_SELF, a column i of the block itself. A scalar, uniform over the
    program: the other tiles skip the masks (the split loop of Triton's fused-attention tutorial,
    here a branch per tile, since the diagonal, the band and the edge fall anywhere in the loop).
    """
    end = start_n + BLOCK_N
    hit = (end > NY) | ((start_n < p0 + BLOCK_M) & (end > p0)) | (start_n < p0 + BLOCK_M - NY)
    if EXCLUDE_SELF:
        hit = hit | ((start_n < row0 + BLOCK_M) & (end > row0))
    return hit


@triton.jit
def _row_tiles(P, P_DESC, N, D, stride_m, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr,
               HOST_TMA: tl.constexpr):
    """What `_tile` loads (BLOCK_R, BLOCK_K) tiles of the (N, D) rows of P through: with TMA a tensor
    descriptor (a TMA copy on sm_90; out-of-bounds rows and columns read as zero), else P itself. The
    descriptor is P_DESC, built on the host with that block shape (`host_descriptors`), if HOST_TMA;
    else it is built here, in every program. The launcher passes TMA only for rows that `tma_eligible`
    accepts (unit stride along D, 16-byte aligned base and row stride). Only streamed tiles take
    descriptors: a kernel's resident block, loaded once, stays a pointer load, since a descriptor load
    of it lands in registers, where the forward at D = 256 spilled (benchmarks/RESULTS.md,
    "Measurements behind design choices")."""
    tiles = P
    if TMA:
        if HOST_TMA:
            tiles = P_DESC
        else:
            tiles = tl.make_tensor_descriptor(P, shape=[N, D], strides=[stride_m, 1],
                                              block_shape=[BLOCK_R, BLOCK_K])  # fmt: skip
    return tiles


@triton.jit
def _store_rows(ptrs, mask, out_desc, start, value, TMA_STORE: tl.constexpr):
    """Store the (BLOCK_R, BLOCK_K) block `value` of output rows start.. : with TMA_STORE through the
    host-built descriptor `out_desc` (a TMA store from shared memory on sm_90, which drops the rows
    and columns past the output's bounds), else to `ptrs` under `mask`."""
    if TMA_STORE:
        out_desc.store([start, 0], value)
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _tile(tiles, start, P, idx, mask, stride_m, stride_d, ks, k_mask, TMA: tl.constexpr):
    """Rows idx = start + arange(BLOCK_R) of P, columns ks = arange(BLOCK_K): a descriptor load with
    TMA (`tiles` from `_row_tiles`), else a masked pointer load (0 outside `mask` and `k_mask`)."""
    if TMA:
        t = tiles.load([start, 0])
    else:
        t = tl.load(P + idx[:, None] * stride_m + ks[None, :] * stride_d, mask=mask[:, None] & k_mask[None, :],
                    other=0.0)
    return t


@triton.jit
def _logits_loop_tma(a_tiles, b_tiles, a0, b0, D, FP32_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """`logits_loop` through descriptors: the (BLOCK_A, BLOCK_B) fp32 tile of rows a0.. of A times rows
    b0.. of B transposed, over D in BLOCK_K chunks (zero past D: the descriptors' bounds)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        acc = mm(a_tiles.load([a0, k0]), tl.trans(b_tiles.load([b0, k0])), acc, FP32_PRECISION)
    return acc


@triton.jit
def _fwd_program(
    X, Y, B, SCALE, LSE, POS, PART,
    M, NY, NB, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_bm, stride_bd,
    pos_offset, ROW_BIN, N_SPLIT,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INCLUDE_POS: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    SPLIT: tl.constexpr, SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, HOST_TMA: tl.constexpr, X_DESC, Y_DESC, B_DESC,
):  # fmt: skip
    """lse_i and pos_i (fp32, natural log) for one block of BLOCK_M rows (grid axis 0) and, if SPLIT,
    one of N_SPLIT runs of its column tiles (grid axis 1, `_split_columns`).

    pos_i = scale·x_i·y_p(i) by a row-wise dot with the gathered rows y_p(i), computed and stored
    once per row (by split 0); it seeds the running max/sum when INCLUDE_POS. Then (BLOCK_M, BLOCK_N)
    logit tiles x_blk @ y_tileᵀ (if Y_NEGATIVES) and x_blk @ bank_tileᵀ (if HAS_BANK), each a
    BLOCK_K-chunked tl.dot with an fp32 accumulator, folded into an online max/sum in base 2
    (log2(e) folded into the scale: one FMA and an exp2 per logit). Only the tiles that hold a
    dropped column (col ≥ Ny, col = p(i), col = i if EXCLUDE_SELF: `_y_tile_needs_mask`) or the
    bank's ragged edge are masked. Stores lse (M,) and pos (M,), nothing else: the backward
    recomputes the tiles from lse (its base-2 round trip costs ≤ 0.5 ulp of |lse|, below the logits'
    own fp32 rounding). If SPLIT, each split stores instead its partial LSE in base 2,
    m + log2(l) (−inf for a split without columns), at PART[split, row] ((N_SPLIT, M) fp32), and
    `_pairwise_lse_merge_kernel` combines them into lse. ROW_BIN is only an autotuning key.
    TMA: the streamed tiles through tensor descriptors (`_row_tiles`); LOOP_STAGES: the column
    loops' tl.range num_stages (None: the compiler's default, which pipelines the dot operands);
    HOST_TMA: the descriptors are X_DESC (the D loop's x chunks), Y_DESC and B_DESC, built on the host.
    """
    pid = tl.program_id(0).to(tl.int64)
    row0 = pid * BLOCK_M
    row0_32 = row0.to(tl.int32)  # descriptor offsets are int32 (M < 2^31)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    pcol = (rows + pos_offset) % NY
    p0 = (row0 + pos_offset) % NY
    scale = tl.load(SCALE).to(tl.float32)
    qk_scale = scale * LOG2E  # base 2 from here on: exp2, and log2(e) rides on the scale

    y_lo = 0
    y_hi = NY
    b_lo = 0
    b_hi = NB
    first = True  # the program that computes the positive
    if SPLIT:
        split = tl.program_id(1)
        y_lo, y_hi, b_lo, b_hi = _split_columns(NY, NB, split, N_SPLIT, Y_NEGATIVES, HAS_BANK, BLOCK_N)
        first = split == 0

    # The streamed tiles through descriptors; the resident row block (SINGLE_K) by pointers, once.
    x_tiles = _row_tiles(X, X_DESC, M, D, stride_xm, BLOCK_M, BLOCK_K, TMA and not SINGLE_K, HOST_TMA)
    y_tiles = _row_tiles(Y, Y_DESC, NY, D, stride_ym, BLOCK_N, BLOCK_K, TMA, HOST_TMA)
    b_tiles = _row_tiles(B, B_DESC, NB, D, stride_bm, BLOCK_N, BLOCK_K, TMA and HAS_BANK, HOST_TMA)
    if SINGLE_K:
        ks = tl.arange(0, BLOCK_K).to(tl.int64)  # × a transposed view's stride M can pass 2^31
        k_mask = ks < D
        x_blk = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if first:
        if SINGLE_K:
            y_pos = tl.load(Y + pcol[:, None] * stride_ym + ks[None, :] * stride_yd,
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            pos_raw = tl.sum(x_blk.to(tl.float32) * y_pos.to(tl.float32), axis=1)
        else:
            pos_raw = rowdot_loop(X, Y, rows, pcol, row_mask, stride_xm, stride_xd, stride_ym, stride_yd, D,
                                   BLOCK_M, BLOCK_K)
        tl.store(POS + rows, pos_raw * scale, mask=row_mask)
        if INCLUDE_POS:
            m_i = pos_raw * qk_scale
            l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)

    if Y_NEGATIVES:
        for start_n in tl.range(y_lo, y_hi, BLOCK_N, num_stages=LOOP_STAGES):
            cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < NY
            if SINGLE_K:
                y_t = _tile(y_tiles, start_n, Y, cols, col_mask, stride_ym, stride_yd, ks, k_mask, TMA)
                s = mm(x_blk, tl.trans(y_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            elif TMA:
                s = _logits_loop_tma(x_tiles, y_tiles, row0_32, start_n, D, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            else:
                s = logits_loop(X, Y, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_ym, stride_yd,
                                 D, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            # The branch yields the masked tile: with the update in both arms (the dot's result used in
            # two regions) Triton 3.6's sm_90 pipeliner fails to compile the loop.
            qk = s * qk_scale
            if _y_tile_needs_mask(start_n, row0, p0, NY, EXCLUDE_SELF, BLOCK_M, BLOCK_N):
                # int32 offsets within the tile (all below 2^31): int64 column indices in the logits'
                # layout take two registers each.
                offs = tl.arange(0, BLOCK_N)
                valid = (offs < NY - start_n)[None, :] & (offs[None, :] != (pcol - start_n).to(tl.int32)[:, None])
                if EXCLUDE_SELF:
                    valid = valid & (offs[None, :] != (rows - start_n).to(tl.int32)[:, None])
                qk = tl.where(valid, qk, float("-inf"))
            m_i, l_i = _online_update(m_i, l_i, qk)

    if HAS_BANK:
        for start_n in tl.range(b_lo, b_hi, BLOCK_N, num_stages=LOOP_STAGES):
            cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < NB
            if SINGLE_K:
                b_t = _tile(b_tiles, start_n, B, cols, col_mask, stride_bm, stride_bd, ks, k_mask, TMA)
                s = mm(x_blk, tl.trans(b_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            elif TMA:
                s = _logits_loop_tma(x_tiles, b_tiles, row0_32, start_n, D, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            else:
                s = logits_loop(X, B, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_bm, stride_bd,
                                 D, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            qk = s * qk_scale
            if start_n + BLOCK_N > NB:  # the ragged edge
                qk = tl.where((tl.arange(0, BLOCK_N) < NB - start_n)[None, :], qk, float("-inf"))
            m_i, l_i = _online_update(m_i, l_i, qk)

    # An empty column set (e.g. DCL with Ny = 2, or a split without columns) has l = 0: its LSE is
    # -inf, the LSE of nothing.
    has_cols = l_i > 0.0
    lse2 = tl.where(has_cols, m_i + tl.log2(tl.where(has_cols, l_i, 1.0)), float("-inf"))
    if SPLIT:
        tl.store(PART + tl.program_id(1).to(tl.int64) * M + rows, lse2, mask=row_mask)
    else:
        tl.store(LSE + rows, lse2 * LN2, mask=row_mask)


@autotune(FWD_CONFIGS, INTERPRET_CONFIG, key=[*_KEY, "N_SPLIT"], prune=_prune("fwd"))
@triton.jit(do_not_specialize=[*_NO_SPECIALIZE, "N_SPLIT"])
def _pairwise_lse_fwd_kernel(
    X, Y, B, SCALE, LSE, POS, PART,
    M, NY, NB, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_bm, stride_bd,
    pos_offset, ROW_BIN, N_SPLIT,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INCLUDE_POS: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    SPLIT: tl.constexpr, SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Today's kernel: `_fwd_program` with pointer loads and the compiler's own loop pipelining."""
    _fwd_program(X, Y, B, SCALE, LSE, POS, PART, M, NY, NB, D, stride_xm, stride_xd, stride_ym, stride_yd,
        stride_bm, stride_bd, pos_offset, ROW_BIN, N_SPLIT, HAS_BANK, EXCLUDE_SELF, INCLUDE_POS, Y_NEGATIVES,
        SPLIT, SINGLE_K, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TMA=False, LOOP_STAGES=None, HOST_TMA=False,
        X_DESC=None, Y_DESC=None, B_DESC=None)


@triton.jit(do_not_specialize=[*_NO_SPECIALIZE, "N_SPLIT"])
def _pairwise_lse_fwd_hopper_kernel(
    X, Y, B, SCALE, LSE, POS, PART,
    M, NY, NB, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_bm, stride_bd,
    pos_offset, ROW_BIN, N_SPLIT,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INCLUDE_POS: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    SPLIT: tl.constexpr, SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, HOST_TMA: tl.constexpr = False,
    X_DESC=None, Y_DESC=None, B_DESC=None,
):  # fmt: skip
    """`_fwd_program` with the Hopper variant's switches (`HopperVariant`); autotuned per variant by `_tuned`.
    The descriptors (HOST_TMA only) are `host_descriptors`'; None otherwise."""
    _fwd_program(X, Y, B, SCALE, LSE, POS, PART, M, NY, NB, D, stride_xm, stride_xd, stride_ym, stride_yd,
        stride_bm, stride_bd, pos_offset, ROW_BIN, N_SPLIT, HAS_BANK, EXCLUDE_SELF, INCLUDE_POS, Y_NEGATIVES,
        SPLIT, SINGLE_K, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TMA=TMA, LOOP_STAGES=LOOP_STAGES,
        HOST_TMA=HOST_TMA, X_DESC=X_DESC, Y_DESC=Y_DESC, B_DESC=B_DESC)


@triton.jit
def _pairwise_lse_merge_kernel(PART, LSE, M, N_SPLIT, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """lse_i = ln 2 · LSE₂ over s of PART[s, i], for one block of BLOCK_R rows: the split forward's
    partial base-2 LSEs ((N_SPLIT, M) fp32, N_SPLIT ≤ BLOCK_S) merged, −inf where every split is."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    splits = tl.arange(0, BLOCK_S)
    mask = (splits < N_SPLIT)[:, None] & (rows < M)[None, :]
    part = tl.load(PART + splits[:, None] * M + rows[None, :], mask=mask, other=float("-inf"))
    m = tl.max(part, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp2(part - m_safe[None, :]), axis=0)
    has_cols = l > 0.0
    lse = tl.where(has_cols, (m_safe + tl.log2(tl.where(has_cols, l, 1.0))) * LN2, float("-inf"))
    tl.store(LSE + rows, lse, mask=rows < M)


# ---------------------------------------------------------------------------------------------------
# backward
#
# Resident D ("fused" route): one pass computes each logit tile once and feeds both products, as in
# FlashAttention-2's backward (Dao 2023). Which operand a program owns decides which gradient stays
# in registers and which leaves through fp32 atomics. Programs own rows of x: dx_I accumulates in
# registers over the y columns *and* the bank columns, and each tile's dy share, a transient
# (BLOCK_N, D) product, is added to an fp32 (Ny, D) buffer with atomics. FlashAttention-2 owns key
# columns instead, because there two accumulators (dK, dV) stay in registers against one (dQ) that
# leaves; here each side has one, and the bank decides: owning columns would send dx through atomics
# once per column block, and MoCo's bank, up to 65,536 columns that feed dx alone, would cost
# K / BLOCK_N atomic adds per dx element. Atomics make dy's summation order depend on scheduling, so
# dy is not bitwise reproducible from run to run (FlashAttention's dQ is not either); dx is.
#
# Weights in half precision. The tensor-core products take the weights rounded to the input dtype.
# The launcher picks a power of two f = 2^(WEIGHT_EXP - e) with max(|grad_lse|, |grad_pos|) < 2^e (a
# device scalar, no sync): the weights G·f stay below 2^14 (2^15 for "sym"'s sum of two), under fp16's
# 65504, and a weight reaches fp16's subnormals only 28 binades below the largest |grad_lse|, where
# P ≈ 1/N alone would reach them past N ≈ 16K columns. Multiplying back by 1/f is exact, so a
# cotangent scaled by 2^-k gives gradients scaled by exactly 2^-k. Where dx is the only product
# ("rows" without NEEDS_DY) the weights are P·2^DX_ONLY_EXP instead and grad_lse_i multiplies row i
# at the end in fp32: exact per row, whatever the other rows' cotangents.

#: Autotuning key of the backward kernels (names a kernel does not take are skipped by Triton).
_BWD_KEY = ["ROW_BIN", "BLOCK_K", *_FLAGS, "NEEDS_DY"]
#: The weight scale's exponent: weights G·f < 2^WEIGHT_EXP (read by the launcher).
WEIGHT_EXP = 14
#: Weights P·2^15 of the dx-only pass (P ≤ 1 rounds to fp16 normally down to P = 2^-29), and its inverse.
DX_ONLY_EXP: tl.constexpr = tl.constexpr(15.0)
DX_ONLY_UNSCALE: tl.constexpr = tl.constexpr(2.0**-15)
#: Rows per program of the positive-weight pre-pass (one fixed tile: it is O(M·D) work).
POS_BLOCK_R = 32
#: Row tiles per group in the "weights" kernel's launch order (they share column tiles in L2).
WEIGHTS_GROUP_M: tl.constexpr = tl.constexpr(8)


@triton.jit(do_not_specialize=["M", "NY", "pos_offset"])
def _pairwise_lse_bwd_pos_kernel(
    X, Y, SCALE, LSE, GRAD_LSE, GRAD_POS, W_POS,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd,
    pos_offset,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The positive pair's weight of BLOCK_R rows, before the main pass (as FlashAttention's backward
    computes its row statistic Delta first): w_i = grad_pos_i + grad_lse_i·exp(pos_i − lse_i), with
    pos_i = scale·x_i·y_p(i) the forward's fp32 row-wise dot. Only launched with the positive in the
    LSE (else w = grad_pos). O(M·D) reads; it spares every backward pass a row dot in its epilogue,
    where the fp32 row tiles it needs would sit next to the accumulator and spill."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    pcol = (rows + pos_offset) % NY
    pos_raw = rowdot_loop(X, Y, rows, pcol, row_mask, stride_xm, stride_xd, stride_ym, stride_yd, D,
                           BLOCK_R, BLOCK_K)
    lse2 = tl.load(LSE + rows, mask=row_mask, other=0.0) * LOG2E
    g_lse = tl.load(GRAD_LSE + rows, mask=row_mask, other=0.0)
    w = tl.load(GRAD_POS + rows, mask=row_mask, other=0.0)
    w += g_lse * tl.exp2(pos_raw * (tl.load(SCALE).to(tl.float32) * LOG2E) - lse2)
    tl.store(W_POS + rows, w, mask=row_mask)


@triton.jit
def _rows_program(
    X, Y, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY_ACC,
    M, NY, NB, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_bm, stride_bd, stride_dxm, stride_dam,
    pos_offset, ROW_BIN,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    NEEDS_DY: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, HOST_TMA: tl.constexpr, Y_DESC, B_DESC, DX_DESC,
):  # fmt: skip
    """dx for one block of BLOCK_M rows and, with NEEDS_DY, the block's share of dy through atomics.

    The (BLOCK_M, D) row block x_I stays resident; per (BLOCK_N, D) column tile y_J: the logits
    S = x_I·y_Jᵀ (fp32), the weights W = G·f (masked: col < Ny, col ≠ p(i), col ≠ i if EXCLUDE_SELF)
    rounded to the input dtype, dx_I += W·y_J in registers, and Wᵀ·x_I (BLOCK_N, D) added to the fp32
    buffer DY_ACC at rows J with relaxed atomics: three products per tile, one of them the logits.
    Bank tiles (HAS_BANK) feed dx alone. The positive pair after the loops, with w_i from W_POS
    (`_pairwise_lse_bwd_pos_kernel`): dx_i += w_i·y_p(i), and w_i·f·x_i goes to DY_ACC row p(i).
    Stores dx_i = scale·(acc_i / f + w_i·y_p(i)); DY_ACC ends as dy·f/scale (the launcher rescales
    and rounds it). Without NEEDS_DY the weights are P·2^15 (see above) and DY_ACC is not touched.
    Indices are int32 in the masks (sizes < 2^31) and int64 in addresses.
    TMA, LOOP_STAGES, HOST_TMA: as in `_fwd_program` (the Hopper entry's switches); HOST_TMA also
    stores the dx block through DX_DESC (a TMA store).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    pcol = (rows + pos_offset) % NY
    scale = tl.load(SCALE).to(tl.float32)
    qk_scale = scale * LOG2E
    lse2 = tl.load(LSE + rows64, mask=row_mask, other=0.0) * LOG2E  # the forward's base-2 lse
    g_lse = tl.load(GRAD_LSE + rows64, mask=row_mask, other=0.0)
    f = tl.load(WSCALE)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)  # × a transposed view's stride M can pass 2^31
    k_mask = ks < D
    y_tiles = _row_tiles(Y, Y_DESC, NY, D, stride_ym, BLOCK_N, BLOCK_K, TMA, HOST_TMA)
    b_tiles = _row_tiles(B, B_DESC, NB, D, stride_bm, BLOCK_N, BLOCK_K, TMA and HAS_BANK, HOST_TMA)
    x_blk = tl.load(X + rows64[:, None] * stride_xm + ks[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    if NEEDS_DY:
        # Rows past M get grad_lse = 0, hence zero weights: they add nothing to dy.
        w_row = g_lse * f
        shift2 = lse2
    else:
        w_row = g_lse  # not read: the weights are P·2^15, grad_lse is applied at the end
        shift2 = lse2 - DX_ONLY_EXP

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if Y_NEGATIVES:
        for start_n in tl.range(0, NY, BLOCK_N, num_stages=LOOP_STAGES):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_mask = cols < NY
            cols64 = cols.to(tl.int64)
            y_t = _tile(y_tiles, start_n, Y, cols64, col_mask, stride_ym, stride_yd, ks, k_mask, TMA)
            s = mm(x_blk, tl.trans(y_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            valid = col_mask[None, :] & (cols[None, :] != pcol[:, None])
            if EXCLUDE_SELF:
                valid = valid & (cols[None, :] != rows[:, None])
            # Mask before exp2: a dropped column (self, positive) may lie far above lse and overflow.
            p = tl.exp2(tl.where(valid, s * qk_scale - shift2[:, None], float("-inf")))
            if NEEDS_DY:
                w = round_to(p * w_row[:, None], y_t.dtype)
                acc = mm(w, y_t, acc, FP32_PRECISION)
                dy_t = mm(tl.trans(w), x_blk, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), FP32_PRECISION)
                tl.atomic_add(DY_ACC + cols64[:, None] * stride_dam + ks[None, :], dy_t,
                              mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")
            else:
                acc = mm(round_to(p, y_t.dtype), y_t, acc, FP32_PRECISION)

    if HAS_BANK:
        for start_n in tl.range(0, NB, BLOCK_N, num_stages=LOOP_STAGES):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_mask = cols < NB
            b_t = _tile(b_tiles, start_n, B, cols.to(tl.int64), col_mask, stride_bm, stride_bd, ks, k_mask, TMA)
            s = mm(x_blk, tl.trans(b_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            p = tl.exp2(tl.where(col_mask[None, :], s * qk_scale - shift2[:, None], float("-inf")))
            if NEEDS_DY:
                p = p * w_row[:, None]
            acc = mm(round_to(p, b_t.dtype), b_t, acc, FP32_PRECISION)

    # The positive pair, after the loops so that its (BLOCK_M, D) tile is not held across them.
    pcol64 = pcol.to(tl.int64)
    m2 = row_mask[:, None] & k_mask[None, :]
    w_pos = tl.load(W_POS + rows64, mask=row_mask, other=0.0)
    y_pos = tl.load(Y + pcol64[:, None] * stride_ym + ks[None, :] * stride_yd, mask=m2, other=0.0)
    if NEEDS_DY:
        dx = scale * (acc * (1.0 / f) + w_pos[:, None] * y_pos.to(tl.float32))
        tl.atomic_add(DY_ACC + pcol64[:, None] * stride_dam + ks[None, :], (w_pos * f)[:, None] * x_blk.to(tl.float32),
                      mask=m2, sem="relaxed")
    else:
        dx = scale * ((g_lse * DX_ONLY_UNSCALE)[:, None] * acc + w_pos[:, None] * y_pos.to(tl.float32))
    _store_rows(DX + rows64[:, None] * stride_dxm + ks[None, :], m2, DX_DESC, tl.program_id(0) * BLOCK_M,
                round_to(dx, DX.dtype.element_ty), TMA and HOST_TMA)


@autotune(BWD_ROWS_CONFIGS, INTERPRET_CONFIG, key=_BWD_KEY, prune=_prune("rows"), reset_to_zero=["DY_ACC"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_lse_bwd_rows_kernel(
    X, Y, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY_ACC,
    M, NY, NB, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_bm, stride_bd, stride_dxm, stride_dam,
    pos_offset, ROW_BIN,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    NEEDS_DY: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Today's kernel: `_rows_program` with pointer loads and the compiler's own loop pipelining."""
    _rows_program(X, Y, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY_ACC, M, NY, NB, D, stride_xm, stride_xd,
        stride_ym, stride_yd, stride_bm, stride_bd, stride_dxm, stride_dam, pos_offset, ROW_BIN, HAS_BANK,
        EXCLUDE_SELF, Y_NEGATIVES, NEEDS_DY, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TMA=False,
        LOOP_STAGES=None, HOST_TMA=False, Y_DESC=None, B_DESC=None, DX_DESC=None)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_lse_bwd_rows_hopper_kernel(
    X, Y, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY_ACC,
    M, NY, NB, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_bm, stride_bd, stride_dxm, stride_dam,
    pos_offset, ROW_BIN,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    NEEDS_DY: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, HOST_TMA: tl.constexpr = False,
    Y_DESC=None, B_DESC=None, DX_DESC=None,
):  # fmt: skip
    """`_rows_program` with the Hopper variant's switches (`HopperVariant`); autotuned per variant by `_tuned`."""
    _rows_program(X, Y, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY_ACC, M, NY, NB, D, stride_xm, stride_xd,
        stride_ym, stride_yd, stride_bm, stride_bd, stride_dxm, stride_dam, pos_offset, ROW_BIN, HAS_BANK,
        EXCLUDE_SELF, Y_NEGATIVES, NEEDS_DY, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TMA=TMA,
        LOOP_STAGES=LOOP_STAGES, HOST_TMA=HOST_TMA, Y_DESC=Y_DESC, B_DESC=B_DESC, DX_DESC=DX_DESC)


@triton.jit
def _sym_program(
    X, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY,
    M, NB, D,
    stride_xm, stride_xd, stride_bm, stride_bd, stride_dxm, stride_dym,
    pos_offset, ROW_BIN,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, HOST_TMA: tl.constexpr, X_DESC, B_DESC, DX_DESC, DY_DESC,
):  # fmt: skip
    """x is y (SimCLR, DCL, ArCL, VICReg-exp): the two roles' gradients of one block of BLOCK_M rows,
    without atomics.

    The logits are symmetric, so the tile S_IJ = x_I·x_Jᵀ holds row i's logits s_ij and, read by
    column, row j's s_ji: one tile gives both weights of each pair. x_i's gradient through both roles
    is scale·Σ_j (G_ij + G_ji)·x_j, so the program accumulates W_IJ·x_J in registers with
    W_IJ = (G_IJ + G_JIᵀ)·f, G_JI from the column rows' lse_J and grad_lse_J under their own masks
    (i ≠ p(j), i ≠ j if EXCLUDE_SELF): two products per tile (the logits and one weighted sum) where
    separate dx and dy passes take four; each output row has one owner, so it is deterministic
    (csrc/pairwise_lse.cu's kSym shares the tile too, with two accumulators). Positives, weights from
    W_POS: row i's own, w_i·x_p(i), and w_q·x_q for the row q = (i − pos_offset) mod M whose positive
    is i. The op sums dx and dy (ops/pairwise_lse.py), so each gets half: Σ x·dx is then
    Σ_ij G_ij x_i·x_j·scale, what d scale is read from. Bank columns (HAS_BANK; no loss has them with
    x is y) feed dx alone: they are added after dy is stored.
    TMA, LOOP_STAGES, HOST_TMA: as in `_fwd_program` (the Hopper entry's switches); HOST_TMA also
    stores the dx and dy blocks through DX_DESC and DY_DESC (TMA stores).
    """
    # M = Ny and 0 ≤ pos_offset < M: (i ± pos_offset) mod M is one conditional add or subtract.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    pcol = rows + pos_offset
    pcol = tl.where(pcol >= M, pcol - M, pcol)
    scale = tl.load(SCALE).to(tl.float32)
    qk_scale = scale * LOG2E
    lse2 = tl.load(LSE + rows64, mask=row_mask, other=0.0) * LOG2E
    f = tl.load(WSCALE)
    w_row = tl.load(GRAD_LSE + rows64, mask=row_mask, other=0.0) * f
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    k_mask = ks < D
    m2 = row_mask[:, None] & k_mask[None, :]
    x_blk = tl.load(X + rows64[:, None] * stride_xm + ks[None, :] * stride_xd, mask=m2, other=0.0)
    x_tiles = _row_tiles(X, X_DESC, M, D, stride_xm, BLOCK_N, BLOCK_K, TMA, HOST_TMA)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for start_n in tl.range(0, M, BLOCK_N, num_stages=LOOP_STAGES):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask = cols < M
        cols64 = cols.to(tl.int64)
        x_t = _tile(x_tiles, start_n, X, cols64, col_mask, stride_xm, stride_xd, ks, k_mask, TMA)
        lse2_c = tl.load(LSE + cols64, mask=col_mask, other=0.0) * LOG2E
        w_col = tl.load(GRAD_LSE + cols64, mask=col_mask, other=0.0) * f
        pcol_c = cols + pos_offset
        pcol_c = tl.where(pcol_c >= M, pcol_c - M, pcol_c)
        t = mm(x_blk, tl.trans(x_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION) * qk_scale
        valid_r = col_mask[None, :] & (cols[None, :] != pcol[:, None])
        valid_c = col_mask[None, :] & (rows[:, None] != pcol_c[None, :])
        if EXCLUDE_SELF:
            not_self = cols[None, :] != rows[:, None]
            valid_r = valid_r & not_self
            valid_c = valid_c & not_self
        # Rows past M: their weights only reach accumulator rows that are never stored.
        p_r = tl.exp2(tl.where(valid_r, t - lse2[:, None], float("-inf")))
        p_c = tl.exp2(tl.where(valid_c, t - lse2_c[None, :], float("-inf")))
        w = round_to(p_r * w_row[:, None] + p_c * w_col[None, :], x_t.dtype)
        acc = mm(w, x_t, acc, FP32_PRECISION)

    # Half the sum to each output, then the positives (i, p(i)) and (q, i).
    qrow = rows - pos_offset
    qrow64 = tl.where(qrow < 0, qrow + M, qrow).to(tl.int64)
    pcol64 = pcol.to(tl.int64)
    half_f = 0.5 * f
    w_own = tl.load(W_POS + rows64, mask=row_mask, other=0.0) * half_f
    w_q = tl.load(W_POS + qrow64, mask=row_mask, other=0.0) * half_f
    x_pos = tl.load(X + pcol64[:, None] * stride_xm + ks[None, :] * stride_xd, mask=m2, other=0.0)
    x_q = tl.load(X + qrow64[:, None] * stride_xm + ks[None, :] * stride_xd, mask=m2, other=0.0)
    acc = acc * 0.5 + w_own[:, None] * x_pos.to(tl.float32) + w_q[:, None] * x_q.to(tl.float32)
    unscale = scale * (1.0 / f)
    row0 = tl.program_id(0) * BLOCK_M
    _store_rows(DY + rows64[:, None] * stride_dym + ks[None, :], m2, DY_DESC, row0,
                round_to(acc * unscale, DY.dtype.element_ty), TMA and HOST_TMA)

    if HAS_BANK:
        b_tiles = _row_tiles(B, B_DESC, NB, D, stride_bm, BLOCK_N, BLOCK_K, TMA, HOST_TMA)
        for start_n in tl.range(0, NB, BLOCK_N, num_stages=LOOP_STAGES):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_mask = cols < NB
            b_t = _tile(b_tiles, start_n, B, cols.to(tl.int64), col_mask, stride_bm, stride_bd, ks, k_mask, TMA)
            s = mm(x_blk, tl.trans(b_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            p = tl.exp2(tl.where(col_mask[None, :], s * qk_scale - lse2[:, None], float("-inf")))
            acc = mm(round_to(p * w_row[:, None], b_t.dtype), b_t, acc, FP32_PRECISION)
    _store_rows(DX + rows64[:, None] * stride_dxm + ks[None, :], m2, DX_DESC, row0,
                round_to(acc * unscale, DX.dtype.element_ty), TMA and HOST_TMA)


@autotune(BWD_SYM_CONFIGS, INTERPRET_CONFIG, key=_BWD_KEY, prune=_prune("sym"))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_lse_bwd_sym_kernel(
    X, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY,
    M, NB, D,
    stride_xm, stride_xd, stride_bm, stride_bd, stride_dxm, stride_dym,
    pos_offset, ROW_BIN,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Today's kernel: `_sym_program` with pointer loads and the compiler's own loop pipelining."""
    _sym_program(X, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY, M, NB, D, stride_xm, stride_xd, stride_bm,
        stride_bd, stride_dxm, stride_dym, pos_offset, ROW_BIN, HAS_BANK, EXCLUDE_SELF, FP32_PRECISION, BLOCK_M,
            BLOCK_N, BLOCK_K, TMA=False, LOOP_STAGES=None, HOST_TMA=False, X_DESC=None, B_DESC=None, DX_DESC=None,
            DY_DESC=None)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_lse_bwd_sym_hopper_kernel(
    X, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY,
    M, NB, D,
    stride_xm, stride_xd, stride_bm, stride_bd, stride_dxm, stride_dym,
    pos_offset, ROW_BIN,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, HOST_TMA: tl.constexpr = False,
    X_DESC=None, B_DESC=None, DX_DESC=None, DY_DESC=None,
):  # fmt: skip
    """`_sym_program` with the Hopper variant's switches (`HopperVariant`); autotuned per variant by `_tuned`."""
    _sym_program(X, B, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DX, DY, M, NB, D, stride_xm, stride_xd, stride_bm,
        stride_bd, stride_dxm, stride_dym, pos_offset, ROW_BIN, HAS_BANK, EXCLUDE_SELF, FP32_PRECISION, BLOCK_M,
            BLOCK_N, BLOCK_K, TMA=TMA, LOOP_STAGES=LOOP_STAGES, HOST_TMA=HOST_TMA, X_DESC=X_DESC, B_DESC=B_DESC,
            DX_DESC=DX_DESC, DY_DESC=DY_DESC)


@triton.jit
def _dy_program(
    X, Y, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DY,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_dym,
    pos_offset, ROW_BIN,
    EXCLUDE_SELF: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, HOST_TMA: tl.constexpr, X_DESC, DY_DESC,
):  # fmt: skip
    """dy alone (dx not asked for: a frozen row tower) for one block of BLOCK_N columns of y.

    dy_j = scale·(Σ_{i: j≠p(i)} grad_lse_i·P_ij x_i + Σ_{i: p(i)=j} w_i x_i), w_i from W_POS. Owning
    the columns keeps dy in registers, with no atomics and no fp32 buffer, which is why this pass
    stays for the dy-only case. If Y_NEGATIVES, the program streams (BLOCK_M, D) row tiles of x,
    recomputes the transposed logits y_blk @ x_tileᵀ (BLOCK_N, BLOCK_M) from the stored lse, and
    accumulates (G·f)ᵀ @ x_tile in fp32, the weights G·f rounded to the input dtype. The positive
    rows of column j, i = (j − pos_offset) mod Ny + t·Ny < M (one pass per wrap of M over Ny,
    usually one), are then gathered and added elementwise. The bank needs no gradient and is not read.
    TMA, LOOP_STAGES, HOST_TMA: as in `_fwd_program` (the Hopper entry's switches); HOST_TMA also
    stores the dy block through DY_DESC (a TMA store).
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < NY
    cols64 = cols.to(tl.int64)
    scale = tl.load(SCALE).to(tl.float32)
    qk_scale = scale * LOG2E
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    k_mask = ks < D
    y_blk = tl.load(Y + cols64[:, None] * stride_ym + ks[None, :] * stride_yd,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
    x_tiles = _row_tiles(X, X_DESC, M, D, stride_xm, BLOCK_M, BLOCK_K, TMA, HOST_TMA)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if Y_NEGATIVES:
        f = tl.load(WSCALE)
        for start_m in tl.range(0, M, BLOCK_M, num_stages=LOOP_STAGES):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            rows64 = rows.to(tl.int64)
            pcol = (rows + pos_offset) % NY
            lse2 = tl.load(LSE + rows64, mask=row_mask, other=0.0) * LOG2E
            w_row = tl.load(GRAD_LSE + rows64, mask=row_mask, other=0.0) * f
            x_t = _tile(x_tiles, start_m, X, rows64, row_mask, stride_xm, stride_xd, ks, k_mask, TMA)
            s_t = mm(y_blk, tl.trans(x_t), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), FP32_PRECISION)
            valid = col_mask[:, None] & row_mask[None, :] & (cols[:, None] != pcol[None, :])
            if EXCLUDE_SELF:
                valid = valid & (cols[:, None] != rows[None, :])
            p_t = tl.exp2(tl.where(valid, s_t * qk_scale - lse2[None, :], float("-inf")))
            acc = mm(round_to(p_t * w_row[None, :], x_t.dtype), x_t, acc, FP32_PRECISION)
        acc = acc * (1.0 / f)

    prow0 = cols - pos_offset
    prow0 = tl.where(prow0 < 0, prow0 + NY, prow0)  # (j − pos_offset) mod Ny, as 0 ≤ pos_offset < Ny
    for wrap in range(0, M, NY):
        prow = prow0 + wrap
        p_mask = col_mask & (prow < M)
        prow64 = prow.to(tl.int64)
        x_pos = tl.load(X + prow64[:, None] * stride_xm + ks[None, :] * stride_xd,
                        mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        w_pos = tl.load(W_POS + prow64, mask=p_mask, other=0.0)
        acc += w_pos[:, None] * x_pos.to(tl.float32)

    _store_rows(DY + cols64[:, None] * stride_dym + ks[None, :], col_mask[:, None] & k_mask[None, :], DY_DESC,
                tl.program_id(0) * BLOCK_N, round_to(acc * scale, DY.dtype.element_ty), TMA and HOST_TMA)


@autotune(BWD_DY_CONFIGS, INTERPRET_CONFIG, key=_BWD_KEY, prune=_prune("dy"))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_lse_bwd_dy_kernel(
    X, Y, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DY,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_dym,
    pos_offset, ROW_BIN,
    EXCLUDE_SELF: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Today's kernel: `_dy_program` with pointer loads and the compiler's own loop pipelining."""
    _dy_program(X, Y, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DY, M, NY, D, stride_xm, stride_xd, stride_ym, stride_yd,
        stride_dym, pos_offset, ROW_BIN, EXCLUDE_SELF, Y_NEGATIVES, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            TMA=False, LOOP_STAGES=None, HOST_TMA=False, X_DESC=None, DY_DESC=None)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_lse_bwd_dy_hopper_kernel(
    X, Y, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DY,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_dym,
    pos_offset, ROW_BIN,
    EXCLUDE_SELF: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, HOST_TMA: tl.constexpr = False,
    X_DESC=None, DY_DESC=None,
):  # fmt: skip
    """`_dy_program` with the Hopper variant's switches (`HopperVariant`); autotuned per variant by `_tuned`."""
    _dy_program(X, Y, SCALE, LSE, GRAD_LSE, W_POS, WSCALE, DY, M, NY, D, stride_xm, stride_xd, stride_ym, stride_yd,
        stride_dym, pos_offset, ROW_BIN, EXCLUDE_SELF, Y_NEGATIVES, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            TMA=TMA, LOOP_STAGES=LOOP_STAGES, HOST_TMA=HOST_TMA, X_DESC=X_DESC, DY_DESC=DY_DESC)


@autotune(BWD_WEIGHTS_CONFIGS, INTERPRET_CONFIG, key=["ROW_BIN", "BLOCK_K", "Y_COLUMNS", "EXCLUDE_SELF"],
          prune=_prune("weights"))
@triton.jit(do_not_specialize=["R", "NC", "NY", "row0", "pos_offset", "ROW_BIN"])
def _pairwise_lse_bwd_weights_kernel(
    X, C, SCALE, LSE, GRAD_LSE, WSCALE, W,
    R, NC, NY, D, row0,
    stride_xm, stride_xd, stride_cm, stride_cd, stride_wm,
    pos_offset, ROW_BIN,
    Y_COLUMNS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The blocked route's weights: W[r, c] = f·grad_lse_i·exp(s_ic − lse_i) for the rows i = row0 + r,
    r < R, against the NC rows of C (y if Y_COLUMNS, else the bank), rounded to W's dtype.

    One (BLOCK_M, BLOCK_N) tile per program: a GEMM tile over D in BLOCK_K chunks with an fp32
    accumulator, whose epilogue turns logits into weights; tiles are visited in groups of
    WEIGHTS_GROUP_M row tiles that share their column tiles in L2 (the Triton matmul tutorial's
    order). Masked entries (Y_COLUMNS: the positive p(i), and i itself if EXCLUDE_SELF) are written as
    0: the positive is handled apart by the launcher.
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(R, BLOCK_M)
    n_n = tl.cdiv(NC, BLOCK_N)
    per_group = WEIGHTS_GROUP_M * n_n
    first_m = (pid // per_group) * WEIGHTS_GROUP_M
    group_rows = tl.minimum(n_m - first_m, WEIGHTS_GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 in the masks, int64 in addresses
    rows = row0 + local
    row_mask = local < R
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < NC
    cols64 = cols.to(tl.int64)
    s = logits_loop(X, C, rows64, cols64, row_mask, col_mask, stride_xm, stride_xd, stride_cm, stride_cd, D,
                     FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    scale = tl.load(SCALE).to(tl.float32)
    lse2 = tl.load(LSE + rows64, mask=row_mask, other=0.0) * LOG2E
    w_row = tl.load(GRAD_LSE + rows64, mask=row_mask, other=0.0) * tl.load(WSCALE)
    valid = col_mask[None, :]
    if Y_COLUMNS:
        valid = valid & (cols[None, :] != ((rows + pos_offset) % NY)[:, None])
        if EXCLUDE_SELF:
            valid = valid & (cols[None, :] != rows[:, None])
    p = tl.exp2(tl.where(valid, s * (scale * LOG2E) - lse2[:, None], float("-inf")))
    tl.store(W + local.to(tl.int64)[:, None] * stride_wm + cols64[None, :],
             round_to(p * w_row[:, None], W.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers


def tile_dims(d: int, dtype: torch.dtype) -> tuple[int, bool, int]:
    """(BLOCK_K, SINGLE_K, BLOCK_DOUT) for feature size `d`: resident single chunk, or a D loop."""
    itemsize = dtype.itemsize
    block = max(16, triton.next_power_of_2(d))
    if block <= RESIDENT_D_MAX[itemsize]:
        return block, True, block
    return LOOP_BLOCK_K[itemsize], False, LOOP_BLOCK_DOUT[itemsize]


def blocked_block_k(d: int, dtype: torch.dtype) -> int:
    """BLOCK_K of the blocked route's weights kernel: the D loop's chunk, or less for a small D."""
    return min(LOOP_BLOCK_K[dtype.itemsize], max(16, triton.next_power_of_2(d)))


def _common(x, y, bank, scale):
    m, d = x.shape
    n_y = y.shape[0]
    has_bank = bank is not None and bank.shape[0] > 0
    b = bank if has_bank else x  # never read when HAS_BANK is False
    n_b = bank.shape[0] if has_bank else 0
    if scale.device != x.device:
        scale = scale.to(x.device)
    block_k, single_k, block_dout = tile_dims(d, x.dtype)
    meta = dict(BLOCK_K=block_k, SINGLE_K=single_k, FP32_PRECISION=FP32_DOT_PRECISION)
    return m, d, n_y, has_bank, b, n_b, scale, meta, block_dout


#: Column splits of the forward (Dao et al. 2023, Flash-Decoding's split-K): at most MAX_SPLIT, with
#: at least MIN_SPLIT_COLUMNS columns each, and S = 1 once the row blocks alone give
#: SPLIT_PROGRAMS_PER_SM programs per SM. These are defaults chosen without a GPU measurement; tune
#: them (FASTSSL_LSE_SPLITS forces S) when one exists.
MAX_SPLIT = 64
MIN_SPLIT_COLUMNS = 512
SPLIT_PROGRAMS_PER_SM = 2
#: The row block `forward_splits` counts in: the largest BLOCK_M of FWD_CONFIGS, so that S does not
#: depend on the config the autotuner picks (the merge must know S before the launch).
SPLIT_ROW_BLOCK = max(c.kwargs["BLOCK_M"] for c in FWD_CONFIGS)
#: Rows per program of the merge kernel.
MERGE_BLOCK_R = 128


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def forward_splits(m: int, n_cols: int, device: torch.device) -> int:
    """S, the number of column splits of the forward for M rows and n_cols columns (y's + the bank's).

    ``FASTSSL_LSE_SPLITS=S`` forces S (clamped to [1, MAX_SPLIT]); the tests use it to run every
    mode split under the interpreter. Otherwise S = 1 off a GPU, and on one the largest power of two
    with S·⌈M / SPLIT_ROW_BLOCK⌉ ≤ SPLIT_PROGRAMS_PER_SM·SMs, at most MAX_SPLIT and at most
    n_cols / MIN_SPLIT_COLUMNS. So S > 1 only when the row blocks cannot fill the GPU, and its
    scratch of partials, S·M fp32, is then at most SPLIT_PROGRAMS_PER_SM·SMs·SPLIT_ROW_BLOCK·4 bytes
    (132 KiB on a 132-SM H200) whatever M; a forced S costs S·M·4 bytes.
    """
    forced = os.environ.get("FASTSSL_LSE_SPLITS", "")
    if forced:
        return min(max(int(forced), 1), MAX_SPLIT)
    if device.type != "cuda":
        return 1
    row_blocks = triton.cdiv(m, SPLIT_ROW_BLOCK)
    budget = min(SPLIT_PROGRAMS_PER_SM * _sm_count(device.index or 0) // row_blocks, MAX_SPLIT,
                 n_cols // MIN_SPLIT_COLUMNS)  # fmt: skip
    return 1 if budget < 2 else 1 << (budget.bit_length() - 1)


def pairwise_lse_forward(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    flags: PairwiseLSEFlags,
    n_split: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """(lse, pos), each (M,) fp32. x (M, D), y (Ny, D), bank (K, D) or None, scale 0-dim on x's device.

    `n_split`: the column splits S (default `forward_splits`). S > 1 launches S programs per row
    block, each writing a partial LSE to an (S, M) fp32 scratch, then `_pairwise_lse_merge_kernel`;
    no host sync either way.
    """
    m, d, n_y, has_bank, b, n_b, scale, meta, _ = _common(x, y, bank, scale)
    lse = torch.empty(m, dtype=torch.float32, device=x.device)
    pos = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return lse, pos
    if n_split is None:
        n_split = forward_splits(m, (n_y if flags.y_negatives else 0) + n_b, x.device)
    part = torch.empty((n_split, m), dtype=torch.float32, device=x.device) if n_split > 1 else lse
    meta.update(HAS_BANK=has_bank, EXCLUDE_SELF=flags.exclude_self, INCLUDE_POS=flags.include_pos,
                Y_NEGATIVES=flags.y_negatives, SPLIT=n_split > 1)  # fmt: skip
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]), n_split)  # noqa: E731
    kernel, extra = variant_kernel("fwd", (x, y, b if has_bank else None))
    with device_ctx(x):
        kernel[grid](
            x, y, b, scale, lse, pos, part,
            m, n_y, n_b, d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), b.stride(0), b.stride(1),
            flags.pos_offset, row_bin(max(m, n_y)), n_split,
            **meta, **extra,
        )  # fmt: skip
        if n_split > 1:
            _pairwise_lse_merge_kernel[(triton.cdiv(m, MERGE_BLOCK_R),)](
                part, lse, m, n_split, BLOCK_R=MERGE_BLOCK_R, BLOCK_S=triton.next_power_of_2(n_split)
            )
    return lse, pos


class HopperVariant(NamedTuple):
    """Opt-in variants of the resident kernels for sm_90 (forward, and the fused backward's "rows",
    "sym" and "dy"), all off by default: the default stays today's kernels until a GPU run measures
    them (benchmarks/hopper_variants.py). Set by ``FASTSSL_LSE_HOPPER`` (`parse_hopper_variant`).

    tma: the tiles each loop streams (y, bank, or x rows in "sym" and "dy"; x and y chunks in the
        forward's D loop) through device-side tensor descriptors (TMA copies), where `tma_eligible`
        accepts every input of the launch (bf16/fp16 rows, 16-byte aligned); otherwise the pointer
        path, always. A program's resident block and the gathered positives stay pointer loads.
    pipeline: the column loops as tl.range(num_stages = the config's num_stages), which pipelines
        every load of the loop (the symmetric pass's column lse and grad_lse too), not only the
        operands of its dots as the kernel-wide num_stages does.
    wide: the autotuner picks from HOPPER_CONFIGS (larger tiles) as well as CONFIGS.
    host_tma: "tma" with its descriptors built on the host, once per launch (`host_descriptors`:
        triton.tools.tensor_descriptor.TensorDescriptor arguments whose block shapes each config's
        pre_hook sets, as Triton's fused-attention tutorial does), and the backward's output blocks
        (dx, dy) written by TMA stores through descriptors too. Same eligibility rule, same pointer
        fallback. A flag of its own rather than a change to "tma": the two trade different costs, and
        neither is measured yet. Device-side descriptors cost every program a 128-byte descriptor
        written to global memory and fenced before its first copy, and need a global scratch
        allocator (`triton.set_allocator`, which a user may own); host ones cost each launch a
        cuTensorMapEncodeTiled per descriptor on the CPU and 128 bytes of kernel parameters each.
        With both flags set, "host_tma" decides.
        The forward's lse and pos are (M,) fp32 vectors, 4 bytes a row against the row's O(Ny·D)
        work: they keep their masked pointer stores.

    Triton 3.6's warp specialisation (tl.range(warp_specialize=True)) is not offered: on sm_90 it
    compiles to the very same PTX as without (it targets Blackwell; tests/gpu/test_triton_hopper_aot.py).
    """

    tma: bool = False
    pipeline: bool = False
    wide: bool = False
    host_tma: bool = False


def parse_hopper_variant(text: str) -> HopperVariant:
    """`HopperVariant` from a comma-separated list of its field names ("" or "default": none), e.g.
    "tma,pipeline"; an unknown name raises ValueError rather than be ignored."""
    names = {n.strip() for n in text.split(",")} - {"", "default"}
    unknown = names - set(HopperVariant._fields)
    if unknown:
        raise ValueError(f"FASTSSL_LSE_HOPPER: unknown variant(s) {sorted(unknown)}; known: {HopperVariant._fields}")
    return HopperVariant(**{n: True for n in names})


#: The variant the launchers use, read from FASTSSL_LSE_HOPPER here and nowhere else (a benchmark
#: may assign this attribute to switch variants in one process).
HOPPER_VARIANT = parse_hopper_variant(os.environ.get("FASTSSL_LSE_HOPPER", ""))
#: Benchmarks only: kind (a key of CONFIGS) -> the one triton.Config to launch, with no autotuning.
PINNED_CONFIGS: dict = {}


def tma_eligible(*tensors: Optional[Tensor]) -> bool:
    """Whether every given (N, D) tensor (None: absent) can be read (or written) through a tensor
    descriptor: half precision (fp32's CUDA-core dots spilled on descriptor tiles,
    benchmarks/RESULTS.md), at least one row and one column, unit stride along D, the row stride and
    the base address multiples of 16 bytes (TMA's rules), on a GPU with TMA (sm_90 or later) or under
    the interpreter. Anything else takes the pointer path. The one rule of both the device-side
    ("tma") and the host-side ("host_tma") descriptors."""
    present = [t for t in tensors if t is not None]
    if not interpreting() and not all(t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9
                                      for t in present):  # fmt: skip
        return False
    return all(t.element_size() == 2 and t.shape[0] > 0 and t.shape[1] > 0 and t.stride(1) == 1
               and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in present)  # fmt: skip


def vector_rows(*tensors: Optional[Tensor]) -> bool:
    """Whether Triton can load every given (N, D) tensor's rows 16 bytes at a time: D and the row
    stride multiples of 16 elements, unit stride along D and a 16-byte aligned base (what its
    launch-time divisibility hints see). `aligned_rows` makes rows so for the backward."""
    return all(t.shape[1] % 16 == 0 and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors if t is not None)  # fmt: skip


def forward_configs(x: Tensor, *others: Optional[Tensor]) -> Optional[list]:
    """The forward's configs on a GPU where FWD_CONFIGS spilled: fp32 (FWD_FP32_CONFIGS) and
    half-precision rows that are not `vector_rows` (the FWD_UNALIGNED lists); None elsewhere."""
    if x.element_size() == 4:
        return FWD_FP32_CONFIGS
    if vector_rows(x, *others):
        return None
    block_k, single_k, _ = tile_dims(x.shape[1], x.dtype)
    return FWD_UNALIGNED_WIDE_K_CONFIGS if single_k and block_k == 256 else FWD_UNALIGNED_CONFIGS


def _tma_scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    """Global memory for device-side descriptors (128 bytes each per program), from torch's allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Device-side descriptors need triton.set_allocator; a user's own allocator is left in place."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


_DEFAULT_KERNELS = {"fwd": _pairwise_lse_fwd_kernel, "rows": _pairwise_lse_bwd_rows_kernel,
                    "sym": _pairwise_lse_bwd_sym_kernel, "dy": _pairwise_lse_bwd_dy_kernel,
                    "weights": _pairwise_lse_bwd_weights_kernel}  # fmt: skip
_HOPPER_KERNELS = {"fwd": _pairwise_lse_fwd_hopper_kernel, "rows": _pairwise_lse_bwd_rows_hopper_kernel,
                   "sym": _pairwise_lse_bwd_sym_hopper_kernel, "dy": _pairwise_lse_bwd_dy_hopper_kernel}  # fmt: skip
_KEYS = {"fwd": [*_KEY, "N_SPLIT"], "rows": _BWD_KEY, "sym": _BWD_KEY, "dy": _BWD_KEY,
         "weights": ["ROW_BIN", "BLOCK_K", "Y_COLUMNS", "EXCLUDE_SELF"]}  # fmt: skip
#: The host-built descriptors of each Hopper entry ("host_tma"): argument -> (the tensor it describes,
#: the meta-parameter that gives its block's rows); every block is BLOCK_K columns wide. "x", "y" and
#: "bank" are the launch's inputs, "dx" and "dy" its outputs (stored through the descriptor).
DESCRIPTORS = {
    "fwd": {"X_DESC": ("x", "BLOCK_M"), "Y_DESC": ("y", "BLOCK_N"), "B_DESC": ("bank", "BLOCK_N")},
    "rows": {"Y_DESC": ("y", "BLOCK_N"), "B_DESC": ("bank", "BLOCK_N"), "DX_DESC": ("dx", "BLOCK_M")},
    "sym": {"X_DESC": ("x", "BLOCK_N"), "B_DESC": ("bank", "BLOCK_N"), "DX_DESC": ("dx", "BLOCK_M"),
            "DY_DESC": ("dy", "BLOCK_M")},
    "dy": {"X_DESC": ("x", "BLOCK_M"), "DY_DESC": ("dy", "BLOCK_N")},
}


def _set_block_shapes(kind: str, nargs: dict) -> None:
    """A config's pre_hook: each host descriptor of `kind` among the launch's arguments `nargs` gets
    the block shape of the config about to run (rows from DESCRIPTORS, BLOCK_K columns)."""
    for name, (_, rows) in DESCRIPTORS[kind].items():
        desc = nargs.get(name)
        if desc is not None:
            desc.block_shape = [nargs[rows], nargs["BLOCK_K"]]


def host_descriptors(kind: str, tensors: dict) -> dict:
    """{argument: TensorDescriptor} for the Hopper entry of `kind` (DESCRIPTORS), each over all of its
    (N, D) tensor in `tensors` ({"x", "y", "bank", "dx", "dy"}; an absent or None one gets None).
    The block shape is a placeholder until a config's pre_hook (`_set_block_shapes`) sets it. The
    forward's x gets one only for the D loop: a resident x block is a pointer load."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = {}
    for name, (role, _) in DESCRIPTORS[kind].items():
        t = tensors.get(role)
        if kind == "fwd" and role == "x" and t is not None and tile_dims(t.shape[1], t.dtype)[1]:
            t = None
        out[name] = None if t is None else TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1])
    return out


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, shapes: tuple, host: bool = False):
    """Kernel `kind` autotuned over configs given as (BLOCK_M, BLOCK_N, num_warps, num_stages,
    LOOP_STAGES) tuples, one autotuner (and one cache of its choices) per list: the Hopper entry, or
    for "weights" (no variant) today's kernel, whose configs carry no LOOP_STAGES. `host`: launches
    with host descriptors ("host_tma"), whose block shapes each config's pre_hook sets; no other
    launch pays for that hook."""
    hopper = kind in _HOPPER_KERNELS
    loop = lambda stages: {"LOOP_STAGES": stages} if hopper else {}  # noqa: E731
    hook = functools.partial(_set_block_shapes, kind) if host else None
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **loop(ls)}, num_warps=w, num_stages=st, pre_hook=hook)
               for bm, bn, w, st, ls in shapes]  # fmt: skip
    interpret = triton.Config({**INTERPRET_CONFIG.kwargs, **loop(shapes[0][4])}, num_warps=4, num_stages=1,
                              pre_hook=hook)  # fmt: skip
    reset = ["DY_ACC"] if kind == "rows" else None
    fn = _HOPPER_KERNELS[kind] if hopper else _DEFAULT_KERNELS[kind].fn
    return autotune(configs, interpret, key=_KEYS[kind] + (["TMA"] if hopper else []) + (["HOST_TMA"] if host else []),
                    prune=_prune(kind), reset_to_zero=reset)(fn)  # fmt: skip


def variant_kernel(kind: str, tensors: tuple, outputs: Optional[dict] = None) -> tuple:
    """(kernel, extra meta) that launches `kind` on `tensors` (x, y, bank or None) under HOPPER_VARIANT
    and PINNED_CONFIGS: today's autotuned kernel when neither is set, else the Hopper entry with
    TMA = variant.tma and `tma_eligible(*tensors)`, its configs carrying LOOP_STAGES. On a GPU a
    forward that `forward_configs` gives its own configs takes the Hopper entry over them (TMA off
    unless asked and eligible, LOOP_STAGES None: today's code otherwise). "weights" has no variant:
    only a pinned config changes its launch. With variant.host_tma, TMA needs `outputs` ({"dx", "dy"}:
    the tensors the kernel stores, which TMA writes) eligible too, and the extra meta adds
    HOST_TMA = True and the descriptors (`host_descriptors`), else it is {"TMA": tma} alone."""
    variant = HOPPER_VARIANT if kind in _HOPPER_KERNELS else HopperVariant()  # "weights" has none
    pinned = PINNED_CONFIGS.get(kind)
    # Under the interpreter every autotuner runs INTERPRET_CONFIG: the forward keeps today's entry
    # there (tests swap its tiles).
    own = forward_configs(*tensors) if kind == "fwd" and not interpreting() else None
    if variant == HopperVariant() and pinned is None and own is None:
        return _DEFAULT_KERNELS[kind], {}
    if pinned is not None:
        configs = [pinned]
    elif own is not None:
        configs = own
    else:
        configs = (HOPPER_CONFIGS[kind] if variant.wide else []) + CONFIGS[kind]
    shapes = tuple((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                    c.num_stages if variant.pipeline else None) for c in configs)  # fmt: skip
    if kind not in _HOPPER_KERNELS:
        return _tuned(kind, shapes), {}
    outputs = outputs or {}
    if variant.host_tma:
        tma = tma_eligible(*tensors, *outputs.values())
        if tma:
            roles = dict(zip(("x", "y", "bank"), tensors), **outputs)
            return _tuned(kind, shapes, host=True), {"TMA": True, "HOST_TMA": True, **host_descriptors(kind, roles)}
        return _tuned(kind, shapes), {"TMA": False}
    tma = variant.tma and tma_eligible(*tensors)
    if tma and not interpreting():
        _ensure_tma_allocator()
    return _tuned(kind, shapes), {"TMA": tma}


#: Route of the backward: "auto" (`backward_route`), or "fused" / "blocked" to force one (e.g. to
#: measure both on a GPU); "fused" is honoured only where D is resident.
BACKWARD_ROUTE = os.environ.get("FASTSSL_LSE_BWD_ROUTE", "auto")
#: The blocked route's scratch: at most this many bytes of weights (a block of rows x every column,
#: in the input dtype) exist at a time; at least one row. 1 GiB unless FASTSSL_LSE_SCRATCH_BYTES says.
SCRATCH_BYTES = int(os.environ.get("FASTSSL_LSE_SCRATCH_BYTES", str(2**30)))


def backward_route(d: int, dtype: torch.dtype) -> str:
    """"fused" (one Triton pass, each logit tile computed once) or "blocked" (weights in a bounded
    scratch, the two products by torch.matmul) for feature size `d` and input `dtype`.

    The default is the fused pass for bf16/fp16 wherever D is resident (one BLOCK_K chunk, D ≤ 256),
    since its accumulators hold a full row of D; blocked above, and for fp32, whose "ieee" dots run
    on CUDA cores, where every resident backward kernel spills (ptxas, tests/gpu/test_triton_aot.py)
    and cuBLAS's fp32 GEMM does not. It is a default, not a measurement: no GPU timing of either route
    exists yet, and this rule is to be replaced by one measured on GPUs. FASTSSL_LSE_BWD_ROUTE forces
    a route meanwhile ("fused" wherever D is resident, fp32 included).
    """
    resident = tile_dims(d, dtype)[1]
    if BACKWARD_ROUTE == "blocked" or not resident:
        return "blocked"
    if BACKWARD_ROUTE == "fused" or dtype.itemsize == 2:
        return "fused"
    return "blocked"


def _weight_scale(grad_lse: Tensor, grad_pos: Tensor) -> Tensor:
    """f = 2^(WEIGHT_EXP − e) with max(|grad_lse|, |grad_pos|) < 2^e: a device scalar (no sync), a
    power of two so that undoing it is exact (see "backward" above). e is clamped so that f and 1/f
    stay normal fp32 numbers; a zero cotangent gives f = 2^WEIGHT_EXP."""
    g_max = torch.maximum(grad_lse.abs().amax(), grad_pos.abs().amax())
    e = torch.frexp(g_max).exponent.clamp(-100, 100)
    return torch.ldexp(torch.ones((), dtype=torch.float32, device=g_max.device), WEIGHT_EXP - e)


def _positive_weights(x, y, scale, lse, grad_lse, grad_pos, flags) -> Tensor:
    """w_i = grad_pos_i + grad_lse_i·exp(pos_i − lse_i)·[include_pos], (M,) fp32: the positive pair's
    weight, by `_pairwise_lse_bwd_pos_kernel` (grad_pos itself when the positive is not in the LSE)."""
    if not flags.include_pos:
        return grad_pos
    m, d = x.shape
    w_pos = torch.empty_like(grad_pos)
    block_r = 16 if interpreting() else POS_BLOCK_R
    with device_ctx(x):
        _pairwise_lse_bwd_pos_kernel[(triton.cdiv(m, block_r),)](
            x, y, scale, lse, grad_lse, grad_pos, w_pos,
            m, y.shape[0], d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            flags.pos_offset,
            BLOCK_R=block_r, BLOCK_K=pos_block_k(d),
        )  # fmt: skip
    return w_pos


def pos_block_k(d: int) -> int:
    """BLOCK_K of `_pairwise_lse_bwd_pos_kernel`: one chunk up to 128, else a loop over D."""
    return min(128, max(16, triton.next_power_of_2(d)))


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32: fp32 accumulation of the input-dtype products, and an fp32 result (no rounding
    to, and no overflow of, half precision). cuBLAS's out_dtype overload on a GPU; on the CPU (the
    interpreter tests), where aten has none, the same exact products upcast. fp32 inputs follow
    torch's matmul precision setting (full fp32 unless TF32 is allowed)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _backward_blocked(x, y, bank, scale, lse, grad_lse, w_pos, wscale, flags, dx, dy):
    """The blocked route, for any D: per block of rows, the weights G·f (the positive excluded) of
    every column are written by `_pairwise_lse_bwd_weights_kernel` into a scratch of at most
    SCRATCH_BYTES in the input dtype; then dx_block = G·y (+ G_bank·bank) and dy += Gᵀ·x_block by
    torch.matmul with fp32 results (`_mm_f32`). The positive pair is handled apart with O(block·D)
    gathers (w_pos: the positive's weights, `_positive_weights`). Memory: O((M + Ny + K)·D) plus the
    scratch. Deterministic (no atomics). Fills dx, dy."""
    m, d = x.shape
    n_y = y.shape[0]
    want_dx, want_dy = flags.needs_dx, flags.needs_dy
    has_bank = want_dx and bank is not None and bank.shape[0] > 0
    y_cols = n_y if flags.y_negatives else 0
    n_cols = y_cols + (bank.shape[0] if has_bank else 0)
    rows_per = max(1, min(m, SCRATCH_BYTES // max(1, n_cols * x.element_size())))
    scratch = torch.empty((rows_per, n_cols), dtype=x.dtype, device=x.device) if n_cols else None
    unscale = scale.to(torch.float32) / wscale  # scale / f, exact: f is a power of two
    dy_acc = torch.zeros((n_y, d), dtype=torch.float32, device=x.device) if want_dy else None  # units of f/scale
    block_k = blocked_block_k(d, x.dtype)
    size_bin = row_bin(max(rows_per, n_cols))

    def weights(cols, out, row0, n_rows, y_columns):
        width = cols.shape[0]
        grid = lambda META: (triton.cdiv(n_rows, META["BLOCK_M"]) * triton.cdiv(width, META["BLOCK_N"]),)  # noqa: E731
        variant_kernel("weights", (x,))[0][grid](
            x, cols, scale, lse, grad_lse, wscale, out,
            n_rows, width, n_y, d, row0,
            x.stride(0), x.stride(1), cols.stride(0), cols.stride(1), out.stride(0),
            flags.pos_offset, size_bin,
            Y_COLUMNS=y_columns, EXCLUDE_SELF=flags.exclude_self, FP32_PRECISION=FP32_DOT_PRECISION,
            BLOCK_K=block_k,
        )  # fmt: skip

    for r0 in range(0, m, rows_per):
        r1 = min(m, r0 + rows_per)
        xb = x[r0:r1]
        pcol = (torch.arange(r0, r1, device=x.device) + flags.pos_offset) % n_y
        y_pos = y[pcol].to(torch.float32)
        wb = w_pos[r0:r1]
        g = scratch[: r1 - r0] if n_cols else None
        with device_ctx(x):
            if y_cols:
                weights(y, g[:, :y_cols], r0, r1 - r0, True)
            if has_bank:
                weights(bank, g[:, y_cols:], r0, r1 - r0, False)
        if want_dx:
            acc = (scale * wb)[:, None] * y_pos
            if y_cols:
                acc += _mm_f32(g[:, :y_cols], y) * unscale
            if has_bank:
                acc += _mm_f32(g[:, y_cols:], bank) * unscale
            dx[r0:r1] = acc
        if want_dy:
            if y_cols:
                dy_acc += _mm_f32(g[:, :y_cols].T, xb)
            dy_acc.index_add_(0, pcol, (wb * wscale)[:, None] * xb.to(torch.float32))
    if want_dy:
        dy.copy_(dy_acc.mul_(unscale))


def pairwise_lse_backward(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    lse: Tensor,
    grad_lse: Tensor,
    grad_pos: Tensor,
    flags: PairwiseLSEFlags,
) -> tuple[Tensor, Tensor]:
    """(dx, dy) in the input dtype: the gradients of Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i.

    A gradient the flags do not ask for comes back empty, (0, D), and nothing computes it. Routes
    (`backward_route`): "blocked" for large D; "fused" otherwise, one pass of
      * `_pairwise_lse_bwd_sym_kernel` when x is y (the same tensor) and both roles are asked for: dx
        and dy then each hold half of their sum (see the op's contract);
      * `_pairwise_lse_bwd_rows_kernel` when dx is asked for, with dy through atomics if asked too;
      * `_pairwise_lse_bwd_dy_kernel` when dy alone is.
    """
    m, d = x.shape
    n_y = y.shape[0]
    want_dx, want_dy = flags.needs_dx, flags.needs_dy
    dx = torch.empty((m if want_dx else 0, d), dtype=x.dtype, device=x.device)
    dy = torch.empty((n_y if want_dy else 0, d), dtype=y.dtype, device=y.device)
    if m == 0 or not (want_dx or want_dy):
        return dx, dy.zero_()
    same = y is x
    # Rows the kernels can load 16 bytes at a time (see `aligned_rows`): O(N·D) copies at most.
    d_pad = padded_width(d)
    x, bank = aligned_rows(x, d_pad), None if bank is None else aligned_rows(bank, d_pad)
    y = x if same else aligned_rows(y, d_pad)
    m, d_k, n_y, has_bank, b, n_b, scale, meta, _ = _common(x, y, bank, scale)
    dx_k = dx if d_k == d else torch.empty((dx.shape[0], d_k), dtype=dx.dtype, device=dx.device)
    dy_k = dy if d_k == d else torch.empty((dy.shape[0], d_k), dtype=dy.dtype, device=dy.device)
    # O(M) copies at most: expanded / strided gradients from the autograd graph.
    lse = lse.to(torch.float32).contiguous()
    grad_lse = grad_lse.to(torch.float32).contiguous()
    grad_pos = grad_pos.to(torch.float32).contiguous()
    wscale = _weight_scale(grad_lse, grad_pos)
    w_pos = _positive_weights(x, y, scale, lse, grad_lse, grad_pos, flags)
    if backward_route(d, x.dtype) == "blocked":
        _backward_blocked(x, y, bank if has_bank else None, scale, lse, grad_lse, w_pos, wscale, flags, dx_k, dy_k)
    else:
        _backward_fused(x, y, b, n_b, has_bank, same, scale, lse, grad_lse, w_pos, wscale, flags, meta, dx_k, dy_k)
    if d_k != d:
        dx.copy_(dx_k[:, :d])
        dy.copy_(dy_k[:, :d])
    return dx, dy


def padded_width(d: int) -> int:
    """D rounded up to a multiple of 16: the width the backward kernels see (`aligned_rows`)."""
    return -(-d // 16) * 16


def aligned_rows(t: Tensor, width: int) -> Tensor:
    """`t` itself where its rows are `width` wide, contiguous along D, 16-byte aligned and 16-element
    strided; else a copy into zero-padded rows of `width` (O(N·D)). The zero columns add nothing to
    any dot product. Otherwise (an odd D such as uniformity's D + 2 columns, a transposed view) Triton
    loads element by element through one 64-bit address each, and every backward kernel spills
    (tests/gpu/test_triton_aot.py: D = 70 spilled, D = 80 did not)."""
    if t.shape[1] == width and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    out = t.new_zeros((t.shape[0], width))
    out[:, : t.shape[1]] = t
    return out


def _backward_fused(x, y, b, n_b, has_bank, same, scale, lse, grad_lse, w_pos, wscale, flags, meta, dx, dy):
    """The fused route: one pass of the symmetric, rows or dy kernel (see pairwise_lse_backward)."""
    m, d = x.shape
    n_y = y.shape[0]
    want_dx, want_dy = flags.needs_dx, flags.needs_dy
    del meta["SINGLE_K"]  # the fused kernels hold D resident, always
    meta.update(EXCLUDE_SELF=flags.exclude_self)
    size_bin = row_bin(max(m, n_y))
    rows_grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]),)  # noqa: E731
    inputs = (x, y, b if has_bank else None)
    with device_ctx(x):
        if same and want_dx and want_dy and flags.y_negatives:
            kernel, extra = variant_kernel("sym", inputs, {"dx": dx, "dy": dy})
            kernel[rows_grid](
                x, b, scale, lse, grad_lse, w_pos, wscale, dx, dy,
                m, n_b, d,
                x.stride(0), x.stride(1), b.stride(0), b.stride(1), dx.stride(0), dy.stride(0),
                flags.pos_offset, size_bin,
                HAS_BANK=has_bank, **meta, **extra,
            )  # fmt: skip
        elif want_dx:
            # dy's fp32 accumulator; a one-element stand-in when dy is not asked for (never written).
            dy_acc = torch.zeros((n_y, d) if want_dy else (1,), dtype=torch.float32, device=x.device)
            kernel, extra = variant_kernel("rows", inputs, {"dx": dx})
            kernel[rows_grid](
                x, y, b, scale, lse, grad_lse, w_pos, wscale, dx, dy_acc,
                m, n_y, n_b, d,
                x.stride(0), x.stride(1), y.stride(0), y.stride(1), b.stride(0), b.stride(1), dx.stride(0),
                dy_acc.stride(0),
                flags.pos_offset, size_bin,
                HAS_BANK=has_bank, Y_NEGATIVES=flags.y_negatives, NEEDS_DY=want_dy, **meta, **extra,
            )  # fmt: skip
            if want_dy:
                dy.copy_(dy_acc.mul_(scale.to(torch.float32) / wscale))
        else:
            kernel, extra = variant_kernel("dy", (x, y), {"dy": dy})
            kernel[lambda META: (triton.cdiv(n_y, META["BLOCK_N"]),)](
                x, y, scale, lse, grad_lse, w_pos, wscale, dy,
                m, n_y, d,
                x.stride(0), x.stride(1), y.stride(0), y.stride(1), dy.stride(0),
                flags.pos_offset, size_bin,
                Y_NEGATIVES=flags.y_negatives, **meta, **extra,
            )  # fmt: skip
    return dx, dy
