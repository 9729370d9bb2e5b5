"""SSL diagnostics (Huang et al. 2023; Wang & Isola 2020): alignment, uniformity, class-centre divergence.

Huang et al. (2023) bounds downstream error by two factors that training controls: *alignment* (positive
pairs close: small E‖f(x1) − f(x2)‖²) and *divergence* of the class centres (centres far apart:
small max_{k≠l} μ_kᵀμ_l). Uniformity (Wang & Isola) measures how evenly embeddings spread on the
sphere. All three are O(N·D) in memory here: uniformity is one LSE per row on the pairwise-LSE op,
the divergence reduces per-class means (a C x C matrix for C classes, never N x N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl._validation import check_embeddings
from fastssl.functional import alignment, uniformity
from fastssl._common import compute_dtype

__all__ = ["alignment", "uniformity", "class_center_divergence"]


def class_center_divergence(z: Tensor, labels: Tensor) -> Tensor:
    """max_{k≠l} μ_kᵀμ_l, μ_k the mean of the row-normalised embeddings n(z_i) of class k (Huang et al. 2023).

    Normalising puts the embeddings on the unit sphere, the r = 1 of Huang et al. (2023)'s bound, so the
    value lies in [−1, 1] and compares across losses whose raw scales differ. Lower is better.

    Args: z (N, D); labels (N,) integer class ids with at least two distinct values.
    Returns a 0-dim tensor (fp32; fp64 for fp64 z), differentiable in z.
    """
    check_embeddings("z", z)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D tensor of length N = {z.shape[0]}, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    classes, inverse = torch.unique(labels.to(z.device), return_inverse=True)
    if classes.numel() < 2:
        raise ValueError(f"labels need at least two distinct classes, got {classes.tolist()}")
    zn = F.normalize(z.to(compute_dtype(z)), dim=1)
    c = classes.numel()
    sums = zn.new_zeros(c, zn.shape[1]).index_add_(0, inverse, zn)
    counts = torch.bincount(inverse, minlength=c).to(zn.dtype)
    centres = sums / counts[:, None]
    gram = centres @ centres.T  # (C, C)
    off_diagonal = ~torch.eye(c, dtype=torch.bool, device=z.device)
    return gram[off_diagonal].max()
