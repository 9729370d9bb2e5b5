"""FLOP counts of the benchmarks and the share of the matmul peak they print.

The counts are checked by hand for a few cases and, for every loss, against the GEMMs that really
run on the CPU (torch.profiler, with shapes): the materialising reference runs exactly its model
FLOPs, and no implementation runs fewer GEMM FLOPs than the route count behind "% of peak" — which
is what keeps that share at or below 100% unless the probe's matmul is really beaten.
"""

from __future__ import annotations

import pytest

import flops
import formatting
import specs
from tests.benchmarks.helpers import assert_share_cell, gemm_flops_run, tiny_case


def _case(loss: str, provider: str, mode: str, route: str = "auto", batch: int = 48, dim: int = 40) -> specs.Case:
    return tiny_case(loss, provider, mode, route=route, batch=batch, dim=dim)


MODES = specs.MODES


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", list(specs.SPECS))
def test_reference_runs_exactly_its_model_flops(loss: str, mode: str) -> None:
    case = _case(loss, "reference", mode)
    assert flops.route_flops(case) == flops.model_flops(case) == gemm_flops_run(case), case.label


FASTSSL_TORCH_CASES = [
    (loss, route, mode, batch, dim)
    for loss in specs.SPECS
    for route in (specs.FROBENIUS_ROUTES if specs.SPECS[loss].family == "frobenius" else ("auto",))
    for mode in MODES
    for batch, dim in ((48, 40), (96, 24))  # N < D and N > D: each route on both sides of the auto switch
]


@pytest.mark.parametrize("loss,route,mode,batch,dim", FASTSSL_TORCH_CASES)
def test_route_flops_never_exceed_what_fastssl_torch_runs(loss: str, route: str, mode: str, batch: int,
                                                           dim: int) -> None:
    case = _case(loss, "fastssl-torch", mode, route, batch, dim)
    ran = gemm_flops_run(case)
    assert 0 < flops.route_flops(case) <= ran, f"{case.test_id}: counted {flops.route_flops(case)}, ran {ran}"


def test_flop_formulas_by_hand() -> None:
    n, d = 32, 8

    def case(loss: str, mode: str, provider: str = "reference", route: str = "auto") -> specs.Case:
        return specs.Case(loss, provider, mode, 2 * n, d, route=route)

    assert flops.model_flops(case("clip", "fwd")) == 2 * n * n * d
    assert flops.model_flops(case("moco", "fwd+bwd")) == 2 * (2 * n * 2 * n * d)  # K = 2N rows, bank without grad
    assert flops.model_flops(case("vicreg_exp", "fwd")) == 2 * (2 * d * d * n)  # one D x D covariance per view
    assert flops.model_flops(case("vicreg_ctr", "fwd+bwd")) == 3 * 2 * (2 * n * n * d)
    assert flops.model_flops(case("arcl_m4", "fwd")) == 2 * (2 * n) ** 2 * d + n * 2 * 4 * 4 * d
    assert flops.model_flops(case("barlow_twins", "fwd+bwd")) == 6 * n * d * d  # C = AᵀB, both operands' gradients
    assert flops.model_flops(case("vicreg", "fwd+bwd")) == 2 * 6 * n * d * d  # XᵀX per view, autograd's two products
    assert flops.model_flops(case("spectral_contrastive", "fwd")) == 2 * n * n * d
    # fastssl's routes: the route's products, recomputation not counted.
    assert flops.route_flops(case("barlow_twins", "fwd+bwd", "fastssl-torch", "covariance")) == 6 * n * d * d
    assert flops.route_flops(case("barlow_twins", "fwd", "fastssl-torch", "gram")) == 2 * (2 * n * n * d)  # AAᵀ, BBᵀ
    assert flops.route_flops(case("barlow_twins", "fwd+bwd", "fastssl-torch", "gram")) == 4 * (2 * n * n * d)
    assert flops.route_flops(case("vicreg", "fwd+bwd", "fastssl-torch", "gram")) == 2 * 2 * (2 * n * n * d)
    assert flops.route_flops(case("spectral_contrastive", "fwd+bwd", "fastssl-torch", "gram")) == 3 * (2 * n * n * d)
    assert flops.route_flops(case("spectral_contrastive", "fwd", "fastssl-torch", "covariance")) == 2 * (2 * n * d * d)
    assert flops.route_flops(case("nt_xent", "fwd+bwd", "fastssl-triton")) == flops.model_flops(case("nt_xent", "fwd+bwd"))


def test_the_gram_route_share_that_read_237_percent() -> None:
    """VICReg forward on the Gram route at the CPU set's N = 512, D = 2048 did a quarter of the model's
    GEMM work (N/D), so model FLOPs / time read 237% of the peak; the route count reads a quarter of it."""
    case = specs.Case("vicreg", "fastssl-torch", "fwd", 1024, 2048, route="gram")
    n, d = 512, 2048
    assert flops.route_flops(case) == 2 * (2 * n * n * d)
    assert flops.model_flops(case) == 4 * flops.route_flops(case)
    seconds = flops.model_flops(case) / 2.37 / 1e12  # model rate 2.37 TFLOP/s against a 1 TFLOP/s peak
    assert formatting.format_share(flops.route_flops(case) / seconds / 1e12) == "59.2"


@pytest.mark.parametrize("fraction", [0.0, 0.004, 0.5, 0.99949, 0.99951, 1.0, 1.0004, 1.38, 2.37, 1e3])
def test_a_share_of_peak_is_never_printed_above_100(fraction: float) -> None:
    cell = formatting.format_share(fraction)
    assert_share_cell(cell)
    assert ("above the probe" in cell) == (fraction > 1)
    if fraction > 1:
        assert f"({fraction:.2f}×)" in cell

