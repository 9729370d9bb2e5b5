"""Shared Triton plumbing: the one place that turns config lists into autotuners, and small tl helpers.

Under ``TRITON_INTERPRET=1`` (the CPU tests) a multi-config ``@triton.autotune`` fails ("0 active
drivers"), so every kernel gets its configs through :func:`autotune`, which keeps a single small
config when interpreting. The full lists stay importable for the ahead-of-time compile test.
`mm` is the one tl.dot wrapper: fp32 precision as asked, and a bf16 workaround for the interpreter.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl


from fastssl._common import triton_interpreting as interpreting  # read when a kernel module is imported


def autotune(configs, interpret_config, key, prune=None, reset_to_zero=None):
    """``triton.autotune`` over `configs` on a GPU, over `[interpret_config]` under the interpreter.

    `key` must name bucketed arguments (powers of two, size bins, flags), never raw sizes, so that a
    training run with varying batch sizes does not re-benchmark forever. Tensor dtypes are added to
    the key by Triton itself. `prune(configs, named_args, **kwargs)` drops configs that cannot fit.
    `reset_to_zero` names the buffers a kernel accumulates into with atomics: benchmarking runs the
    kernel once per config, so they are zeroed before each run and after the last.
    """
    if interpreting():
        return triton.autotune(configs=[interpret_config], key=key)
    by = {"early_config_prune": prune} if prune is not None else None
    return triton.autotune(configs=list(configs), key=key, prune_configs_by=by, reset_to_zero=reset_to_zero)


#: Shared memory per block when no device can be asked (sm_80's 163 KiB; sm_90 has 227 KiB).
DEFAULT_SMEM_LIMIT = 163 * 1024


@functools.lru_cache(maxsize=None)
def device_smem_limit(device_index: int) -> int:
    """Max dynamic shared memory per block of CUDA device `device_index`, for autotune pruning."""
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # an unknown driver: fall back to the smallest limit we target
        return DEFAULT_SMEM_LIMIT


@triton.jit
def _mm_device(a, b, acc, FP32_PRECISION: tl.constexpr):
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision=FP32_PRECISION)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _mm_interpreted(a, b, acc, FP32_PRECISION: tl.constexpr):
    # The interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bits (triton 3.6), so
    # upcast first. bf16 x bf16 products are exact in fp32: this is the tensor-core math.
    if a.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _round_device(x, dtype: tl.constexpr):
    return x.to(dtype)


@triton.jit
def _round_interpreted(x, dtype: tl.constexpr):
    # The interpreter truncates fp32 -> bf16 (and its "rtne" mode drops the carry into the exponent),
    # so round to nearest even by hand, as the GPU's cvt.rn does; the final cast is then exact.
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        out = x.to(dtype)
    return out


#: acc + a @ b with fp32 accumulation: tensor cores for bf16/fp16, `FP32_PRECISION` for fp32 inputs.
mm = _mm_interpreted if interpreting() else _mm_device
#: fp32 -> `dtype` rounded to nearest even, on the GPU and in the interpreter alike.
round_to = _round_interpreted if interpreting() else _round_device


@triton.jit
def mm_weights(w, b, acc, FP32_PRECISION: tl.constexpr):
    """acc + w @ b for fp32 weights `w` (softmax probabilities) rounded to b's dtype (tensor cores).

    As in FlashAttention's backward. The rounding (2^-9 relative per weight in bf16) averages out
    over the columns, within the accuracy rule of docs/design.md (the measured ratio is in
    benchmarks/RESULTS.md, "Measurements behind design choices"), so splitting w into hi + lo halves
    (one more MMA per tile) buys nothing.
    """
    return mm(round_to(w, b.dtype), b, acc, FP32_PRECISION)


def row_bin(n: int) -> int:
    # Coarse size classes for the autotuning key: small grids favour small tiles, large ones big tiles.
    return 0 if n <= 4096 else (1 if n <= 32768 else 2)


@triton.jit
def logits_loop(A, B, a_idx, b_idx, a_mask, b_mask, stride_am, stride_ad, stride_bm, stride_bd, D,
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
def rowdot_loop(A, B, a_idx, b_idx, mask, stride_am, stride_ad, stride_bm, stride_bd, D,
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
