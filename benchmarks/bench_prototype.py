"""Benchmarks of the prototype cross-entropy family (docs/design.md kernel family 4): DINO's loss with
the head's weight-normalised last layer (Caron et al. 2021), iBOT's patch loss (Zhou et al. 2022),
SwaV (Caron et al. 2020) and MSN (Assran et al. 2022).

fastssl takes the embeddings that enter the head's last layer and its weight (K x D) and never
stores a rows x K logit matrix; the baselines run the layer, then lightly 1.6's loss on its
logits (baselines.py). A case's size is its student rows, D and K (specs.PROTOTYPES); every
loss x size x dtype x provider x mode is one benchmark, measured as in the other suites
(benchmarks/README.md).
"""

from __future__ import annotations

import pytest

import specs
from _runner import COMPILE_WARNING_FILTER, run_case

pytestmark = COMPILE_WARNING_FILTER

CASES = specs.suite_cases("prototype")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.test_id)
def test_prototype(benchmark, case: specs.Case, peak_memory, results, matmul_peak) -> None:
    run_case(benchmark, case, peak_memory, results, matmul_peak)
