"""Benchmarks of the off-diagonal Frobenius family (docs/design.md kernel family 2): Barlow Twins, VICReg,
spectral contrastive loss (HaoChen et al. 2021), FroSSL (Skean et al. 2024) and TiCo (Zhu et al. 2022).

Every loss x size x dtype x provider x mode is one benchmark; fastssl's providers run once per
route ("covariance": the D x D side, "gram": the N x N side), so the tables show where each route
wins. Sizes are (2N, D) as everywhere in benchmarks/ (N x D embeddings per view), from
specs.SIZE_SETS or FASTSSL_BENCH_SIZES. The FLOP model per route is in flops.py;
measurement conventions are in benchmarks/README.md.
"""

from __future__ import annotations

import pytest

import specs
from _runner import COMPILE_WARNING_FILTER, run_case

pytestmark = COMPILE_WARNING_FILTER

CASES = specs.suite_cases("frobenius")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.test_id)
def test_frobenius(benchmark, case: specs.Case, peak_memory, results, matmul_peak) -> None:
    run_case(benchmark, case, peak_memory, results, matmul_peak)
