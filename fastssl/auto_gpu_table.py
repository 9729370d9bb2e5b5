"""`auto`'s measured table on CUDA: the format of fastssl/auto_gpu_table.json, its checks and its loader.

The file is written by benchmarks/auto_table.py from a GPU run of benchmarks/cuda_variants.py and
read by :func:`fastssl.backends.auto_gpu_backend` (once, on first use). Everything here is the
file's format: a malformed file raises ValueError naming the field, so that no rule of a broken
file ever selects `cuda`.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

#: The ops for which `auto` may choose `cuda` on a GPU (the keys of the measured table).
AUTO_GPU_OPS = ("pairwise_lse", "sq_frobenius")

#: The measured table, shipped as package data (setup.py).
AUTO_GPU_TABLE_FILE = Path(__file__).with_name("auto_gpu_table.json")

_TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIDES = ("covariance", "gram")


@dataclass(frozen=True)
class AutoRule:
    """One measured shape class of one op: `backend` for CUDA tensors whose first operand x (N, D)
    has a dtype in `dtypes`, N in `rows` and D in `d` (inclusive; None: unbounded) and, for
    sq_frobenius, whose `auto` route is on `side` ("covariance" when D <= N, else "gram"), on a GPU
    of compute capability `capability` (the measured GPU's: an H200 measurement says nothing about
    an A100). `speedup` is the smallest measured triton time / cuda time over the class's cases."""

    backend: str
    capability: tuple
    dtypes: frozenset
    rows: tuple
    d: tuple
    side: Optional[str]
    speedup: float

    def matches(self, dtype: torch.dtype, shape: tuple, capability: tuple) -> bool:
        return tuple(capability) == self.capability and dtype in self.dtypes and self.covers(shape)

    def covers(self, shape: tuple) -> bool:
        """Whether an (N, D) first operand lies in this rule's shape class."""
        if len(shape) != 2:
            return False
        n, d = shape
        if not (_within(n, self.rows) and _within(d, self.d)):
            return False
        if self.side is None:
            return True
        from fastssl.ops.frobenius import choose_side

        return choose_side(n, d, "auto") == self.side


def _within(value: int, bounds: tuple) -> bool:
    low, high = bounds
    return value >= low and (high is None or value <= high)


