"""The prototype cross-entropy op: custom-op registration, backend dispatch and autograd (docs/design.md, family 4).

DINO (Caron et al. 2021), iBOT (Zhou et al. 2022), SwaV (Caron et al. 2020) and MSN (Assran et al.
2022) heads score every crop against K prototypes (the head's last layer) and take a cross-entropy
between a teacher's softmax and the student's log-softmax over the K prototypes. At K = 65,536 the
student logits of 12,288 crops alone are 3.2 GB in fp32. This op never stores a row x prototype
matrix: the idea of Cut Cross-Entropy (Wijmans et al. 2024) applied to SSL heads.

Inputs: student rows s (N, D) (what enters the head's last layer), student prototypes W (K, D),
teacher rows t (Nt, D), teacher prototypes W_t (K, D) (DINO's EMA teacher; None: W itself),
centre c (K,) or None, and the inverse temperatures α_s = 1/τs, α_t = 1/τt. Tiled over K with an
online max/sum, per row:

    lse_s_i = LSE_k α_s·s_i·W_k                        (N,)    the student's log-normaliser
    p_t,jk  = softmax_k α_t·(t_j·W_t,k − c_k)           (Nt, K) the teacher's probabilities, never stored
    lse_t_j = LSE_k α_t·(t_j·W_t,k − c_k)               (Nt,)   kept for the backward
    P_t_j   = Σ_k p_t,jk·W_k                            (Nt, D) the teacher's expected (student) prototype

so that the cross-entropy of a pair (student row i, teacher row j) is an O(D) dot:

    CE(i, j) = −Σ_k p_t,jk·log softmax_k(α_s·s_i·Wᵀ) = lse_s_i − α_s·s_i·P_t_j

The op returns (lse_s, P_t); a loss pairs rows as it likes (DINO: every crop of an image against
the teacher's global crops of that image but itself; iBOT: each masked patch token against the
teacher's token at the same place) with O(pairs·D) dots.

Gradients. The teacher is DINO's stop-gradient: t, W_t and c get none, p_t is a constant. With
g = ∂L/∂lse_s (N,) and G = ∂L/∂P_t (Nt, D), the student's gradients are

    ds_i = g_i·α_s·P_s_i,     P_s_i = Σ_k softmax_k(α_s·s_i·Wᵀ)·W_k     (P_s is kept from the forward)
    dW_k = α_s·Σ_i g_i·softmax_ik·s_i + Σ_j p_t,jk·G_j                 (one pass over K tiles)

The second term of dW is P_t's: W is the value of the teacher's average, so W gets gradient through
P_t even when W_t is W — what is stopped is W's role inside p_t (the teacher's scores), not this.
The forward computes P_s (one more logit-sized product, the one a backward would otherwise
recompute) only when s needs a gradient.

Memory: O((N + Nt + K)·D) plus one tile (Triton) or chunk (torch) of logits. The teacher's batch-mean
logit (DINO's centre update) is mean_j t_j·W_tᵀ = (mean_j t_j)·W_tᵀ, one (K, D) x (D,) product: the
caller computes it, not this pass.

`fastssl::prototype_ce_fwd` and `fastssl::prototype_ce_bwd` are `torch.library` custom ops with
fake implementations, composed by the autograd Function `PrototypeCE` (the pairwise-LSE pattern).
The forward's options are one :class:`~fastssl.kernels.PrototypeCEFlags`, which crosses the
custom-op boundary as a list of ints.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl._common import compute_dtype
from fastssl.kernels import PrototypeCEFlags
from fastssl.ops._dispatch import kernel_module

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.prototype_ce",
    "triton": "fastssl.kernels.triton.prototype_ce",
}


def _kernels(backend: str):
    return kernel_module("prototype_ce", _KERNEL_MODULES, backend)


@torch.library.custom_op("fastssl::prototype_ce_fwd", mutates_args=())
def prototype_ce_fwd(
    s: Tensor,
    w: Tensor,
    t: Tensor,
    w_t: Optional[Tensor],
    center: Optional[Tensor],
    scale_s: Tensor,
    scale_t: Tensor,
    flags: list[int],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse_s (N,), P_s (N, D) if flags' needs_ds else (0, D), lse_t (Nt,), P_t (Nt, D)), fp32 (fp64
    for fp64 inputs); w_t=None means W; `flags` is `PrototypeCEFlags.to_list()`."""
    return _kernels(backend).prototype_ce_forward(
        s, w, t, w_t, center, scale_s, scale_t, PrototypeCEFlags.from_list(flags)
    )


@prototype_ce_fwd.register_fake
def _(s, w, t, w_t, center, scale_s, scale_t, flags, backend):
    dt, d = compute_dtype(s), s.shape[1]
    n_mean = s.shape[0] if PrototypeCEFlags.from_list(flags).needs_ds else 0
    return (s.new_empty(s.shape[0], dtype=dt), s.new_empty(n_mean, d, dtype=dt), s.new_empty(t.shape[0], dtype=dt),
            s.new_empty(t.shape[0], d, dtype=dt))  # fmt: skip


