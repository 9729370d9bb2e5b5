"""Tests of the benchmark tooling on the CPU: the suite's JSON, report.py, max_batch.py, profile_ncu.py.

The report is tested on the JSON of a real (tiny) run of ``pytest benchmarks/ --benchmark-only``
in a subprocess, under an address-space limit (RLIMIT_AS) so that the materialising reference at
2N = 131,072 (64 GiB of logits) really runs out of memory: the OOM path of the suite is exercised
end to end, not simulated. Expected speed-ups are computed here from the JSON's own medians.
max_batch.py's search is unit-tested with a fake predicate, and run for real under a memory limit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flops
import formatting
import max_batch
import report
import specs
from tests.benchmarks.helpers import assert_share_cell

ROOT = Path(__file__).resolve().parents[2]

OOM_2N = 131072  # the reference's fp32 2N x 2N logits alone: 64 GiB
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Runs a script or pytest in a child whose address space is capped at what it has mapped after
# importing torch and fastssl plus a headroom, so that a too-large allocation fails at once (a real
# "can't allocate memory"). Relative to the child's own size: a CUDA build of torch maps far more
# than the CPU build, so a fixed cap would not mean the same thing on every machine.
_LIMITED = """
import re, resource, runpy, sys
import torch, fastssl
size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
limit = size + int(float(sys.argv[1]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = sys.argv[2:]
if sys.argv[0] == "pytest":
    import pytest
    sys.exit(pytest.main(sys.argv[1:]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_limited(headroom_gib: float, args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LIMITED, str(headroom_gib), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _env(**extra: str) -> dict:
    # PYTEST_XDIST_*: a test run under pytest-xdist must not make the child's pytest-benchmark think it is
    # an xdist worker too (it would turn itself off and refuse --benchmark-only)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSSL_BENCH_", "PYTEST_XDIST_"))}
    env.pop("TRITON_INTERPRET", None)  # as a plain benchmark run: no Triton interpreter
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU runs, also on a machine with a GPU
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def suite_json(tmp_path_factory) -> Path:
    """JSON of a real tiny suite run: NT-Xent, fastssl-torch and reference, 2N = 256 and 512 (D = 16),
    plus the reference at 2N = 131,072, which runs out of memory with 3 GiB of address space to spare."""
    out = tmp_path_factory.mktemp("bench") / "benchmarks.json"
    env = _env(FASTSSL_BENCH_SIZES=f"256x16,512x16,{OOM_2N}x16", FASTSSL_BENCH_DTYPE="float32",
               FASTSSL_BENCH_LOSSES="nt_xent", FASTSSL_BENCH_PROVIDERS="fastssl-torch,reference",
               FASTSSL_BENCH_DEVICE="cpu")
    args = ["pytest", "benchmarks/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
            "-k", f"not (fastssl-torch and 2N{OOM_2N})", f"--benchmark-json={out}"]
    run = _run_limited(3, args, env, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "10 passed" in run.stdout, run.stdout[-3000:]
    out.with_suffix(".stdout").write_text(run.stdout)  # the table printed at the end of the run
    return out


def _bench(doc: dict, provider: str, mode: str, batch: int) -> dict:
    (found,) = [b for b in doc["benchmarks"] if (b["extra_info"]["provider"], b["extra_info"]["mode"],
                                                 b["extra_info"]["batch_2n"]) == (provider, mode, batch)]
    return found


def test_suite_json_records_results_and_oom(suite_json: Path) -> None:
    doc = json.loads(suite_json.read_text())
    assert len(doc["benchmarks"]) == 10
    for provider in ("fastssl-torch", "reference"):
        for mode in ("fwd", "fwd+bwd"):
            for batch in (256, 512):
                info = _bench(doc, provider, mode, batch)["extra_info"]
                assert info["status"] == "ok" and info["peak_mib"] > 0
                # FLOPs by the formula: forward 2·(2N)²·D, fwd+bwd 3x that (dZ through both operands).
                assert info["model_flops"] == 2 * batch * batch * 16 * (3 if mode == "fwd+bwd" else 1)
                assert info["tflops"] == pytest.approx(info["model_flops"] / info["median_s"] / 1e12)
                assert info["route_flops"] == info["model_flops"]  # NT-Xent: the same products on every route
                assert info["route_tflops"] == pytest.approx(info["route_flops"] / info["median_s"] / 1e12)
                assert info["fraction_of_peak"] == pytest.approx(info["route_tflops"] / info["matmul_peak_tflops"])
                assert info["matmul_peak"].startswith("fp32 torch.matmul 1024x1024x1024 on cpu")
                assert info["torch"] and info["device_name"] and info["peak_method"] == "rss_growth_helper_process"
    for mode in ("fwd", "fwd+bwd"):
        info = _bench(doc, "reference", mode, OOM_2N)["extra_info"]
        assert info["status"] == "OOM" and info["peak_mib"] == "OOM" and info["median_s"] is None


@pytest.fixture(scope="module")
def rendered(suite_json: Path, tmp_path_factory) -> dict:
    """report.py run on the suite's JSON (with a max_batch.py JSON beside it) and a RESULTS.md to refresh."""
    tmp = tmp_path_factory.mktemp("report")
    results_md = tmp / "RESULTS.md"
    results_md.write_text("# Results\n\nHand-written CPU notes stay.\n\n<!-- report.py:begin cpu -->\nold numbers\n"
                          "<!-- report.py:end cpu -->\n\n## GPU\n\n<!-- report.py:begin cuda -->\nGPU section stays\n"
                          "<!-- report.py:end cuda -->\n\nTrailing notes stay.\n")
    max_json = tmp / "max_batch.json"
    max_json.write_text(json.dumps({"device": "cpu", "device_name": "test CPU", "d": 128, "dtype": "bfloat16",
                                    "limit": 4096, "results": {"fastssl": {"max_2n": 4096, "first_failure": None,
                                                                           "limited_by": "limit", "tries": [{}] * 5}}}))
    cmd = [sys.executable, "benchmarks/report.py", str(suite_json), "--out", str(tmp / "out"), "--results-md",
           str(results_md), "--max-batch", str(max_json)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first = results_md.read_text()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    return {"dir": tmp / "out", "md": (tmp / "out" / "report.md").read_text(), "results_md": results_md.read_text(),
            "first_results_md": first}


def _table_rows(markdown: str, loss: str) -> list[dict]:
    section = markdown.split(f"#### {loss}\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    lines = [line.strip("|").split("|") for line in section.splitlines()]
    headers = [h.strip() for h in lines[0]]
    return [dict(zip(headers, (c.strip() for c in cells))) for cells in lines[2:]]


def test_report_tables_speedups_and_oom(suite_json: Path, rendered: dict) -> None:
    doc = json.loads(suite_json.read_text())
    rows = _table_rows(rendered["md"], "nt_xent")
    assert {r["implementation"] for r in rows} == {"fastssl-torch", "reference"}
    assert len(rows) == 10
    for mode in ("fwd", "fwd+bwd"):
        for batch in (256, 512):
            ours = _bench(doc, "fastssl-torch", mode, batch)["stats"]["median"]
            ref = _bench(doc, "reference", mode, batch)["stats"]["median"]
            (row,) = [r for r in rows if (r["mode"], r["2N"], r["implementation"]) == (mode, f"{batch:,}", "fastssl-torch")]
            assert row["vs reference"] == f"{ref / ours:.2f}×"
            assert row["vs compile"] == "—"  # no compiled run in this JSON
            info = _bench(doc, "fastssl-torch", mode, batch)["extra_info"]
            assert row["model TFLOP/s"] == f"{info['model_flops'] / ours / 1e12:.3g}"
            share = info["route_flops"] / ours / 1e12 / info["matmul_peak_tflops"]
            assert row["% of peak"] == formatting.format_share(share)
            assert row["peak MiB"] == f"{info['peak_mib']:,.1f}"
    oom_rows = [r for r in rows if r["2N"] == f"{OOM_2N:,}"]
    assert len(oom_rows) == 2
    for row in oom_rows:
        assert row["implementation"] == "reference"
        assert row["time ms"] == row["model TFLOP/s"] == row["% of peak"] == row["peak MiB"] == "OOM"
    assert "#### Maximum batch" in rendered["md"] and "| fastssl | 4,096 | — | limit | 5 |" in rendered["md"]


def test_targets_table_from_rows(suite_json: Path) -> None:
    """The targets' status, computed from the rows' times (the CPU rows re-labelled as the GPU targets' sizes:
    the targets are GPU sizes, and a CPU report leaves them out)."""
    _, rows = report.load(suite_json)
    ours = next(r for r in rows if (r.provider, r.mode, r.batch_2n) == ("fastssl-torch", "fwd+bwd", 512))
    ref = next(r for r in rows if (r.provider, r.mode, r.batch_2n) == ("reference", "fwd+bwd", 512))
    at_target = [dataclasses.replace(r, dtype="bfloat16", batch_2n=32768, dim=256) for r in (ours, ref)]
    table = report.targets_table(at_target, {"device_name": "X", "results": {
        "fastssl": {"max_2n": 4096, "limited_by": "limit"}}})
    ratio = ref.median_s / ours.median_s
    line = next(line for line in table.splitlines() if "vs reference eager" in line and "NT-Xent" in line)
    assert f"| {ratio:.2f}× (fastssl-torch" in line
    assert ("| met |" in line) == (ratio >= 4) and (f"missed by {4 / ratio:.2f}×" in line) == (ratio < 4)
    compile_line = next(line for line in table.splitlines() if "torch.compile" in line)
    assert "not in this run" in compile_line  # no compiled row
    assert "| 4,096 (search limit reached, not OOM) on X | missed by 244.14× |" in table  # 1e6 / 4096
    frac = ours.model_flops / ours.median_s / 1e12 / ours.matmul_peak_tflops
    assert f"| {formatting.format_share(frac)}% of" in table
    barlow = next(line for line in table.splitlines() if "Barlow Twins" in line)
    assert "not in this run" in barlow
    # The bf16 baselines' lines: no goal, reported where measured.
    assert "| same: vs the bf16 materialising baseline (torch.compile) | no target | not in this run" in table


def test_report_marks_speedup_over_an_oom_baseline(suite_json: Path) -> None:
    """A fastssl row at a size where the reference ran out of memory says so instead of a ratio.
    (The tiny run does not time fastssl at 2N = 131,072 on the CPU; the row is copied here, re-sized.)"""
    _, rows = report.load(suite_json)
    ours = next(r for r in rows if r.provider == "fastssl-torch" and r.mode == "fwd+bwd")
    moved = dataclasses.replace(copy.deepcopy(ours), batch_2n=OOM_2N)
    table = report.loss_tables(rows + [moved])["nt_xent"]
    line = next(line for line in table.splitlines() if f"| {OOM_2N:,} |" in line and "fastssl-torch" in line)
    assert "| ref OOM |" in line


def _share_cells(markdown: str) -> list[str]:
    """Every cell under a "% of peak" header in the Markdown tables of `markdown`."""
    cells, column = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            column = parts.index("% of peak") if "% of peak" in parts else -1
        elif column >= 0 and set(parts[column]) - set("-: "):
            cells.append(parts[column])
    return cells


def _assert_no_percentage_above_100(text: str) -> None:
    for number in re.findall(r"([0-9][0-9,]*(?:\.[0-9]+)?)\s*%", text):
        assert float(number.replace(",", "")) <= 100, f"{number}% printed"


def test_report_never_prints_a_share_of_peak_above_100(suite_json: Path) -> None:
    """Rows built to beat the peak both ways: GEMMs that really ran 2.37x faster than the probe, and
    VICReg's Gram route at N = 512, D = 2048, whose model FLOPs / time read 237% (a newcomer saw that
    on the CPU). Neither may print a share above 100, in any table or in the targets."""
    doc, rows = report.load(suite_json)
    ours = next(r for r in rows if (r.provider, r.mode, r.batch_2n) == ("fastssl-torch", "fwd+bwd", 512))
    peak = ours.matmul_peak_tflops
    # Synthetic timed rows (oom=False: the suite's own row may have run out of its capped memory).
    beats_probe = dataclasses.replace(ours, batch_2n=1024, n_pairs=512, oom=False,
                                      median_s=ours.route_flops / (2.37 * peak * 1e12))
    case = specs.Case("vicreg", "fastssl-torch", "fwd", 1024, 2048, route="gram")
    gram = dataclasses.replace(ours, loss="vicreg", family="frobenius", implementation="fastssl-torch (gram)",
                               mode="fwd", oom=False, batch_2n=1024, n_pairs=512, dim=2048, model_flops=flops.model_flops(case),
                               route_flops=flops.route_flops(case),
                               median_s=flops.model_flops(case) / (2.37 * peak * 1e12))
    cpu = report.render(doc, rows + [beats_probe, gram], "x.json", None, [], None)
    cells = _share_cells(cpu)
    assert len(cells) == len(rows) + 2
    for cell in cells:
        assert_share_cell(cell)
    assert "above the probe (2.37×)" in cells and "59.2" in cells
    _assert_no_percentage_above_100(cpu)

    # The GPU section adds the targets: fastssl's NT-Xent at the target size, faster than the probe.
    ref = next(r for r in rows if (r.provider, r.mode, r.batch_2n) == ("reference", "fwd+bwd", 512))
    gpu_rows = [dataclasses.replace(r, dtype="bfloat16", batch_2n=32768, n_pairs=16384, dim=256,
                                    info=dict(r.info, device="cuda")) for r in (beats_probe, ref)]
    gpu = report.render(doc, gpu_rows, "x.json", None, [], None)
    for cell in _share_cells(gpu):
        assert_share_cell(cell)
    assert "above the probe (2.37×) of" in gpu
    _assert_no_percentage_above_100(gpu)


def test_suite_table_never_prints_a_share_of_peak_above_100(suite_json: Path) -> None:
    """The table the suite prints at the end of a run: its "% peak" column comes from format_share too."""
    stdout = suite_json.with_suffix(".stdout").read_text()
    table = stdout.split("fastssl: time, peak memory above inputs", 1)[1].split("matmul peak of this run", 1)[0]
    lines = [line for line in table.splitlines()[1:] if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    assert header[-1] == "% peak"
    shares = [re.split(r"\s{2,}", line.strip())[-1] for line in lines[2:]]
    assert len(shares) == 10
    for cell in shares:
        assert_share_cell(cell)


def test_report_gives_fastssl_ratio_to_each_baseline(suite_json: Path) -> None:
    """Rows of the bf16 baselines (eager, compiled) and Inf-CL get their own "vs" columns: the baseline's
    time / the row's time, or "<name> OOM"; a loss without such rows keeps only the reference columns."""
    _, rows = report.load(suite_json)
    ours = next(r for r in rows if (r.provider, r.mode, r.batch_2n) == ("fastssl-torch", "fwd+bwd", 512))
    ref = next(r for r in rows if (r.provider, r.mode, r.batch_2n) == ("reference", "fwd+bwd", 512))
    eager = dataclasses.replace(ref, provider="materialising-bf16", implementation="materialising-bf16",
                                median_s=3 * ours.median_s)
    compiled = dataclasses.replace(ref, provider="materialising-bf16-compiled",
                                   implementation="materialising-bf16-compiled", oom=True, median_s=None)
    clip = [dataclasses.replace(r, loss="clip") for r in (ours, ref)]
    clip.append(dataclasses.replace(ref, loss="clip", provider="inf_cl", implementation="inf_cl",
                                    median_s=ours.median_s / 2))
    tables = report.loss_tables(rows + [eager, compiled] + clip)
    (row,) = [r for r in _table_rows("#### nt_xent\n" + tables["nt_xent"], "nt_xent")
              if (r["mode"], r["2N"], r["implementation"]) == ("fwd+bwd", "512", "fastssl-torch")]
    assert row["vs bf16 eager"] == "3.00×" and row["vs bf16 compiled"] == "bf16 compiled OOM"
    assert row["vs reference"] == f"{ref.median_s / ours.median_s:.2f}×"
    assert "vs Inf-CL" not in tables["nt_xent"]
    (clip_row,) = [r for r in _table_rows("#### clip\n" + tables["clip"], "clip") if r["implementation"] == "fastssl-torch"]
    assert clip_row["vs Inf-CL"] == "0.50×" and "vs bf16 eager" not in clip_row


def test_report_plots(rendered: dict) -> None:
    pngs = sorted(rendered["dir"].glob("*.png"))
    assert [p.name for p in pngs] == ["nt_xent_fp32_D16.png"]
    data = pngs[0].read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert "nt_xent_fp32_D16" in rendered["md"]


def test_results_md_section_is_refreshed_in_place(rendered: dict) -> None:
    text = rendered["results_md"]
    assert text == rendered["first_results_md"]  # a second run gives the same file
    assert "old numbers" not in text and "Hand-written CPU notes stay." in text and "Trailing notes stay." in text
    assert "<!-- report.py:begin cuda -->\nGPU section stays\n<!-- report.py:end cuda -->" in text
    cpu = text.split("<!-- report.py:begin cpu -->", 1)[1].split("<!-- report.py:end cpu -->", 1)[0]
    assert "#### nt_xent" in cpu and "| OOM |" in cpu and "GPU targets" in cpu
    assert text.count("<!-- report.py:begin cpu -->") == 1


def test_refresh_section_appends_when_markers_are_missing() -> None:
    text = report.refresh_section("# R\n\nnotes\n", "cuda", "body")
    assert text.startswith("# R\n\nnotes\n\n<!-- report.py:begin cuda -->") and text.rstrip().endswith(
        "<!-- report.py:end cuda -->") and "\nbody\n" in text


# --------------------------------------------------------------------------------------------------
# max_batch.py
# --------------------------------------------------------------------------------------------------


def _fake(limit_2n: int):
    calls = []

    def fits(two_n: int) -> dict:
        calls.append(two_n)
        return {"ok": two_n <= limit_2n, "seconds": 0.0}

    return fits, calls


def test_search_doubles_then_bisects_to_the_exact_largest() -> None:
    fits, calls = _fake(37)
    found = max_batch.search_max(fits, start=2, limit=1000, step=2)
    assert (found.max_2n, found.first_failure, found.limited_by) == (36, 38, "oom")
    assert calls[:6] == [2, 4, 8, 16, 32, 64]  # doubling until the first failure
    assert all(32 < c < 64 for c in calls[6:]) and len(calls) <= 6 + 4  # then bisection inside (32, 64)
    assert [t["two_n"] for t in found.tries] == calls


@pytest.mark.parametrize("bound", [2, 3, 36, 37, 100, 1023, 1024])
def test_search_agrees_with_a_linear_scan(bound: int) -> None:
    fits, _ = _fake(bound)
    found = max_batch.search_max(fits, start=8, limit=1024, step=2)
    expected = max((x for x in range(2, 1025, 2) if x <= bound), default=0)
    assert found.max_2n == expected
    assert found.limited_by == ("limit" if expected == 1024 else "oom")


def test_search_with_a_coarse_step_and_time_limit() -> None:
    fits, _ = _fake(5000)
    found = max_batch.search_max(fits, start=1024, limit=2**20, step=1024)
    assert (found.max_2n, found.first_failure) == (4096, 5120)
    slow = max_batch.search_max(lambda n: {"ok": True, "seconds": n / 1000}, start=1024, limit=2**20, step=2,
                                max_seconds=20)
    assert (slow.max_2n, slow.limited_by) == (8192, "time")  # 4 x 8.192 s > 20 s: no 16384 try


def test_search_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="step"):
        max_batch.search_max(lambda n: {"ok": True}, start=4, limit=16, step=3)
    with pytest.raises(ValueError, match="start"):
        max_batch.search_max(lambda n: {"ok": True}, start=32, limit=16, step=2)


def test_max_batch_finds_a_real_oom_on_the_cpu(tmp_path: Path) -> None:
    """The reference with 1 GiB of address space to spare: a real allocation failure bounds the search."""
    out = tmp_path / "max_batch.json"
    args = ["benchmarks/max_batch.py", "--device", "cpu", "--providers", "reference", "--d", "8",
            "--dtype", "fp32", "--start", "2048", "--limit", "65536", "--step", "1024", "--json", str(out)]
    run = _run_limited(1, args, _env(), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["reference"]
    assert res["limited_by"] == "oom"
    assert 2048 <= res["max_2n"] < res["first_failure"] <= res["max_2n"] + 1024
    for attempt in res["tries"]:  # monotone: everything at or above the first failure failed
        assert attempt["ok"] == (attempt["two_n"] <= res["max_2n"]), res["tries"]
        if not attempt["ok"]:
            assert "allocate" in attempt["error"]


def test_profile_helper_runs_on_the_cpu() -> None:
    cmd = [sys.executable, "benchmarks/profile_ncu.py", "--device", "cpu", "--batch", "256", "--dim", "32",
           "--dtype", "fp32"]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "nt_xent fwd+bwd 2N=256 D=32 float32" in run.stdout and "model TFLOP/s" in run.stdout


# --------------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------------


def test_rounds_fit_the_target_time() -> None:
    import _runner

    if _runner.ROUNDS is not None:
        pytest.skip("FASTSSL_BENCH_ROUNDS is set in this environment")
    assert _runner.rounds_for(10.0, "cuda") == _runner.MIN_ROUNDS
    assert _runner.rounds_for(1e-4, "cuda") == 10
    assert _runner.rounds_for(_runner.TARGET_S / 5, "cuda") == 5
    assert _runner.rounds_for(1e-4, "cpu") == _runner.MIN_ROUNDS
