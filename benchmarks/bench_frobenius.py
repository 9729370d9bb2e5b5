"""Benchmarks of the off-diagonal Frobenius family (DESIGN.md kernel family 2): Barlow Twins, VICReg,
spectral contrastive loss.

Every loss x size x provider x mode is one benchmark; fastssl's providers run once per route
("covariance": the D x D side, "gram": the N x N side), so the table shows where each route wins.
Sizes are (2N, D) as everywhere in benchmarks/ (N x D embeddings per view), from
_common.FROBENIUS_SIZE_SETS or FASTSSL_BENCH_SIZES. The FLOP model per route is
_common._frobenius_flops; measurement conventions are in benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses

import pytest

import _common as common
from _runner import COMPILE_WARNING_FILTER, DEVICE, DTYPE, run_case

pytestmark = COMPILE_WARNING_FILTER

CASES = [
    dataclasses.replace(common.Case(loss, provider, mode, batch, dim, DTYPE, DEVICE), route=route)
    for loss in common.FROBENIUS_LOSSES
    for batch, dim in common.bench_sizes(DEVICE, sets=common.FROBENIUS_SIZE_SETS)
    for provider in common.PROVIDERS
    for route in (common.FROBENIUS_ROUTES if provider.startswith("fastssl-") else ("auto",))
    for mode in common.MODES
]


def _case_id(case: common.Case) -> str:
    route = f"-{case.route}" if case.provider.startswith("fastssl-") else ""
    return f"{case.loss}-{case.provider}{route}-{case.mode}-N{case.n_pairs}-D{case.dim}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_frobenius(benchmark, case: common.Case, peak_memory, results) -> None:
    run_case(benchmark, case, peak_memory, results)
