"""benchmarks/hopper_variants.py on the CPU: its plan, and its --dry-run, which walks that plan at
tiny sizes through the Triton interpreter (every variant's loss and gradients against today's
kernels on the same inputs), writes the JSON and prints the table. The GPU timings themselves need
a GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import hopper_variants  # noqa: E402  (tests/benchmarks/conftest.py puts benchmarks/ on sys.path)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "hopper_variants.py"


def _run(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "variants.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.parametrize("d", [128, 256, 512])
def test_plan(d):
    """Today's kernels first, then each switch in today's configs (the host-descriptor form too), then
    the wide configs; the backward kernel is NT-Xent's: the symmetric pass at resident D, the blocked
    route's weights past it."""
    from fastssl.kernels.triton import pairwise_lse as K

    rows = hopper_variants.plan(d)
    labels = [label for label, _, _ in rows]
    switches = ["today", "tma", "pipeline", "tma+pipeline", "host_tma", "host_tma+pipeline"]
    assert labels[:6] == switches and labels[-1] == "pointers wide0"
    assert K.parse_hopper_variant(rows[4][1]) == K.HopperVariant(host_tma=True)
    assert any(label.startswith("tma+pipeline wide") for label in labels)
    bwd = "sym" if d <= 256 else "weights"
    for label, text, configs in rows:
        assert set(configs) == {"fwd", bwd}, label
        K.parse_hopper_variant(text)  # a valid setting
    today = rows[0][2]
    assert all(configs == today for _, _, configs in rows[:6]), "the switches are timed in today's configs"
    wide = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in K.HOPPER_CONFIGS["fwd"]]
    assert rows[6][2]["fwd"] in wide and rows[-1][2] == rows[6][2]
    wide_bwd = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in K.HOPPER_CONFIGS.get(bwd, [])]  # "weights" has none
    assert rows[6][2][bwd] in wide_bwd + [today[bwd]], "the backward's wide config, else today's where none fits"


@pytest.mark.slow  # about a minute of interpreted kernels on 2 cores
def test_dry_run_walks_the_plan(tmp_path):
    proc, result = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shapes = hopper_variants.SHAPES["dry-run"]
    want = {(label, two_n, d) for two_n, d in shapes for label, _, _ in hopper_variants.plan(d)}
    got = {(r["label"], r["two_n"], r["d"]) for r in result["records"]}
    assert got == want
    for r in result["records"]:
        assert "skipped" not in r and r["ms"] > 0 and r["agrees"], r
    for label in {r["label"] for r in result["records"]}:
        assert f"| {label} |" in proc.stdout
    assert "interpreter" in result["device"]


def test_budget_skips_rows_and_says_so(tmp_path):
    proc, result = _run(tmp_path, "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["records"] and all(r["skipped"] == "over the 0 s budget" for r in result["records"])
    assert "skipped: over the 0 s budget" in proc.stdout


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """One row raising (a compile error on the GPU, say) leaves its error in the JSON and the table,
    the other rows run, the file is written, and the exit status says so."""
    import torch

    def fake_row(nt_xent_loss, K, text, configs, two_n, d, device, reps):
        if text == "tma":
            raise RuntimeError("PassManager::run failed")
        return [1.0], 2.0, torch.ones(two_n, d)

    monkeypatch.setattr(hopper_variants, "_row", fake_row)
    monkeypatch.setitem(hopper_variants.SHAPES, "dry-run", [(32, 16)])
    out = tmp_path / "variants.json"
    assert hopper_variants.main(["--dry-run", "--json", str(out)]) == 1
    records = json.loads(out.read_text())["records"]
    failed = [r for r in records if "error" in r]
    assert [r["label"] for r in failed] == ["tma"] and "PassManager" in failed[0]["error"]
    assert all(r["agrees"] for r in records if "error" not in r) and len(records) == len(hopper_variants.plan(16))
    printed = capsys.readouterr()
    assert "FAILED: RuntimeError: PassManager::run failed" in printed.out and "tma at 2N=32 D=16" in printed.err


def test_rows_filter_keeps_todays_row(tmp_path, monkeypatch):
    """--rows runs the rows named (and today's, their reference) in the plan's order."""
    import torch

    monkeypatch.setattr(hopper_variants, "_row", lambda *a: ([1.0], 2.0, torch.ones(4, 4)))
    monkeypatch.setitem(hopper_variants.SHAPES, "dry-run", [(32, 16), (48, 16)])
    out = tmp_path / "variants.json"
    assert hopper_variants.main(["--dry-run", "--json", str(out), "--rows", "tma+pipeline,tma"]) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["label"], r["two_n"]) for r in records] == [
        ("today", 32), ("today", 48), ("tma", 32), ("tma", 48), ("tma+pipeline", 32), ("tma+pipeline", 48)]
