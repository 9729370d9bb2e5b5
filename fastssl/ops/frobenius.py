"""The squared-Frobenius-of-a-cross-product op: routes, dispatch, custom ops, autograd (docs/design.md, family 2).

For a, b (R, K) (b = a allowed) under optional per-column transforms â = (a − a_shift)·a_scale,
b̂ = (b − b_shift)·b_scale (the losses' batch norm, centring or norm clip, folded into the kernels'
loads: no normalised copy is written), the op returns the 0-dim

    ‖âᵀb̂‖²_F = Σ_kl (âᵀb̂)_kl²  =  ⟨ââᵀ, b̂b̂ᵀ⟩_F      (Garrido et al. (2023)'s duality)

on one of two routes: "inner" walks the K x K product aᵀb (cost 2·R·K²), "outer" the R x R Grams
aaᵀ and bbᵀ (cost 2·R²·K). Whatever a route stores is at most one chunk (torch) or one tile (triton)
of its matrix in the forward, and at most that matrix in the backward, so the cheaper route is also
the one that stays within min(R, K)². Barlow Twins and VICReg call it with a = normalised or centred
embeddings (R = N samples, K = D dimensions); the spectral loss with a = z1ᵀ, b = z2ᵀ (read through
strides). The losses translate their public `route` ("covariance" = the D x D side, "gram" = the
N x N side) into "inner"/"outer" with :func:`op_route`.

`fastssl::sq_frobenius_fwd` / `fastssl::sq_frobenius_bwd` are torch.library custom ops with fake
kernels, composed by the public autograd Function `SqFrobenius` (torch.compile(fullgraph=True) safe).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastssl._common import OP_ROUTES, compute_dtype
from fastssl.ops._dispatch import kernel_module
from fastssl.ops.reductions import chain_transform

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.frobenius",
    "triton": "fastssl.kernels.triton.frobenius",
    "cuda": "fastssl.kernels.cuda.frobenius",
}

def _kernels(backend: str):
    return kernel_module("sq_frobenius", _KERNEL_MODULES, backend)


def choose_side(n: int, d: int, route: str) -> str:
    """"covariance" (the D x D side) or "gram" (the N x N side) for `route` on (N, D) embeddings.

    auto: the smaller side. Both the cost (N·D² vs N²·D multiply-adds) and the memory of the
    backward (D² vs N²) favour it; at N = D the covariance side is kept (it needs one product, the
    Gram side two).
    """
    if route != "auto":
        return route
    return "covariance" if d <= n else "gram"


def op_route(side: str, samples_are_rows: bool) -> str:
    """The op's "inner"/"outer" for a loss `side`, given whether a's rows are samples (a = z) or
    dimensions (a = zᵀ, the spectral loss): the D x D side is aᵀb when rows are samples, aaᵀ otherwise."""
    covariance = side == "covariance"
    return "inner" if covariance == samples_are_rows else "outer"


@torch.library.custom_op("fastssl::sq_frobenius_fwd", mutates_args=())
def sq_frobenius_fwd(
    a: Tensor,
    b: Optional[Tensor],
    a_shift: Optional[Tensor],
    a_scale: Optional[Tensor],
    b_shift: Optional[Tensor],
    b_scale: Optional[Tensor],
    route: str,
    backend: str,
) -> Tensor:
    """‖âᵀb̂‖²_F, 0-dim fp32 (fp64 for fp64 inputs); b=None means b̂ is â."""
    return _kernels(backend).sq_frobenius_forward(a, b, a_shift, a_scale, b_shift, b_scale, route)


@sq_frobenius_fwd.register_fake
def _(a, b, a_shift, a_scale, b_shift, b_scale, route, backend):
    return a.new_empty((), dtype=compute_dtype(a))


@torch.library.custom_op("fastssl::sq_frobenius_bwd", mutates_args=())
def sq_frobenius_bwd(
    a: Tensor,
    b: Optional[Tensor],
    a_shift: Optional[Tensor],
    a_scale: Optional[Tensor],
    b_shift: Optional[Tensor],
    b_scale: Optional[Tensor],
    grad: Tensor,
    route: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dâ, db̂) of grad·‖âᵀb̂‖²_F in the input dtypes; b=None: dâ holds both roles, db̂ is empty."""
    return _kernels(backend).sq_frobenius_backward(a, b, a_shift, a_scale, b_shift, b_scale, grad, route)


