"""The squared-Frobenius-of-a-cross-product op: routes, dispatch, custom ops, autograd (DESIGN.md, family 2).

For a, b (R, K) (b = a allowed) the op returns the 0-dim

    ‖aᵀb‖²_F = Σ_kl (aᵀb)_kl²  =  ⟨aaᵀ, bbᵀ⟩_F      (seed 002's duality)

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

import importlib
from typing import Optional

import torch
from torch import Tensor

_KERNEL_MODULES = {
    "torch": "fastssl.kernels.torch.frobenius",
    "triton": "fastssl.kernels.triton.frobenius",
}

#: The public route names, for every loss of this family.
ROUTES = ("auto", "covariance", "gram")


def _kernels(backend: str):
    if backend not in _KERNEL_MODULES:
        raise ValueError(f"sq_frobenius has no backend {backend!r}; choose one of {tuple(_KERNEL_MODULES)}")
    return importlib.import_module(_KERNEL_MODULES[backend])


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_route(route: object) -> str:
    """`route` if it is one of ROUTES, else a ValueError naming the choices."""
    if not isinstance(route, str) or route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    return route


def choose_side(n: int, d: int, route: str) -> str:
    """"covariance" (the D x D side) or "gram" (the N x N side) for `route` on (N, D) embeddings.

    auto: the smaller side. Both the cost (N·D² vs N²·D multiply-adds) and the memory of the
    backward (D² vs N²) favour it; at N = D the covariance side is kept (it needs one product, the
    Gram side two).
    """
    check_route(route)
    if route != "auto":
        return route
    return "covariance" if d <= n else "gram"


def op_route(side: str, samples_are_rows: bool) -> str:
    """The op's "inner"/"outer" for a loss `side`, given whether a's rows are samples (a = z) or
    dimensions (a = zᵀ, the spectral loss): the D x D side is aᵀb when rows are samples, aaᵀ otherwise."""
    covariance = side == "covariance"
    return "inner" if covariance == samples_are_rows else "outer"


@torch.library.custom_op("fastssl::sq_frobenius_fwd", mutates_args=())
def sq_frobenius_fwd(a: Tensor, b: Optional[Tensor], route: str, backend: str) -> Tensor:
    """‖aᵀb‖²_F, 0-dim fp32 (fp64 for fp64 inputs); b=None means b is a."""
    return _kernels(backend).sq_frobenius_forward(a, b, route)


@sq_frobenius_fwd.register_fake
def _(a, b, route, backend):
    return a.new_empty((), dtype=_stat_dtype(a))


@torch.library.custom_op("fastssl::sq_frobenius_bwd", mutates_args=())
def sq_frobenius_bwd(a: Tensor, b: Optional[Tensor], grad: Tensor, route: str, backend: str) -> tuple[Tensor, Tensor]:
    """(da, db) of grad·‖aᵀb‖²_F in the input dtypes; b=None: da holds both roles, db is empty."""
    return _kernels(backend).sq_frobenius_backward(a, b, grad, route)


@sq_frobenius_bwd.register_fake
def _(a, b, grad, route, backend):
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    db = a.new_empty(0) if b is None else torch.empty_like(b, memory_format=torch.contiguous_format)
    return da, db


class SqFrobenius(torch.autograd.Function):
    """Autograd over the custom ops: `apply(a, b, route, backend) -> ‖aᵀb‖²_F` (b=None: b is a).

    The backward recomputes the route's products from a and b; nothing but the inputs is saved.
    """

    @staticmethod
    def forward(ctx, a, b, route, backend):
        ctx.save_for_backward(a, b)
        ctx.options = (route, backend)
        return torch.ops.fastssl.sq_frobenius_fwd(a, b, route, backend)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        da, db = torch.ops.fastssl.sq_frobenius_bwd(a, b, grad, *ctx.options)
        return da, (None if b is None else db), None, None


def sq_frobenius(a: Tensor, b: Optional[Tensor], *, route: str, backend: str) -> Tensor:
    """Differentiable ‖aᵀb‖²_F for a, b (R, K) ("inner"/"outer" route; "torch"/"triton" backend).

    b=None or b is a: one operand in both roles. Callers validate user input; this checks only
    what the kernels rely on.
    """
    if route not in ("inner", "outer"):
        raise ValueError(f"sq_frobenius: route must be 'inner' or 'outer', got {route!r}")
    if b is not None and (b.shape != a.shape or b.dtype != a.dtype or b.device != a.device):
        raise ValueError(f"sq_frobenius: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must match")
    return SqFrobenius.apply(a, None if b is a else b, route, backend)
