"""Test-session setup: the Triton interpreter on GPU-less machines, the `cuda` marker, shared fixtures.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at collection.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NO_CUDA_REASON = "needs a CUDA GPU; this machine has none (tests/backends runs the same checks on the CPU: docs/design.md, \"Correctness without a GPU\")"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
