"""Squared Frobenius norm of a cross product, ‖âᵀb̂‖²_F, in Triton (docs/design.md, kernel family 2).

Same contract as `fastssl.kernels.torch.frobenius` (the spec). a, b are (R, K), read in place through
their strides (the spectral loss passes transposed views), under an optional per-column transform
(the losses' batch norm, centring or norm clip):

    â[r, k] = round_to_input_dtype((a[r, k] − a_shift[k]) · a_scale[k])     (b̂ likewise)

computed in fp32 (subtract, then multiply; a missing shift is 0, a missing scale 1) and rounded to
nearest even (a no-op for fp32), bit for bit what the losses recompute on the host. It is applied to
every tile right after its load (`_transform`; HAS_*_SHIFT / HAS_*_SCALE constexpr flags, so the
kernels without a transform compile exactly as before), and â, b̂ never exist in memory. Below, a and
b stand for â and b̂. Garrido et al. (2023)'s identity ‖aᵀb‖²_F = ⟨aaᵀ, bbᵀ⟩_F gives two routes, and both are one
generic product: for X, Y of shape (L, M) (the contraction axis first),

    "inner": X = a,  Y = b,  L = R, M = K:   ‖XᵀY‖²_F                 (K x K cross product, R·K² work)
    "outer": X = aᵀ, Y = bᵀ, L = K, M = R:   ⟨XᵀX, YᵀY⟩_F = Σ (aaᵀ)∘(bbᵀ) (R x R Grams, R²·K work)

so the outer route is the inner machinery run on the transposed *views* (strides swapped, no copy).
The transform's K axis is then M on the inner route (a tile's parameters load once) and L on the
outer one (TRANSFORM_ON_L: one chunk of parameters per chunk of L, staged beside the operands).

Forward (`_sq_frobenius_fwd_kernel`): each program owns one (BLOCK, BLOCK) tile of the M x M product
(or of both Grams), loops over L in BLOCK_L chunks with tl.dot into fp32 accumulators, squares (or
multiplies) and sums the tile in registers and stores ONE fp32 partial; the launcher sums the
whole buffer of partials (deterministic, no atomics; it is sized for the config with the most tiles
and the kernel zeroes the slots past its grid, so no tile count comes back from the autotuner's
shared state). Nothing of size M x M is written. Symmetric products (b is a,
or any Gram pair: (aaᵀ)∘(bbᵀ) is symmetric) run only the tiles i ≤ j, off-diagonal ones counted
twice. Parallelism is the number of output tiles: a small M (inner route with a small K) gives few
programs, each looping over all of L; splitting L would need the unsquared partial tiles in memory.

Backward (exact), the gradients w.r.t. â and b̂ (the op layer chains them through the transform):
da = 2g·b(bᵀa) = 2g·(bbᵀ)a, db = 2g·a(aᵀb) = 2g·(aaᵀ)b, and 4g·a(aᵀa) when b is a.
`_sq_frobenius_bwd_matrix_kernel` materialises the route's matrix W once in fp32 (C = aᵀb, K x K, for
"inner"; one Gram, R x R, for "outer": bbᵀ for da, then aaᵀ in the same buffer for db), and
`_sq_frobenius_bwd_grad_kernel` is the GEMM da = scale·b·Cᵀ, db = scale·a·C ("inner", W on the right)
or da = scale·(bbᵀ)·a, db = scale·(aaᵀ)·b ("outer", W on the left), scale = coef·grad read on the
device (no host sync). For bf16/fp16 inputs the fp32 W tile is rounded to the input dtype before the
tensor-core dot (see `_sq_frobenius_bwd_grad_kernel` for why that error is acceptable); fp16 first divides W
by max|W| (a device scalar) so that Gram entries past 65504 cannot overflow. The gradient GEMM's
other operand (an input) is transformed in its loads like the forward's.

Launchers allocate outputs, take strides, and launch on the current stream.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl._common import device_ctx
from fastssl.kernels.triton._utils import autotune, device_smem_limit, mm, round_to

#: fp32 inputs must match an fp32 reference to ~1e-5, so their dots run in full fp32 (CUDA cores).
FP32_DOT_PRECISION = "ieee"


#: Tile ordering of the full (non-symmetric) grids: GROUP row blocks share column blocks in L2.
GROUP: tl.constexpr = tl.constexpr(8)


def _tile_configs(shapes):
    return [
        triton.Config({"BLOCK": bm, "BLOCK_L": bl}, num_warps=w, num_stages=s) for bm, bl, w, s in shapes
    ]


def _gemm_configs(shapes):
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_L": bl}, num_warps=w, num_stages=s)
        for bp, bq, bl, w, s in shapes
    ]


# (BLOCK, BLOCK_L, num_warps, num_stages): square output tiles (the symmetric grids need them), BLOCK_L
# the chunk of the contraction axis per tl.dot. 64-row tiles keep wgmma (a warpgroup needs 64 rows)
# and give 4x the programs of 128 for small M.
FWD_CONFIGS = _tile_configs(
    [(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 5)]
)
MATRIX_CONFIGS = _tile_configs([(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3)])
# (BLOCK_P, BLOCK_Q, BLOCK_L, num_warps, num_stages) of the gradient GEMM (one operand fp32).
GRAD_CONFIGS = _gemm_configs(
    [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3)]
)
CONFIGS = {"fwd": FWD_CONFIGS, "matrix": MATRIX_CONFIGS, "grad": GRAD_CONFIGS}
#: Under the interpreter: small tiles, so that the odd test sizes hit several tiles and every mask.
INTERPRET_TILE_CONFIG = triton.Config({"BLOCK": 16, "BLOCK_L": 16}, num_warps=4, num_stages=1)
INTERPRET_GEMM_CONFIG = triton.Config({"BLOCK_P": 16, "BLOCK_Q": 16, "BLOCK_L": 16}, num_warps=4, num_stages=1)
#: fp32 dots run on CUDA cores (FP32_DOT_PRECISION = "ieee"): big tiles buy nothing there and compile
#: slowly, so fp32 keeps output tiles of at most this many elements.
FP32_MAX_TILE = 64 * 64
#: fp32 accumulator registers per thread above which a config would spill (two 128 x 128 Gram tiles
#: on 8 warps would need 128).
MAX_ACC_REGS = 64


def transform_l_params(kind: str, flags: dict) -> int:
    """How many fp32 parameter vectors (shifts, scales) kernel `kind` streams along L with its operands,
    given its constexpr flags: the transform's K axis is L on the outer route of "fwd" and "matrix"
    (TRANSFORM_ON_L; one operand per dot there, the Gram pair's two loops one after the other) and
    when W is on the right in "grad" (the inner route). Elsewhere the tile's parameters load once."""
    if kind == "grad":
        return 0 if flags.get("W_LEFT") else int(bool(flags.get("HAS_SHIFT"))) + int(bool(flags.get("HAS_SCALE")))
    if not flags.get("TRANSFORM_ON_L"):
        return 0
    x = int(bool(flags.get("HAS_X_SHIFT"))) + int(bool(flags.get("HAS_X_SCALE")))
    y = int(bool(flags.get("HAS_Y_SHIFT"))) + int(bool(flags.get("HAS_Y_SCALE")))
    return max(x, y) if flags.get("TRIANGLE") else x + y


def smem_estimate(kind: str, block_p: int, block_q: int, block_l: int, itemsize: int, stages: int,
                  w_left: bool = False, l_params: int = 0) -> int:
    """Upper estimate of the shared memory (bytes) of one program; the pruning relies on it.

    The pipelined loop holds `stages` copies of both operand chunks (exact for "fwd" and "matrix" on
    sm_90 with sizes that are multiples of 16; sm_80 keeps one stage fewer). "matrix" stores its
    fp32 tile (and its mirror) through a layout conversion that may use a BLOCK² fp32 scratch once
    the loop's buffers are dead. "grad" streams its fp32 W operand at 4 bytes plus one rounded copy
    (the compiled kernels keep one stage fewer: their loads pass through registers). The per-column
    transform keeps those totals (its operands are staged one stage fewer, plus one transformed copy),
    but the `l_params` parameter vectors it streams along L (`transform_l_params`) are staged too, each
    up to once per operand layout: 2·4·BLOCK_L bytes per vector and stage. Checked against the
    compiled kernels in tests/gpu/test_triton_aot.py.
    """
    params = 8 * stages * block_l * l_params
    if kind in ("fwd", "matrix"):
        est = itemsize * stages * block_l * (block_p + block_q) + params
        if kind == "matrix":
            est = max(est, 4 * block_p * block_q)
        return est
    w_rows, z_rows = (block_p, block_q) if w_left else (block_q, block_p)
    est = stages * block_l * (4 * w_rows + itemsize * z_rows) + params
    if itemsize < 4:
        est += itemsize * block_l * w_rows
    return max(est, 4 * block_p * block_q)


def _shape(kind, c):
    if kind == "grad":
        return c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_L"]
    return c.kwargs["BLOCK"], c.kwargs["BLOCK"], c.kwargs["BLOCK_L"]


def candidate_configs(kind: str, itemsize: int, smem_limit: int, gram_pair: bool = False,
                      w_left: bool = False, l_params: int = 0) -> list:
    """The configs of kernel `kind` ("fwd", "matrix", "grad") that autotuning may pick."""

    def keep(c):
        bp, bq, bl = _shape(kind, c)
        accs = 2 if gram_pair else 1
        return (
            (itemsize < 4 or bp * bq <= FP32_MAX_TILE)
            and accs * bp * bq <= MAX_ACC_REGS * 32 * c.num_warps
            and smem_estimate(kind, bp, bq, bl, itemsize, c.num_stages, w_left, l_params) <= smem_limit
        )

    smallest = min(CONFIGS[kind], key=lambda c: (_shape(kind, c)[0] * _shape(kind, c)[1], c.num_stages))
    return [c for c in CONFIGS[kind] if keep(c)] or [smallest]



def _prune(kind):
    def prune(configs, named_args, **kwargs):
        x = named_args["OUT" if kind == "grad" else "Y"]  # has the input dtype
        return candidate_configs(kind, x.element_size(), device_smem_limit(x.device.index or 0),
                                 bool(kwargs.get("GRAM_PAIR", False)), bool(kwargs.get("W_LEFT", False)),
                                 transform_l_params(kind, kwargs))

    return prune


# Sizes keep their %16 specialisation: a unit-stride axis is masked by its size (inner route: M = K;
# outer route: L = K), and only a size known to be a multiple of 16 lets those masked loads vectorise
# into the cp.async copies that pipelining needs (an odd size compiles an unpipelined variant).
_NO_SPECIALIZE_TILE = ["M_BIN", "L_BIN"]
_NO_SPECIALIZE_FWD = [*_NO_SPECIALIZE_TILE, "N_PART"]
_NO_SPECIALIZE_GEMM = ["P_BIN", "Q_BIN", "L_BIN", "coef"]
# The transform's flags are autotuning keys: the parameters streamed along L take shared memory (the
# pruning counts them). Without a transform they are all False, so the tuning is what it was.
_TRANSFORM_KEY = ["TRANSFORM_ON_L", "HAS_X_SHIFT", "HAS_X_SCALE", "HAS_Y_SHIFT", "HAS_Y_SCALE"]


# ---------------------------------------------------------------------------------------------------
# tl helpers


@triton.jit
def _tile_coords(pid, M, TRIANGLE: tl.constexpr, BLOCK: tl.constexpr):
    """(i, j) tile indices of program `pid` over an M x M product; i ≤ j only when TRIANGLE.

    TRIANGLE: column-major upper triangle, pid = j(j+1)/2 + i, j from an fp32 sqrt corrected by one
    step either way (the sqrt is off by < 1 while j < 2^24, i.e. M < 2^24·BLOCK). Otherwise grouped
    ordering (GROUP row blocks walk the column blocks together), as in the Triton matmul tutorial,
    for L2 reuse.
    """
    if TRIANGLE:
        j = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int64)
        j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
        j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
        i = pid - j * (j + 1) // 2
    else:
        n = tl.cdiv(M, BLOCK)
        width = GROUP * n
        first = (pid // width) * GROUP
        size = tl.minimum(n - first, GROUP)
        i = first + (pid % width) % size
        j = (pid % width) // size
    return i, j


@triton.jit
def _col_params(SHIFT, SCALE, idx, mask, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """fp32 vectors (shift, scale) of the K columns `idx` (masked lanes read 0 and 1); absent ones stay
    the scalars 0.0 and 1.0, which `_transform` never reads."""
    shift = 0.0
    scale = 1.0
    if HAS_SHIFT:
        shift = tl.load(SHIFT + idx, mask=mask, other=0.0)
    if HAS_SCALE:
        scale = tl.load(SCALE + idx, mask=mask, other=1.0)
    return shift, scale


@triton.jit
def _transform(x, shift, scale, mask, AXIS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """x̂ = round_to(x.dtype, (x − shift)·scale) in fp32, the masked lanes kept at zero.

    shift, scale: vectors along x's axis AXIS (the K axis of the tile); for a Gram (X̂ is Ŷ) the
    callers pass one set of pointers, so both operands use the same chunk of parameters.
    Subtract, then multiply, then round to nearest even: the losses reproduce these bits on the host.
    The masked lanes loaded as 0 would become −shift·scale; zeroing them keeps padding out of the dots.
    Without HAS_SHIFT and HAS_SCALE x passes untouched (no code).
    """
    if HAS_SHIFT or HAS_SCALE:
        v = x.to(tl.float32)
        if HAS_SHIFT:
            v = v - (shift[:, None] if AXIS == 0 else shift[None, :])
        if HAS_SCALE:
            v = v * (scale[:, None] if AXIS == 0 else scale[None, :])
        x = round_to(tl.where(mask, v, 0.0), x.dtype)  # fp32 -> fp32 for fp32 inputs: a no-op
    return x


@triton.jit
def _xty_tile(X, Y, XSH, XSC, YSH, YSC, rows, cols, M, L, stride_xl, stride_xm, stride_yl, stride_ym,
              HAS_X_SHIFT: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_Y_SHIFT: tl.constexpr,
              HAS_Y_SCALE: tl.constexpr, TRANSFORM_ON_L: tl.constexpr,
              FP32_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_L: tl.constexpr):
    """(BLOCK, BLOCK) fp32 tile (X̂ᵀŶ)[rows, cols] for X, Y (L, M), looping over L in BLOCK_L chunks.

    X̂ = (X − XSH)·XSC per K column (Ŷ likewise), applied to each loaded chunk right after its load:
    K is the M axis when not TRANSFORM_ON_L ("inner": the tile's parameters, loaded once) and the L
    axis when TRANSFORM_ON_L ("outer": one chunk of parameters per chunk of L).
    """
    row_mask = rows < M
    col_mask = cols < M
    if not TRANSFORM_ON_L:
        xsh, xsc = _col_params(XSH, XSC, rows, row_mask, HAS_X_SHIFT, HAS_X_SCALE)
        ysh, ysc = _col_params(YSH, YSC, cols, col_mask, HAS_Y_SHIFT, HAS_Y_SCALE)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        l_mask = ls < L
        x_mask = row_mask[:, None] & l_mask[None, :]
        xt = tl.load(X + rows[:, None] * stride_xm + ls[None, :] * stride_xl, mask=x_mask, other=0.0)
        y_mask = l_mask[:, None] & col_mask[None, :]
        y = tl.load(Y + ls[:, None] * stride_yl + cols[None, :] * stride_ym, mask=y_mask, other=0.0)
        if TRANSFORM_ON_L:
            xsh_l, xsc_l = _col_params(XSH, XSC, ls, l_mask, HAS_X_SHIFT, HAS_X_SCALE)
            ysh_l, ysc_l = _col_params(YSH, YSC, ls, l_mask, HAS_Y_SHIFT, HAS_Y_SCALE)
            xt = _transform(xt, xsh_l, xsc_l, x_mask, 1, HAS_X_SHIFT, HAS_X_SCALE)
            y = _transform(y, ysh_l, ysc_l, y_mask, 0, HAS_Y_SHIFT, HAS_Y_SCALE)
        else:
            xt = _transform(xt, xsh, xsc, x_mask, 0, HAS_X_SHIFT, HAS_X_SCALE)
            y = _transform(y, ysh, ysc, y_mask, 1, HAS_Y_SHIFT, HAS_Y_SCALE)
        acc = mm(xt, y, acc, FP32_PRECISION)
    return acc


# ---------------------------------------------------------------------------------------------------
# forward


@autotune(FWD_CONFIGS, INTERPRET_TILE_CONFIG, key=["M_BIN", "L_BIN", "TRIANGLE", "GRAM_PAIR", *_TRANSFORM_KEY],
          prune=_prune("fwd"))  # fmt: skip
@triton.jit(do_not_specialize=_NO_SPECIALIZE_FWD)
def _sq_frobenius_fwd_kernel(
    X, Y, XSH, XSC, YSH, YSC, PART,
    M, L, N_PART,
    stride_xl, stride_xm, stride_yl, stride_ym,
    M_BIN, L_BIN,
    TRIANGLE: tl.constexpr, GRAM_PAIR: tl.constexpr,
    HAS_X_SHIFT: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_Y_SHIFT: tl.constexpr, HAS_Y_SCALE: tl.constexpr,
    TRANSFORM_ON_L: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """One fp32 partial of ‖X̂ᵀŶ‖²_F (or of ⟨X̂ᵀX̂, ŶᵀŶ⟩_F if GRAM_PAIR) per (BLOCK, BLOCK) output tile.

    X, Y are (L, M); X̂ = round_to(X.dtype, (X − XSH)·XSC) per K column (the M axis, or the L axis if
    TRANSFORM_ON_L), each factor only if its HAS_* flag is set, applied to every chunk right after its
    load (Ŷ likewise with YSH, YSC). The program computes its tile T = (X̂ᵀŶ)[I, J] (GRAM_PAIR:
    G = (X̂ᵀX̂)[I, J] and H = (ŶᵀŶ)[I, J], one after the other) with BLOCK_L-chunked tl.dot into fp32
    accumulators, and stores w·Σ T² (GRAM_PAIR: w·Σ G∘H) at PART[pid], w = 2 for off-diagonal tiles of
    a TRIANGLE grid (the product is symmetric: X̂ is Ŷ, or a Gram pair), else 1. Masked rows and
    columns are zeros (after the transform too) and add nothing. PART has N_PART ≥ grid slots (the
    launcher sizes it for the config with the most tiles); program pid also zeroes the slots
    pid + k·grid past the grid, so that every launch writes every slot and the sum of all of PART
    is the value whatever config ran. Nothing else is stored; the backward recomputes. M_BIN and
    L_BIN are only autotuning keys.
    """
    pid = tl.program_id(0).to(tl.int64)
    i, j = _tile_coords(pid, M, TRIANGLE, BLOCK)
    rows = i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cols = j * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    if GRAM_PAIR:
        g = _xty_tile(X, X, XSH, XSC, XSH, XSC, rows, cols, M, L, stride_xl, stride_xm, stride_xl, stride_xm,
                      HAS_X_SHIFT, HAS_X_SCALE, HAS_X_SHIFT, HAS_X_SCALE, TRANSFORM_ON_L,
                      FP32_PRECISION, BLOCK, BLOCK_L)
        h = _xty_tile(Y, Y, YSH, YSC, YSH, YSC, rows, cols, M, L, stride_yl, stride_ym, stride_yl, stride_ym,
                      HAS_Y_SHIFT, HAS_Y_SCALE, HAS_Y_SHIFT, HAS_Y_SCALE, TRANSFORM_ON_L,
                      FP32_PRECISION, BLOCK, BLOCK_L)
        part = tl.sum(tl.sum(g * h, axis=1), axis=0)
    else:
        if TRIANGLE:  # X̂ is Ŷ: one set of parameters, so each chunk of them is loaded once
            t = _xty_tile(X, Y, XSH, XSC, XSH, XSC, rows, cols, M, L, stride_xl, stride_xm, stride_yl, stride_ym,
                          HAS_X_SHIFT, HAS_X_SCALE, HAS_X_SHIFT, HAS_X_SCALE, TRANSFORM_ON_L,
                          FP32_PRECISION, BLOCK, BLOCK_L)
        else:
            t = _xty_tile(X, Y, XSH, XSC, YSH, YSC, rows, cols, M, L, stride_xl, stride_xm, stride_yl, stride_ym,
                          HAS_X_SHIFT, HAS_X_SCALE, HAS_Y_SHIFT, HAS_Y_SCALE, TRANSFORM_ON_L,
                          FP32_PRECISION, BLOCK, BLOCK_L)
        part = tl.sum(tl.sum(t * t, axis=1), axis=0)
    if TRIANGLE:
        part = tl.where(i == j, part, 2.0 * part)
    tl.store(PART + pid, part)
    n_prog = tl.num_programs(0).to(tl.int64)
    for slot in range(pid + n_prog, N_PART, n_prog):
        tl.store(PART + slot, 0.0)


# ---------------------------------------------------------------------------------------------------
# backward


@autotune(MATRIX_CONFIGS, INTERPRET_TILE_CONFIG, key=["M_BIN", "L_BIN", "TRIANGLE", *_TRANSFORM_KEY],
          prune=_prune("matrix"))  # fmt: skip
@triton.jit(do_not_specialize=_NO_SPECIALIZE_TILE)
def _sq_frobenius_bwd_matrix_kernel(
    X, Y, XSH, XSC, YSH, YSC, W,
    M, L,
    stride_xl, stride_xm, stride_yl, stride_ym, stride_wm,
    M_BIN, L_BIN,
    TRIANGLE: tl.constexpr,
    HAS_X_SHIFT: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_Y_SHIFT: tl.constexpr, HAS_Y_SCALE: tl.constexpr,
    TRANSFORM_ON_L: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """W = X̂ᵀŶ (M x M, fp32, row stride stride_wm) for X, Y (L, M): the backward's one matrix.

    X̂, Ŷ: the per-K-column transform of the forward kernel (same flags, same rounding), applied to
    each loaded chunk. One (BLOCK, BLOCK) tile per program, BLOCK_L-chunked tl.dot with fp32
    accumulation (exact products for bf16/fp16). TRIANGLE (X̂ is Ŷ: a Gram, or âᵀâ) runs the tiles
    i ≤ j and stores each off-diagonal tile twice, at (i, j) and transposed at (j, i).
    """
    pid = tl.program_id(0).to(tl.int64)
    i, j = _tile_coords(pid, M, TRIANGLE, BLOCK)
    rows = i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cols = j * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    if TRIANGLE:  # X̂ is Ŷ: one set of parameters, so each chunk of them is loaded once
        t = _xty_tile(X, Y, XSH, XSC, XSH, XSC, rows, cols, M, L, stride_xl, stride_xm, stride_yl, stride_ym,
                      HAS_X_SHIFT, HAS_X_SCALE, HAS_X_SHIFT, HAS_X_SCALE, TRANSFORM_ON_L,
                      FP32_PRECISION, BLOCK, BLOCK_L)
    else:
        t = _xty_tile(X, Y, XSH, XSC, YSH, YSC, rows, cols, M, L, stride_xl, stride_xm, stride_yl, stride_ym,
                      HAS_X_SHIFT, HAS_X_SCALE, HAS_Y_SHIFT, HAS_Y_SCALE, TRANSFORM_ON_L,
                      FP32_PRECISION, BLOCK, BLOCK_L)
    mask = (rows < M)[:, None] & (cols < M)[None, :]
    tl.store(W + rows[:, None] * stride_wm + cols[None, :], t, mask=mask)
    if TRIANGLE:
        tl.store(W + cols[None, :] * stride_wm + rows[:, None], t, mask=mask & (i != j))


@autotune(GRAD_CONFIGS, INTERPRET_GEMM_CONFIG,
          key=["P_BIN", "Q_BIN", "L_BIN", "W_LEFT", "SCALE_W", "HAS_SHIFT", "HAS_SCALE"], prune=_prune("grad"))
@triton.jit(do_not_specialize=_NO_SPECIALIZE_GEMM)
def _sq_frobenius_bwd_grad_kernel(
    X, Y, SHIFT, SCALE, GRAD, WMAX, OUT,
    P, Q, L,
    stride_xp, stride_xl, stride_yl, stride_yq, stride_op,
    coef, P_BIN, Q_BIN, L_BIN,
    W_LEFT: tl.constexpr, SCALE_W: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """OUT = coef·grad·(X @ Y) (P x Q, OUT's dtype, unit column stride) for X (P, L), Y (L, Q).

    One operand is the fp32 matrix W from the matrix kernel (X if W_LEFT, else Y; any strides, so
    Wᵀ is a view), the other an input Z (R, K) in its own dtype, used as Ẑ = round_to(Z.dtype,
    (Z − SHIFT)·SCALE) per K column (each factor only if its HAS_* flag is set) right after each load:
    K is Y's Q axis if W_LEFT ("outer": the tile's parameters, loaded once), else X's L axis ("inner":
    one chunk per chunk of L). One (BLOCK_P, BLOCK_Q) tile per program in grouped order,
    BLOCK_L-chunked tl.dot into an fp32 accumulator, scaled once at the end by coef·grad (grad a
    0-dim device tensor).

    The W tile is rounded to the input dtype (tensor cores), as `mm_weights` does: W's 2^-9 / 2^-12
    rounding averages out over L next to the output's own rounding, which keeps the gradients within
    the accuracy rule of docs/design.md (at most 2x the torch backend's error; the measured ratio is
    in benchmarks/RESULTS.md, "Measurements behind design choices"). Keeping W in fp32 would upcast
    the other operand to CUDA-core fp32 dots, an order of magnitude slower. SCALE_W (fp16) divides
    W by WMAX = max|W| before rounding, so that entries past fp16's 65504 (Grams of long rows) cannot
    overflow; the factor rides on the final scale. fp32 inputs keep both operands fp32 ("ieee").
    """
    pid = tl.program_id(0).to(tl.int64)
    n_p = tl.cdiv(P, BLOCK_P)
    n_q = tl.cdiv(Q, BLOCK_Q)
    width = GROUP * n_q
    first = (pid // width) * GROUP
    size = tl.minimum(n_p - first, GROUP)
    pid_p = first + (pid % width) % size
    pid_q = (pid % width) // size
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    cols = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    row_mask = rows < P
    col_mask = cols < Q

    scale = coef * tl.load(GRAD).to(tl.float32)
    w_inv = 1.0
    if SCALE_W:
        w_max = tl.load(WMAX).to(tl.float32)
        w_inv = tl.where(w_max > 0.0, 1.0 / tl.where(w_max > 0.0, w_max, 1.0), 0.0)
        scale = scale * w_max
    if W_LEFT:
        z_shift, z_scale = _col_params(SHIFT, SCALE, cols, col_mask, HAS_SHIFT, HAS_SCALE)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        l_mask = ls < L
        x_mask = row_mask[:, None] & l_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xp + ls[None, :] * stride_xl, mask=x_mask, other=0.0)
        y_mask = l_mask[:, None] & col_mask[None, :]
        y = tl.load(Y + ls[:, None] * stride_yl + cols[None, :] * stride_yq, mask=y_mask, other=0.0)
        if W_LEFT:
            if SCALE_W:
                x = x * w_inv
            x = round_to(x, OUT.dtype.element_ty)  # fp32 -> fp32 for fp32 inputs: a no-op
            y = _transform(y, z_shift, z_scale, y_mask, 1, HAS_SHIFT, HAS_SCALE)
        else:
            if SCALE_W:
                y = y * w_inv
            y = round_to(y, OUT.dtype.element_ty)
            z_shift_l, z_scale_l = _col_params(SHIFT, SCALE, ls, l_mask, HAS_SHIFT, HAS_SCALE)
            x = _transform(x, z_shift_l, z_scale_l, x_mask, 1, HAS_SHIFT, HAS_SCALE)
        acc = mm(x, y, acc, FP32_PRECISION)
    tl.store(OUT + rows[:, None] * stride_op + cols[None, :], round_to(acc * scale, OUT.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers


def _bin(n: int) -> int:
    # Autotuning key: powers of two between 64 and 16384, so varying batch sizes reuse a tuned config.
    return min(max(triton.next_power_of_2(max(n, 1)), 64), 16384)


def _l_bin(n: int) -> int:
    # The contraction length barely moves the best tile; three coarse classes.
    return 0 if n <= 1024 else (1 if n <= 16384 else 2)


def _n_tiles(m: int, block: int, triangle: bool) -> int:
    t = triton.cdiv(m, block)
    return t * (t + 1) // 2 if triangle else t * t


def _operands(a: Tensor, b: Optional[Tensor], route: str) -> tuple[Tensor, Tensor]:
    """X, Y (L, M) views of the generic product: (a, b) for "inner", (aᵀ, bᵀ) for "outer"; no copies."""
    x = a if route == "inner" else a.t()
    y = x if b is None else (b if route == "inner" else b.t())
    return x, y


def _check_params(a: Tensor, b: Optional[Tensor], params: tuple) -> None:
    """Shifts and scales: None or contiguous fp32 (K,) on a's device; none for b when b is None."""
    k = a.shape[1]
    names = ("a_shift", "a_scale", "b_shift", "b_scale")
    for name, t in zip(names, params):
        if t is None:
            continue
        if b is None and name[0] == "b":
            raise ValueError(f"{name} given but b is None (b̂ is â)")
        if t.dtype != torch.float32 or t.shape != (k,) or not t.is_contiguous() or t.device != a.device:
            raise ValueError(
                f"{name} must be a contiguous float32 ({k},) tensor on {a.device}, got "
                f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}"
            )


def _flags(prefix: str, shift: Optional[Tensor], scale: Optional[Tensor]) -> dict:
    return {f"HAS_{prefix}SHIFT": shift is not None, f"HAS_{prefix}SCALE": scale is not None}


def sq_frobenius_forward(a: Tensor, b: Optional[Tensor], a_shift: Optional[Tensor], a_scale: Optional[Tensor],
                         b_shift: Optional[Tensor], b_scale: Optional[Tensor], route: str) -> Tensor:
    """‖âᵀb̂‖²_F (b None: b̂ is â) as a 0-dim fp32 tensor. a, b: (R, K), any strides.

    â = round_to(a.dtype, (a − a_shift)·a_scale) per column in fp32 (a missing shift is 0, a missing
    scale 1), b̂ likewise; shifts and scales are None or contiguous fp32 (K,), applied in the tile loads.
    """
    _check_params(a, b, (a_shift, a_scale, b_shift, b_scale))
    x, y = _operands(a, b, route)
    l, m = x.shape
    if l == 0 or m == 0:
        return torch.zeros((), dtype=torch.float32, device=a.device)
    gram_pair = route == "outer" and b is not None
    triangle = b is None or gram_pair
    if b is None:  # Ŷ is X̂
        b_shift, b_scale = a_shift, a_scale
    flags = {**_flags("X_", a_shift, a_scale), **_flags("Y_", b_shift, b_scale)}
    part = _partials(m, triangle, a.device)
    grid = lambda META: (_n_tiles(m, META["BLOCK"], triangle),)  # noqa: E731
    with device_ctx(a):
        _sq_frobenius_fwd_kernel[grid](
            x, y, a_shift, a_scale, b_shift, b_scale, part,
            m, l, part.numel(),
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            _bin(m), _l_bin(l),
            TRIANGLE=triangle, GRAM_PAIR=gram_pair, **flags, TRANSFORM_ON_L=route == "outer" and any(flags.values()),
            FP32_PRECISION=FP32_DOT_PRECISION,
        )  # fmt: skip
    # The kernel writes every slot (zeros past its own grid), so the whole buffer sums to the value
    # whatever config the autotuner ran: no tile count is read back from the autotuner's state.
    return part.sum()


def _partials(m: int, triangle: bool, device: torch.device) -> Tensor:
    """The forward's buffer of partials: one fp32 slot per tile of the config with the most tiles
    (the smallest BLOCK of the kernel's configs), uninitialised (the kernel writes every slot)."""
    smallest = min(c.kwargs["BLOCK"] for c in _sq_frobenius_fwd_kernel.configs)
    return torch.empty(_n_tiles(m, smallest, triangle), dtype=torch.float32, device=device)


def _matrix(x: Tensor, y: Tensor, x_params: tuple, y_params: tuple, on_l: bool, w: Tensor) -> Tensor:
    """w (M, M) fp32 ← x̂ᵀŷ for x, y (L, M) with their (shift, scale); y is x means symmetric (x_params
    must then be y_params: triangle grid). on_l: the transform's K axis is L (outer route)."""
    l, m = x.shape
    triangle = y is x
    flags = {**_flags("X_", *x_params), **_flags("Y_", *y_params)}
    _sq_frobenius_bwd_matrix_kernel[lambda META: (_n_tiles(m, META["BLOCK"], triangle),)](
        x, y, *x_params, *y_params, w,
        m, l,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), w.stride(0),
        _bin(m), _l_bin(l),
        TRIANGLE=triangle, **flags, TRANSFORM_ON_L=on_l and any(flags.values()), FP32_PRECISION=FP32_DOT_PRECISION,
    )  # fmt: skip
    return w


def _grad(x: Tensor, y: Tensor, w_left: bool, z_params: tuple, grad: Tensor, coef: float, out: Tensor) -> Tensor:
    """out (P, Q) ← coef·grad·(x @ y), one of x, y the fp32 matrix (x if w_left), the other an input
    transformed with z_params = (shift, scale) along its K axis."""
    p, l = x.shape
    q = y.shape[1]
    w = x if w_left else y
    scale_w = out.dtype == torch.float16
    # max|W| as a device scalar (no sync, and a reduction: no |W| temporary beside the one matrix);
    # only fp16 reads it (its range is the only one W can leave).
    w_max = torch.linalg.vector_norm(w, float("inf")) if scale_w else grad
    grid = lambda META: (triton.cdiv(p, META["BLOCK_P"]) * triton.cdiv(q, META["BLOCK_Q"]),)  # noqa: E731
    _sq_frobenius_bwd_grad_kernel[grid](
        x, y, *z_params, grad, w_max, out,
        p, q, l,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0),
        coef, _bin(p), _bin(q), _l_bin(l),
        W_LEFT=w_left, SCALE_W=scale_w, **_flags("", *z_params), FP32_PRECISION=FP32_DOT_PRECISION,
    )  # fmt: skip
    return out


def sq_frobenius_backward(a: Tensor, b: Optional[Tensor], a_shift: Optional[Tensor], a_scale: Optional[Tensor],
                          b_shift: Optional[Tensor], b_scale: Optional[Tensor], grad: Tensor,
                          route: str) -> tuple[Tensor, Tensor]:
    """(dâ, db̂) of grad·‖âᵀb̂‖²_F in the input dtypes; b None: (dâ with both roles, an empty db̂).

    The gradients are with respect to the transformed operands â, b̂ (see `sq_frobenius_forward`);
    the op layer chains them through the transform. Materialises one fp32 matrix: C = âᵀb̂ (K x K)
    for "inner", one R x R Gram at a time for "outer"; â and b̂ exist only in the kernels' tiles.
    """
    _check_params(a, b, (a_shift, a_scale, b_shift, b_scale))
    same = b is None
    r, k = a.shape
    da = torch.empty((r, k), dtype=a.dtype, device=a.device)
    db = a.new_empty(0) if same else torch.empty(b.shape, dtype=b.dtype, device=b.device)
    if r == 0 or k == 0:
        return da.zero_(), db.zero_()
    if grad.device != a.device:
        grad = grad.to(a.device)
    coef = 4.0 if same else 2.0
    pa = (a_shift, a_scale)
    pb = (b_shift, b_scale)
    with device_ctx(a):
        if route == "inner":
            # C = âᵀb̂; dâ = coef·g·b̂·Cᵀ, db̂ = coef·g·â·C (b̂ is â: C symmetric, dâ = coef·g·â·C).
            c = torch.empty((k, k), dtype=torch.float32, device=a.device)
            if same:
                _grad(a, _matrix(a, a, pa, pa, False, c), False, pa, grad, coef, da)
            else:
                _matrix(a, b, pa, pb, False, c)
                _grad(b, c.t(), False, pb, grad, coef, da)
                _grad(a, c, False, pa, grad, coef, db)
        else:
            # dâ = coef·g·(b̂b̂ᵀ)·â, then db̂ = coef·g·(ââᵀ)·b̂ with ââᵀ in the same buffer (stream order).
            g = torch.empty((r, r), dtype=torch.float32, device=a.device)
            at = a.t()
            if same:
                _grad(_matrix(at, at, pa, pa, True, g), a, True, pa, grad, coef, da)
            else:
                bt = b.t()
                _grad(_matrix(bt, bt, pb, pb, True, g), a, True, pa, grad, coef, da)
                _grad(_matrix(at, at, pa, pa, True, g), b, True, pb, grad, coef, db)
    return da, db
