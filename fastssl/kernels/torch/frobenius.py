"""Squared Frobenius norm of a cross product, ‖âᵀb̂‖²_F, in chunked PyTorch (docs/design.md, kernel family 2).

The operands are a, b (R, K) under an optional per-column transform (the losses' batch norm,
centring or norm clip), applied in fp32 (fp64 for fp64 inputs) and rounded to the input dtype:

    â[r, k] = round_to_input_dtype((a[r, k] − a_shift[k]) · a_scale[k])     (b̂ likewise)

Here the transformed operands are formed once per call (O(R·K), the size of the inputs); the Triton
kernels apply the same formula in their tile loads instead. Below, a and b stand for â and b̂.
For a, b (R, K) the value has two routes (Garrido et al. (2023)'s identity ‖aᵀb‖²_F = ⟨aaᵀ, bbᵀ⟩_F):

    "inner": Σ_kl (aᵀb)_kl²          via the K x K cross product     cost 2·R·K² multiply-adds
    "outer": Σ_rs (aaᵀ)_rs (bbᵀ)_rs  via the two R x R Grams          cost 2·R²·K (R²·K when b is a)

Both walk their matrix in row chunks, so at most ``chunk x K`` (inner) or ``2 x chunk x R`` (outer)
products exist at a time; nothing larger than the inputs is stored beyond one chunk. Gradients of
grad·‖aᵀb‖²:

    da = 2·grad·b(bᵀa)  = 2·grad·(bbᵀ)a        db = 2·grad·a(aᵀb) = 2·grad·(aaᵀ)b
    b is a (one operand in both roles): da = 4·grad·a(aᵀa) = 4·grad·(aaᵀ)a

and the backward recomputes the chunks; it returns the gradients w.r.t. â and b̂ (the op layer
chains them through the transform). Chunks are computed in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from fastssl._common import compute_dtype

#: Upper bound on the bytes of one chunk of the cross product or Gram (the outer route holds two).
_CHUNK_BYTES = int(os.environ.get("FASTSSL_TORCH_CHUNK_BYTES", str(64 * 2**20)))




def _step(cols: int, dtype: torch.dtype) -> int:
    return max(1, _CHUNK_BYTES // max(1, cols * torch.finfo(dtype).bits // 8))


def apply_transform(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """x̂ = (x − shift)·scale per column, in fp32 (fp64 for fp64 x), rounded to x's dtype and back."""
    acc = compute_dtype(x)
    out = x.to(acc)
    if shift is not None:
        out = out - shift
    if scale is not None:
        out = out * scale
    # Half inputs: round as the Triton kernels do before their dots (a no-op for fp32 and fp64).
    return out if x.dtype == acc else out.to(x.dtype).to(acc)


def sq_frobenius_forward(a: Tensor, b: Optional[Tensor], a_shift: Optional[Tensor], a_scale: Optional[Tensor],
                         b_shift: Optional[Tensor], b_scale: Optional[Tensor], route: str) -> Tensor:
    """‖âᵀb̂‖²_F (b None: b̂ is â) as a 0-dim tensor in fp32 (fp64 for fp64 inputs). a, b: (R, K);
    shifts and scales (K,) or None."""
    dt = compute_dtype(a)
    a = apply_transform(a, a_shift, a_scale)
    b = a if b is None else apply_transform(b, b_shift, b_scale)
    total = torch.zeros((), dtype=dt, device=a.device)
    if route == "inner":  # rows k0:k1 of aᵀb
        k = a.shape[1]
        step = _step(k, dt)
        for k0 in range(0, k, step):
            total += (a[:, k0 : k0 + step].T @ b).square().sum()
        return total
    r = a.shape[0]
    step = _step(r, dt)
    for r0 in range(0, r, step):  # rows r0:r1 of aaᵀ and bbᵀ
        g_a = a[r0 : r0 + step] @ a.T
        total += g_a.square().sum() if b is a else (g_a * (b[r0 : r0 + step] @ b.T)).sum()
    return total


def sq_frobenius_backward(a: Tensor, b: Optional[Tensor], a_shift: Optional[Tensor], a_scale: Optional[Tensor],
                          b_shift: Optional[Tensor], b_scale: Optional[Tensor], grad: Tensor,
                          route: str) -> tuple[Tensor, Tensor]:
    """(dâ, db̂) of grad·‖âᵀb̂‖²_F in the input dtypes; b None: (dâ with both roles, an empty db̂)."""
    dt = compute_dtype(a)
    same = b is None
    a32 = apply_transform(a, a_shift, a_scale)
    b32 = a32 if same else apply_transform(b, b_shift, b_scale)
    g = grad.to(dt) * (4.0 if same else 2.0)
    da = torch.empty(a.shape, dtype=dt, device=a.device)
    db = None if same else torch.zeros(b32.shape, dtype=dt, device=a.device)
    if route == "inner":
        k = a.shape[1]
        step = _step(k, dt)
        for k0 in range(0, k, step):
            c = a32[:, k0 : k0 + step].T @ b32  # rows k0:k1 of aᵀb, (chunk, K)
            da[:, k0 : k0 + step] = b32 @ c.T
            if not same:
                db.addmm_(a32[:, k0 : k0 + step], c)
    else:
        r = a.shape[0]
        step = _step(r, dt)
        for r0 in range(0, r, step):
            g_a = a32[r0 : r0 + step] @ a32.T  # rows r0:r1 of aaᵀ, (chunk, R)
            if same:
                da[r0 : r0 + step] = g_a @ a32
            else:
                da[r0 : r0 + step] = (b32[r0 : r0 + step] @ b32.T) @ a32
                db[r0 : r0 + step] = g_a @ b32
    da = (da * g).to(a.dtype)
    db = a.new_empty(0) if same else (db * g).to(b.dtype)
    return da, db
