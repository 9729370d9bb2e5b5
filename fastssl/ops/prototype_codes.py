"""Prototype codes: the Sinkhorn-Knopp scaling of SwaV and MSN, and MSN's batch-mean prototype
probabilities, never storing a rows x prototypes matrix (docs/design.md, family 4).

These are the two small ops that SwaV (Caron et al. 2020) and MSN (Assran et al. 2022) need besides
the prototype cross-entropy op (fastssl/ops/prototype_ce.py), whose contract they leave unchanged:
the codes come out as a centre for that op's teacher softmax.

**Sinkhorn-Knopp in tiles** (Cuturi 2013; SwaV's and MSN's form). Rows x (N, D), prototypes W (K, D),
scores S_bk = x_b·W_k, α = 1/ε. SwaV starts from Q = exp(α·S) (K x N after its transpose) and
alternates "rows" (each prototype's mass over the batch) and "columns" (each sample's mass over the
prototypes). Every iterate is Q = diag(e^-u)·exp(α·Sᵀ)·diag(e^-v) with a (K,) vector u and an (N,)
vector v, so the iteration needs only LSEs of the scores offset by those vectors:

    u_k ← LSE_b (α·S_bk − v_b)          (prototype k's total over the batch; all ranks' rows when gathering)
    v_b ← LSE_k (α·S_bk − u_k)          (sample b's total over the prototypes)

Constant factors (the initial 1/ΣQ, the 1/B, 1/K and the final ·B of the reference codes) cancel in
the next normalisation. After T ≥ 1 iterations, which end with the sample step, the codes are

    q_bk = softmax_k(α·S_bk − u_k) = softmax_k(α·(S_bk − c_k)),   c = u/α  (K,)

— a teacher softmax with a centre, which is exactly what the prototype-CE op takes. So
:func:`sinkhorn_scaling` returns c; each LSE pass is the `fastssl::prototype_lse` custom op, run
once with the rows against the prototypes and once with the prototypes against the rows (then the
passes are tiled over the prototypes). T iterations cost 2T − 1 passes (T for MSN's rows-first
form, whose first sample step is the softmax of its probabilities: 2T). The log domain has no
exp(α·S) to overflow (SwaV's exp(S/0.05) overflows fp32 once a score passes 4.4).

T = 0 leaves SwaV's codes as B·exp(α·S)/Σ exp(α·S): rows that do not sum to 1. Then the codes are
q_bk = m_b·softmax_k(α·S_bk) with the row masses m_b = B·exp(v_b − LSE_b' v_b'), returned instead.

**Batch-mean probabilities** (MSN's mean-entropy regulariser). For x (M, D), W (K, D) and α:

    pbar_k = (1/M) Σ_i p_ik,   p_ik = softmax_k(α·x_i·W_k)                    (K,)

differentiable in x and W: with h = ∂L/∂pbar and h̄_i = Σ_k p_ik·h_k, ∂L/∂z_ik = (1/M)·p_ik·(h_k − h̄_i)
for the logits z = α·x·Wᵀ, contracted with W and x chunk by chunk. Memory O((M + K)·D) plus a chunk.

`fastssl::prototype_lse`, `fastssl::prototype_mean_probs_fwd` and `..._bwd` are `torch.library`
custom ops with fake implementations (torch.compile traces the compositions below).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastssl import distributed
from fastssl._common import compute_dtype
from fastssl.ops._dispatch import kernel_module

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.prototype_codes",
    "triton": "fastssl.kernels.triton.prototype_codes",
}


def _kernels(backend: str):
    return kernel_module("prototype_codes", _KERNEL_MODULES, backend)


@torch.library.custom_op("fastssl::prototype_lse", mutates_args=())
def prototype_lse(x: Tensor, a: Tensor, center: Optional[Tensor], scale: Tensor, backend: str) -> Tensor:
    """lse_i = LSE_j scale·(x_i·a_j − center_j), (M,) fp32 (fp64 for fp64 inputs); no gradient."""
    return _kernels(backend).prototype_lse(x, a, center, scale)


@prototype_lse.register_fake
def _(x, a, center, scale, backend):
    return x.new_empty(x.shape[0], dtype=compute_dtype(x))


def lse_over_ranks(u: Tensor) -> Tensor:
    """LSE over the ranks of each entry of u (the same shape on every rank), no gradient."""
    parts = distributed.all_gather(u.detach().contiguous(), [u.shape[0]] * distributed.world_size())
    return torch.logsumexp(torch.stack(parts), 0)


@torch.no_grad()
def sinkhorn_scaling(
    x: Tensor,
    w: Tensor,
    scale: Tensor,
    iterations: int,
    *,
    rows_first: bool = False,
    gather: bool = False,
    backend: str,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(center (K,) or None, mass (N,) or None) with the codes q_bk = mass_b·softmax_k(scale·(x_b·w_k − center_k)).

    x (N, D) and w (K, D) are the rows and the prototypes (used without gradient), scale = 1/ε
    0-dim. Codes of Q = exp(scale·x·wᵀ) after `iterations` Sinkhorn-Knopp steps as SwaV's reference
    code runs them (the module docstring); rows_first: Q = softmax(scale·x·wᵀ) instead (MSN's
    sharpened target probabilities, normalised per sample before the first step). gather: every
    prototype's total runs over the rows of all ranks (SwaV's and MSN's distributed codes), which
    costs one all-gather of K numbers per iteration; as in lightly 1.6, each sample step leaves each
    rank's batch the total mass 1/W (its columns are divided by local rows x ranks), so with unequal
    batches a rank's rows weigh as 1/(its rows) in the prototypes' totals.

    center None: no centre (T = 0); mass None: every row has mass 1 (T ≥ 1, or MSN's T = 0).
    fp32 (fp64 for fp64 inputs).
    """
    x, w = x.detach(), w.detach()
    dt = compute_dtype(x)
    scale = scale.detach().to(device=x.device, dtype=dt)
    if iterations == 0:
        if rows_first:
            return None, None
        v = prototype_lse(x, w, None, scale, backend)
        n_global = x.shape[0] * (distributed.world_size() if gather else 1)  # SwaV's B: local rows x ranks
        log_total = torch.logsumexp(v, 0)
        if gather:
            log_total = lse_over_ranks(log_total.reshape(1))[0]
        return None, torch.exp(v - log_total + math.log(n_global))
    v = prototype_lse(x, w, None, scale, backend) if rows_first else None
    for step in range(iterations):
        u = prototype_lse(w, x, None if v is None else v / scale, scale, backend)
        if gather:
            u = lse_over_ranks(u)
        if step + 1 < iterations:
            v = prototype_lse(x, w, u / scale, scale, backend)
            if gather:  # lightly's per-rank column mass 1/(local rows x ranks): log(local rows), the rest cancels
                v = v + math.log(x.shape[0])
    return u / scale, None


