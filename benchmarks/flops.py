"""FLOP models of the benchmarked calls: the GEMMs of docs/design.md's kernel families 1 (pairwise
LSE, with its sigmoid and max variants), 2 (off-diagonal Frobenius) and 4 (prototype cross-entropy).
Elementwise work (exp, LSE, normalisation, Sinkhorn's scalings) is not counted.

Two counts per case (benchmarks/README.md, "FLOPs"):

* model_flops: the GEMMs of the materialising algorithm, the same for every provider, so that
  model FLOPs / time compares implementations like speed (an *effective* rate: it passes the
  machine's peak where an implementation does less arithmetic, e.g. fastssl's Gram route at N < D);
* route_flops: the GEMMs of the route that actually ran, without what a fused backward recomputes:
  a lower bound of the arithmetic every backend of that route does, so route_flops / time is at
  most the hardware's GEMM rate and its share of the same-run matmul peak cannot pass 100% except
  by really beating that matmul (the tables then say so rather than print a share).
"""

from __future__ import annotations

import dataclasses

import env  # noqa: F401  (puts the checkout on sys.path before fastssl is imported)
from fastssl.ops.frobenius import choose_side
from specs import Case


@dataclasses.dataclass(frozen=True)
class Gemm:
    """count products of an (rows x inner) by (inner x cols) matrix: 2·rows·cols·inner FLOPs each.

    grads: products the backward runs per forward product — one per operand with a gradient (2 for
    x yᵀ, also for autograd's x xᵀ; 1 for MoCo's bank, or where one product gives the gradient, as in
    fastssl's X·(C + Cᵀ) for a covariance C = XᵀX).
    """

    rows: int
    cols: int
    inner: int
    grads: int = 2
    count: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.cols * self.inner * self.count


def materialising_gemms(case: Case) -> list[Gemm]:
    """The logit / covariance products of the materialising algorithm (docs/design.md, the spec).

    NT-Xent, DCL, DCLW, uniformity: Z Zᵀ over the 2N rows; CLIP: n(z1) n(z2)ᵀ (N x N); MoCo:
    q bankᵀ (N x K), the bank without gradient; VICReg-exp: one D x D covariance per view (over the
    N rows); VICReg-ctr: one N x N Gram per view (over D); ArCL: Z Zᵀ over views 0 and 1 plus each
    sample's m x m Gram of its views; Barlow Twins: C = AᵀB (D x D); VICReg: one covariance XᵀX per
    view (D x D); spectral: z1 z2ᵀ (N x N). The recent losses: MACL, SupCon: Z Zᵀ over 2N rows;
    DirectCLR: the same over its first 64 dimensions; SigLIP: n(z1) n(z2)ᵀ; KoLeo: Z Zᵀ without a
    backward product (the neighbour is an argmax); FroSSL: one Gram per view on the smaller side;
    TiCo: B = aᵀa (no gradient) and a·C; the prototype family: rows x K logits (_prototype_gemms),
    and DINO's cross-entropy over crop pairs (T x S over B·K).
    """
    n, d, two_n = case.n_pairs, case.dim, case.batch
    loss = case.loss
    if loss in ("nt_xent", "dcl", "dclw", "uniformity"):
        return [Gemm(two_n, two_n, d)]
    if loss in ("clip", "spectral_contrastive"):
        return [Gemm(n, n, d)]
    if loss == "moco":
        return [Gemm(n, case.bank_rows, d, grads=1)]
    if loss in ("vicreg_exp", "vicreg"):
        return [Gemm(d, d, n, count=2)]
    if loss == "vicreg_ctr":
        return [Gemm(n, n, d, count=2)]
    if loss.startswith("arcl"):
        m = case.spec.views
        return [Gemm(two_n, two_n, d), Gemm(m, m, d, count=n)]
    if loss == "barlow_twins":
        return [Gemm(d, d, n)]
    if loss in ("macl", "supcon"):
        return [Gemm(two_n, two_n, d)]
    if loss == "directclr":
        return [Gemm(two_n, two_n, min(d, DIRECTCLR_DIM))]
    if loss == "siglip":
        return [Gemm(n, n, d)]
    if loss == "koleo":
        return [Gemm(two_n, two_n, d, grads=0)]  # the neighbour search: argmax carries no gradient
    if loss == "frossl":  # one Gram per view, on the smaller side (as lightly picks it)
        side, other = min(n, d), max(n, d)
        return [Gemm(side, side, other, count=2)]
    if loss == "tico":  # B = aᵀa without gradient, then a·C (C without gradient)
        return [Gemm(d, d, n, grads=0), Gemm(n, d, d, grads=1)]
    if case.spec.family == "prototype":
        return _prototype_gemms(case)
    raise ValueError(f"no FLOP model for {loss!r}")


