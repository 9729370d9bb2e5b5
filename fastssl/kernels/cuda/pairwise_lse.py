"""Pairwise LogSumExp on the hand-written CUDA kernels of csrc/pairwise_lse.cu (docs/design.md, family 1).

Same contract as fastssl/kernels/torch/pairwise_lse.py (the oracle) and the Triton kernels: for rows
x (M, D), columns y (Ny, D), optional bank (K, D), s_ij = scale·x_i·y_j, p(i) = (i + pos_offset) mod Ny,

    lse_i = LSE over {s_i,p(i)} (include_pos) ∪ {s_ij : j ≠ p(i), j ≠ i if exclude_self} (y_negatives)
                     ∪ {scale·x_i·bank_k},      pos_i = s_i,p(i)

and the backward returns (dx, dy) of Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i in the input dtype.
This adapter only normalises arguments (fp32 statistics, the device scalar
max|grad_lse| that keeps fp16 weights out of the subnormals) and calls `fastssl._C`, which checks
shapes, reads strided inputs in place and launches on the current stream. When y is x (SimCLR, DCL)
in bf16/fp16 the backward is one symmetric launch that computes each logit tile once for both dx
and dy (csrc/README.md). Nothing of size M x Ny is allocated; no host synchronisation.

On sm_90 GPUs, ``FASTSSL_CUDA_SM90=1`` runs the forward and the backward (dx and dy, or the symmetric
launch when y is x, each where TMA can read the inputs) on the Hopper kernels of
csrc/pairwise_lse_sm90.cu (TMA, wgmma) instead; on sm_80 and later, ``FASTSSL_CUDA_PIPELINE=1`` runs them
(the symmetric launch too) on csrc/pairwise_lse_pipelined.cu (cp.async ring, ldmatrix, 128-row tiles;
FASTSSL_CUDA_SM90 wins on sm_90).
Both are off by default until a GPU run has verified them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl.kernels import PairwiseLSEFlags
from fastssl.kernels.cuda._ext import extension, launcher


def _check(x: Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"backend='cuda' takes float32, bfloat16 or float16 inputs, got {x.dtype}; "
            "use backend='torch' or 'reference' for float64"
        )
    if x.device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got x on {x.device}")


def _scale32(scale: Tensor, x: Tensor) -> Tensor:
    # Inductor may hand over fp64 scalars: the kernels read one fp32 on the device.
    return scale.detach().to(device=x.device, dtype=torch.float32).reshape(())


def pairwise_lse_forward(
    x: Tensor,
    y: Tensor,
    bank: Optional[Tensor],
    scale: Tensor,
    flags: PairwiseLSEFlags,
) -> tuple[Tensor, Tensor]:
    """Per-row (lse, pos), each (M,) fp32. x (M, D), y (Ny, D), bank (K, D) or None, scale 0-dim."""
    _check(x)
    forward = launcher(extension(), torch.cuda.get_device_capability(x.device), "pairwise_lse_forward")
    return forward(
        x, y, bank, _scale32(scale, x), flags.pos_offset, flags.exclude_self, flags.include_pos, flags.y_negatives
    )


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
    """(dx (M, D), dy (Ny, D)) in the input dtype: with G_ij = grad_lse_i·P_ij + grad_pos_i·[j = p(i)],
    dx_i = scale·(Σ_j G_ij y_j + Σ_k G_ik bank_k), dy_j = scale·Σ_i G_ij x_i.

    The csrc kernels compute both; a gradient the flags do not ask for is dropped, returned (0, D).
    """
    _check(x)
    grad_lse = grad_lse.to(torch.float32).contiguous()
    absmax = grad_lse.abs().amax() if grad_lse.numel() else grad_lse.new_zeros(())
    backward = launcher(extension(), torch.cuda.get_device_capability(x.device), "pairwise_lse_backward")
    dx, dy = backward(
        x, y, bank, _scale32(scale, x), lse.to(torch.float32).contiguous(), grad_lse,
        grad_pos.to(torch.float32).contiguous(), absmax, flags.pos_offset, flags.exclude_self,
        flags.include_pos, flags.y_negatives, y is x,
    )  # fmt: skip
    return (dx if flags.needs_dx else dx.new_empty((0, dx.shape[1]))), (dy if flags.needs_dy else dy.new_empty((0, dy.shape[1])))
