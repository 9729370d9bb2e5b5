"""Pairwise max (KoLeo's nearest neighbour, Sablayrolles et al. 2019) on the CUDA kernel of csrc/pairwise_max.cu.

Same contract as fastssl/kernels/torch/pairwise_max.py (the oracle) and the Triton kernel: for rows
x (M, D) and columns y (Ny, D), s_ij = x_i·y_j,

    value_i = max_{j (≠ i if exclude_self)} s_ij,   index_i = the first j attaining it (torch.argmax's rule)

value (M,) fp32 and index (M,) int64; nothing else is kept, and the backward is a row gather in
torch (fastssl/ops/pairwise_max.py). `fastssl._C` checks shapes, reads strided inputs in place and
launches on the current stream.
"""

from __future__ import annotations

from torch import Tensor

from fastssl.kernels.cuda._ext import extension
from fastssl.kernels.cuda.pairwise_lse import _check


def pairwise_max_forward(x: Tensor, y: Tensor, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """(value, index), (M,) fp32 and (M,) int64, for x (M, D), y (Ny, D) in fp32/bf16/fp16 (y may be x)."""
    _check(x)
    return extension().pairwise_max_forward(x, y, bool(exclude_self))
