"""Benchmarks of the contrastive losses (DESIGN.md kernel family 1, pairwise LSE).

Every loss x size x provider x mode is one benchmark: NT-Xent first, then CLIP, DCL and MoCo
(with a bank of K = 2N rows). The timed target is one call (forward, or forward and backward)
that synchronises the device; the extra_info of each benchmark carries its peak memory, FLOPs,
TFLOP/s, shapes, dtype, device and versions (the conventions are in benchmarks/README.md).
Sizes and dtype come from FASTSSL_BENCH_SIZES / FASTSSL_BENCH_DTYPE (see _common.bench_sizes).
"""

from __future__ import annotations

import pytest

import _common as common
from _runner import COMPILE_WARNING_FILTER, DEVICE, DTYPE, run_case

pytestmark = COMPILE_WARNING_FILTER

CASES = [
    common.Case(loss, provider, mode, batch, dim, DTYPE, DEVICE)
    for loss in common.LOSSES
    for batch, dim in common.bench_sizes(DEVICE)
    for provider in common.PROVIDERS
    for mode in common.MODES
]


def _case_id(case: common.Case) -> str:
    return f"{case.loss}-{case.provider}-{case.mode}-2N{case.batch}-D{case.dim}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_contrastive(benchmark, case: common.Case, peak_memory, results) -> None:
    run_case(benchmark, case, peak_memory, results)
