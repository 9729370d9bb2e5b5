"""Small fused reductions (docs/design.md, family 3) and the per-column transform of the Frobenius family.

The Frobenius-family losses never write their normalised embeddings: the fused op and the column
dots below take the raw (R, K) operand x with a per-column shift and scale and read

    x̂[r, k] = round_to_input_dtype((x[r, k] − shift[k]) · scale[k])      (fp32; fp64 for fp64 inputs)

(Barlow Twins: the batch norm, shift = mean, scale = 1/sqrt(var + eps); VICReg: centring, shift =
mean; the spectral loss: its √μ norm clip, a scale per sample). The rounding to the input dtype is the
one the Triton kernels apply before their tensor-core dots, so that a diagonal computed here and the
Frobenius norm computed there see the very same operands. Gradients reach x, shift and scale
through :func:`chain_transform`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl._common import compute_dtype
from fastssl.kernels.torch.frobenius import apply_transform


def column_mean_var(z: Tensor, *, unbiased: bool, one_pass: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """(mean, var) of each column of z (N, D), each (D,), in compute_dtype(z); differentiable.

    `one_pass` (default: on GPUs only) is torch.var_mean (Welford). Otherwise two vectorised
    passes over the rows, mean then the centred squares: at least as accurate, and on the CPU much
    faster, because torch's CPU var_mean over dim 0 walks each column separately (the timing is in
    benchmarks/RESULTS.md, "Measurements behind design choices"). Both are tested against each other.
    """
    zc = z.to(compute_dtype(z))
    correction = 1 if unbiased else 0
    if one_pass is None:
        one_pass = zc.device.type != "cpu"
    if one_pass:
        var, mean = torch.var_mean(zc, dim=0, correction=correction)
        return mean, var
    mean = zc.mean(0)
    return mean, (zc - mean).square().sum(0) / (zc.shape[0] - correction)


def chain_transform(
    d_hat: Tensor, x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], needs: tuple[bool, bool, bool]
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dshift, dscale) from the gradient d_hat w.r.t. x̂ (the rounding is treated as identity).

    dx = d_hat·scale, dshift_k = −Σ_r dx_rk, dscale_k = Σ_r d_hat_rk (x_rk − shift_k). `needs` says
    which of the three are wanted (autograd's needs_input_grad).
    """
    acc = compute_dtype(x)
    d_hat = d_hat.to(acc)
    dx_acc = d_hat if scale is None else d_hat * scale
    dx = dx_acc.to(x.dtype) if needs[0] else None
    dshift = -dx_acc.sum(0) if needs[1] and shift is not None else None
    dscale = None
    if needs[2] and scale is not None:
        centred = x.to(acc) if shift is None else x.to(acc) - shift
        dscale = (d_hat * centred).sum(0)
    return dx, dshift, dscale


class ColumnDot(torch.autograd.Function):
    """`apply(a, b, a_shift, a_scale, b_shift, b_scale) -> (K,)`: Σ_r â_rk·b̂_rk (b None: b̂ = â).

    The diagonal of âᵀb̂ in O(R·K) work, in compute_dtype(a). Only the inputs are saved: the
    backward recomputes â and b̂, so no transformed copy outlives the call.
    """

    @staticmethod
    def forward(ctx, a, b, a_shift, a_scale, b_shift, b_scale):
        ctx.save_for_backward(a, b, a_shift, a_scale, b_shift, b_scale)
        a_hat = apply_transform(a, a_shift, a_scale)
        b_hat = a_hat if b is None else apply_transform(b, b_shift, b_scale)
        return (a_hat * b_hat).sum(0)

    @staticmethod
    def backward(ctx, grad):
        a, b, a_shift, a_scale, b_shift, b_scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        a_hat = apply_transform(a, a_shift, a_scale)
        a_needs = (needs[0], needs[2], needs[3])
        if b is None:  # Σ_r â_rk²: both roles
            da, da_shift, da_scale = chain_transform(2 * grad * a_hat, a, a_shift, a_scale, a_needs)
            return da, None, da_shift, da_scale, None, None
        b_hat = apply_transform(b, b_shift, b_scale)
        da, da_shift, da_scale = chain_transform(grad * b_hat, a, a_shift, a_scale, a_needs)
        db, db_shift, db_scale = chain_transform(grad * a_hat, b, b_shift, b_scale, (needs[1], needs[4], needs[5]))
        return da, db, da_shift, da_scale, db_shift, db_scale


def column_dot(
    a: Tensor,
    b: Optional[Tensor],
    a_shift: Optional[Tensor] = None,
    a_scale: Optional[Tensor] = None,
    b_shift: Optional[Tensor] = None,
    b_scale: Optional[Tensor] = None,
) -> Tensor:
    """Differentiable Σ_r â_rk·b̂_rk, (K,), for a, b (R, K); b None or b is a (with no own transform): b̂ = â."""
    if b is a and b_shift is None and b_scale is None:
        b = None
    return ColumnDot.apply(a, b, a_shift, a_scale, b_shift, b_scale)
