"""`auto`'s measured table on CUDA (fastssl/auto_gpu_table.json, read by fastssl.backends): the shipped
file, which rules match (dtype, shape class, compute capability, a loadable extension), and the
errors of malformed files. The GPU's capability and the extension are monkeypatched, so every case
runs on the CPU with meta tensors (only their dtype and shape matter)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastssl import auto_gpu_table as table_format
from fastssl import backends

ROOT = Path(__file__).resolve().parents[2]
H200 = (9, 0)


def _case(rows, d, triton_ms, cuda_ms, loss="nt_xent"):
    return dict(loss=loss, two_n=2 * rows, rows=rows, d=d, triton_ms=triton_ms, cuda_ms=cuda_ms)


def _table() -> dict:
    """A valid table: pairwise_lse N >= 8,192 with 129 <= D <= 256 in bf16, and sq_frobenius on the
    Gram side, both cuda, measured at compute capability 9.0."""
    pairwise = dict(
        **{"class": "N >= 8,192, 129 <= D <= 256"}, dtypes=["bfloat16"], rows=[8192, None], d=[129, 256], side=None,
        backend="cuda", speedup=1.25, cases=[_case(16384, 256, 20.0, 16.0), _case(16384, 256, 30.0, 20.0, "clip")])
    gram = dict(**{"class": "gram side (D > N)"}, dtypes=["bfloat16"], rows=[1, None], d=[1, None], side="gram",
                backend="cuda", speedup=1.2, cases=[_case(2048, 8192, 6.0, 5.0, "barlow_twins")])

    def entry(rule):
        return dict(device="NVIDIA H200", capability=list(H200), torch="2.9.0", triton="3.5.0", cuda="12.8",
                    date="2026-12-05", method="benchmarks/cuda_variants.py, fwd+bwd, median of 5", rules=[rule])

    return {"format": 1, "about": "test", "ops": {"pairwise_lse": [entry(pairwise)], "sq_frobenius": [entry(gram)]}}


@pytest.fixture
def gpu(monkeypatch):
    """A GPU of capability `gpu.capability` (default 9.0) with a loadable extension, and the table
    `gpu.use(table)` in place of the shipped one."""

    class Fake:
        capability = H200
        extension = True

        def use(self, table):
            parsed = table_format.parse_auto_gpu_table(table, "test table")
            monkeypatch.setattr(backends, "auto_gpu_table", lambda: parsed)

    fake = Fake()
    monkeypatch.setattr(backends, "_device_capability", lambda device: fake.capability)
    monkeypatch.setattr(backends, "cuda_extension_usable", lambda: fake.extension)
    return fake


def _x(rows, d, dtype=torch.bfloat16):
    return torch.empty(rows, d, dtype=dtype, device="meta")


def test_the_shipped_table_is_valid_and_selects_triton_everywhere(gpu):
    """No GPU measurement is committed: both ops have no rules, so auto keeps triton at every dtype and
    shape, on any GPU, even with a loadable extension."""
    table = table_format.load_auto_gpu_table()
    assert table == {"pairwise_lse": [], "sq_frobenius": []}
    assert backends.AUTO_GPU_TABLE == table == backends.auto_gpu_table()
    for gpu.capability in [(8, 0), (9, 0), (10, 0)]:
        for op in (*table_format.AUTO_GPU_OPS, "pairwise_sigmoid"):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for shape in [(8, 4), (16384, 256), (2048, 8192)]:
                    assert backends.auto_gpu_backend(op, _x(*shape, dtype)) == "triton"


def test_a_rule_matches_only_its_dtype_shape_class_and_capability(gpu):
    gpu.use(_table())
    pick = backends.auto_gpu_backend
    assert pick("pairwise_lse", _x(8192, 256)) == "cuda"
    assert pick("pairwise_lse", _x(65536, 129)) == "cuda"
    assert pick("pairwise_lse", _x(8191, 256)) == "triton"  # rows below the class
    assert pick("pairwise_lse", _x(8192, 128)) == "triton"  # D below
    assert pick("pairwise_lse", _x(8192, 257)) == "triton"  # D above
    assert pick("pairwise_lse", _x(8192, 256, torch.float16)) == "triton"  # a dtype not measured
    assert pick("pairwise_lse", _x(8192, 256, torch.float32)) == "triton"
    assert pick("pairwise_lse", torch.empty(8192, 2, 256, dtype=torch.bfloat16, device="meta")) == "triton"
    assert pick("pairwise_sigmoid", _x(8192, 256)) == "triton"  # another op
    # sq_frobenius on the Gram side (D > N) only: the side auto routes to
    assert pick("sq_frobenius", _x(2048, 8192)) == "cuda"
    assert pick("sq_frobenius", _x(8192, 2048)) == "triton"
    assert pick("sq_frobenius", _x(4096, 4096)) == "triton"  # N = D: the covariance side
    assert pick("sq_frobenius", _x(8192, 256)) == "triton"
    # an H200 measurement says nothing about another compute capability
    for gpu.capability in [(8, 0), (9, 1), (10, 0)]:
        assert pick("pairwise_lse", _x(8192, 256)) == "triton"
        assert pick("sq_frobenius", _x(2048, 8192)) == "triton"


def test_a_cuda_rule_falls_back_to_triton_without_the_extension(gpu):
    gpu.use(_table())
    gpu.extension = False
    assert backends.auto_gpu_backend("pairwise_lse", _x(8192, 256)) == "triton"
    assert backends.auto_gpu_backend("sq_frobenius", _x(2048, 8192)) == "triton"


def test_the_first_matching_rule_wins(gpu):
    table = _table()
    rules = table["ops"]["pairwise_lse"][0]["rules"]
    triton_first = dict(copy.deepcopy(rules[0]), backend="triton", rows=[16384, None],
                        speedup=0.5, cases=[_case(16384, 256, 10.0, 20.0)])
    rules.insert(0, triton_first)
    gpu.use(table)
    assert backends.auto_gpu_backend("pairwise_lse", _x(16384, 256)) == "triton"
    assert backends.auto_gpu_backend("pairwise_lse", _x(8192, 256)) == "cuda"


def _change(table: dict, path: str, value) -> None:
    """Sets the value at a dotted path of `table` (list indices as numbers); `...` deletes it."""
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = table
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value


PAIRWISE_RULE = "ops.pairwise_lse.0.rules.0"
#: The error messages' paths of the two rules of _table().
PR, FR = r"ops\.pairwise_lse\[0\]\.rules\[0\]", r"ops\.sq_frobenius\[0\]\.rules\[0\]"
MALFORMED = [
    ("format", ..., r"format: missing"),
    ("format", 2, r"format: expected 1"),
    ("extra", 1, r"extra: unknown field"),
    ("ops.sq_frobenius", ..., r"ops\.sq_frobenius: missing"),
    ("ops.pairwise_sigmoid", [], r"ops\.pairwise_sigmoid: unknown field"),
    ("ops.pairwise_lse", {}, r"ops\.pairwise_lse: expected a list"),
    ("ops.pairwise_lse.0.device", "", r"ops\.pairwise_lse\[0\]\.device: expected a non-empty string"),
    ("ops.pairwise_lse.0.triton", ..., r"ops\.pairwise_lse\[0\]\.triton: missing"),
    ("ops.pairwise_lse.0.capability", "9.0", r"ops\.pairwise_lse\[0\]\.capability: expected \[major, minor\]"),
    ("ops.pairwise_lse.0.date", "05/12/2026", r"ops\.pairwise_lse\[0\]\.date: expected YYYY-MM-DD"),
    ("ops.pairwise_lse.0.rules", [], r"ops\.pairwise_lse\[0\]\.rules: expected a non-empty list"),
    (f"{PAIRWISE_RULE}.dtypes", ["bf16"], PR + r"\.dtypes: expected a non-empty list"),
    (f"{PAIRWISE_RULE}.dtypes", [], PR + r"\.dtypes: expected a non-empty list"),
    (f"{PAIRWISE_RULE}.rows", [0, None], PR + r"\.rows: expected \[min, max\]"),
    (f"{PAIRWISE_RULE}.rows", [8192, 100], PR + r"\.rows: expected \[min, max\]"),
    (f"{PAIRWISE_RULE}.d", "129-256", PR + r"\.d: expected \[min, max\]"),
    (f"{PAIRWISE_RULE}.d", [129.0, 256], PR + r"\.d: expected \[min, max\]"),
    (f"{PAIRWISE_RULE}.side", "gram", PR + r"\.side: expected null \(sides are sq_frobenius's\)"),
    ("ops.sq_frobenius.0.rules.0.side", "outer", FR + r"\.side: expected null or one"),
    (f"{PAIRWISE_RULE}.backend", "cuda sm90", PR + r"\.backend: expected 'cuda' or 'triton'"),
    (f"{PAIRWISE_RULE}.speedup", "fast", PR + r"\.speedup: expected a positive number"),
    (f"{PAIRWISE_RULE}.speedup", 2.0, PR + r"\.speedup: 2\.0 is not the least triton_ms / cuda_ms"),
    (f"{PAIRWISE_RULE}.cases", [], PR + r"\.cases: expected a non-empty list"),
    (f"{PAIRWISE_RULE}.cases.0.rows", 4096, PR + r"\.cases\[0\]: the case \(N, D\) = \(4096, 256\) is outside"),
    (f"{PAIRWISE_RULE}.cases.1.d", 512, PR + r"\.cases\[1\]: the case \(N, D\) = \(16384, 512\) is outside"),
    ("ops.sq_frobenius.0.rules.0.cases.0.d", 1024, FR + r"\.cases\[0\]: the case"),
    (f"{PAIRWISE_RULE}.cases.0.cuda_ms", 0, PR + r"\.cases\[0\]\.cuda_ms: expected a positive number"),
    (f"{PAIRWISE_RULE}.cases.0.two_n", None, PR + r"\.cases\[0\]\.two_n: expected a positive integer"),
    (f"{PAIRWISE_RULE}.cases.0.row", 1, PR + r"\.cases\[0\]\.row: unknown field"),
]


@pytest.mark.parametrize("path, value, message", MALFORMED, ids=[f"{p}={v!r}" for p, v, _ in MALFORMED])
def test_a_malformed_table_raises_naming_the_field(path, value, message):
    table = _table()
    table_format.parse_auto_gpu_table(table, "t.json")  # valid before the change
    _change(table, path, value)
    with pytest.raises(ValueError, match=r"^t\.json: " + message):
        table_format.parse_auto_gpu_table(table, "t.json")


def test_a_cuda_rule_needs_a_measured_speedup():
    """A cuda rule whose cases show cuda slower (speedup <= 1) is refused even when it is consistent."""
    table = _table()
    rule = table["ops"]["pairwise_lse"][0]["rules"][0]
    rule.update(speedup=0.8, cases=[_case(16384, 256, 16.0, 20.0)])
    with pytest.raises(ValueError, match=PR + r"\.speedup: a cuda rule needs a measured speed-up over triton > 1"):
        table_format.parse_auto_gpu_table(table, "t.json")
    rule["backend"] = "triton"  # the same evidence behind a triton rule is fine
    assert table_format.parse_auto_gpu_table(table, "t.json")["pairwise_lse"][0].backend == "triton"


def test_two_measurements_for_one_capability_are_ambiguous():
    table = _table()
    table["ops"]["pairwise_lse"].append(copy.deepcopy(table["ops"]["pairwise_lse"][0]))
    with pytest.raises(ValueError, match=r"ops\.pairwise_lse\[1\]\.capability: a second measurement"):
        table_format.parse_auto_gpu_table(table, "t.json")
    table["ops"]["pairwise_lse"][1]["capability"] = [8, 0]
    assert len(table_format.parse_auto_gpu_table(table, "t.json")["pairwise_lse"]) == 2


def test_an_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "auto_gpu_table.json"
    path.write_text('{"format": 1, "ops": {')
    with pytest.raises(ValueError, match=r"auto_gpu_table\.json: cannot read the measured table"):
        table_format.load_auto_gpu_table(path)
    path.write_text(json.dumps(_table()))
    assert [r.backend for r in table_format.load_auto_gpu_table(path)["pairwise_lse"]] == ["cuda"]


def test_a_non_editable_build_ships_the_table(tmp_path):
    """setup.py's build_py (what a wheel or a non-editable install copies) includes the table file."""
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                          cwd=ROOT, env=dict(os.environ, FASTSSL_BUILD_CUDA="0"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = tmp_path / "lib" / "fastssl" / "auto_gpu_table.json"
    assert shipped.read_text() == table_format.AUTO_GPU_TABLE_FILE.read_text()


def test_auto_on_a_malformed_table_file_raises_instead_of_choosing(gpu, monkeypatch, tmp_path):
    """The file is read on first use by auto_gpu_backend: a broken one raises there, naming the field."""
    table = _table()
    table["ops"]["pairwise_lse"][0]["capability"] = "9.0"
    path = tmp_path / "auto_gpu_table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(backends, "AUTO_GPU_TABLE_FILE", path)
    backends.auto_gpu_table.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"auto_gpu_table\.json: ops\.pairwise_lse\[0\]\.capability"):
            backends.auto_gpu_backend("pairwise_lse", _x(8192, 256))
    finally:
        backends.auto_gpu_table.cache_clear()
