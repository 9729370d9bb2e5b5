"""`auto`'s table on CUDA from a GPU run of cuda_variants.py: the proposed rules, a RESULTS.md table,
and (with --write) the committed data file fastssl/auto_gpu_table.json.

    python benchmarks/auto_table.py OUTDIR/cuda_variants.json                 # the proposal, printed
    python benchmarks/auto_table.py OUTDIR/cuda_variants.json --write         # ... and the table file
    python benchmarks/auto_table.py RUN.json [--min-speedup 1.05] [--out-md auto_table.md] [--write PATH]

Each case of the run (a loss, 2N, D; bf16 fwd+bwd) belongs to an op and a shape class of the first
operand x (N, D) that `auto` sees (fastssl.backends.auto_gpu_backend; cuda_variants' losses take
z1, z2 (N, D), so N = 2N / 2):

* pairwise_lse (NT-Xent, CLIP): N < 8,192 or N >= 8,192 (2N at 16,384), by D <= 128, 129..256, > 256;
* sq_frobenius (Barlow Twins, VICReg): the side `auto` routes to, "covariance" (D <= N) or "gram".

A cuda kernel set is proposed for a class only when, at every case of the class at which the Triton
row was timed, it was timed too, agreed with the Triton row (loss and gradients, cuda_variants'
thresholds) and was at least --min-speedup times faster. Only classes with measurements get rules;
the others, and every class that no kernel set wins, keep triton. A kernel set that needs an opt-in
environment variable (e.g. FASTSSL_CUDA_SM90=1) is listed as "needs promotion" and never written:
the library sets no environment variables, so its kernels must first become the cuda backend's
default, and then be measured again. --write replaces the table's measurement for this GPU's compute
capability (per op; an op with no rule then has no entry for it), keeps the others, and reads the
written file back through the library's loader.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple, Optional

#: The op `auto` chooses a backend for, per loss of cuda_variants.py.
OPS = {"nt_xent": "pairwise_lse", "clip": "pairwise_lse", "barlow_twins": "sq_frobenius", "vicreg": "sq_frobenius"}
#: pairwise_lse's shape classes: N below / from ROW_SPLIT, and D up to each bound (then above the last).
ROW_SPLIT = 8192
D_BOUNDS = (128, 256)
DTYPE = "bfloat16"
#: The table file `auto` reads (package data of fastssl).
TABLE_FILE = Path(__file__).resolve().parents[1] / "fastssl" / "auto_gpu_table.json"


class ShapeClass(NamedTuple):
    """A rule's shape class, in the fields of the table file (fastssl.auto_gpu_table.parse_auto_gpu_table)."""

    name: str
    rows: tuple
    d: tuple
    side: Optional[str]


def _setup() -> None:
    """Puts benchmarks/ and the checkout on sys.path, as cuda_variants.py does."""
    here = Path(__file__).resolve().parent
    for path in (str(here), str(here.parent)):
        if path not in sys.path:
            sys.path.insert(0, path)


def shape_class(op: str, rows: int, d: int) -> ShapeClass:
    """The class of an (N, D) first operand of `op`."""
    if op == "sq_frobenius":
        from fastssl.ops.frobenius import choose_side

        side = choose_side(rows, d, "auto")
        return ShapeClass(f"{side} side ({'D <= N' if side == 'covariance' else 'D > N'})", (1, None), (1, None), side)
    if rows < ROW_SPLIT:
        row_range, row_name = (1, ROW_SPLIT - 1), f"N < {ROW_SPLIT:,}"
    else:
        row_range, row_name = (ROW_SPLIT, None), f"N >= {ROW_SPLIT:,}"
    low = 1
    for high in D_BOUNDS:
        if d <= high:
            return ShapeClass(f"{row_name}, {low} <= D <= {high}", row_range, (low, high), None)
        low = high + 1
    return ShapeClass(f"{row_name}, D > {D_BOUNDS[-1]}", row_range, (low, None), None)


_METADATA = ("device", "capability", "torch", "triton", "cuda", "date", "dtype", "reps", "records")


def _metadata(result: dict) -> None:
    """Raises ValueError naming the first field a GPU run of cuda_variants.py records and `result` lacks."""
    for key in _METADATA:
        if result.get(key) in (None, ""):
            raise ValueError(f"the run has no {key!r} (cuda_variants.py records it on a GPU; a --dry-run "
                             "walk measures no GPU)")
    cap = result["capability"]
    if not (isinstance(cap, list) and len(cap) == 2 and all(isinstance(v, int) for v in cap)):
        raise ValueError(f"the run's 'capability' is not [major, minor]: {cap!r}")
    if result["dtype"] != DTYPE:
        raise ValueError(f"the run's dtype is {result['dtype']!r}; the table's rules are measured in {DTYPE}")


