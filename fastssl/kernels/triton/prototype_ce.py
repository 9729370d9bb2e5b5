"""Prototype cross-entropy in Triton: rows against K prototypes, never storing a row x K matrix.

docs/design.md, kernel family 4; the math and the gradients are in fastssl/ops/prototype_ce.py.
Same contract as `fastssl.kernels.torch.prototype_ce`. Two kernels:

Forward (`_prototype_ce_fwd_kernel`), launched once for the student rows and once for the teacher's:
each program owns BLOCK_M rows x and streams (BLOCK_N, D) tiles of the scoring prototypes A (W for
the student, W_t for the teacher) through an online max/sum in base 2, as FlashAttention's forward:

    z_ik  = α·(x_i·A_k − c_k)                 (c only for the teacher, HAS_CENTER)
    lse_i = LSE_k z_ik,   mean_i = Σ_k softmax_k(z_i)·V_k   (HAS_MEAN; V = W, the student prototypes)

mean is attention with queries x, keys A and values V (the accumulator is rescaled by exp2(m_old −
m_new) per tile). Stored: lse (M,) and mean (M, D) in fp32 — O(M·D).

Backward (`_prototype_ce_bwd_kernel`): each program owns BLOCK_N prototypes (one BLOCK_DOUT slice of
D, grid axis 1), streams (BLOCK_M, D) row tiles of the student, then of the teacher, recomputes the
transposed logits A_blk @ x_tileᵀ (BLOCK_N, BLOCK_M) from the stored lse, and accumulates

    dW_k = α_s·Σ_i g_i·exp(z_s,ik − lse_s,i)·s_i + Σ_j exp(z_t,jk − lse_t,j)·G_j

into one (BLOCK_N, BLOCK_DOUT) fp32 accumulator, written once. The probability tiles are rounded to
the input dtype for the tensor-core product (as FlashAttention's backward). For the same fp16 reason
as the pairwise-LSE dy kernel, g is divided by max|g| and G by max|G| (device scalars, no sync) before
rounding, and multiplied back in fp32.

Tiling. D ≤ 256 (bf16/fp16) or ≤ 128 (fp32) is resident (one BLOCK_K = next_pow2(D) chunk, loaded
once per program; BLOCK_DOUT = BLOCK_K); larger D loops over BLOCK_K chunks for the logits and puts
BLOCK_DOUT slices of the output on grid axis 1, each slice recomputing the full-D logits
(fastssl.kernels.triton.pairwise_lse's scheme and tile sizes).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl._common import device_ctx
from fastssl.kernels import PrototypeCEFlags
from fastssl.kernels.triton._utils import autotune, device_smem_limit, logits_loop, mm, mm_weights, round_to, row_bin
from fastssl.kernels.triton.pairwise_lse import FP32_DOT_PRECISION, tile_dims

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

_KEY = ["ROW_BIN", "BLOCK_K", "SINGLE_K"]
# Sizes only feed masks; specialising them would multiply compiles (D and strides keep theirs).
_NO_SPECIALIZE = ["M", "K", "ROW_BIN"]


def _configs(shapes):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M rows x BLOCK_N prototypes per logit tile. In the
# forward a program owns BLOCK_M rows, in the backward BLOCK_N prototypes. 8 warps: the fp32 output
# accumulator (owned rows x D, up to 64 x 256) needs them to stay in registers; wgmma needs 64 owned rows.
FWD_CONFIGS = _configs([(64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 3)])
BWD_CONFIGS = _configs(
    [(64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 8, 3), (32, 64, 8, 4)]
)
#: fp32 inputs: dots on CUDA cores (FP32_DOT_PRECISION = "ieee") whose operands sit in registers, so
#: small tiles with few owned rows (larger ones spill, per tests/gpu/test_prototype_ce_aot.py).
FP32_FWD_CONFIGS = _configs([(64, 32, 8, 3)])
FP32_BWD_CONFIGS = _configs([(64, 32, 8, 3)])
CONFIGS = {"fwd": FWD_CONFIGS, "bwd": BWD_CONFIGS}
FP32_CONFIGS = {"fwd": FP32_FWD_CONFIGS, "bwd": FP32_BWD_CONFIGS}
#: Under the interpreter: small tiles, so that the odd test sizes hit several tiles and every mask.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
#: fp32 registers per thread for the output accumulator and the logit tile above which a config is
#: dropped (ptxas has 255; tests/gpu/test_prototype_ce_aot.py checks that no kept config spills).
MAX_ACC_REGS = 160
#: Shared memory the compiled kernels use besides their tiles (barriers, the lse vector).
SMEM_SLACK = 1024


def _acc_regs(kind: str, block_m: int, block_n: int, block_dout: int, num_warps: int) -> int:
    owned = block_m if kind == "fwd" else block_n  # rows of the output accumulator
    return (owned * block_dout + block_m * block_n) // (32 * num_warps)


def smem_estimate(kind: str, block_m: int, block_n: int, block_k: int, single_k: bool, itemsize: int, stages: int,
                  block_dout: int, out_operand: str = "separate") -> int:
    """Upper estimate of the shared memory (bytes) of one program; the pruning relies on it.

    Resident D (SINGLE_K): the owned block (its rows x BLOCK_K) once, and per pipeline stage the
    streamed tile plus, for `out_operand` "separate" (the forward's values V ≠ A, the backward's
    teacher phase G), the streamed output tile — exact on sm_90 up to the slack. "reused" (the output
    product reuses the streamed logit tile) may hold one stage more; "none": LSE only. The backward's
    two phases reuse one allocation. D loop: both logit operands per stage plus the streamed output
    tile once. Checked against the compiled kernels in tests/gpu/test_prototype_ce_aot.py.
    """
    owned, streamed = (block_m, block_n) if kind == "fwd" else (block_n, block_m)
    if single_k:
        per_stage = block_k + (block_dout if out_operand == "separate" else 0)
        est = owned * block_k + (stages + (out_operand == "reused")) * streamed * per_stage
    else:
        est = stages * block_k * (block_m + block_n) + streamed * block_dout
    return itemsize * est + SMEM_SLACK


def candidate_configs(kind: str, itemsize: int, block_k: int, single_k: bool, block_dout: int, smem_limit: int,
                      out_operand: str = "separate") -> list:
    """The configs of kernel `kind` ("fwd", "bwd") that autotuning may pick for these tiles."""
    configs = (FP32_CONFIGS if itemsize == 4 else CONFIGS)[kind]
    keep = [
        c
        for c in configs
        if _acc_regs(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_dout, c.num_warps) <= MAX_ACC_REGS
        and smem_estimate(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_k, single_k, itemsize, c.num_stages,
                          block_dout, out_operand) <= smem_limit
    ]
    smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
    return keep or [smallest]


def out_operand(kind: str, flags: dict) -> str:
    """The output operand a kernel streams besides its logit tiles, for smem_estimate, from its flags."""
    if kind == "fwd":
        if not flags["HAS_MEAN"]:
            return "none"
        return "reused" if flags["V_IS_A"] and flags["SINGLE_K"] else "separate"
    if flags["HAS_TEACHER"]:
        return "separate"
    return "reused" if flags["SINGLE_K"] else "separate"


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        x = named_args["X"]
        limit = device_smem_limit(x.device.index or 0)
        return candidate_configs(kind, x.element_size(), kwargs["BLOCK_K"], kwargs["SINGLE_K"], kwargs["BLOCK_DOUT"],
                                 limit, out_operand(kind, kwargs))  # fmt: skip

    return prune


# ---------------------------------------------------------------------------------------------------
# forward


@autotune(FWD_CONFIGS + FP32_FWD_CONFIGS, INTERPRET_CONFIG, key=_KEY + ["HAS_CENTER", "HAS_MEAN", "V_IS_A"],
          prune=_prune("fwd"))  # fmt: skip
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _prototype_ce_fwd_kernel(
    X, A, V, C, SCALE, LSE, MEAN,
    M, K, D,
    stride_xm, stride_xd, stride_am, stride_ad, stride_vm, stride_vd, stride_meanm,
    ROW_BIN,
    HAS_CENTER: tl.constexpr, HAS_MEAN: tl.constexpr, V_IS_A: tl.constexpr,
    SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):  # fmt: skip
    """lse (and mean, one BLOCK_DOUT slice on grid axis 1) of BLOCK_M rows x against all K prototypes.

    Per (BLOCK_M, BLOCK_N) tile: logits x_blk @ A_tileᵀ (fp32 accumulator), minus the centre tile,
    times α·log2(e) (base 2), masked past K, folded into the running max m and sum l; with HAS_MEAN
    the accumulator is rescaled by exp2(m_old − m_new) and gets P_tile @ V_tile (P rounded to the
    input dtype). V_IS_A: the value tile is the logit tile already loaded (the student, resident D).
    Stores lse = (m + log2 l)·ln 2 and mean = acc / l; ROW_BIN is only an autotuning key.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    qk_scale = tl.load(SCALE).to(tl.float32) * LOG2E
    ds = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    d_mask = ds < D
    if SINGLE_K:
        ks = ds  # one D block: the logit chunk and the output slice coincide
        x_blk = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    for start_n in range(0, K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < K
        if SINGLE_K:
            a_t = tl.load(A + cols[:, None] * stride_am + ks[None, :] * stride_ad,
                          mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            s = mm(x_blk, tl.trans(a_t), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_PRECISION)
        else:
            s = logits_loop(X, A, rows, cols, row_mask, col_mask, stride_xm, stride_xd, stride_am, stride_ad, D,
                             FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_CENTER:
            s = s - tl.load(C + cols, mask=col_mask, other=0.0)[None, :]
        qk = tl.where(col_mask[None, :], s * qk_scale, float("-inf"))
        # The first tile always has a column (K ≥ 1), so m_new is finite from there on.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_MEAN:
            if SINGLE_K and V_IS_A:
                v_t = a_t
            else:
                v_t = tl.load(V + cols[:, None] * stride_vm + ds[None, :] * stride_vd,
                              mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            acc = mm_weights(p, v_t, acc * alpha[:, None], FP32_PRECISION)
        m_i = m_new

    tl.store(LSE + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_mask & (pid_d == 0))
    if HAS_MEAN:
        tl.store(MEAN + rows[:, None] * stride_meanm + ds[None, :], acc / l_i[:, None],
                 mask=row_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _accumulate_rows(acc, X, A, C, OUT, LSE, COEF, cols, col_mask, a_blk, ds, d_mask, N, D, qk_scale, coef_inv,
                     stride_xm, stride_xd, stride_am, stride_ad, stride_outm, stride_outd,
                     HAS_CENTER: tl.constexpr, OUT_IS_X: tl.constexpr, SINGLE_K: tl.constexpr,
                     FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr):  # fmt: skip
    """acc + Σ_i w_i·exp2(z_ik − lse2_i)·OUT_i over the N rows of X, for the BLOCK_N prototypes `cols`.

    Logits z from X and A (minus C if HAS_CENTER), a_blk the resident A block (SINGLE_K). OUT_IS_X
    (the student): OUT is X, w_i = COEF_i·coef_inv, and the row tile loaded for the logits is reused
    when D is resident. Otherwise (the teacher) OUT is its own (N, D) operand and w_i = 1.
    """
    c_tile = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_CENTER:
        c_tile = tl.load(C + cols, mask=col_mask, other=0.0)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < N
        if SINGLE_K:
            x_t = tl.load(X + rows[:, None] * stride_xm + ds[None, :] * stride_xd,
                          mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            s_t = mm(a_blk, tl.trans(x_t), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), FP32_PRECISION)
        else:
            s_t = logits_loop(A, X, cols, rows, col_mask, row_mask, stride_am, stride_ad, stride_xm, stride_xd,
                               D, FP32_PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
        lse2 = tl.load(LSE + rows, mask=row_mask, other=0.0) * LOG2E
        z = (s_t - c_tile[:, None]) * qk_scale - lse2[None, :]
        p = tl.exp2(tl.where(col_mask[:, None] & row_mask[None, :], z, float("-inf")))
        if OUT_IS_X:
            p = p * (tl.load(COEF + rows, mask=row_mask, other=0.0) * coef_inv)[None, :]
        if OUT_IS_X and SINGLE_K:
            out = x_t
        else:
            out = tl.load(OUT + rows[:, None] * stride_outm + ds[None, :] * stride_outd,
                          mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        acc = mm_weights(p, out, acc, FP32_PRECISION)
    return acc


@autotune(BWD_CONFIGS + FP32_BWD_CONFIGS, INTERPRET_CONFIG, key=_KEY + ["HAS_CENTER", "HAS_STUDENT", "HAS_TEACHER"],
          prune=_prune("bwd"))  # fmt: skip
@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["N", "NT"])
def _prototype_ce_bwd_kernel(
    X, W, T, WT, C, SCALE_S, SCALE_T, LSE_S, LSE_T, GRAD_LSE, GRAD_MEAN, GMAX, DW,
    N, NT, K, D,
    stride_xm, stride_xd, stride_wm, stride_wd, stride_tm, stride_td, stride_wtm, stride_wtd, stride_gm,
    stride_dwm, ROW_BIN,
    HAS_CENTER: tl.constexpr, HAS_STUDENT: tl.constexpr, HAS_TEACHER: tl.constexpr,
    SINGLE_K: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):  # fmt: skip
    """dW for BLOCK_N prototypes and one BLOCK_DOUT slice of D (grid axis 1).

    Student phase: rows X (N, D) against W, weights g_i·softmax/max|g|, output operand the rows
    themselves. Teacher phase: rows T (NT, D) against W_t with the centre, weights p_t, output
    operand GRAD_MEAN = G/max|G| (NT, D), rounded to the input dtype by the launcher. GMAX holds
    (max|g|, max|G|), each replaced by 1 where it is 0 (the launcher's). ROW_BIN is only an autotuning key.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < K
    ds = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    d_mask = ds < D

    # One accumulator for both phases (two would double the registers): the student's sum is scaled
    # into the teacher's units (max|G|) before the teacher's rows are added, and all of it back after.
    g_max = tl.load(GMAX).to(tl.float32)
    gm_max = tl.load(GMAX + 1).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32)
    if HAS_STUDENT:
        w_blk = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=W.dtype.element_ty)
        if SINGLE_K:
            w_blk = tl.load(W + cols[:, None] * stride_wm + ds[None, :] * stride_wd,
                            mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        scale_s = tl.load(SCALE_S).to(tl.float32)
        acc = _accumulate_rows(acc, X, W, C, X, LSE_S, GRAD_LSE, cols, col_mask, w_blk, ds, d_mask, N, D,
                               scale_s * LOG2E, 1.0 / g_max, stride_xm, stride_xd, stride_wm, stride_wd, stride_xm,
                               stride_xd, False, True, SINGLE_K, FP32_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                               BLOCK_DOUT)  # fmt: skip
        acc = acc * (g_max * scale_s / gm_max)
    if HAS_TEACHER:
        wt_blk = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=WT.dtype.element_ty)
        if SINGLE_K:
            wt_blk = tl.load(WT + cols[:, None] * stride_wtm + ds[None, :] * stride_wtd,
                             mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = _accumulate_rows(acc, T, WT, C, GRAD_MEAN, LSE_T, GRAD_LSE, cols, col_mask, wt_blk, ds, d_mask,
                               NT, D, tl.load(SCALE_T).to(tl.float32) * LOG2E, 1.0, stride_tm, stride_td,
                               stride_wtm, stride_wtd, stride_gm, 1, HAS_CENTER, False, SINGLE_K, FP32_PRECISION,
                               BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DOUT)  # fmt: skip
    acc = acc * gm_max
    tl.store(DW + cols[:, None] * stride_dwm + ds[None, :], round_to(acc, DW.dtype.element_ty),
             mask=col_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers


def _row_stats(x: Tensor, a: Tensor, v: Optional[Tensor], center: Optional[Tensor], scale: Tensor):
    """(lse (M,), mean (M, D) or None) of rows x against the prototypes a (values v)."""
    m, d = x.shape
    k = a.shape[0]
    block_k, single_k, block_dout = tile_dims(d, x.dtype)
    lse = torch.empty(m, dtype=torch.float32, device=x.device)
    mean = None if v is None else torch.empty(m, d, dtype=torch.float32, device=x.device)
    if m == 0:
        return lse, mean
    d_blocks = triton.cdiv(d, block_dout) if v is not None else 1
    if v is None and not single_k:
        block_dout = block_k  # lse only: no output slices, one program per row block
    vv = a if v is None else v
    with device_ctx(x):
        _prototype_ce_fwd_kernel[lambda META: (triton.cdiv(m, META["BLOCK_M"]), d_blocks)](
            x, a, vv, a if center is None else center, scale, lse, lse if mean is None else mean,
            m, k, d,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), vv.stride(0), vv.stride(1),
            0 if mean is None else mean.stride(0),
            row_bin(m),
            HAS_CENTER=center is not None, HAS_MEAN=v is not None, V_IS_A=v is a,
            SINGLE_K=single_k, FP32_PRECISION=FP32_DOT_PRECISION, BLOCK_K=block_k, BLOCK_DOUT=block_dout,
        )  # fmt: skip
    return lse, mean


def prototype_ce_forward(
    s: Tensor,
    w: Tensor,
    t: Tensor,
    w_t: Optional[Tensor],
    center: Optional[Tensor],
    scale_s: Tensor,
    scale_t: Tensor,
    flags: PrototypeCEFlags,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse_s (N,), mean_s (N, D) if flags.needs_ds else (0, D), lse_t (Nt,), mean_t (Nt, D)), fp32;
    w_t None means w."""
    scale_s, scale_t = scale_s.to(s.device), scale_t.to(s.device)
    center = None if center is None else center.to(device=s.device, dtype=torch.float32).contiguous()
    lse_s, mean_s = _row_stats(s, w, w if flags.needs_ds else None, None, scale_s)
    if mean_s is None:
        mean_s = torch.empty(0, s.shape[1], dtype=torch.float32, device=s.device)
    lse_t, mean_t = _row_stats(t, w if w_t is None else w_t, w, center, scale_t)
    return lse_s, mean_s, lse_t, mean_t


def prototype_ce_backward(
    s: Tensor,
    w: Tensor,
    t: Tensor,
    w_t: Optional[Tensor],
    center: Optional[Tensor],
    scale_s: Tensor,
    scale_t: Tensor,
    lse_s: Tensor,
    lse_t: Tensor,
    grad_lse_s: Optional[Tensor],
    grad_mean_t: Optional[Tensor],
) -> Tensor:
    """dW (K, D) in w's dtype: α_s·Σ_i g_i·softmax_s,ik·s_i + Σ_j p_t,jk·G_j (None gradients are zero)."""
    k, d = w.shape
    n, n_t = s.shape[0], t.shape[0]
    dw = torch.empty((k, d), dtype=w.dtype, device=w.device)
    has_student = grad_lse_s is not None and n > 0
    has_teacher = grad_mean_t is not None and n_t > 0
    if k == 0 or not (has_student or has_teacher):
        return dw.zero_()
    w_t = w if w_t is None else w_t
    # O(N + Nt·D) copies at most: expanded / strided gradients from the autograd graph.
    lse_s = lse_s.to(torch.float32).contiguous()
    lse_t = lse_t.to(torch.float32).contiguous()
    one = torch.ones((), dtype=torch.float32, device=w.device)
    g = grad_lse_s.to(torch.float32).contiguous() if has_student else lse_s
    # Device scalars, no sync: each phase runs on weights divided by them (fp16 range), see the kernel;
    # 1 where a gradient is all zero (its weights are then 0 whatever the divisor).
    g_max = torch.stack([g.abs().amax() if has_student else one,
                         grad_mean_t.abs().amax().to(torch.float32) if has_teacher else one])  # fmt: skip
    g_max = torch.where(g_max > 0, g_max, one)
    # G/max|G| in the input dtype, the teacher phase's output operand: O(Nt·D), one tensor-core operand.
    g_mean = (grad_mean_t.to(torch.float32) / g_max[1]).to(w.dtype) if has_teacher else w[:1]
    center = None if center is None else center.to(device=s.device, dtype=torch.float32).contiguous()
    block_k, single_k, block_dout = tile_dims(d, w.dtype)
    grid = lambda META: (triton.cdiv(k, META["BLOCK_N"]), triton.cdiv(d, block_dout))  # noqa: E731
    with device_ctx(w):
        _prototype_ce_bwd_kernel[grid](
            s, w, t, w_t, w if center is None else center, scale_s.to(w.device), scale_t.to(w.device),
            lse_s, lse_t, g, g_mean, g_max, dw,
            n, n_t, k, d,
            s.stride(0), s.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1), w_t.stride(0),
            w_t.stride(1), g_mean.stride(0), dw.stride(0), row_bin(max(n, n_t)),
            HAS_CENTER=center is not None, HAS_STUDENT=has_student, HAS_TEACHER=has_teacher,
            SINGLE_K=single_k, FP32_PRECISION=FP32_DOT_PRECISION, BLOCK_K=block_k, BLOCK_DOUT=block_dout,
        )  # fmt: skip
    return dw
