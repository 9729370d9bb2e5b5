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
in FlashAttention. Larger D loops over BLOCK_K chunks inside each logit tile, and the backward puts
BLOCK_DOUT-wide slices of the output on grid axis 1; each slice recomputes the full-D logits, so
the backward does (1 + cdiv(D, BLOCK_DOUT))/2 times the GEMM work of the resident path (e.g. 16.5×
at D = 4096). Memory stays O((M + Ny + K)·D) in every case.

Small batches. When the row blocks cannot fill the GPU, the forward splits each row block's column
tiles over grid axis 1 (Flash-Decoding's split-K, Dao et al. 2023): partial base-2 LSEs go to an
(S, M) fp32 scratch and a merge kernel combines them (`forward_splits` chooses S). In its column loop
only the tiles holding a dropped column (ragged edge, positive, self) are masked.

Launchers allocate outputs, take strides (non-contiguous inputs are read in place, x may be y),
read `scale` on the device (no host sync) and launch on the current stream.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl._common import device_ctx
from fastssl.kernels import PairwiseLSEFlags
from fastssl.kernels.triton._utils import autotune, device_smem_limit, mm, mm_weights, round_to

#: fp32 inputs must match an fp32 reference to ~1e-5, so their dots run in full fp32 (CUDA cores).
#: "tf32x3" (three TF32 tensor-core products, ~1e-6 relative per product) is the fast alternative.
FP32_DOT_PRECISION = "ieee"

#: Largest D (after rounding up to a power of two) kept resident in one BLOCK_K chunk, per itemsize.
RESIDENT_D_MAX = {2: 256, 4: 128}
#: Chunk of D per tl.dot, and width of each output D slice (grid axis 1), when D is not resident.
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


# (BLOCK_M, BLOCK_N, num_warps, num_stages). In the dy kernel BLOCK_N is the y block a program owns
# and BLOCK_M the x tile it streams. 128 x 128 backward tiles are left out: with two fp32 tiles
# (logits and a 128-wide output accumulator) live per program they would spill.
FWD_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 2)]
)
BWD_DX_CONFIGS = _configs(
    [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)]
)
BWD_DY_CONFIGS = _configs(
    [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3)]
)
CONFIGS = {"fwd": FWD_CONFIGS, "dx": BWD_DX_CONFIGS, "dy": BWD_DY_CONFIGS}
#: Under the interpreter: small tiles, so that the odd test sizes hit several tiles and every mask.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
#: fp32 dots run on CUDA cores (FP32_DOT_PRECISION = "ieee"): big tiles buy nothing there and take
#: ~20 s each to compile, so fp32 keeps the tiles of at most this many logits.
FP32_MAX_TILE = 64 * 64


def smem_estimate(kind: str, block_m: int, block_n: int, block_k: int, single_k: bool, itemsize: int, stages: int,
                  block_dout: int = 0, fp32_precision: Optional[str] = None) -> int:
    """Upper estimate of the shared memory (bytes) of one program; the pruning relies on it.

    Resident operands (SINGLE_K) count once, streamed ones once per pipeline stage, plus one
    (BLOCK_M, BLOCK_N) tile of weights and, in the D loop, the output operand. Exact for the resident
    forward kernel on sm_90, above the compiled figure elsewhere (tests/gpu/test_triton_aot.py checks).
    """
    if single_k:
        if kind == "fwd":
            est = itemsize * block_k * (block_m + stages * block_n)
        elif kind == "dx":
            est = itemsize * (block_k * (block_m + stages * block_n) + block_m * block_n)
        else:
            est = itemsize * (block_k * (block_n + stages * block_m) + block_m * block_n)
    else:
        est = itemsize * stages * block_k * (block_m + block_n)
        if kind != "fwd":
            rows = block_n if kind == "dx" else block_m  # the streamed operand of the output product
            est += itemsize * (rows * block_dout + block_m * block_n)
    if itemsize == 4 and (fp32_precision or FP32_DOT_PRECISION) != "ieee":
        est = est * 3 // 2  # TF32 splits stage extra operand copies (benchmarks/RESULTS.md, "Measurements behind design choices")
    return est


