"""Pairwise max (nearest neighbour by inner product) in chunked PyTorch: the CPU default and the portable fallback.

A pairwise reduction like fastssl/kernels/torch/pairwise_lse.py with a max (and its argmax) in place
of the log-sum-exp. For rows x (M, D) and columns y (Ny, D), with s_ij = x_i·y_j:

    value_i = max_{j (≠ i if exclude_self)} s_ij,   index_i = the first j that attains it (torch.argmax)

Rows are processed in chunks so that at most ``chunk x Ny`` similarities exist at a time: memory is
O((M + Ny)·D + chunk·Ny), never M x Ny. Only (value, index) are returned; the backward
(fastssl/ops/pairwise_max.py) gathers the selected rows and needs nothing else.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from fastssl._common import compute_dtype

#: Upper bound on the bytes of one chunk of similarities.
_CHUNK_BYTES = int(os.environ.get("FASTSSL_TORCH_CHUNK_BYTES", str(64 * 2**20)))


def pairwise_max_forward(x: Tensor, y: Tensor, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """(value, index), (M,) in fp32 (fp64 for fp64 inputs) and (M,) int64, for x (M, D), y (Ny, D).

    A row whose every column is excluded (Ny = 1 and exclude_self) gets value −inf and index 0.
    """
    acc = compute_dtype(x)
    m, n_y = x.shape[0], y.shape[0]
    # Row-major copies in the compute dtype (O(N·D), once): strided inputs would otherwise make
    # every chunk's product walk memory column by column. x and y share one copy when they are one tensor.
    xc = x.to(acc).contiguous()
    yc = xc if y is x else y.to(acc).contiguous()
    step = max(1, _CHUNK_BYTES // max(1, n_y * torch.finfo(acc).bits // 8))
    values = torch.empty(m, dtype=acc, device=x.device)
    index = torch.empty(m, dtype=torch.long, device=x.device)
    for start in range(0, m, step):
        stop = min(m, start + step)
        sims = xc[start:stop] @ yc.T
        if exclude_self:
            rows = torch.arange(start, min(stop, n_y), device=x.device)
            sims[rows - start, rows] = float("-inf")
        best = sims.argmax(dim=1)  # ties: the first maximum, as documented for torch.argmax
        values[start:stop] = sims.gather(1, best[:, None]).squeeze(1)
        index[start:stop] = best
    return values, index
