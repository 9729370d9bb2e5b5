"""ArCL's worst-pair selection in chunked PyTorch (docs/design.md, family 3; Zhao et al. 2023).

For normalised views v (N, m, D), sample i's worst positive is the least similar pair of its views:

    s_i = min_{j<k} v_ij·v_ik,   (j_i, k_i) = the first minimising pair in (j, k) lexicographic order

Samples are processed in chunks so that at most ``chunk·m²`` similarities exist at a time (the
(N, m, m) block of per-sample Gram matrices is never built whole). Only (s, j, k) are returned:
the backward needs the two selected rows, nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl._common import compute_dtype

#: Samples per chunk: 4,096 samples of 16 views hold 4 MiB of fp32 similarities.
_CHUNK_SAMPLES = 4096


def worst_pair_forward(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(s, j, k) for v (N, m, D), m ≥ 2: s (N,) in fp32 (fp64 for fp64 inputs), j < k (N,) int64."""
    n, m, _ = v.shape
    acc = compute_dtype(v)
    first, second = torch.triu_indices(m, m, offset=1, device=v.device)  # pairs j<k, lexicographic
    sims = torch.empty(n, dtype=acc, device=v.device)
    pairs = torch.empty(n, dtype=torch.long, device=v.device)
    for start in range(0, n, _CHUNK_SAMPLES):
        block = v[start : start + _CHUNK_SAMPLES].to(acc)
        pair_sims = torch.bmm(block, block.transpose(1, 2))[:, first, second]  # (chunk, m(m−1)/2)
        best = pair_sims.argmin(dim=1)  # the first minimum: ties go to the first pair in order
        sims[start : start + _CHUNK_SAMPLES] = pair_sims.gather(1, best[:, None]).squeeze(1)
        pairs[start : start + _CHUNK_SAMPLES] = best
    return sims, first[pairs], second[pairs]