def candidate_configs(kind: str, itemsize: int, block_k: int, single_k: bool, block_dout: int,
                      smem_limit: int) -> list:
    """The configs of kernel `kind` ("fwd", "dx", "dy") that autotuning may pick for these tiles."""
    keep = [
        c
        for c in CONFIGS[kind]
        if (itemsize < 4 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= FP32_MAX_TILE)
        and smem_estimate(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_k, single_k, itemsize, c.num_stages,
                          block_dout) <= smem_limit
    ]
    smallest = min(CONFIGS[kind], key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
    return keep or [smallest]



def _prune(kind):
    def prune(configs, named_args, **kwargs):
        x = named_args["X"]
        limit = device_smem_limit(x.device.index or 0)  # CUDA tensors always carry their index
        return candidate_configs(kind, x.element_size(), kwargs["BLOCK_K"], kwargs["SINGLE_K"],
                                 kwargs.get("BLOCK_DOUT", 0), limit)

    return prune


# ---------------------------------------------------------------------------------------------------
# tl helpers


@triton.jit
def _logits_loop(A, B, a_idx, b_idx, a_mask, b_mask, stride_am, stride_ad, stride_bm, stride_bd, D,
                 FP32_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """(BLOCK_A, BLOCK_B) fp32 tile of A[a_idx] @ B[b_idx]ᵀ, looping over D in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < D
        a = tl.load(A + a_idx[:, None] * stride_am + ks[None, :] * stride_ad,
                    mask=a_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(B + b_idx[None, :] * stride_bm + ks[:, None] * stride_bd,
                    mask=b_mask[None, :] & k_mask[:, None], other=0.0)
        acc = mm(a, b, acc, FP32_PRECISION)
    return acc


@triton.jit
def _rowdot_loop(A, B, a_idx, b_idx, mask, stride_am, stride_ad, stride_bm, stride_bd, D,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_R,) fp32 row-wise dots A[a_idx[r]]·B[b_idx[r]], looping over D in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m2 = mask[:, None] & (ks < D)[None, :]
        a = tl.load(A + a_idx[:, None] * stride_am + ks[None, :] * stride_ad, mask=m2, other=0.0)
        b = tl.load(B + b_idx[:, None] * stride_bm + ks[None, :] * stride_bd, mask=m2, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    return acc


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
    """
    pid = tl.program_id(0).to(tl.int64)
    row0 = pid * BLOCK_M
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
            pos_raw = _rowdot_loop(X, Y, rows, pcol, row_mask, stride_xm, stride_xd, stride_ym, stride_yd, D,
                                   BLOCK_M, BLOCK_K)
        tl.store(POS + rows, pos_raw * scale, mask=row_mask)
        if INCLUDE_POS:
            m_i = pos_raw * qk_scale
            l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)

    if Y_NEGATIVES:
        for start_n in range(y_lo, y_hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < NY
            if SINGLE_K:
                y_t = tl.load(Y + cols[:, None] * stride_ym + ks[None, :] * stride_yd,
                              mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                s = mm(x_blk, tl.trans(y_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            else:
                s = _logits_loop(X, Y, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_ym, stride_yd,
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
        for start_n in range(b_lo, b_hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < NB
            if SINGLE_K:
                b_t = tl.load(B + cols[:, None] * stride_bm + ks[None, :] * stride_bd,
                              mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                s = mm(x_blk, tl.trans(b_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            else:
                s = _logits_loop(X, B, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_bm, stride_bd,
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


@autotune(BWD_DX_CONFIGS, INTERPRET_CONFIG, key=_KEY, prune=_prune("dx"))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_lse_bwd_dx_kernel(
    X, Y, B, SCALE, LSE, GRAD_LSE, GRAD_POS, DX,
    M, NY, NB, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_bm, stride_bd, stride_dxm,
    pos_offset, ROW_BIN,
    HAS_BANK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INCLUDE_POS: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):  # fmt: skip
    """dx for one block of BLOCK_M rows and one BLOCK_DOUT slice of D (grid axis 1).

    dx_i = scale·(grad_lse_i·(Σ_j≠p(i) P_ij y_j + Σ_k P_ik bank_k) + w_i·y_p(i)), with the positive
    weight w_i = grad_pos_i + grad_lse_i·exp(pos_i − lse_i)·[INCLUDE_POS] from a row-wise dot.
    Each (BLOCK_M, BLOCK_N) tile of P is recomputed from the stored lse (full-D logits), rounded to
    the input dtype and multiplied into a (BLOCK_M, BLOCK_DOUT) fp32 accumulator against the
    (BLOCK_N, BLOCK_DOUT) column tile. grad_lse_i is applied once at the end: P ∈ [0, 1] keeps
    fp16 away from its subnormals whatever the loss scaling. With SINGLE_K, BLOCK_DOUT = BLOCK_K and
    the tile loaded for the logits is the one multiplied into dx.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    pcol = (rows + pos_offset) % NY
    scale = tl.load(SCALE).to(tl.float32)
    qk_scale = scale * LOG2E
    lse2 = tl.load(LSE + rows, mask=row_mask, other=0.0) * LOG2E  # the forward's base-2 lse
    ds = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    d_mask = ds < D
    if SINGLE_K:
        ks = ds  # one D block: the logit chunk and the output slice coincide
        k_mask = d_mask
        x_blk = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    if Y_NEGATIVES:
        for start_n in range(0, NY, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < NY
            if SINGLE_K:
                y_t = tl.load(Y + cols[:, None] * stride_ym + ks[None, :] * stride_yd,
                              mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                s = mm(x_blk, tl.trans(y_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            else:
                s = _logits_loop(X, Y, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_ym, stride_yd,
                                 D, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                y_t = tl.load(Y + cols[:, None] * stride_ym + ds[None, :] * stride_yd,
                              mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            valid = col_mask[None, :] & (cols[None, :] != pcol[:, None])
            if EXCLUDE_SELF:
                valid = valid & (cols[None, :] != rows[:, None])
            # Mask before exp2: a dropped column (self, positive) may lie far above lse and overflow.
            p = tl.exp2(tl.where(valid, s * qk_scale - lse2[:, None], float("-inf")))
            acc = mm_weights(p, y_t, acc, FP32_PRECISION)

    if HAS_BANK:
        for start_n in range(0, NB, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < NB
            if SINGLE_K:
                b_t = tl.load(B + cols[:, None] * stride_bm + ks[None, :] * stride_bd,
                              mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                s = mm(x_blk, tl.trans(b_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
            else:
                s = _logits_loop(X, B, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_bm, stride_bd,
                                 D, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                b_t = tl.load(B + cols[:, None] * stride_bm + ds[None, :] * stride_bd,
                              mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            p = tl.exp2(tl.where(col_mask[None, :], s * qk_scale - lse2[:, None], float("-inf")))
            acc = mm_weights(p, b_t, acc, FP32_PRECISION)

    # The positive pair, after the loops so that its (BLOCK_M, BLOCK_DOUT) tile is not held across them.
    g_lse = tl.load(GRAD_LSE + rows, mask=row_mask, other=0.0)
    w_pos = tl.load(GRAD_POS + rows, mask=row_mask, other=0.0)
    y_pos = tl.load(Y + pcol[:, None] * stride_ym + ds[None, :] * stride_yd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if INCLUDE_POS:
        if SINGLE_K:
            pos_raw = tl.sum(x_blk.to(tl.float32) * y_pos.to(tl.float32), axis=1)
        else:
            pos_raw = _rowdot_loop(X, Y, rows, pcol, row_mask, stride_xm, stride_xd, stride_ym, stride_yd, D,
                                   BLOCK_M, BLOCK_K)
        w_pos += g_lse * tl.exp2(pos_raw * qk_scale - lse2)
    dx = scale * (g_lse[:, None] * acc + w_pos[:, None] * y_pos.to(tl.float32))
    tl.store(DX + rows[:, None] * stride_dxm + ds[None, :], round_to(dx, DX.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


@autotune(BWD_DY_CONFIGS, INTERPRET_CONFIG, key=_KEY, prune=_prune("dy"))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_lse_bwd_dy_kernel(
    X, Y, SCALE, LSE, GRAD_LSE, GRAD_POS, GRAD_LSE_MAX, DY,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_dym,
    pos_offset, ROW_BIN,
    EXCLUDE_SELF: tl.constexpr, INCLUDE_POS: tl.constexpr, Y_NEGATIVES: tl.constexpr,
    SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):  # fmt: skip
    """dy for one block of BLOCK_N columns of y and one BLOCK_DOUT slice of D (grid axis 1).

    dy_j = scale·(Σ_{i: j≠p(i)} grad_lse_i·P_ij x_i + Σ_{i: p(i)=j} w_i x_i), w_i as in the dx kernel.
    If Y_NEGATIVES, the program streams (BLOCK_M, D) row tiles of x, recomputes the transposed
    logits y_blk @ x_tileᵀ (BLOCK_N, BLOCK_M) from the stored lse, and accumulates Gᵀ @ x_tile into
    a (BLOCK_N, BLOCK_DOUT) fp32 accumulator, with G = P·grad_lse/max|grad_lse| rounded to the
    input dtype: the division by GRAD_LSE_MAX (a device scalar) keeps fp16
    weights out of the subnormals when the loss is a mean over many rows. The positive rows of
    column j, i = (j − pos_offset) mod Ny + t·Ny < M (one pass per wrap of M over Ny, usually one),
    are then gathered and added elementwise. The bank needs no gradient and is not read.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < NY
    scale = tl.load(SCALE).to(tl.float32)
    qk_scale = scale * LOG2E
    ds = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    d_mask = ds < D
    if SINGLE_K:
        ks = ds
        k_mask = d_mask
        y_blk = tl.load(Y + cols[:, None] * stride_ym + ks[None, :] * stride_yd,
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)

    acc = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32)
    if Y_NEGATIVES:
        g_max = tl.load(GRAD_LSE_MAX).to(tl.float32)
        g_inv = tl.where(g_max > 0.0, 1.0 / tl.where(g_max > 0.0, g_max, 1.0), 0.0)
        for start_m in range(0, M, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
            row_mask = rows < M
            pcol = (rows + pos_offset) % NY
            lse2 = tl.load(LSE + rows, mask=row_mask, other=0.0) * LOG2E
            g_rel = tl.load(GRAD_LSE + rows, mask=row_mask, other=0.0) * g_inv
            if SINGLE_K:
                x_t = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                              mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                s_t = mm(y_blk, tl.trans(x_t), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), FP32_PRECISION)
            else:
                s_t = _logits_loop(Y, X, cols, rows, col_mask, row_mask, stride_ym, stride_yd, stride_xm, stride_xd,
                                   D, FP32_PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
                x_t = tl.load(X + rows[:, None] * stride_xm + ds[None, :] * stride_xd,
                              mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            valid = col_mask[:, None] & row_mask[None, :] & (cols[:, None] != pcol[None, :])
            if EXCLUDE_SELF:
                valid = valid & (cols[:, None] != rows[None, :])
            p_t = tl.exp2(tl.where(valid, s_t * qk_scale - lse2[None, :], float("-inf")))
            acc = mm_weights(p_t * g_rel[None, :], x_t, acc, FP32_PRECISION)
        acc = acc * g_max

    prow0 = (cols + (NY - pos_offset)) % NY  # 0 ≤ pos_offset < NY, so this is (j − pos_offset) mod Ny
    for wrap in range(0, M, NY):
        prow = prow0 + wrap
        p_mask = col_mask & (prow < M)
        x_pos = tl.load(X + prow[:, None] * stride_xm + ds[None, :] * stride_xd,
                        mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        w_pos = tl.load(GRAD_POS + prow, mask=p_mask, other=0.0)
        if INCLUDE_POS:
            if SINGLE_K:
                pos_raw = tl.sum(x_pos.to(tl.float32) * y_blk.to(tl.float32), axis=1)
            else:
                pos_raw = _rowdot_loop(X, Y, prow, cols, p_mask, stride_xm, stride_xd, stride_ym, stride_yd, D,
                                       BLOCK_N, BLOCK_K)
            lse2 = tl.load(LSE + prow, mask=p_mask, other=0.0) * LOG2E
            g_lse = tl.load(GRAD_LSE + prow, mask=p_mask, other=0.0)
            w_pos += g_lse * tl.exp2(pos_raw * qk_scale - lse2)
        acc += w_pos[:, None] * x_pos.to(tl.float32)

    tl.store(DY + cols[:, None] * stride_dym + ds[None, :], round_to(acc * scale, DY.dtype.element_ty),
             mask=col_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers


def tile_dims(d: int, dtype: torch.dtype) -> tuple[int, bool, int]:
    """(BLOCK_K, SINGLE_K, BLOCK_DOUT) for feature size `d`: resident single chunk, or a D loop."""
    itemsize = dtype.itemsize
    block = max(16, triton.next_power_of_2(d))
    if block <= RESIDENT_D_MAX[itemsize]:
        return block, True, block
    return LOOP_BLOCK_K[itemsize], False, LOOP_BLOCK_DOUT[itemsize]


def _row_bin(n: int) -> int:
    # Coarse size classes for the autotuning key: small grids favour small tiles, large ones big tiles.
    return 0 if n <= 4096 else (1 if n <= 32768 else 2)


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
    with device_ctx(x):
        _pairwise_lse_fwd_kernel[grid](
            x, y, b, scale, lse, pos, part,
            m, n_y, n_b, d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), b.stride(0), b.stride(1),
            flags.pos_offset, _row_bin(max(m, n_y)), n_split,
            **meta,
        )  # fmt: skip
        if n_split > 1:
            _pairwise_lse_merge_kernel[(triton.cdiv(m, MERGE_BLOCK_R),)](
                part, lse, m, n_split, BLOCK_R=MERGE_BLOCK_R, BLOCK_S=triton.next_power_of_2(n_split)
            )
    return lse, pos


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

    A gradient the flags do not ask for comes back empty, (0, D), and its kernel is not launched.
    """
    m, d, n_y, has_bank, b, n_b, scale, meta, block_dout = _common(x, y, bank, scale)
    dx = torch.empty((m if flags.needs_dx else 0, d), dtype=x.dtype, device=x.device)
    dy = torch.empty((n_y if flags.needs_dy else 0, d), dtype=y.dtype, device=y.device)
    if m == 0:
        return dx, dy.zero_()
    # O(M) copies at most: expanded / strided gradients from the autograd graph.
    lse = lse.to(torch.float32).contiguous()
    grad_lse = grad_lse.to(torch.float32).contiguous()
    grad_pos = grad_pos.to(torch.float32).contiguous()
    # A device scalar, no sync: the dy kernel divides its weights by it (fp16 range, see its docstring).
    grad_lse_max = grad_lse.abs().amax()
    meta.update(EXCLUDE_SELF=flags.exclude_self, INCLUDE_POS=flags.include_pos, Y_NEGATIVES=flags.y_negatives,
                BLOCK_DOUT=block_dout)  # fmt: skip
    row_bin = _row_bin(max(m, n_y))
    d_blocks = triton.cdiv(d, block_dout)
    with device_ctx(x):
        if flags.needs_dx:
            _pairwise_lse_bwd_dx_kernel[lambda META: (triton.cdiv(m, META["BLOCK_M"]), d_blocks)](
                x, y, b, scale, lse, grad_lse, grad_pos, dx,
                m, n_y, n_b, d,
                x.stride(0), x.stride(1), y.stride(0), y.stride(1), b.stride(0), b.stride(1), dx.stride(0),
                flags.pos_offset, row_bin,
                HAS_BANK=has_bank, **meta,
            )  # fmt: skip
        if flags.needs_dy:
            _pairwise_lse_bwd_dy_kernel[lambda META: (triton.cdiv(n_y, META["BLOCK_N"]), d_blocks)](
                x, y, scale, lse, grad_lse, grad_pos, grad_lse_max, dy,
                m, n_y, d,
                x.stride(0), x.stride(1), y.stride(0), y.stride(1), dy.stride(0),
                flags.pos_offset, row_bin,
                **meta,
            )  # fmt: skip
    return dx, dy
