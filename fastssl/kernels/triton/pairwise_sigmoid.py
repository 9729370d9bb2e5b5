"""Pairwise sigmoid (SigLIP, Zhai et al. 2023) in Triton: fused, tiled kernels that never store a logit.

For rows x (M, D), columns y (Ny, D), logits ℓ_ij = scale·x_i·y_j + bias and (HAS_POS) one
positive column per row p(i) = (i + pos_offset) mod Ny (label +1; all other pairs −1):

    rows_i = Σ_j softplus(−label_ij·ℓ_ij)                                   (forward, (M,))
    G_ij   = grad_i·(−label_ij)·σ(−label_ij·ℓ_ij)   = grad_i·σ(ℓ_ij) off the positive, −grad_i·σ(−ℓ_ij) on it
    dx_i   = scale·Σ_j G_ij y_j,   dy_j = scale·Σ_i G_ij x_i
    dlogit_i = Σ_j G_ij,   dscale_i = Σ_j G_ij·x_i·y_j      (their sums are d bias and d scale)

Every term depends on its own logit only, so the backward needs nothing from the forward: each of
its two kernels recomputes the logit tiles once. dx comes from a row program (the dx kernel: a row
block streams the column tiles), dy from a column program (the dy kernel: a column block streams
the row tiles), as in the pairwise-LSE backward — no atomics, so the result is deterministic, at
the price of computing each logit tile twice in the backward (three times in all).

The positive pair is handled apart from the tiles, as in fastssl/kernels/triton/pairwise_lse.py:
a row-wise dot of x_i with the gathered y_p(i) gives its logit in every kernel alike, the tile
masks drop column p(i), and so the tile weights σ(ℓ_ij) stay in [0, 1]. Tiling, block configs,
autotuning keys and the shared-memory estimate are the pairwise-LSE kernels' (the tile shapes are
the same: one logit tile and, in the backward, one output accumulator per program); the config
lists are theirs less the configs that spill registers here (CONFIGS).

softplus(u) = max(u, 0) + log1p(exp(−|u|)), with log1p by Goldberg's rewrite (exact to a few ulps,
from tl.log alone): SigLIP's negatives sit near ℓ = −10, where log(1 + e) of fp32 would keep only
three digits of e ≈ 4.5e-5.

fp16: the weights σ(ℓ) ≈ e^−10 of SigLIP's negatives are fp16 subnormals, so before they are
rounded to fp16 for the tensor-core product they are multiplied by FP16_WEIGHT_SCALE (an exact
power of two) and the fp32 accumulator is divided by it afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl._common import device_ctx
from fastssl.kernels.triton._utils import (
    autotune,
    device_smem_limit,
    logits_loop,
    mm,
    mm_weights,
    round_to,
    row_bin,
    rowdot_loop,
)
from fastssl.kernels.triton.pairwise_lse import (
    FP32_DOT_PRECISION,
    FP32_MAX_TILE,
    FWD_CONFIGS,
    INTERPRET_CONFIG,
    smem_estimate,
    tile_dims,
)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

#: 2^12: σ ≤ 1 becomes ≤ 4096 (fp16 max 65504), and weights down to 2^−36 stay above fp16's
#: smallest subnormal (2^−24 before scaling); the accumulator stays fp32.
FP16_WEIGHT_SCALE = 4096.0

_KEY = ["ROW_BIN", "BLOCK_K", "SINGLE_K", "HAS_POS"]
_NO_SPECIALIZE = ["M", "NY", "pos_offset", "ROW_BIN"]


def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


# (BLOCK_M, BLOCK_N, num_warps, num_stages): the forward's are pairwise-LSE's. The backward's are the
# tile shapes of a two-kernel backward (dx: a program owns x rows and streams y; dy the mirror),
# less those that spill registers here at bf16, D = 128, sm_90 (ptxas -v,
# tests/gpu/test_pairwise_sigmoid_aot.py): a (BLOCK_M, 128) fp32 accumulator per 4 warps with a
# 32-wide logit tile (dx 128 x 32), its dy mirror (32 x 128), and dy 64 x 64 with 3 stages (its
# positive pass holds the accumulator, a gathered x tile and y_blk at once).
CONFIGS = {
    "fwd": list(FWD_CONFIGS),
    "dx": _configs([(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)]),
    "dy": _configs([(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3)]),
}
#: The pairwise-LSE kernel whose shared-memory layout each kernel here has (resident and streamed
#: operands, one weight tile): the estimate is that kernel's.
_SMEM_LIKE = {"fwd": "fwd", "dx": "sym", "dy": "dy"}


def candidate_configs(kind: str, itemsize: int, block_k: int, single_k: bool, block_dout: int,
                      smem_limit: int) -> list:
    """The configs of kernel `kind` ("fwd", "dx", "dy") autotuning may pick for these tiles: the
    pairwise-LSE rule (fp32 tiles of at most FP32_MAX_TILE logits, smem_estimate within the limit:
    the programs hold the same tiles) over this file's CONFIGS."""
    keep = [
        c
        for c in CONFIGS[kind]
        if (itemsize < 4 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= FP32_MAX_TILE)
        and smem_estimate(_SMEM_LIKE[kind], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_k, single_k, itemsize,
                          c.num_stages, block_dout) <= smem_limit
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
def _softplus(u):
    """log(1 + e^u) in fp32, accurate to a few ulps for every u (no overflow, no cancellation)."""
    e = tl.exp2(-tl.abs(u) * LOG2E)
    w = 1.0 + e
    # Goldberg: log1p(e) = log(w)·e/(w − 1), exact where w rounds; w == 1 means log1p(e) = e.
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.maximum(u, 0.0) + log1p_e


@triton.jit
def _sigmoid(u):
    """σ(u) in fp32 from e = exp(−|u|) ≤ 1, which never overflows: 1/(1 + e) or e/(1 + e)."""
    e = tl.exp2(-tl.abs(u) * LOG2E)
    r = 1.0 / (1.0 + e)
    return tl.where(u >= 0.0, r, e * r)


# ---------------------------------------------------------------------------------------------------
# forward


@autotune(CONFIGS["fwd"], INTERPRET_CONFIG, key=_KEY, prune=_prune("fwd"))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_sigmoid_fwd_kernel(
    X, Y, SCALE, BIAS, ROWS,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd,
    pos_offset, ROW_BIN,
    HAS_POS: tl.constexpr, SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """rows_i = Σ_j softplus(−label_ij·ℓ_ij) (fp32) for one block of BLOCK_M rows.

    Streams (BLOCK_M, BLOCK_N) logit tiles x_blk @ y_tileᵀ (BLOCK_K-chunked tl.dot, fp32
    accumulator), adds softplus(ℓ) over the valid columns (col < Ny, col ≠ p(i)) into a (BLOCK_M,)
    fp32 sum, then the positive's softplus(−ℓ_i,p(i)) from a row-wise dot. Stores rows (M,) only.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    pcol = (rows + pos_offset) % NY
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    if SINGLE_K:
        ks = tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < D
        x_blk = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)

    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, NY, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < NY
        if SINGLE_K:
            y_t = tl.load(Y + cols[:, None] * stride_ym + ks[None, :] * stride_yd,
                          mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            s = mm(x_blk, tl.trans(y_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
        else:
            s = logits_loop(X, Y, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_ym, stride_yd,
                             D, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        valid = col_mask[None, :]
        if HAS_POS:
            valid = valid & (cols[None, :] != pcol[:, None])
        acc += tl.sum(tl.where(valid, _softplus(s * scale + bias), 0.0), axis=1)

    if HAS_POS:
        if SINGLE_K:
            y_pos = tl.load(Y + pcol[:, None] * stride_ym + ks[None, :] * stride_yd,
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            pos_raw = tl.sum(x_blk.to(tl.float32) * y_pos.to(tl.float32), axis=1)
        else:
            pos_raw = rowdot_loop(X, Y, rows, pcol, row_mask, stride_xm, stride_xd, stride_ym, stride_yd, D,
                                   BLOCK_M, BLOCK_K)
        acc += _softplus(-(pos_raw * scale + bias))
    tl.store(ROWS + rows, acc, mask=row_mask)


# ---------------------------------------------------------------------------------------------------
# backward


@autotune(CONFIGS["dx"], INTERPRET_CONFIG, key=_KEY, prune=_prune("dx"))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_sigmoid_bwd_dx_kernel(
    X, Y, SCALE, BIAS, GRAD, DX, DLOGIT, DSCALE,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_dxm,
    pos_offset, ROW_BIN,
    HAS_POS: tl.constexpr, SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr, WEIGHT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):  # fmt: skip
    """dx for one block of BLOCK_M rows and one BLOCK_DOUT slice of D (grid axis 1); the row sums.

    dx_i = scale·grad_i·(Σ_{j≠p(i)} σ(ℓ_ij) y_j − σ(−ℓ_i,p(i)) y_p(i)). Each (BLOCK_M, BLOCK_N) tile
    of weights σ(ℓ) (×WEIGHT_SCALE, rounded to the input dtype) is multiplied into a
    (BLOCK_M, BLOCK_DOUT) fp32 accumulator against the (BLOCK_N, BLOCK_DOUT) column tile; grad_i
    is applied once at the end. The programs of slice 0 also store dlogit_i = grad_i·Σ_j w_ij and
    dscale_i = grad_i·Σ_j w_ij·x_i·y_j (w the signed weights), summed in fp32 from the unrounded
    weights and the full-D logits that every slice computes anyway.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    pcol = (rows + pos_offset) % NY
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    ds = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    d_mask = ds < D
    if SINGLE_K:
        ks = ds  # one D block: the logit chunk and the output slice coincide
        k_mask = d_mask
        x_blk = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    w_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ws_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, NY, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < NY
        if SINGLE_K:
            y_t = tl.load(Y + cols[:, None] * stride_ym + ks[None, :] * stride_yd,
                          mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            s = mm(x_blk, tl.trans(y_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
        else:
            s = logits_loop(X, Y, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_ym, stride_yd,
                             D, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            y_t = tl.load(Y + cols[:, None] * stride_ym + ds[None, :] * stride_yd,
                          mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        valid = col_mask[None, :]
        if HAS_POS:
            valid = valid & (cols[None, :] != pcol[:, None])
        w = tl.where(valid, _sigmoid(s * scale + bias), 0.0)
        w_sum += tl.sum(w, axis=1)
        ws_sum += tl.sum(w * s, axis=1)
        acc = mm_weights(w * WEIGHT_SCALE, y_t, acc, FP32_PRECISION)
    acc = acc * (1.0 / WEIGHT_SCALE)

    if HAS_POS:  # after the loop, so that its (BLOCK_M, BLOCK_DOUT) tile is not held across it
        y_pos = tl.load(Y + pcol[:, None] * stride_ym + ds[None, :] * stride_yd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if SINGLE_K:
            pos_raw = tl.sum(x_blk.to(tl.float32) * y_pos.to(tl.float32), axis=1)
        else:
            pos_raw = rowdot_loop(X, Y, rows, pcol, row_mask, stride_xm, stride_xd, stride_ym, stride_yd, D,
                                   BLOCK_M, BLOCK_K)
        w_pos = -_sigmoid(-(pos_raw * scale + bias))
        acc += w_pos[:, None] * y_pos.to(tl.float32)
        w_sum += w_pos
        ws_sum += w_pos * pos_raw

    g = tl.load(GRAD + rows, mask=row_mask, other=0.0)
    dx = (scale * g)[:, None] * acc
    tl.store(DX + rows[:, None] * stride_dxm + ds[None, :], round_to(dx, DX.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])
    if pid_d == 0:
        tl.store(DLOGIT + rows, g * w_sum, mask=row_mask)
        tl.store(DSCALE + rows, g * ws_sum, mask=row_mask)


@autotune(CONFIGS["dy"], INTERPRET_CONFIG, key=_KEY, prune=_prune("dy"))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _pairwise_sigmoid_bwd_dy_kernel(
    X, Y, SCALE, BIAS, GRAD, GRAD_MAX, DY,
    M, NY, D,
    stride_xm, stride_xd, stride_ym, stride_yd, stride_dym,
    pos_offset, ROW_BIN,
    HAS_POS: tl.constexpr, SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr, WEIGHT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):  # fmt: skip
    """dy for one block of BLOCK_N columns of y and one BLOCK_DOUT slice of D (grid axis 1).

    dy_j = scale·(Σ_{i: p(i)≠j} grad_i·σ(ℓ_ij) x_i − Σ_{i: p(i)=j} grad_i·σ(−ℓ_ij) x_i). The program
    streams (BLOCK_M, D) row tiles of x, recomputes the transposed logits y_blk @ x_tileᵀ
    (BLOCK_N, BLOCK_M) and accumulates Wᵀ @ x_tile into a (BLOCK_N, BLOCK_DOUT) fp32 accumulator,
    with W = σ(ℓ)·grad/max|grad| (×WEIGHT_SCALE) rounded to the input dtype: dividing by GRAD_MAX
    (a device scalar) keeps the weights in [−1, 1] whatever the loss scaling. The rows whose
    positive is column j, i = (j − pos_offset) mod Ny + t·Ny < M, are then gathered and added
    elementwise.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < NY
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    ds = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    d_mask = ds < D
    if SINGLE_K:
        ks = ds
        k_mask = d_mask
        y_blk = tl.load(Y + cols[:, None] * stride_ym + ks[None, :] * stride_yd,
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)

    g_max = tl.load(GRAD_MAX).to(tl.float32)
    g_inv = tl.where(g_max > 0.0, 1.0 / tl.where(g_max > 0.0, g_max, 1.0), 0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < M
        g_rel = tl.load(GRAD + rows, mask=row_mask, other=0.0) * g_inv
        if SINGLE_K:
            x_t = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                          mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            s_t = mm(y_blk, tl.trans(x_t), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), FP32_PRECISION)
        else:
            s_t = logits_loop(Y, X, cols, rows, col_mask, row_mask, stride_ym, stride_yd, stride_xm, stride_xd,
                               D, FP32_PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
            x_t = tl.load(X + rows[:, None] * stride_xm + ds[None, :] * stride_xd,
                          mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        valid = col_mask[:, None] & row_mask[None, :]
        if HAS_POS:
            valid = valid & (cols[:, None] != ((rows + pos_offset) % NY)[None, :])
        w_t = tl.where(valid, _sigmoid(s_t * scale + bias), 0.0) * (g_rel * WEIGHT_SCALE)[None, :]
        acc = mm_weights(w_t, x_t, acc, FP32_PRECISION)
    acc = acc * (g_max / WEIGHT_SCALE)

    if HAS_POS:
        prow0 = (cols + (NY - pos_offset)) % NY  # 0 ≤ pos_offset < NY: this is (j − pos_offset) mod Ny
        for wrap in range(0, M, NY):
            prow = prow0 + wrap
            p_mask = col_mask & (prow < M)
            x_pos = tl.load(X + prow[:, None] * stride_xm + ds[None, :] * stride_xd,
                            mask=p_mask[:, None] & d_mask[None, :], other=0.0)
            if SINGLE_K:
                pos_raw = tl.sum(x_pos.to(tl.float32) * y_blk.to(tl.float32), axis=1)
            else:
                pos_raw = rowdot_loop(X, Y, prow, cols, p_mask, stride_xm, stride_xd, stride_ym, stride_yd, D,
                                       BLOCK_N, BLOCK_K)
            g = tl.load(GRAD + prow, mask=p_mask, other=0.0)
            w_pos = -g * _sigmoid(-(pos_raw * scale + bias))
            acc += w_pos[:, None] * x_pos.to(tl.float32)

    tl.store(DY + cols[:, None] * stride_dym + ds[None, :], round_to(acc * scale, DY.dtype.element_ty),
             mask=col_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers


def _common(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, pos_offset: int, has_pos: bool):
    m, d = x.shape
    n_y = y.shape[0]
    scale, bias = scale.to(x.device), bias.to(x.device)
    block_k, single_k, block_dout = tile_dims(d, x.dtype)
    meta = dict(BLOCK_K=block_k, SINGLE_K=single_k, FP32_PRECISION=FP32_DOT_PRECISION, HAS_POS=bool(has_pos))
    return m, d, n_y, scale, bias, meta, block_dout, pos_offset % n_y, row_bin(max(m, n_y))


def pairwise_sigmoid_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, pos_offset: int,
                             has_pos: bool) -> Tensor:
    """rows (M,) fp32. x (M, D), y (Ny, D), scale and bias 0-dim on x's device (read there: no sync)."""
    m, d, n_y, scale, bias, meta, _, off, row_bin = _common(x, y, scale, bias, pos_offset, has_pos)
    out = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    with device_ctx(x):
        _pairwise_sigmoid_fwd_kernel[lambda META: (triton.cdiv(m, META["BLOCK_M"]),)](
            x, y, scale, bias, out,
            m, n_y, d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            off, row_bin,
            **meta,
        )  # fmt: skip
    return out


def pairwise_sigmoid_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad_rows: Tensor,
                              pos_offset: int, has_pos: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy) in the input dtype and (dlogit_rows, dscale_rows) fp32 (M,): see the module docstring."""
    m, d, n_y, scale, bias, meta, block_dout, off, row_bin = _common(x, y, scale, bias, pos_offset, has_pos)
    dx = torch.empty((m, d), dtype=x.dtype, device=x.device)
    dy = torch.empty((n_y, d), dtype=y.dtype, device=y.device)
    dlogit = torch.empty(m, dtype=torch.float32, device=x.device)
    dscale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return dx, dy.zero_(), dlogit, dscale
    grad_rows = grad_rows.to(torch.float32).contiguous()  # O(M): an expanded gradient from a mean
    grad_max = grad_rows.abs().amax()  # a device scalar: no sync (the dy kernel's weight range)
    meta.update(BLOCK_DOUT=block_dout, WEIGHT_SCALE=FP16_WEIGHT_SCALE if x.dtype == torch.float16 else 1.0)
    d_blocks = triton.cdiv(d, block_dout)
    with device_ctx(x):
        _pairwise_sigmoid_bwd_dx_kernel[lambda META: (triton.cdiv(m, META["BLOCK_M"]), d_blocks)](
            x, y, scale, bias, grad_rows, dx, dlogit, dscale,
            m, n_y, d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), dx.stride(0),
            off, row_bin,
            **meta,
        )  # fmt: skip
        _pairwise_sigmoid_bwd_dy_kernel[lambda META: (triton.cdiv(n_y, META["BLOCK_N"]), d_blocks)](
            x, y, scale, bias, grad_rows, grad_max, dy,
            m, n_y, d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), dy.stride(0),
            off, row_bin,
            **meta,
        )  # fmt: skip
    return dx, dy, dlogit, dscale