class Verdict(NamedTuple):
    """What one cuda kernel set (`label`, run under `env`) gets for one op's shape class."""

    op: str
    shape: ShapeClass
    label: str
    env: dict
    chosen: bool  # agreed and fast enough at every case of the class
    speedup: Optional[float]  # the least triton / cuda time over the class's cases (None: a case untimed)
    why: str  # why not, when not chosen
    cases: list  # the table file's case objects


def propose(result: dict, min_speedup: float) -> list[Verdict]:
    """Every (op, shape class, cuda kernel set) of the run, in the run's order, with its verdict."""
    import cuda_variants

    _metadata(result)
    reference = cuda_variants.ROWS[0].label
    by_case: dict = {}
    for rec in result["records"]:
        if rec["loss"] not in OPS:
            raise ValueError(f"record for loss {rec['loss']!r}: not one of {tuple(OPS)}")
        by_case.setdefault((rec["loss"], rec["two_n"], rec["d"]), {})[rec["label"]] = rec
    classes: dict = {}
    for (loss, two_n, d), recs in by_case.items():
        base = recs.get(reference)
        if base is None or "ms" not in base:
            continue  # the Triton row was not timed: the case measures nothing
        op = OPS[loss]
        key = (op, shape_class(op, two_n // 2, d))
        classes.setdefault(key, []).append(((loss, two_n, d), recs))
    verdicts = []
    for (op, shape), cases in classes.items():
        labels = []
        for _, recs in cases:
            labels += [label for label in recs if label != reference and label not in labels]
        for label in labels:
            envs = {json.dumps(recs[label].get("env", {}), sort_keys=True) for _, recs in cases if label in recs}
            if len(envs) != 1:
                raise ValueError(f"kernel set {label!r} ran under different environments: {sorted(envs)}")
            env = json.loads(envs.pop())
            why, ratios, evidence = "", [], []
            for (loss, two_n, d), recs in cases:
                at = f"{loss} 2N={two_n} D={d}"
                rec = recs.get(label)
                if rec is None or "ms" not in rec:
                    why = why or f"not timed at {at}" + (f" ({rec.get('skipped') or rec.get('error')})" if rec else "")
                    continue
                ratio = recs[reference]["ms"] / rec["ms"]
                ratios.append(ratio)
                evidence.append(dict(loss=loss, two_n=two_n, rows=two_n // 2, d=d,
                                     triton_ms=recs[reference]["ms"], cuda_ms=rec["ms"]))
                if not rec.get("agrees"):
                    why = why or f"disagrees with triton at {at}"
                elif ratio < min_speedup:
                    why = why or f"{ratio:.2f}x at {at}, under {min_speedup}x"
            speedup = min(ratios) if ratios and len(ratios) == len(cases) else None
            verdicts.append(Verdict(op, shape, label, env, not why, speedup, why, evidence))
    return verdicts


def rules(verdicts: list[Verdict]) -> dict:
    """op -> the table file's rule objects: the chosen kernel sets that run without an opt-in variable."""
    out: dict = {}
    for v in verdicts:
        if v.chosen and not v.env:
            out.setdefault(v.op, []).append(dict(
                **{"class": v.shape.name}, dtypes=[DTYPE], rows=list(v.shape.rows), d=list(v.shape.d),
                side=v.shape.side, backend="cuda", speedup=v.speedup, cases=v.cases))
    return out


def needs_promotion(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.chosen and v.env]


def _env_text(env: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()))


def markdown(result: dict, verdicts: list[Verdict], min_speedup: float) -> str:
    """The RESULTS.md table: per case and cuda kernel set, the times, the ratio, and what its class gets."""
    import cuda_variants

    reference = cuda_variants.ROWS[0].label
    major, minor = result["capability"]
    lines = [f"{result['device']} (compute capability {major}.{minor}), torch {result['torch']}, Triton "
             f"{result['triton']}, CUDA {result['cuda']}, {result['date']}; fwd+bwd, {result['dtype']}, median of "
             f"{result['reps']}. A cuda kernel set is chosen for a shape class when it agrees with triton and is "
             f">= {min_speedup}x faster at every measured case of the class (benchmarks/auto_table.py).",
             "",
             "| op | shape class | loss | 2N | D | triton ms | kernel set | ms | triton / it | agrees | class gets |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    triton_ms = {}
    for rec in result["records"]:
        if rec["label"] == reference and "ms" in rec:
            triton_ms[(rec["loss"], rec["two_n"], rec["d"])] = rec["ms"]
    verdict = {(v.op, v.shape, v.label): v for v in verdicts}
    for rec in result["records"]:
        key = (rec["loss"], rec["two_n"], rec["d"])
        if rec["label"] == reference or key not in triton_ms:
            continue
        op = OPS[rec["loss"]]
        shape = shape_class(op, rec["two_n"] // 2, rec["d"])
        v = verdict[(op, shape, rec["label"])]
        gets = ("cuda" if not v.env else f"needs promotion ({_env_text(v.env)})") if v.chosen else "triton"
        label = rec["label"] + (f" ({_env_text(v.env)})" if v.env else "")
        if "ms" in rec:
            timing = (f"{rec['ms']:.3f} | {triton_ms[key] / rec['ms']:.2f}x | "
                      f"{'yes' if rec.get('agrees') else 'NO'}")
        else:
            timing = f"{'skipped' if 'skipped' in rec else 'FAILED'} | | "
        lines.append(f"| {op} | {shape.name} | {rec['loss']} | {rec['two_n']} | {rec['d']} | {triton_ms[key]:.3f} | "
                     f"{label} | {timing} | {gets} |")
    lines += ["", "Proposed rules:"]
    chosen = rules(verdicts)
    lines += [f"* {op}, {r['class']}: cuda ({r['speedup']:.2f}x at least)" for op, rs in chosen.items() for r in rs]
    if not chosen:
        lines.append("* none: every measured shape class keeps triton")
    lines += [f"* {v.op}, {v.shape.name}: not {v.label}: {v.why}" for v in verdicts if not v.chosen]
    for v in needs_promotion(verdicts):
        lines.append(f"* needs promotion, not written: {v.op}, {v.shape.name}: {v.label} ({_env_text(v.env)}, "
                     f"{v.speedup:.2f}x at least); its kernels must first become the cuda backend's default "
                     "(the library sets no environment variables), then be measured again")
    return "\n".join(lines)


def updated_table(table: dict, result: dict, verdicts: list[Verdict]) -> tuple[dict, list[str]]:
    """The table file's JSON with this run's measurement in place of any earlier one for its compute
    capability, and a line per replaced measurement."""
    capability = list(result["capability"])
    new = json.loads(json.dumps(table))
    notes = []
    chosen = rules(verdicts)
    for op, entries in new["ops"].items():
        kept = [e for e in entries if e["capability"] != capability]
        notes += [f"{op}: replaced the measurement of {e['device']} ({e['date']})" for e in entries if e not in kept]
        if op in chosen:
            kept.append(dict(device=result["device"], capability=capability, torch=result["torch"],
                             triton=result["triton"], cuda=result["cuda"], date=result["date"],
                             method=f"benchmarks/cuda_variants.py, fwd+bwd, median of {result['reps']}",
                             rules=chosen[op]))
        new["ops"][op] = kept
    return new, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="the records of a GPU run of benchmarks/cuda_variants.py")
    parser.add_argument("--min-speedup", type=float, default=1.05,
                        help="the least triton / cuda time at every case of a class for cuda to be chosen")
    parser.add_argument("--out-md", default="", help="also write the markdown table to this file")
    parser.add_argument("--write", nargs="?", const=str(TABLE_FILE), default="",
                        help="update the table file (without a path: this checkout's fastssl/auto_gpu_table.json)")
    args = parser.parse_args(argv)
    if args.min_speedup <= 1:
        parser.error(f"--min-speedup must be > 1 (cuda is chosen only when faster), got {args.min_speedup}")
    _setup()
    from fastssl.auto_gpu_table import load_auto_gpu_table, parse_auto_gpu_table

    try:
        result = json.loads(Path(args.json).read_text())
        verdicts = propose(result, args.min_speedup)
    except (OSError, ValueError, KeyError) as e:
        print(f"auto_table: {args.json}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    text = markdown(result, verdicts, args.min_speedup)
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text + "\n")
    if args.write:
        path = Path(args.write)
        try:
            load_auto_gpu_table(path)  # the file as it is must be valid before it is changed
            new, notes = updated_table(json.loads(path.read_text()), result, verdicts)
            parse_auto_gpu_table(new, str(path))
        except ValueError as e:
            print(f"auto_table: not written: {e}", file=sys.stderr)
            return 2
        path.write_text(json.dumps(new, indent=1) + "\n")
        load_auto_gpu_table(path)  # read back as the library reads it
        for note in notes:
            print(note)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