class _Fields:
    """Checks of one JSON object, each error naming the file and the field's path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str):
        raise ValueError(f"{self.source}: {where}: {what}")

    def obj(self, value, where: str, required: tuple, optional: tuple = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {type(value).__name__}")
        missing = [k for k in required if k not in value]
        if missing:
            self.fail(f"{where}.{missing[0]}" if where else missing[0], "missing")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            self.fail(f"{where}.{unknown[0]}" if where else unknown[0], f"unknown field (known: {required + optional})")
        return value

    def text(self, value, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def number(self, value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            self.fail(where, f"expected a positive number, got {value!r}")
        return float(value)

    def bounds(self, value, where: str) -> tuple:
        ok = isinstance(value, list) and len(value) == 2 and _is_int(value[0]) and value[0] >= 1
        if not (ok and (value[1] is None or (_is_int(value[1]) and value[1] >= value[0]))):
            self.fail(where, f"expected [min, max] with 1 <= min <= max (max null: unbounded), got {value!r}")
        return tuple(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_auto_gpu_table(data: object, source: str = "auto_gpu_table") -> dict[str, list[AutoRule]]:
    """The rules of a measured table (the JSON of fastssl/auto_gpu_table.json), checked field by field;
    anything malformed raises ValueError naming `source` and the field, so that no rule of a broken
    file ever selects `cuda`.

    Format: {"format": 1, "about": str, "ops": {op: [entry, ...]} for every op of AUTO_GPU_OPS}; an
    entry is one measurement, {"device", "capability": [major, minor], "torch", "triton", "cuda",
    "date": "YYYY-MM-DD", "method", "rules": [rule, ...]}, at most one per op and capability; a rule
    is {"class", "dtypes": [names], "rows": [min, max], "d": [min, max], "side": null or
    "covariance"/"gram" (sq_frobenius only), "backend": "cuda"/"triton", "speedup", "cases": [{"loss",
    "two_n", "rows", "d", "triton_ms", "cuda_ms"}, ...]}: the measured cases behind it, each inside
    the class, and speedup the smallest triton_ms / cuda_ms among them (> 1 for a cuda rule).
    """
    f = _Fields(source)
    f.obj(data, "", ("format", "ops"), ("about",))
    if data["format"] != 1:
        f.fail("format", f"expected 1, got {data['format']!r}")
    ops = f.obj(data["ops"], "ops", AUTO_GPU_OPS)
    table: dict[str, list[AutoRule]] = {}
    for op in AUTO_GPU_OPS:
        if not isinstance(ops[op], list):
            f.fail(f"ops.{op}", f"expected a list of measurements, got {type(ops[op]).__name__}")
        table[op] = []
        seen = set()
        for i, entry in enumerate(ops[op]):
            where = f"ops.{op}[{i}]"
            f.obj(entry, where, ("device", "capability", "torch", "triton", "cuda", "date", "method", "rules"))
            for key in ("device", "torch", "triton", "cuda", "method"):
                f.text(entry[key], f"{where}.{key}")
            cap = entry["capability"]
            if not (isinstance(cap, list) and len(cap) == 2 and all(_is_int(v) and v >= 0 for v in cap)):
                f.fail(f"{where}.capability", f"expected [major, minor], got {cap!r}")
            capability = tuple(cap)
            if capability in seen:
                f.fail(f"{where}.capability", f"a second measurement for compute capability {capability}")
            seen.add(capability)
            try:
                datetime.date.fromisoformat(f.text(entry["date"], f"{where}.date"))
            except ValueError:
                f.fail(f"{where}.date", f"expected YYYY-MM-DD, got {entry['date']!r}")
            if not isinstance(entry["rules"], list) or not entry["rules"]:
                f.fail(f"{where}.rules", "expected a non-empty list (a measurement without rules is not written)")
            for j, rule in enumerate(entry["rules"]):
                table[op].append(_parse_rule(f, rule, f"{where}.rules[{j}]", op, capability))
    return table


def _parse_rule(f: _Fields, rule: object, where: str, op: str, capability: tuple) -> AutoRule:
    f.obj(rule, where, ("class", "dtypes", "rows", "d", "side", "backend", "speedup", "cases"))
    f.text(rule["class"], f"{where}.class")
    names = rule["dtypes"]
    if not (isinstance(names, list) and names and all(n in _TABLE_DTYPES for n in names)):
        f.fail(f"{where}.dtypes", f"expected a non-empty list of {tuple(_TABLE_DTYPES)}, got {names!r}")
    rows, d = f.bounds(rule["rows"], f"{where}.rows"), f.bounds(rule["d"], f"{where}.d")
    side = rule["side"]
    if side is not None and (op != "sq_frobenius" or side not in _SIDES):
        allowed = f"null or one of {_SIDES}" if op == "sq_frobenius" else "null (sides are sq_frobenius's)"
        f.fail(f"{where}.side", f"expected {allowed}, got {side!r}")
    if rule["backend"] not in ("cuda", "triton"):
        f.fail(f"{where}.backend", f"expected 'cuda' or 'triton', got {rule['backend']!r}")
    speedup = f.number(rule["speedup"], f"{where}.speedup")
    if rule["backend"] == "cuda" and speedup <= 1:
        f.fail(f"{where}.speedup", f"a cuda rule needs a measured speed-up over triton > 1, got {speedup}")
    cases = rule["cases"]
    if not isinstance(cases, list) or not cases:
        f.fail(f"{where}.cases", "expected a non-empty list of the measured cases behind the rule")
    ratios = []
    for k, case in enumerate(cases):
        at = f"{where}.cases[{k}]"
        f.obj(case, at, ("loss", "two_n", "rows", "d", "triton_ms", "cuda_ms"))
        f.text(case["loss"], f"{at}.loss")
        for key in ("two_n", "rows", "d"):
            if not _is_int(case[key]) or case[key] < 1:
                f.fail(f"{at}.{key}", f"expected a positive integer, got {case[key]!r}")
        if not AutoRule("cuda", capability, frozenset(), rows, d, side, speedup).covers((case["rows"], case["d"])):
            f.fail(at, f"the case (N, D) = ({case['rows']}, {case['d']}) is outside the rule's class")
        ratios.append(f.number(case["triton_ms"], f"{at}.triton_ms") / f.number(case["cuda_ms"], f"{at}.cuda_ms"))
    if abs(min(ratios) - speedup) > 1e-6 * speedup:
        f.fail(f"{where}.speedup", f"{speedup} is not the least triton_ms / cuda_ms of the cases ({min(ratios):.4f})")
    dtypes = frozenset(_TABLE_DTYPES[n] for n in names)
    return AutoRule(rule["backend"], capability, dtypes, rows, d, side, speedup)


def load_auto_gpu_table(path: Union[str, Path] = AUTO_GPU_TABLE_FILE) -> dict[str, list[AutoRule]]:
    """The rules of the table file at `path` (see :func:`parse_auto_gpu_table`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the measured table: {e}") from e
    return parse_auto_gpu_table(data, str(path))
