"""Pairwise max (nearest neighbour by inner product) as one fused Triton kernel.

The pairwise-LSE kernel's tiling (fastssl/kernels/triton/pairwise_lse.py) with a running max and
argmax in place of the online log-sum-exp. For rows x (M, D) and columns y (Ny, D), s_ij = x_i·y_j:

    value_i = max_{j (≠ i if EXCLUDE_SELF)} s_ij,   index_i = the first j that attains it

One program owns BLOCK_M rows and streams (BLOCK_N, D) column tiles: each (BLOCK_M, BLOCK_N) tile of
similarities is a tl.dot with an fp32 accumulator (tensor cores for bf16/fp16), masked, reduced to
its row max and first argmax in registers, and merged into the running best only where strictly
greater — so the earliest column wins a tie across tiles as well as within one, as torch.argmax.
As there, a NaN similarity ranks above every number (the first NaN column is selected, value NaN),
so a NaN embedding gives a NaN loss rather than a plausible one.
Only value (M,) fp32 and index (M,) int64 are written: no M x Ny matrix exists. The backward is two
row gathers (fastssl/ops/pairwise_max.py), no kernel.

Tiling: D ≤ 256 (bf16/fp16) or ≤ 128 (fp32) is resident — the row block is loaded once and only the
column tiles stream; larger D loops over BLOCK_K chunks inside each tile. Inputs are read through
their strides (a transposed or sliced view is not copied). The tile sizes are fixed (no autotuning):
this op serves a regulariser (KoLeo) whose cost is one similarity GEMM; they are the small end of
pairwise_lse's forward configs, and tests/backends/test_new_losses.py compiles them for sm_90 and sm_80.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl._common import device_ctx
from fastssl.kernels.triton._utils import interpreting, mm

#: fp32 inputs must select the neighbour an fp32 reference selects: full-precision dots (CUDA cores).
FP32_DOT_PRECISION = "ieee"
#: Largest D (rounded up to a power of two) kept resident in one BLOCK_K chunk, per itemsize.
RESIDENT_D_MAX = {2: 256, 4: 128}
#: BLOCK_K of the D loop, per itemsize.
LOOP_BLOCK_K = {2: 64, 4: 32}


@triton.jit
def _pairwise_max_fwd_kernel(
    X, Y, VALUE, INDEX,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd,
    EXCLUDE_SELF: tl.constexpr, SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """value_i = max_j x_i·y_j and index_i = its first argmax, for one block of BLOCK_M rows (fp32 dots)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < M
    if SINGLE_K:
        ks = tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < D
        x_blk = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_M,), dtype=tl.int64)
    for start_n in range(0, NY, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < NY
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SINGLE_K:
            y_t = tl.load(Y + cols[None, :] * stride_ym + ks[:, None] * stride_yd,
                          mask=col_mask[None, :] & k_mask[:, None], other=0.0)  # fmt: skip
            s = mm(x_blk, y_t, s, FP32_PRECISION)
        else:
            for k0 in range(0, D, BLOCK_K):
                kl = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                kl_mask = kl < D
                x_t = tl.load(X + rows[:, None] * stride_xm + kl[None, :] * stride_xd,
                              mask=row_mask[:, None] & kl_mask[None, :], other=0.0)  # fmt: skip
                y_t = tl.load(Y + cols[None, :] * stride_ym + kl[:, None] * stride_yd,
                              mask=col_mask[None, :] & kl_mask[:, None], other=0.0)  # fmt: skip
                s = mm(x_t, y_t, s, FP32_PRECISION)
        valid = col_mask[None, :]
        if EXCLUDE_SELF:
            valid = valid & (cols[None, :] != rows[:, None])
        s = tl.where(valid, s, float("-inf"))
        # NaN ranks above every number and the first NaN wins (torch.argmax): the tile's first NaN
        # column, then the max over the rest. Once best is NaN no comparison can replace it.
        is_nan = s != s
        first_nan = tl.min(tl.where(is_nan, cols[None, :], NY), axis=1)
        new_nan = (first_nan < NY) & (best == best)
        s = tl.where(is_nan, float("-inf"), s)
        tile_best, tile_index = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: an earlier tile keeps a tie
        best_index = tl.where(new_nan, first_nan, tl.where(better, start_n + tile_index.to(tl.int64), best_index))
        best = tl.where(new_nan, float("nan"), tl.where(better, tile_best, best))
    tl.store(VALUE + rows, best, mask=row_mask)
    tl.store(INDEX + rows, best_index, mask=row_mask)


def tile_config(d: int, dtype: torch.dtype) -> dict:
    """The launch meta-parameters for feature size `d` and input `dtype` (fixed, see the module docstring)."""
    itemsize = dtype.itemsize
    block_k = max(16, triton.next_power_of_2(d))
    single_k = block_k <= RESIDENT_D_MAX[itemsize]
    if not single_k:
        block_k = LOOP_BLOCK_K[itemsize]
    if interpreting():  # small tiles: the odd test sizes hit several tiles and every mask
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, SINGLE_K=single_k, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, SINGLE_K=single_k, num_warps=4, num_stages=2 if single_k else 3)


def pairwise_max_forward(x: Tensor, y: Tensor, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """(value, index), (M,) fp32 and (M,) int64, for x (M, D), y (Ny, D) in fp32/bf16/fp16."""
    m, d = x.shape
    value = torch.empty(m, dtype=torch.float32, device=x.device)
    index = torch.empty(m, dtype=torch.long, device=x.device)
    if m == 0:
        return value, index
    meta = tile_config(d, x.dtype)
    grid = (triton.cdiv(m, meta["BLOCK_M"]),)
    with device_ctx(x):
        _pairwise_max_fwd_kernel[grid](
            x, y, value, index, m, y.shape[0], d, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            EXCLUDE_SELF=bool(exclude_self), FP32_PRECISION=FP32_DOT_PRECISION, **meta,
        )  # fmt: skip
    return value, index
