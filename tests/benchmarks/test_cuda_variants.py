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
    from fastssl.kernels.cuda.pairwise_lse import SM90_ENV
    from specs import SPECS

    first = cuda_variants.ROWS[0]
    assert (first.backend, first.env) == ("triton", {})
    known_variables = {SM90_ENV}
    for row in cuda_variants.ROWS[1:]:
        assert row.backend == "cuda" and set(row.env) <= known_variables, row
    assert {SM90_ENV: "1"} in [row.env for row in cuda_variants.ROWS]
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
    the "cuda sm90" row returns other gradients (agrees False); the environment is the row's."""
    import torch

    seen = []

    def fake_measure(case, reps):
        sm90 = os.environ.get("FASTSSL_CUDA_SM90")
        seen.append(sm90)
        if len(seen) % 3 == 2:
            raise RuntimeError("kernel launch failed")
        grads = torch.ones(4) * (2.0 if sm90 == "1" else 1.0)
        return 1e-3, 1.0, grads

    monkeypatch.setattr(cuda_variants, "_measure", fake_measure)
    cuda_variants._setup()
    out = tmp_path / "records.json"
    result = cuda_variants.run(True, 1, 1e9, out, None)
    records = result["records"]
    assert json.loads(out.read_text())["records"] == records
    n_cases = len(cuda_variants.CASES["dry-run"])
    assert seen == [None, None, "1"] * n_cases
    assert [r["label"] for r in records] == ["triton", "cuda", "cuda sm90"] * n_cases
    for first, failed, other in zip(records[::3], records[1::3], records[2::3]):
        assert first["agrees"] and first["ms"] == pytest.approx(1.0)
        assert "kernel launch failed" in failed["error"] and "ms" not in failed
        assert other["agrees"] is False and other["grad_rel_diff"] == pytest.approx(1.0)
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
    assert len(records) == len(cuda_variants.CASES["dry-run"]) * len(cuda_variants.ROWS)
    # every row ran the torch backend on the same inputs: the same loss and gradients to the bit
    assert all(r["agrees"] and r["loss_rel_diff"] == 0 and r["grad_rel_diff"] == 0 for r in records)
    assert "| loss | 2N | D | row | ms |" in proc.stdout and "| nt_xent | 32 | 16 | cuda sm90 |" in proc.stdout


def test_unknown_row_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--rows", "cuda sm91"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cuda sm91" in proc.stderr