# --------------------------------------------------------------------------------------------------
# batch-mean prototype probabilities (MSN's regulariser)


@torch.library.custom_op("fastssl::prototype_mean_probs_fwd", mutates_args=())
def prototype_mean_probs_fwd(x: Tensor, w: Tensor, scale: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(lse (M,), pbar (K,)), fp32 (fp64 for fp64 inputs)."""
    return _kernels(backend).prototype_mean_probs_forward(x, w, scale)


@prototype_mean_probs_fwd.register_fake
def _(x, w, scale, backend):
    dt = compute_dtype(x)
    return x.new_empty(x.shape[0], dtype=dt), x.new_empty(w.shape[0], dtype=dt)


@torch.library.custom_op("fastssl::prototype_mean_probs_bwd", mutates_args=())
def prototype_mean_probs_bwd(
    x: Tensor, w: Tensor, scale: Tensor, lse: Tensor, grad_pbar: Tensor, needs_dx: bool, needs_dw: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """(dx (M, D) or (0, D), dw (K, D) or (0, D)) in the inputs' dtypes."""
    return _kernels(backend).prototype_mean_probs_backward(x, w, scale, lse, grad_pbar, needs_dx, needs_dw)


@prototype_mean_probs_bwd.register_fake
def _(x, w, scale, lse, grad_pbar, needs_dx, needs_dw, backend):
    return (x.new_empty(x.shape[0] if needs_dx else 0, x.shape[1]),
            w.new_empty(w.shape[0] if needs_dw else 0, w.shape[1]))  # fmt: skip


class PrototypeMeanProbs(torch.autograd.Function):
    """`apply(x, w, scale, backend) -> pbar (K,)`, gradients to x and w (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w, scale, backend):
        lse, pbar = torch.ops.fastssl.prototype_mean_probs_fwd(x, w, scale, backend)
        ctx.save_for_backward(x, w, scale, lse)
        ctx.backend = backend
        return pbar

    @staticmethod
    def backward(ctx, grad_pbar):
        x, w, scale, lse = ctx.saved_tensors
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (needs_dx or needs_dw):
            return None, None, None, None
        dx, dw = torch.ops.fastssl.prototype_mean_probs_bwd(
            x, w, scale, lse, grad_pbar.contiguous(), needs_dx, needs_dw, ctx.backend
        )
        return dx if needs_dx else None, dw if needs_dw else None, None, None


def prototype_mean_probs(x: Tensor, w: Tensor, scale: Tensor, *, backend: str) -> Tensor:
    """pbar_k = (1/M) Σ_i softmax_k(scale·x_i·w_k), (K,) fp32 (fp64 for fp64 inputs), differentiable in
    x (M, D) and w (K, D); scale 0-dim without gradient. `backend` is "torch" or "triton"."""
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"prototype_mean_probs: x {tuple(x.shape)} and w {tuple(w.shape)} need one D")
    scale = scale.detach().to(device=x.device, dtype=compute_dtype(x))
    return PrototypeMeanProbs.apply(x, w, scale, backend)
