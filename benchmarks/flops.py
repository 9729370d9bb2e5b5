"""FLOP models of the benchmarked calls: the GEMMs of docs/design.md's kernel families 1 (pairwise
LSE) and 2 (off-diagonal Frobenius). Elementwise work (exp, LSE, normalisation) is not counted.
"""

from __future__ import annotations

import dataclasses

import env  # noqa: F401  (puts the checkout on sys.path before fastssl is imported)
from fastssl.ops.frobenius import choose_side
from specs import Case



@dataclasses.dataclass(frozen=True)
class Gemm:
    """count products of an (rows x inner) by (inner x cols) matrix: 2·rows·cols·inner FLOPs each.

    grads: operands with a gradient (the backward runs one more such product per operand);
    passes: how many times fastssl's pairwise-LSE op sweeps this logit matrix (CLIP: rows, then columns).
    """

    rows: int
    cols: int
    inner: int
    grads: int = 2
    passes: int = 1
    count: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.cols * self.inner * self.count


def logit_gemms(case: Case) -> list[Gemm]:
    """The logit (similarity / covariance) products of a pairwise-family loss, per docs/design.md.

    NT-Xent, DCL, DCLW, uniformity: Z Zᵀ over the 2N rows; CLIP: n(z1) n(z2)ᵀ (N x N), two LSE
    passes; MoCo: q bankᵀ (N x K), the bank without gradient; VICReg-exp: one D x D covariance per
    view (over the N rows); VICReg-ctr: one N x N Gram per view (over D); ArCL: Z Zᵀ over views 0
    and 1 plus each sample's m x m Gram of its views.
    """
    n, d, two_n = case.n_pairs, case.dim, case.batch
    loss = case.loss
    if loss in ("nt_xent", "dcl", "dclw", "uniformity"):
        return [Gemm(two_n, two_n, d)]
    if loss == "clip":
        return [Gemm(n, n, d, passes=2)]
    if loss == "moco":
        return [Gemm(n, case.bank_rows, d, grads=1)]
    if loss == "vicreg_exp":
        return [Gemm(d, d, n, count=2)]
    if loss == "vicreg_ctr":
        return [Gemm(n, n, d, count=2)]
    if loss.startswith("arcl"):
        m = case.spec.views
        return [Gemm(two_n, two_n, d), Gemm(m, m, d, count=n)]
    raise ValueError(f"no FLOP model for {loss!r}")


def _frobenius_flops(case: Case, executed: bool) -> int:
    """GEMM FLOPs of the Frobenius family, per docs/design.md family 2.

    One product of an S x S matrix over the other dimension costs g = 2·N·D·S (S = D on the
    covariance side, N on the Gram side). The materialising reference builds C = AᵀB (Barlow Twins,
    S = D), two covariances XᵀX (VICReg, S = D) or abᵀ (spectral, S = N). fastssl's route either
    forms one cross product (Barlow Twins' covariance route, spectral's Gram route) — forward g,
    backward 3g (recompute, da, db) — or two Grams (the other routes) — forward 2g, backward 4g; VICReg's
    shared operand is one Gram per view: forward g, backward 2g (recompute, dx), twice.
    """
    n, d = case.n_pairs, case.dim
    forward = case.mode == "fwd"
    spectral = case.loss == "spectral_contrastive"
    if case.loss == "vicreg":
        side = choose_side(n, d, case.route) if executed else "covariance"
        per_view = 1 if forward else (3 if executed else 2)
        return 2 * per_view * 2 * n * d * (d if side == "covariance" else n)
    if not executed:  # the reference: one product forward, two more backward
        g = 2 * n * d * (n if spectral else d)
        return g if forward else 3 * g
    side = choose_side(n, d, case.route)
    g = 2 * n * d * (d if side == "covariance" else n)
    one_cross_product = (side == "covariance") == (case.loss == "barlow_twins")
    if one_cross_product:
        return g if forward else 4 * g
    return 2 * g if forward else 6 * g


def model_flops(case: Case) -> int:
    """GEMM FLOPs of the materialising algorithm (the same for every provider, so TFLOP/s compare).

    Per logit product (logit_gemms): forward 2·R·C·K for an R x C matrix over K; the backward
    adds 2·R·C·K per operand with a gradient (so fwd+bwd = 3x forward when both operands have
    one). Elementwise work (exp, LSE, normalisation) is not counted.
    """
    if case.spec.family == "frobenius":
        return _frobenius_flops(case, executed=False)
    bwd = case.mode == "fwd+bwd"
    return sum(g.flops * (1 + g.grads if bwd else 1) for g in logit_gemms(case))


def executed_flops(case: Case) -> int:
    """GEMM FLOPs the provider actually runs: model_flops plus the fused backward's recompute.

    fastssl's pairwise-LSE op: each pass computes the logits once forward; fwd+bwd recomputes them
    once and runs one product per gradient (2 + grads per pass). Other providers: model_flops.
    """
    if not case.provider.startswith("fastssl-"):
        return model_flops(case)
    if case.spec.family == "frobenius":
        return _frobenius_flops(case, executed=True)
    bwd = case.mode == "fwd+bwd"
    return sum(g.flops * g.passes * (2 + g.grads if bwd else 1) for g in logit_gemms(case))

