"""Prototype codes in Triton: the LSE passes of the Sinkhorn-Knopp scaling (SwaV, MSN) and of the
batch-mean prototype probabilities (MSN's regulariser). Same contract as
`fastssl.kernels.torch.prototype_codes`; the math is in fastssl/ops/prototype_codes.py.

No new kernel: an LSE with a per-column offset is the prototype-CE forward kernel
(`fastssl.kernels.triton.prototype_ce._prototype_ce_fwd_kernel`) launched LSE-only (HAS_MEAN off)
with its centre (HAS_CENTER on). Each program owns BLOCK_M rows of x and streams (BLOCK_N, D) tiles
of a through an online max/sum: never a rows x columns matrix. Both directions use it — rows x
against the prototypes a = W, and the prototypes x = W against the rows a (the column LSE of the
Sinkhorn scaling, then each program owns BLOCK_M prototypes and streams the rows).

The regulariser's backward has no Triton kernel yet: it runs the chunked torch kernel on the GPU
tensors (same O(R·K) memory, cuBLAS products).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastssl.kernels.torch import prototype_codes as _torch_codes
from fastssl.kernels.triton.prototype_ce import _row_stats


def prototype_lse(x: Tensor, a: Tensor, center: Optional[Tensor], scale: Tensor) -> Tensor:
    """lse_i = LSE_j scale·(x_i·a_j − center_j), (M,) fp32, for x (M, D), a (J, D) of one dtype."""
    center = None if center is None else center.to(device=x.device, dtype=torch.float32).contiguous()
    return _row_stats(x, a, None, center, scale.to(device=x.device, dtype=torch.float32))[0]


def prototype_mean_probs_forward(x: Tensor, w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(lse (M,), pbar (K,)), fp32: lse_i = LSE_k scale·x_i·w_k, then
    log(M·pbar_k) = LSE_i (scale·w_k·x_i − lse_i), the second pass over tiles of rows per prototype."""
    scale = scale.to(device=x.device, dtype=torch.float32)
    lse = prototype_lse(x, w, None, scale)
    log_total = prototype_lse(w, x, lse / scale, scale)
    return lse, torch.exp(log_total - math.log(max(x.shape[0], 1)))


def prototype_mean_probs_backward(
    x: Tensor, w: Tensor, scale: Tensor, lse: Tensor, grad_pbar: Tensor, needs_dx: bool, needs_dw: bool
) -> tuple[Tensor, Tensor]:
    """The chunked torch kernel on these (GPU) tensors; see its docstring."""
    return _torch_codes.prototype_mean_probs_backward(x, w, scale, lse, grad_pbar, needs_dx, needs_dw)
