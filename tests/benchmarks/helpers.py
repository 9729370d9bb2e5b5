"""Helpers shared by the benchmark-tooling tests."""

from __future__ import annotations

import re

import torch
from torch.profiler import ProfilerActivity, profile

import providers
import specs

#: GEMM ops and the positions of their two matrix operands in the profiler's input shapes.
_GEMM_OPERANDS = {"aten::mm": (0, 1), "aten::bmm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2),
                  "aten::baddbmm": (1, 2), "aten::baddbmm_": (1, 2)}


#: K of the prototype family in the tiny cases of these tests.
TINY_PROTOTYPES = 24


def tiny_case(loss: str, provider: str, mode: str = "fwd+bwd", dtype: str = "float32", route: str = "auto",
              batch: int = 48, dim: int = 40) -> specs.Case:
    """A case small enough for any test: `batch` rows (rounded up to whole images of the loss's crops
    for the prototype family, which also gets K = TINY_PROTOTYPES)."""
    spec = specs.SPECS[loss]
    prototypes = TINY_PROTOTYPES if spec.family == "prototype" else 0
    if spec.family == "prototype" and spec.views:
        batch = -(-batch // spec.views) * spec.views
    return specs.Case(loss, provider, mode, batch, dim, dtype, route=route, prototypes=prototypes)


def gemm_flops_run(case: specs.Case) -> int:
    """GEMM FLOPs of one `case.mode` call of `case`, summed from the profiler's GEMM events (outermost
    only: an addmm that calls mm is counted once); 2·m·k·n per (m, k) x (k, n) product, per batch."""
    fn = providers.loss_function(case.loss, case.provider, case.route)
    inputs = providers.make_inputs(case)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn(*inputs)
        if case.mode == "fwd+bwd":
            torch.autograd.grad(out, [t for t in inputs if t.requires_grad])
    total = 0
    for event in prof.events():
        if event.name not in _GEMM_OPERANDS:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in _GEMM_OPERANDS:
            parent = parent.cpu_parent
        if parent is not None:
            continue
        i, j = _GEMM_OPERANDS[event.name]
        a, b = event.input_shapes[i], event.input_shapes[j]
        batch = a[0] if len(a) == 3 else 1
        total += 2 * batch * a[-2] * a[-1] * b[-1]
    return total


def assert_share_cell(cell: str) -> None:
    """A "% of peak" cell: a percentage at most 100, "—", "OOM", or the words saying the probe was beaten."""
    if cell in ("—", "OOM") or re.fullmatch(r"above the probe \([0-9.]+×\)", cell):
        return
    assert re.fullmatch(r"[0-9]+\.[0-9]", cell) and float(cell) <= 100.0, f"share cell {cell!r}"
