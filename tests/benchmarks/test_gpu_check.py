"""scripts/gpu_check.sh on the CPU: its plan (--dry-run) as detected here and in a faked environment,
its deadline, and the filter that prints failing tests by name as they fail. One real run, under a
32 s deadline, checks the steps' bookkeeping (a CPU-only torch cannot build the extension)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["build", "tests_cuda", "hopper_variants", "cuda_variants", "benchmarks", "benchmarks_new", "report"]
_STEP_LINE = re.compile(r"^step (\w+) \(at most (\d+)s\): (.*)$")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSSL_CHECK_", "FASTSSL_BENCH_"))}
    env.pop("FASTSSL_CUDA_ARCH_LIST", None)
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _plan(out: Path, env: dict) -> tuple[str, dict[str, tuple[int, str]]]:
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    steps = {}
    for line in run.stdout.splitlines():
        match = _STEP_LINE.match(line)
        if match:
            steps[match.group(1)] = (int(match.group(2)), match.group(3))
    assert list(steps) == STEPS, run.stdout
    return run.stdout, steps


def _has(module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_dry_run_plan_here(tmp_path: Path) -> None:
    out = tmp_path / "out"
    text, steps = _plan(out, _env())
    assert not out.exists()  # a dry run writes nothing
    assert sum(limit for limit, _ in steps.values()) <= 540  # every step at its limit still ends in 9 minutes
    build_limit, build = steps["build"]
    # no prebuilt fastssl._C: the just-in-time loader builds it, with the sm_90a kernels on an sm_90 GPU
    assert "FASTSSL_CUDA_JIT=1" in build and "_ext.load()" in build and "pairwise_lse_forward_sm90" in build
    assert build_limit == (90 if (ROOT / "build" / "csrc" / "sm_90").is_dir() else 150)  # carried objects: a link
    _, tests = steps["tests_cuda"]
    assert tests.startswith(f"{sys.executable} -m pytest tests -m cuda") and "-rf" in tests
    assert "-p no:cacheprovider" in tests
    assert ("-n 8" in tests) == _has("xdist") and ("--timeout 120" in tests) == _has("pytest_timeout")
    bench_limit, bench = steps["benchmarks"]
    assert "FASTSSL_BENCH_SIZES=small FASTSSL_BENCH_DTYPE=bfloat16" in bench
    assert "FASTSSL_BENCH_LOSSES=nt_xent,barlow_twins,vicreg,clip" in bench
    assert f"--benchmark-json {out}/benchmarks.json" in bench and "--benchmark-only" in bench
    budget = int(re.search(r"FASTSSL_BENCH_BUDGET_S=(\d+)", bench).group(1))
    assert 0 < budget < bench_limit  # the suite stops starting cases before its step's timeout
    _, hopper = steps["hopper_variants"]
    assert hopper.endswith(f"benchmarks/hopper_variants.py --json {out}/hopper_variants.json --budget-s 55")
    cuda_limit, cuda_rows = steps["cuda_variants"]
    assert cuda_rows.endswith(f"benchmarks/cuda_variants.py --json {out}/cuda_variants.json --budget-s 45")
    assert 45 < cuda_limit  # the script stops starting rows before its step's timeout
    new_limit, new = steps["benchmarks_new"]
    assert "FASTSSL_BENCH_LOSSES=dino,siglip" in new and f"--benchmark-json {out}/benchmarks_new.json" in new
    assert "(dino and R12288-K65536-D256) or (siglip and 2N65536-D512)" in new
    assert 0 < int(re.search(r"FASTSSL_BENCH_BUDGET_S=(\d+)", new).group(1)) < new_limit
    _, report = steps["report"]
    assert f"--results-md '{out}/RESULTS.md'" in report and f"--out '{out}'" in report
    assert f"'{out}/benchmarks_new.json' --out '{out}/new' --no-results-md" in report
    # auto's proposed table after the reports, whose status the step keeps
    assert report.endswith(f"rc=$?; '{sys.executable}' benchmarks/auto_table.py '{out}/cuda_variants.json' "
                           f"--out-md '{out}/auto_table.md'; exit $rc")
    assert "extension: build" in text


def test_dry_run_plan_with_a_prebuilt_extension_and_plugins(tmp_path: Path) -> None:
    """A faked environment: fastssl._C importable (a stand-in module), pytest-timeout present, xdist
    turned off, a 300 s deadline, every loss."""
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "sitecustomize.py").write_text(
        "import importlib.machinery, sys, types\n"
        "module = types.ModuleType('fastssl._C')\n"
        "module.__spec__ = importlib.machinery.ModuleSpec('fastssl._C', None)\n"
        "sys.modules['fastssl._C'] = module\n")
    (fakes / "pytest_timeout.py").write_text("")
    pythonpath = os.pathsep.join([str(fakes), str(ROOT)])
    text, steps = _plan(tmp_path / "out", _env(PYTHONPATH=pythonpath, FASTSSL_CHECK_WORKERS="0",
                                               FASTSSL_CHECK_DEADLINE_S="300", FASTSSL_CHECK_LOSSES="all"))
    assert "extension: reuse" in text
    limit, build = steps["build"]
    assert "prebuilt, reused" in build and "setup.py" not in build and limit == 60
    _, tests = steps["tests_cuda"]
    assert "--timeout 120" in tests and " -n " not in tests
    assert "FASTSSL_BENCH_LOSSES= " in steps["benchmarks"][1]  # empty: every loss
    assert sum(limit for limit, _ in steps.values()) <= 300


def test_usage_error() -> None:
    run = subprocess.run(["bash", str(SCRIPT)], env=_env(), capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "usage:" in run.stderr


def test_failing_tests_are_printed_by_name_as_they_fail(tmp_path: Path) -> None:
    """The --stream filter of the tests step, applied with grep to pytest's own verbose output."""
    pattern = re.search(r"step tests_cuda \d+ --stream '([^']+)'", SCRIPT.read_text()).group(1)
    (tmp_path / "test_two.py").write_text("def test_passes():\n    pass\n\n\ndef test_breaks():\n    assert 0\n")
    pytest_run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-rf", "-p", "no:cacheprovider",
                                 str(tmp_path / "test_two.py")], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
    shown = subprocess.run(["grep", "-E", pattern], input=pytest_run.stdout, capture_output=True, text=True).stdout
    assert "test_two.py::test_breaks FAILED" in shown  # as it fails
    assert "FAILED test_two.py::test_breaks" in shown  # and in the -rf summary
    assert "test_passes" not in shown
    assert re.search(r"^=+ .*1 failed, 1 passed.* =+$", shown, re.M)


def test_real_run_keeps_its_deadline_and_books_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    run = subprocess.run(["bash", str(SCRIPT), str(out)], env=_env(FASTSSL_CHECK_DEADLINE_S="32",
                                                                   FASTSSL_CHECK_WORKERS="0"),
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert elapsed < 32 + 20, run.stdout  # the deadline, plus at most one step's kill grace
    assert run.returncode == 1, run.stdout  # not everything ran (and this torch cannot build the extension)
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == STEPS
    for name, status, _seconds in rows:
        ran = status != "skipped-deadline"
        assert status.isdigit() or not ran, status
        assert (out / f"{name}.log").exists() == ran
    # 32 s cannot hold the benchmarks, so the deadline skipped something; which steps ran (the cheap
    # report may still fit after a skipped step) depends on the machine's speed.
    assert any(status == "skipped-deadline" for _name, status, _seconds in rows), rows
    if rows[0][1] != "skipped-deadline":
        assert rows[0][1] != "0" and "CUDA extension cannot be built" in (out / "build.log").read_text()
    assert "nvidia-smi: not found or failed" in run.stdout and "| torch" in run.stdout  # the machine, first

