"""‖âᵀb̂‖²_F on the `cuda` backend: cuBLAS GEMMs on the small side + csrc/frobenius.cu (docs/design.md, family 2).

Same contract as fastssl/kernels/torch/frobenius.py (the spec): a, b (R, K) under the per-column
transform â = round_to_input_dtype((a − a_shift)·a_scale) (b̂ likewise), routes "inner" (the K x K
product aᵀb) and "outer" (the R x R Grams), gradients w.r.t. â and b̂.

What runs where:
  * csrc `affine_columns` applies the transform in one pass (reading a through its strides) and
    writes â contiguous: in the input dtype for the forward GEMMs, in fp32 for the backward ones.
    â is the size of the input (O(R·K)); no normalised copy outlives the call.
  * the GEMMs are cuBLAS through torch.mm, fp32 accumulation and fp32 output (bf16/fp16 operands use
    ``torch.mm(..., out_dtype=torch.float32)`` where this torch has it, else fp32 operands; fp32
    operands follow torch's TF32 setting, off by default), walked in row chunks so that no product
    chunk holds more than min(R, K)² fp32 entries: the route's matrix is never materialised whole
    when it is the large side, and is at most min(R, K)² when it is the small one.
  * csrc `sum_product` is the forward epilogue: Σ C² (inner) or Σ (ââᵀ)∘(b̂b̂ᵀ) (outer) of each
    chunk, deterministic (fixed two-stage reduction, no atomics), accumulated on the device.
The backward's dâ, db̂ (R, K) are fp32 until the final rounding to the input dtype, as in the torch
backend. No host synchronisation.

On sm_90 GPUs, ``FASTSSL_CUDA_SM90=1`` (the switch of fastssl/kernels/cuda/pairwise_lse.py) runs the
forward of either route on csrc/frobenius_sm90.cu instead of the cuBLAS chunks: one fused kernel (TMA,
wgmma) reduces each 128 x 128 tile of âᵀb̂ (Σ C²) or of the two Grams (Σ G_a·G_b) in registers, so the
route's matrix is never written. It takes bf16/fp16 â, b̂ whose rows TMA can read (K a multiple of 8);
others keep the cuBLAS chunks, and so does the backward. Off by default until a GPU run has verified it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl.kernels.cuda._ext import extension, launcher

_MM_OUT_DTYPE: Optional[bool] = None  # whether torch.mm(..., out_dtype=) works here; probed once


def _check(a: Tensor) -> None:
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"backend='cuda' takes float32, bfloat16 or float16 inputs, got {a.dtype}; "
            "use backend='torch' or 'reference' for float64"
        )
    if a.device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got a on {a.device}")


def _hat(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], fp32: bool) -> Tensor:
    return extension().affine_columns(x, shift, scale, fp32)


def _mm32(u: Tensor, v: Tensor) -> Tensor:
    """u @ v with an fp32 result (u, v in one dtype)."""
    global _MM_OUT_DTYPE
    if u.dtype == torch.float32:
        return u @ v
    if _MM_OUT_DTYPE is None:
        try:
            torch.mm(u[:1], v[:, :1], out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    if _MM_OUT_DTYPE:
        return torch.mm(u, v, out_dtype=torch.float32)
    return u.float() @ v.float()


def _budget(a: Tensor) -> int:
    """Entries one product chunk may hold: min(R, K)² (at least one row of the product)."""
    return min(a.shape) ** 2


def _sum_product(u: Tensor, v: Tensor) -> Tensor:
    return extension().sum_product(u.contiguous(), v.contiguous())


def _fused(ah: Tensor, bh: Optional[Tensor], route: str) -> Optional[Tensor]:
    """‖âᵀb̂‖²_F by the sm_90a kernel of `route` when FASTSSL_CUDA_SM90=1 selects it and it takes â, b̂
    (bh None: b̂ is â); else None."""
    ext = extension()
    forward = launcher(ext, torch.cuda.get_device_capability(ah.device), "sq_frobenius_forward")
    outer = route == "outer"
    if forward is None or not ext.sq_frobenius_sm90_supported(ah, bh, outer):
        return None
    return forward(ah, bh, outer)


def sq_frobenius_forward(a: Tensor, b: Optional[Tensor], a_shift: Optional[Tensor], a_scale: Optional[Tensor],
                         b_shift: Optional[Tensor], b_scale: Optional[Tensor], route: str) -> Tensor:
    """‖âᵀb̂‖²_F (b None: b̂ is â) as a 0-dim fp32 tensor. a, b (R, K); shifts/scales (K,) fp32 or None."""
    _check(a)
    ah = _hat(a, a_shift, a_scale, False)
    bh = ah if b is None else _hat(b, b_shift, b_scale, False)
    fused = _fused(ah, None if b is None else bh, route)
    if fused is not None:
        return fused
    r, k = a.shape
    total = torch.zeros((), dtype=torch.float32, device=a.device)
    if route == "inner":  # rows k0:k1 of âᵀb̂
        step = max(1, _budget(a) // max(1, k))
        for k0 in range(0, k, step):
            c = _mm32(ah[:, k0 : k0 + step].T, bh)
            total = total + _sum_product(c, c)
        return total
    step = max(1, _budget(a) // max(1, 2 * r))  # two Gram chunks live at once
    for r0 in range(0, r, step):
        g_a = _mm32(ah[r0 : r0 + step], ah.T)
        g_b = g_a if b is None else _mm32(bh[r0 : r0 + step], bh.T)
        total = total + _sum_product(g_a, g_b)
    return total


def sq_frobenius_backward(a: Tensor, b: Optional[Tensor], a_shift: Optional[Tensor], a_scale: Optional[Tensor],
                          b_shift: Optional[Tensor], b_scale: Optional[Tensor], grad: Tensor,
                          route: str) -> tuple[Tensor, Tensor]:
    """(dâ, db̂) of grad·‖âᵀb̂‖²_F in the input dtypes: dâ = 2g·b̂(b̂ᵀâ) = 2g·(b̂b̂ᵀ)â, db̂ = 2g·â(âᵀb̂);
    b None: (4g·â(âᵀâ), an empty db̂)."""
    _check(a)
    same = b is None
    a32 = _hat(a, a_shift, a_scale, True)
    b32 = a32 if same else _hat(b, b_shift, b_scale, True)
    coef = grad.to(torch.float32) * (4.0 if same else 2.0)
    r, k = a.shape
    da = torch.empty((r, k), dtype=torch.float32, device=a.device)
    db = None if same else torch.zeros((r, k), dtype=torch.float32, device=a.device)
    if route == "inner":
        step = max(1, _budget(a) // max(1, k))
        for k0 in range(0, k, step):
            c = a32[:, k0 : k0 + step].T @ b32  # rows k0:k1 of âᵀb̂
            da[:, k0 : k0 + step] = b32 @ c.T
            if db is not None:
                db.addmm_(a32[:, k0 : k0 + step], c)
    else:
        step = max(1, _budget(a) // max(1, 2 * r))
        for r0 in range(0, r, step):
            g_a = a32[r0 : r0 + step] @ a32.T  # rows r0:r1 of ââᵀ
            if same:
                da[r0 : r0 + step] = g_a @ a32
            else:
                da[r0 : r0 + step] = (b32[r0 : r0 + step] @ b32.T) @ a32
                db[r0 : r0 + step] = g_a @ b32
    da = (da * coef).to(a.dtype)
    db = a.new_empty(0) if db is None else (db * coef).to(b.dtype)
    return da, db


def column_mean_var(z: Tensor, *, unbiased: bool) -> tuple[Tensor, Tensor]:
    """(mean, var) of each column of z (N, D), each (D,) fp32, in one pass of csrc `column_stats`
    (Welford per thread, Chan's merge; variance biased or unbiased). Not differentiable: a building
    block for callers that only need the statistics."""
    _check(z)
    return extension().column_mean_var(z, 1 if unbiased else 0)
