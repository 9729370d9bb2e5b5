"""ArCL's worst-pair selection as one Triton kernel (docs/design.md, family 3; Zhao et al. 2023).

For normalised views v (N, m, D): s_i = min_{j<k} v_ij·v_ik and the first minimising (j, k) in
lexicographic order. One program per sample reads its m x D block once (through strides, in place),
accumulates the m x m Gram matrix in fp32 on tensor cores (padded to M_PAD ≥ 16 rows, zero rows are
masked out of the selection), and reduces it to (s, j, k) in registers: similarity, min and argmin
in one pass, nothing but 3 numbers per sample written. The op is memory-bound (N·m·D reads).
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor

from fastssl.kernels.triton._utils import mm

#: Largest number of views per sample: the m x m tile lives in one program's registers.
MAX_VIEWS = 64


@triton.jit
def _worst_pair_fwd_kernel(
    v_ptr, sim_ptr, first_ptr, second_ptr,
    m, d, stride_n, stride_m, stride_d,
    M_PAD: tl.constexpr, BLOCK_D: tl.constexpr, FP32_PRECISION: tl.constexpr,
):  # fmt: skip
    """sim[i] = min_{j<k<m} v_ij·v_ik, first[i], second[i] = argmin (j, k); G = V_i V_iᵀ (M_PAD²)."""
    sample = tl.program_id(0).to(tl.int64)
    views = tl.arange(0, M_PAD)
    base = v_ptr + sample * stride_n + views[:, None].to(tl.int64) * stride_m
    gram = tl.zeros((M_PAD, M_PAD), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = (views[:, None] < m) & (cols[None, :] < d)
        block = tl.load(base + cols[None, :].to(tl.int64) * stride_d, mask=mask, other=0.0)
        gram = mm(block, tl.trans(block), gram, FP32_PRECISION)
    # Only the strict upper triangle of real views competes; the flat index j·M_PAD + k orders the
    # pairs lexicographically, so tie_break_left picks the first pair, as torch.argmin does.
    valid = (views[:, None] < views[None, :]) & (views[None, :] < m)
    flat = tl.reshape(tl.where(valid, gram, float("inf")), (M_PAD * M_PAD,))
    best_sim, best = tl.min(flat, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(sim_ptr + sample, best_sim)
    tl.store(first_ptr + sample, (best // M_PAD).to(tl.int64))
    tl.store(second_ptr + sample, (best % M_PAD).to(tl.int64))


def worst_pair_forward(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(s, j, k) for v (N, m, D), 2 ≤ m ≤ MAX_VIEWS, fp32/bf16/fp16: s (N,) fp32, j < k (N,) int64."""
    n, m, d = v.shape
    if m > MAX_VIEWS:
        raise ValueError(
            f"the triton worst-pair kernel takes at most {MAX_VIEWS} views per sample, "
            f"got views of shape {tuple(v.shape)}; use backend='torch'"
        )
    sims = torch.empty(n, dtype=torch.float32, device=v.device)
    first = torch.empty(n, dtype=torch.long, device=v.device)
    second = torch.empty(n, dtype=torch.long, device=v.device)
    m_pad = max(16, triton.next_power_of_2(m))
    # The (M_PAD, BLOCK_D) view tile holds at most 8,192 elements (one program's registers).
    block_d = max(16, min(128, triton.next_power_of_2(d), 8192 // m_pad))
    _worst_pair_fwd_kernel[(n,)](
        v, sims, first, second, m, d, *v.stride(),
        M_PAD=m_pad, BLOCK_D=block_d, FP32_PRECISION="ieee", num_warps=4 if m_pad <= 16 else 8,
    )  # fmt: skip
    return sims, first, second
