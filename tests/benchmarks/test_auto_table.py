"""benchmarks/auto_table.py on the CPU: runs of cuda_variants.py with made-up timings (its own `run`,
with `_measure` replaced, so the records are exactly what a GPU run writes) turned into proposed
rules, the RESULTS.md table, and the table file, which must round-trip through the library's loader
and select cuda exactly where the tool proposed it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import auto_table  # noqa: E402  (tests/benchmarks/conftest.py puts benchmarks/ on sys.path)
import cuda_variants
from fastssl import auto_gpu_table as table_format

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "auto_table.py"
H200 = [9, 0]
#: The GPU plan of cuda_variants.py; its pairwise cases fall in four classes (N = 4,096 with D = 128;
#: N = 16,384 with D = 128 (NT-Xent and CLIP), 256 and 512 (NT-Xent and CLIP)), its Frobenius cases
#: all on the Gram side.
CASES = cuda_variants.CASES["gpu"]


def _run(tmp_path, monkeypatch, ms, disagree=()) -> Path:
    """cuda_variants.run over CASES with `ms(label, loss, two_n, d)` as each row's time (ms) and
    other gradients for the (label, loss, two_n, d) in `disagree`; the JSON with the GPU fields a
    CPU run cannot record (compute capability 9.0, CUDA 12.8)."""
    calls = {}

    def fake_measure(case, reps):
        key = (case.loss, case.batch, case.dim)
        calls[key] = calls.get(key, 0) + 1
        label = cuda_variants.ROWS[calls[key] - 1].label
        assert (os.environ.get("FASTSSL_CUDA_SM90") == "1") == (label == "cuda sm90")
        grads = torch.ones(4) * (2.0 if (label, *key) in disagree else 1.0)
        return ms(label, *key) / 1e3, 1.0, grads

    monkeypatch.setitem(cuda_variants.CASES, "dry-run", CASES)
    monkeypatch.setattr(cuda_variants, "_measure", fake_measure)
    cuda_variants._setup()
    path = tmp_path / "cuda_variants.json"
    result = cuda_variants.run(True, 5, 1e9, path, None)
    assert result["capability"] is None and result["date"]  # a CPU run measures no GPU
    result.update(capability=H200, cuda="12.8", device="NVIDIA H200", dtype="bfloat16")
    path.write_text(json.dumps(result))
    return path


class _Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _tool(capsys, *args, check=True) -> _Ran:
    """auto_table.main in this process (the command line is tested once, in a subprocess)."""
    capsys.readouterr()
    rc = auto_table.main([str(a) for a in args])
    ran = _Ran(rc, *capsys.readouterr())
    if check:
        assert rc == 0, ran.stderr[-2000:]
    return ran


def _empty_table(tmp_path) -> Path:
    path = tmp_path / "auto_gpu_table.json"
    path.write_text(table_format.AUTO_GPU_TABLE_FILE.read_text())
    return path


def _selects(table_path: Path, capability=tuple(H200)) -> dict:
    """(loss, 2N, D) of every GPU case -> the backend the written table gives auto on that GPU."""
    table = table_format.load_auto_gpu_table(table_path)
    out = {}
    for loss, two_n, d in CASES:
        rules = table[auto_table.OPS[loss]]
        match = [r.backend for r in rules if r.matches(torch.bfloat16, (two_n // 2, d), capability)]
        out[(loss, two_n, d)] = match[0] if match else "triton"
    return out


def _speed(factor_by_case: dict, default=0.5):
    """Triton 10 ms everywhere; "cuda" at 10 * factor ms (factor_by_case, else `default`); "cuda sm90" at 1 ms."""

    def ms(label, loss, two_n, d):
        if label == "triton":
            return 10.0
        return 1.0 if label == "cuda sm90" else 10.0 * factor_by_case.get((loss, two_n, d), default)

    return ms


def test_shape_classes():
    pairwise = [auto_table.shape_class("pairwise_lse", n, d) for n, d in
                [(8191, 128), (8192, 1), (8192, 128), (8192, 129), (8192, 256), (8192, 257), (10**6, 4096)]]
    assert [(c.rows, c.d) for c in pairwise] == [((1, 8191), (1, 128)), ((8192, None), (1, 128)),
                                                 ((8192, None), (1, 128)), ((8192, None), (129, 256)),
                                                 ((8192, None), (129, 256)), ((8192, None), (257, None)),
                                                 ((8192, None), (257, None))]
    assert all(c.side is None for c in pairwise)
    assert auto_table.shape_class("sq_frobenius", 2048, 8192).side == "gram"
    assert auto_table.shape_class("sq_frobenius", 4096, 4096).side == "covariance"
    assert set(auto_table.OPS) == {loss for loss, _, _ in CASES}


def test_cuda_faster_and_agreeing_everywhere_gets_every_measured_class(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path, monkeypatch, _speed({}))
    table = _empty_table(tmp_path)
    proc = _tool(capsys, run, "--write", table)
    assert _selects(table) == {case: "cuda" for case in CASES}
    assert all(b == "triton" for b in _selects(table, (8, 0)).values())  # only the measured capability
    written = json.loads(table.read_text())
    entry = written["ops"]["pairwise_lse"][0]
    assert (entry["device"], entry["capability"], entry["cuda"]) == ("NVIDIA H200", H200, "12.8")
    assert entry["triton"] == json.loads(run.read_text())["triton"] and entry["date"]
    assert [r["class"] for r in entry["rules"]] == ["N < 8,192, 1 <= D <= 128", "N >= 8,192, 1 <= D <= 128",
                                                    "N >= 8,192, 129 <= D <= 256", "N >= 8,192, D > 256"]
    assert all(r["speedup"] == pytest.approx(2.0) and r["dtypes"] == ["bfloat16"] for r in entry["rules"])
    assert [r["side"] for r in written["ops"]["sq_frobenius"][0]["rules"]] == ["gram"]
    assert ("| pairwise_lse | N >= 8,192, 1 <= D <= 128 | clip | 32768 | 128 | 10.000 | cuda | 5.000 | 2.00x | yes "
            "| cuda |") in proc.stdout
    assert "NVIDIA H200 (compute capability 9.0)" in proc.stdout and "CUDA 12.8" in proc.stdout


def test_one_slow_or_disagreeing_case_keeps_its_class_on_triton(tmp_path, monkeypatch, capsys):
    """CLIP at 2N = 32,768, D = 128 only 1.04x (under 1.05x): the whole class N >= 8,192, D <= 128
    (NT-Xent too, 2x there) keeps triton; NT-Xent at D = 512 disagrees: that class keeps triton too."""
    slow = ("clip", 32768, 128)
    wrong = ("cuda", "nt_xent", 32768, 512)
    run = _run(tmp_path, monkeypatch, _speed({slow: 1 / 1.04}), disagree={wrong})
    table = _empty_table(tmp_path)
    proc = _tool(capsys, run, "--write", table)
    selects = _selects(table)
    assert selects == {case: "triton" if case in [("nt_xent", 32768, 128), slow, ("nt_xent", 32768, 512),
                                                  ("clip", 32768, 512)] else "cuda" for case in CASES}
    assert "not cuda: 1.04x at clip 2N=32768 D=128, under 1.05x" in proc.stdout
    assert "not cuda: disagrees with triton at nt_xent 2N=32768 D=512" in proc.stdout
    # a lower bar admits the slow class, not the disagreeing one
    _tool(capsys, run, "--write", table, "--min-speedup", "1.03")
    assert _selects(table)[slow] == "cuda" and _selects(table)[("nt_xent", 32768, 512)] == "triton"


def test_an_untimed_case_keeps_its_class_on_triton(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path, monkeypatch, _speed({}))
    result = json.loads(run.read_text())
    for rec in result["records"]:
        if (rec["label"], rec["loss"], rec["two_n"]) == ("cuda", "vicreg", 4096):
            del rec["ms"]
            rec["error"] = "RuntimeError: launch failed"
    run.write_text(json.dumps(result))
    table = _empty_table(tmp_path)
    proc = _tool(capsys, run, "--write", table)
    assert json.loads(table.read_text())["ops"]["sq_frobenius"] == []  # the Gram side: not proven
    assert "not cuda: not timed at vicreg 2N=4096 D=8192 (RuntimeError: launch failed)" in proc.stdout
    assert _selects(table)[("nt_xent", 8192, 128)] == "cuda"


def test_opt_in_kernel_sets_need_promotion_and_are_not_written(tmp_path, monkeypatch, capsys):
    """"cuda sm90" (FASTSSL_CUDA_SM90=1) 10x faster everywhere and today's cuda slower everywhere:
    nothing is written, and every class lists the sm90 set as needing promotion."""
    run = _run(tmp_path, monkeypatch, _speed({}, default=1.2))
    table = _empty_table(tmp_path)
    before = table.read_text()
    proc = _tool(capsys, run, "--write", table)
    assert json.loads(table.read_text()) == json.loads(before)
    assert all(b == "triton" for b in _selects(table).values())
    promoted = [line for line in proc.stdout.splitlines() if line.startswith("* needs promotion, not written:")]
    assert len(promoted) == 5 and all("cuda sm90 (FASTSSL_CUDA_SM90=1, 10.00x at least)" in p for p in promoted)
    assert "| needs promotion (FASTSSL_CUDA_SM90=1) |" in proc.stdout
    assert "* none: every measured shape class keeps triton" in proc.stdout


def test_write_replaces_only_this_capabilitys_measurement(tmp_path, monkeypatch, capsys):
    """An earlier 9.0 measurement is replaced, an 8.0 one kept; an op with no rule now loses its 9.0 entry."""
    table = _empty_table(tmp_path)
    _tool(capsys, _run(tmp_path, monkeypatch, _speed({})), "--write", table)
    data = json.loads(table.read_text())
    a100 = json.loads(json.dumps(data["ops"]["pairwise_lse"][0]))
    a100.update(device="NVIDIA A100", capability=[8, 0])
    data["ops"]["pairwise_lse"].append(a100)
    table.write_text(json.dumps(data))
    slower = {case: 1.2 for case in CASES if auto_table.OPS[case[0]] == "sq_frobenius"}
    proc = _tool(capsys, _run(tmp_path, monkeypatch, _speed(slower, default=0.8)), "--write", table)
    data = json.loads(table.read_text())
    assert [e["device"] for e in data["ops"]["pairwise_lse"]] == ["NVIDIA A100", "NVIDIA H200"]
    assert data["ops"]["pairwise_lse"][1]["rules"][0]["speedup"] == pytest.approx(1.25)
    assert data["ops"]["sq_frobenius"] == []
    assert "sq_frobenius: replaced the measurement of NVIDIA H200" in proc.stdout
    assert _selects(table, (8, 0))[("nt_xent", 8192, 128)] == "cuda"  # the A100 entry still reads


def test_a_run_without_gpu_fields_or_a_broken_table_is_refused(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path, monkeypatch, _speed({}))
    result = json.loads(run.read_text())
    table = _empty_table(tmp_path)
    before = table.read_text()
    for key in ("capability", "cuda"):
        broken = dict(result, **{key: None})
        run.write_text(json.dumps(broken))
        proc = _tool(capsys, run, "--write", table, check=False)
        assert proc.returncode == 2 and f"the run has no '{key}'" in proc.stderr
    assert table.read_text() == before
    run.write_text(json.dumps(result))
    table.write_text(before.replace('"format": 1', '"format": 7'))
    proc = _tool(capsys, run, "--write", table, check=False)
    assert proc.returncode == 2 and "format: expected 1" in proc.stderr


def test_the_command_line(tmp_path, monkeypatch):
    """As gpu_check.sh runs it: a subprocess from another directory; a bad --min-speedup is a usage error."""
    run = _run(tmp_path, monkeypatch, _speed({}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "* pairwise_lse, N < 8,192, 1 <= D <= 128: cuda (2.00x at least)" in proc.stdout
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run), "--min-speedup", "1.0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--min-speedup must be > 1" in proc.stderr


def test_the_markdown_goes_to_a_file(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path, monkeypatch, _speed({}))
    out = tmp_path / "auto_table.md"
    proc = _tool(capsys, run, "--out-md", out)
    assert out.read_text() == proc.stdout and "Proposed rules:" in proc.stdout