#: DirectCLR's loss_dim default: the loss runs on the first 64 dimensions.
DIRECTCLR_DIM = 64


def _prototype_gemms(case: Case) -> list[Gemm]:
    """The logits of the prototype family: every student row against the K prototypes (gradient to
    the rows and to the prototypes), the teacher's rows against them without gradient (DINO's
    global crops, iBOT's tokens, MSN's targets). SwaV's codes come from the same scores as its
    high-resolution crops' predictions, so it has the student product only."""
    k, d, rows = case.prototypes, case.dim, case.batch
    student = Gemm(rows, k, d)
    teacher_rows = {"dino": case.spec.global_views * case.images, "ibot": rows, "msn": case.images}.get(case.loss, 0)
    gemms = [student, Gemm(teacher_rows, k, d, grads=0)] if teacher_rows else [student]
    if case.loss == "dino":  # the cross-entropy of every (teacher, student) crop pair: an einsum over B·K
        gemms.append(Gemm(case.spec.global_views, case.spec.views, case.images * k, grads=1))
    return gemms


def route_gemms(case: Case) -> list[Gemm]:
    """The products of the route that `case` runs, recomputation not counted.

    fastssl's Frobenius family (docs/design.md family 2) works on one side: an S x S product over the
    other dimension (S = D on the covariance side, N on the Gram side, as choose_side picks for the
    case's route). Barlow Twins' covariance route and spectral's Gram route form one cross product
    (forward, then one product per gradient); the other two routes form two Grams, AAᵀ and BBᵀ, and
    the backward one product each ((BBᵀ)A, (AAᵀ)B); VICReg forms one Gram per view and its gradient
    in one product. fastssl's ArCL forms each sample's m x m Gram forward only: the worst pair's
    gradient is a dot product of two rows, not a GEMM. Every other case runs the materialising
    products (fastssl's pairwise-LSE op computes the same logits, tile by tile).
    """
    fastssl = case.provider.startswith("fastssl-")
    if fastssl and case.loss in ("frossl", "tico"):
        return _recent_frobenius_route_gemms(case)
    if fastssl and case.loss.startswith("arcl"):
        logits, views = materialising_gemms(case)
        return [logits, dataclasses.replace(views, grads=0)]
    if not (fastssl and case.spec.family == "frobenius"):
        return materialising_gemms(case)
    n, d = case.n_pairs, case.dim
    side = choose_side(n, d, case.route)
    size, other = (d, n) if side == "covariance" else (n, d)
    if case.loss == "vicreg":
        return [Gemm(size, size, other, grads=1, count=2)]
    one_cross_product = (side == "covariance") == (case.loss == "barlow_twins")
    if one_cross_product:
        return [Gemm(size, size, other)]
    return [Gemm(size, size, other, grads=1, count=2)]


def _recent_frobenius_route_gemms(case: Case) -> list[Gemm]:
    """fastssl's FroSSL and TiCo: the squared-Frobenius op on one side (S x S over the other dimension)
    with the operand as its own partner, its gradient one product (as VICReg's Gram); FroSSL once per
    view; TiCo once for ‖aaᵀ‖², plus the N x D product with the running covariance."""
    n, d = case.n_pairs, case.dim
    side = choose_side(n, d, case.route)
    size, other = (d, n) if side == "covariance" else (n, d)
    if case.loss == "frossl":
        return [Gemm(size, size, other, grads=1, count=2)]
    return [Gemm(size, size, other, grads=1), Gemm(n, d, d, grads=1)]


def _total(gemms: list[Gemm], mode: str) -> int:
    backward = mode == "fwd+bwd"
    return sum(g.flops * (1 + g.grads if backward else 1) for g in gemms)


def model_flops(case: Case) -> int:
    """GEMM FLOPs of the materialising algorithm (the same for every provider, so TFLOP/s compare).

    Per product (materialising_gemms): forward 2·R·C·K for an R x C matrix over K; the backward
    adds 2·R·C·K per operand with a gradient (so fwd+bwd = 3x forward when both operands have one,
    e.g. 6·N·D² for Barlow Twins' C = AᵀB).
    """
    return _total(materialising_gemms(case), case.mode)


def route_flops(case: Case) -> int:
    """GEMM FLOPs of the route that ran (route_gemms), without recomputation: the count behind
    "% of peak", at most what any backend of that route computes."""
    return _total(route_gemms(case), case.mode)