@torch.library.custom_op("fastssl::prototype_ce_bwd", mutates_args=())
def prototype_ce_bwd(
    s: Tensor,
    w: Tensor,
    t: Tensor,
    w_t: Optional[Tensor],
    center: Optional[Tensor],
    scale_s: Tensor,
    scale_t: Tensor,
    lse_s: Tensor,
    lse_t: Tensor,
    grad_lse_s: Optional[Tensor],
    grad_mean_t: Optional[Tensor],
    backend: str,
) -> Tensor:
    """dW (K, D) in W's dtype: α_s·Σ_i g_i·softmax_ik·s_i + Σ_j p_t,jk·G_j (None gradients are zero)."""
    return _kernels(backend).prototype_ce_backward(
        s, w, t, w_t, center, scale_s, scale_t, lse_s, lse_t, grad_lse_s, grad_mean_t
    )


@prototype_ce_bwd.register_fake
def _(s, w, t, w_t, center, scale_s, scale_t, lse_s, lse_t, grad_lse_s, grad_mean_t, backend):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


class PrototypeCE(torch.autograd.Function):
    """Autograd over the prototype cross-entropy custom ops; `apply(s, w, t, w_t, center, scale_s, scale_t,
    backend) -> (lse_s, P_t)` (see the module docstring). Gradients flow to s and w only."""

    @staticmethod
    def forward(ctx, s, w, t, w_t, center, scale_s, scale_t, backend):
        flags = PrototypeCEFlags(needs_ds=bool(ctx.needs_input_grad[0]))
        lse_s, mean_s, lse_t, mean_t = torch.ops.fastssl.prototype_ce_fwd(
            s, w, t, w_t, center, scale_s, scale_t, flags.to_list(), backend
        )
        ctx.save_for_backward(s, w, t, w_t, center, scale_s, scale_t, lse_s, mean_s, lse_t)
        ctx.backend = backend
        return lse_s, mean_t

    @staticmethod
    def backward(ctx, grad_lse_s, grad_mean_t):
        s, w, t, w_t, center, scale_s, scale_t, lse_s, mean_s, lse_t = ctx.saved_tensors
        ds = dw = None
        if ctx.needs_input_grad[0] and grad_lse_s is not None:
            ds = ((grad_lse_s.to(mean_s.dtype) * scale_s)[:, None] * mean_s).to(s.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.ops.fastssl.prototype_ce_bwd(
                s, w, t, w_t, center, scale_s, scale_t, lse_s, lse_t,
                None if grad_lse_s is None else grad_lse_s.contiguous(),
                None if grad_mean_t is None else grad_mean_t.contiguous(), ctx.backend,
            )  # fmt: skip
        return ds, dw, None, None, None, None, None, None


def prototype_ce(
    s: Tensor,
    w: Tensor,
    t: Tensor,
    scale_s: Tensor,
    scale_t: Tensor,
    *,
    teacher_prototypes: Optional[Tensor] = None,
    center: Optional[Tensor] = None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Differentiable (lse_s (N,), P_t (Nt, D)) of the module docstring; `backend` is "torch" or "triton".

    Shapes: s (N, D), w (K, D), t (Nt, D), teacher_prototypes (K, D) or None (w), center (K,) or
    None, scale_s and scale_t 0-dim (1/τ, no gradient). t, teacher_prototypes and center are
    detached (the teacher's stop-gradient). Callers (fastssl.functional) validate user input; this
    checks only what the kernels rely on.
    """
    if s.shape[1] != w.shape[1] or t.shape[1] != w.shape[1]:
        raise ValueError(f"prototype_ce: s {tuple(s.shape)}, t {tuple(t.shape)} and w {tuple(w.shape)} need one D")
    dt = compute_dtype(s)
    w_t = None if teacher_prototypes is None or teacher_prototypes is w else teacher_prototypes.detach()
    if w_t is not None and w_t.shape != w.shape:
        raise ValueError(f"prototype_ce: teacher_prototypes {tuple(w_t.shape)} must match w {tuple(w.shape)}")
    if center is not None:
        # A copy (K numbers): the backward reads the centre of this forward, and DINO updates its
        # centre buffer in place right after the loss.
        center = center.detach().reshape(-1).to(device=s.device, dtype=dt, copy=True)
        if center.shape[0] != w.shape[0]:
            raise ValueError(f"prototype_ce: center has {center.shape[0]} entries, w has K = {w.shape[0]} rows")
    scale_s = scale_s.detach().to(device=s.device, dtype=dt)
    scale_t = scale_t.detach().to(device=s.device, dtype=dt)
    return PrototypeCE.apply(s, w, t.detach(), w_t, center, scale_s, scale_t, backend)
