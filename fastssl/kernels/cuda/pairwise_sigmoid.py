"""Pairwise sigmoid (SigLIP, Zhai et al. 2023) on the hand-written CUDA kernels of csrc/pairwise_sigmoid.cu.

Same contract as fastssl/kernels/torch/pairwise_sigmoid.py (the oracle) and the Triton kernels: for
rows x (M, D), columns y (Ny, D), logits ℓ_ij = scale·x_i·y_j + bias and, when has_pos, the positive
column p(i) = (i + pos_offset) mod Ny (label +1, every other pair −1),

    rows_i = Σ_j softplus(−label_ij·ℓ_ij)

in fp32, and the backward's (dx, dy) in the input dtype with per-row (dlogit, dscale) in fp32. This
adapter only normalises arguments (fp32 device scalars, fp32 grad_rows and the device scalar
max|grad_rows| that keeps fp16 weights in range) and calls `fastssl._C`, which checks shapes, reads
strided inputs in place and launches on the current stream. Nothing of size M x Ny is allocated; no
host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl.kernels.cuda._ext import extension
from fastssl.kernels.cuda.pairwise_lse import _check, _scale32


def pairwise_sigmoid_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, pos_offset: int,
                             has_pos: bool) -> Tensor:
    """rows (M,) fp32 for x (M, D), y (Ny, D) (fp32/bf16/fp16 CUDA), scale and bias 0-dim."""
    _check(x)
    return extension().pairwise_sigmoid_forward(x, y, _scale32(scale, x), _scale32(bias, x), pos_offset, has_pos)


def pairwise_sigmoid_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad_rows: Tensor,
                              pos_offset: int, has_pos: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dlogit_rows, dscale_rows) of Σ_i grad_rows_i·rows_i: with G_ij = ∂/∂ℓ_ij,
    dx_i = scale·Σ_j G_ij y_j, dy_j = scale·Σ_i G_ij x_i (input dtype), and per row Σ_j G_ij and
    Σ_j G_ij·x_i·y_j (fp32), whose sums are d bias and d scale."""
    _check(x)
    grad_rows = grad_rows.to(torch.float32).contiguous()
    absmax = grad_rows.abs().amax() if grad_rows.numel() else grad_rows.new_zeros(())
    dx, dy, dlogit, dscale = extension().pairwise_sigmoid_backward(
        x, y, _scale32(scale, x), _scale32(bias, x), grad_rows, absmax, pos_offset, has_pos
    )
    return dx, dy, dlogit, dscale
