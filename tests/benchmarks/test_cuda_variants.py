"""benchmarks/cuda_variants.py on the CPU: its plan (the rows select the kernel sets the cuda adapters
read), its environment handling, its bookkeeping of failed and skipped rows, and its --dry-run, which
walks the plan at tiny sizes with every row on the torch backend. The GPU timings need a GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_variants  # noqa: E402  (tests/benchmarks/conftest.py puts benchmarks/ on sys.path)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cuda_variants.py"


def test_plan_rows_select_what_the_adapters_read():
    """The Triton backend first; the cuda rows set exactly the variables the cuda adapters read;
    every case's family has the Triton row and at least one cuda row."""
    from fastssl.kernels.cuda._ext import PIPELINE_ENV, SM90_ENV
    from specs import SPECS

    first = cuda_variants.ROWS[0]
    assert (first.backend, first.env) == ("triton", {})
    known_variables = {SM90_ENV, PIPELINE_ENV}
    for row in cuda_variants.ROWS[1:]:
        assert row.backend == "cuda" and set(row.env) <= known_variables, row
    assert {SM90_ENV: "1"} in [row.env for row in cuda_variants.ROWS]
    assert {PIPELINE_ENV: "1"} in [row.env for row in cuda_variants.ROWS]
    for loss, two_n, d in cuda_variants.CASES["gpu"] + cuda_variants.CASES["dry-run"]:
        rows = [r for r in cuda_variants.ROWS if SPECS[loss].family in r.families]
        assert rows[0] is first and len(rows) >= 2, loss
        assert two_n % 2 == 0 and d > 0


def test_environment_is_set_inside_and_restored_after(monkeypatch):
    monkeypatch.setenv("FASTSSL_TEST_KEPT", "before")
    monkeypatch.delenv("FASTSSL_TEST_ABSENT", raising=False)
    with cuda_variants._Environment({"FASTSSL_TEST_KEPT": "inside", "FASTSSL_TEST_ABSENT": "1"}):
        assert os.environ["FASTSSL_TEST_KEPT"] == "inside" and os.environ["FASTSSL_TEST_ABSENT"] == "1"
    assert os.environ["FASTSSL_TEST_KEPT"] == "before" and "FASTSSL_TEST_ABSENT" not in os.environ


def test_a_failing_row_is_recorded_and_a_disagreeing_one_flagged(tmp_path, monkeypatch):
    """In-process dry run with `_measure` replaced: the "cuda" row raises (recorded, the others run on),
    the opt-in rows return other gradients (agrees False); each call sees its row's environment only."""
    import torch

    seen = []

    def fake_measure(case, reps):
        env = {k: os.environ[k] for k in ("FASTSSL_CUDA_SM90", "FASTSSL_CUDA_PIPELINE") if k in os.environ}
        seen.append(env)
        if case.provider == "fastssl-torch" and len(seen) > 1 and seen[-1] == {} and seen[-2] == {}:
            raise RuntimeError("kernel launch failed")  # the second row without variables: "cuda"
        return 1e-3, 1.0, torch.ones(4) * (2.0 if env else 1.0)

    monkeypatch.setattr(cuda_variants, "_measure", fake_measure)
    cuda_variants._setup()
    out = tmp_path / "records.json"
    result = cuda_variants.run(True, 1, 1e9, out, None)
    records = result["records"]
    assert json.loads(out.read_text())["records"] == records
    from specs import SPECS

    expected = [(loss, row) for loss, _, _ in cuda_variants.CASES["dry-run"] for row in cuda_variants.ROWS
                if SPECS[loss].family in row.families]  # fmt: skip
    assert [(r["loss"], r["label"]) for r in records] == [(loss, row.label) for loss, row in expected]
    assert seen == [row.env for _, row in expected]
    for r in records:
        if r["label"] == "triton":
            assert r["agrees"] and r["ms"] == pytest.approx(1.0)
        elif r["label"] == "cuda":
            assert "kernel launch failed" in r["error"] and "ms" not in r
        else:
            assert r["agrees"] is False and r["grad_rel_diff"] == pytest.approx(1.0)
    assert "FAILED: RuntimeError: kernel launch failed" in cuda_variants.table(result)


def test_rows_past_the_budget_are_skipped(tmp_path):
    cuda_variants._setup()
    result = cuda_variants.run(True, 1, -1.0, tmp_path / "r.json", None)
    assert result["records"] and all("skipped" in r for r in result["records"])


def test_dry_run_walks_the_plan(tmp_path):
    out = tmp_path / "variants.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out), "--reps", "2"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    from specs import SPECS

    assert len(records) == sum(SPECS[loss].family in row.families for loss, _, _ in cuda_variants.CASES["dry-run"]
                               for row in cuda_variants.ROWS)  # fmt: skip
    # every row ran the torch backend on the same inputs: the same loss and gradients to the bit
    assert all(r["agrees"] and r["loss_rel_diff"] == 0 and r["grad_rel_diff"] == 0 for r in records)
    assert "| loss | 2N | D | row | ms |" in proc.stdout and "| nt_xent | 32 | 16 | cuda sm90 |" in proc.stdout


def test_unknown_row_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--rows", "cuda sm91"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cuda sm91" in proc.stderr
