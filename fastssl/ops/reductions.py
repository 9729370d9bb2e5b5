"""Small fused reductions (DESIGN.md, family 3): per-column statistics shared by the Frobenius losses.

`column_mean_var` is one pass over the rows (ATen's var_mean: Welford), in fp32 (fp64 for fp64
inputs), differentiable. Barlow Twins' batch norm asks for the biased variance, VICReg for the
unbiased one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half and fp32 inputs, fp64 for fp64 inputs: the precision every statistic is kept in."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def column_mean_var(z: Tensor, *, unbiased: bool) -> tuple[Tensor, Tensor]:
    """(mean, var) of each column of z (N, D), each (D,), in compute_dtype(z)."""
    var, mean = torch.var_mean(z.to(compute_dtype(z)), dim=0, correction=1 if unbiased else 0)
    return mean, var