@sq_frobenius_bwd.register_fake
def _(a, b, a_shift, a_scale, b_shift, b_scale, grad, route, backend):
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    db = a.new_empty(0) if b is None else torch.empty_like(b, memory_format=torch.contiguous_format)
    return da, db


class SqFrobenius(torch.autograd.Function):
    """Autograd over the custom ops:
    `apply(a, b, a_shift, a_scale, b_shift, b_scale, route, backend) -> ‖âᵀb̂‖²_F` (b=None: b̂ is â),
    with â = (a − a_shift)·a_scale per column (either may be None) and b̂ likewise.

    Only the inputs are saved: the backward recomputes the route's products (and the transform)
    from them, then chains dâ, db̂ into a, b and the shifts and scales (fastssl.ops.reductions).
    """

    @staticmethod
    def forward(ctx, a, b, a_shift, a_scale, b_shift, b_scale, route, backend):
        ctx.save_for_backward(a, b, a_shift, a_scale, b_shift, b_scale)
        ctx.options = (route, backend)
        return torch.ops.fastssl.sq_frobenius_fwd(a, b, a_shift, a_scale, b_shift, b_scale, route, backend)

    @staticmethod
    def backward(ctx, grad):
        a, b, a_shift, a_scale, b_shift, b_scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d_a_hat, d_b_hat = torch.ops.fastssl.sq_frobenius_bwd(
            a, b, a_shift, a_scale, b_shift, b_scale, grad, *ctx.options
        )
        da, da_shift, da_scale = chain_transform(d_a_hat, a, a_shift, a_scale, (needs[0], needs[2], needs[3]))
        db = db_shift = db_scale = None
        if b is not None:
            db, db_shift, db_scale = chain_transform(d_b_hat, b, b_shift, b_scale, (needs[1], needs[4], needs[5]))
        return da, db, da_shift, da_scale, db_shift, db_scale, None, None


def sq_frobenius(
    a: Tensor,
    b: Optional[Tensor],
    *,
    a_shift: Optional[Tensor] = None,
    a_scale: Optional[Tensor] = None,
    b_shift: Optional[Tensor] = None,
    b_scale: Optional[Tensor] = None,
    route: str,
    backend: str,
) -> Tensor:
    """Differentiable ‖âᵀb̂‖²_F for a, b (R, K) ("inner"/"outer" route; "torch"/"triton" backend).

    â = (a − a_shift)·a_scale per column, shifts and scales (K,) in the compute dtype (fp32; fp64 for
    fp64 inputs) or None; b̂ likewise. b=None, or b is a with no transform of its own: one operand in
    both roles. Callers validate user input; this checks only what the kernels rely on.
    """
    if route not in OP_ROUTES:
        raise ValueError(f"sq_frobenius: route must be one of {OP_ROUTES}, got {route!r}")
    if b is a and b_shift is None and b_scale is None:
        b, b_shift, b_scale = None, None, None
    if b is None and (b_shift is not None or b_scale is not None):
        raise ValueError("sq_frobenius: b_shift/b_scale need a b (with b=None, b̂ is â)")
    if b is not None and (b.shape != a.shape or b.dtype != a.dtype or b.device != a.device):
        raise ValueError(f"sq_frobenius: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must match")
    k, acc = a.shape[1], compute_dtype(a)
    # The kernels read the transform as contiguous (K,) vectors in the compute dtype.
    a_shift, a_scale, b_shift, b_scale = (
        None if t is None else t.reshape(k).to(device=a.device, dtype=acc).contiguous()
        for t in (a_shift, a_scale, b_shift, b_scale)
    )
    return SqFrobenius.apply(a, b, a_shift, a_scale, b_shift, b_scale, route, backend)
