"""Benchmarks of the pairwise-LSE family (docs/design.md kernel family 1): NT-Xent, MoCo, DCL, DCLW,
CLIP, uniformity, VICReg-exp / VICReg-ctr (the same op on zᵀ, Garrido et al. 2023), ArCL with m = 4 and
m = 8 views (Zhao et al. 2023), MACL (Huang et al. 2023), DirectCLR (Jing et al. 2022) and SupCon
(Khosla et al. 2020); with them the same tiling's other reductions: SigLIP's pairwise sigmoid (Zhai et
al. 2023) and KoLeo's nearest neighbour (Sablayrolles et al. 2019).

Every loss x size x dtype x provider x mode is one benchmark (specs.suite_cases lists them and
specs.policy_skip says which are skipped on this machine and why). The timed target is one call
(forward, or forward and backward) that synchronises the device; each benchmark's extra_info
carries its FLOPs, TFLOP/s, fraction of the same-run matmul peak, peak memory, shapes, device and
versions (benchmarks/README.md). Sizes: specs.SIZE_SETS or FASTSSL_BENCH_SIZES.
"""

from __future__ import annotations

import pytest

import specs
from _runner import COMPILE_WARNING_FILTER, run_case

pytestmark = COMPILE_WARNING_FILTER

CASES = specs.suite_cases("pairwise")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.test_id)
def test_contrastive(benchmark, case: specs.Case, peak_memory, results, matmul_peak) -> None:
    run_case(benchmark, case, peak_memory, results, matmul_peak)
