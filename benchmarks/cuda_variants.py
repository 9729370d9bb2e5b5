"""The `cuda` backend's kernel sets against the Triton backend, on one GPU, in one short run.

    python benchmarks/cuda_variants.py [--json cuda_variants.json] [--budget-s 80] [--reps 5]
    python benchmarks/cuda_variants.py --rows "cuda sm90"    # this row (and the Triton one) only
    python benchmarks/cuda_variants.py --dry-run             # the same plan, tiny sizes, CPU

Per case (a loss and a shape: NT-Xent and CLIP at the sizes of the backend comparison, Barlow Twins
and VICReg at (N, D) = (2048, 8192) and (256, 65536)), forward + backward in bf16, each row of ROWS
that applies to its kernel family runs on the same inputs (the benchmark suite's, from
providers.make_inputs): the Triton backend first, then the `cuda` backend with today's kernels and
with each opt-in kernel set, selected by its environment variable, which the row sets around its
calls and restores after (the cuda adapters read them on every call). Each row's loss and
gradients are compared with the first row's (the agreement thresholds of hopper_variants.py), its
time is the median of --reps synchronised calls after one warm-up call (which compiles or
autotunes), and its rate counts the materialising algorithm's GEMMs (flops.model_flops, the
suite's model FLOPs). Rows past --budget-s are listed as skipped, a row that fails records its
error, and the JSON file is rewritten after every row, with the GPU's name and compute capability,
the torch, Triton and CUDA versions and the date (what benchmarks/auto_table.py turns into `auto`'s
measured table). Exit status 1 if a row failed or disagrees.

--dry-run walks the same plan at tiny sizes on the CPU with every row on the torch backend (no
kernel of these runs there): it checks the plan, the environment handling, the comparison, the JSON
and the table, not the kernels.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

#: (loss, 2N, D) on a GPU: the pairwise sizes at which the backends are compared (the sm_90a dx and
#: dy kernels take D <= 256; D = 512 has the sm_90a forward only), and the Frobenius targets.
CASES = {"gpu": [("nt_xent", 8192, 128), ("nt_xent", 32768, 128), ("nt_xent", 32768, 256), ("nt_xent", 32768, 512),
                 ("clip", 32768, 128), ("clip", 32768, 512),
                 ("barlow_twins", 4096, 8192), ("vicreg", 4096, 8192), ("barlow_twins", 512, 65536)],
         "dry-run": [("nt_xent", 32, 16), ("clip", 32, 16), ("barlow_twins", 16, 24), ("vicreg", 16, 24)]}  # fmt: skip


class Row(NamedTuple):
    """One kernel set: a fastssl backend, the environment it runs under, and the families it covers."""

    label: str
    backend: str
    env: dict
    families: tuple


#: The Triton backend first (the others are compared with it), then the cuda backend's kernel sets:
#: today's default, the sm_90a kernels (TMA + wgmma: pairwise-LSE forward, dx, dy and the symmetric
#: backward; the fused Frobenius forward) and the pipelined sm_80 pairwise-LSE kernels (cp.async,
#: ldmatrix, 128-row tiles; they run on sm_90 too), both opt-in until a GPU run verifies them.
ROWS = [
    Row("triton", "triton", {}, ("pairwise", "frobenius")),
    Row("cuda", "cuda", {}, ("pairwise", "frobenius")),
    Row("cuda sm90", "cuda", {"FASTSSL_CUDA_SM90": "1"}, ("pairwise", "frobenius")),
    Row("cuda pipelined", "cuda", {"FASTSSL_CUDA_PIPELINE": "1"}, ("pairwise",)),
]
DTYPE = "bfloat16"


def _setup() -> None:
    """Puts benchmarks/ and the checkout on sys.path (the suite's modules import each other by name)."""
    here = Path(__file__).resolve().parent
    for path in (str(here), str(here.parent)):
        if path not in sys.path:
            sys.path.insert(0, path)


class _Environment:
    """Sets `values` in os.environ for the block and restores what was there (or its absence)."""

    def __init__(self, values: dict):
        self.values, self.saved = values, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _version(package: str):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _measure(case, reps: int) -> tuple:
    """(median seconds, loss, gradients flattened to fp32) of one fwd+bwd case."""
    import torch

    import providers

    fn = providers.loss_function(case.loss, case.provider, case.route)
    inputs = providers.make_inputs(case)
    wrt = [t for t in inputs if t.requires_grad]
    loss = fn(*inputs)
    grads = torch.cat([g.detach().float().reshape(-1) for g in torch.autograd.grad(loss, wrt)])
    seconds = providers.time_step(providers.make_step(case), reps)
    return seconds, float(loss.detach()), grads


def run(dry_run: bool, reps: int, budget_s: float, json_path: Path, only_rows=None) -> dict:
    """Every applicable row at every case (those labelled in `only_rows`, if given; the first row
    always runs, as the others are compared with it)."""
    import torch

    import flops
    import hopper_variants
    from specs import SPECS, Case

    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --dry-run for the CPU walk-through")
    device = "cuda" if cuda else "cpu"
    result = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu (torch backend for every row, --dry-run)",
        capability=list(torch.cuda.get_device_capability()) if cuda else None,
        torch=torch.__version__, triton=_version("triton"), cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        dtype=DTYPE, reps=reps, budget_s=budget_s,
        agreement=dict(loss_rtol=hopper_variants.LOSS_RTOL, grad_rtol=hopper_variants.GRAD_RTOL),
        seconds=0.0, records=[],
    )  # fmt: skip
    t_start = time.perf_counter()
    for loss, two_n, d in CASES["dry-run" if dry_run else "gpu"]:
        family = SPECS[loss].family
        reference = None
        for i, row in enumerate(r for r in ROWS if family in r.families):
            if only_rows and i > 0 and row.label not in only_rows:
                continue
            rec = dict(label=row.label, env=row.env, loss=loss, two_n=two_n, d=d)
            if time.perf_counter() - t_start > budget_s:
                rec["skipped"] = f"over the {budget_s:.0f} s budget"
            else:
                provider = "fastssl-torch" if dry_run else f"fastssl-{row.backend}"
                case = Case(loss, provider, "fwd+bwd", two_n, d, DTYPE, device)
                try:
                    with _Environment(row.env):
                        seconds, value, grads = _measure(case, reps)
                except Exception as e:  # recorded, not raised: the other rows still run
                    rec["error"] = f"{type(e).__name__}: {e}"[:1000]
                else:
                    rec.update(ms=seconds * 1e3, value=value, tflops=flops.model_flops(case) / seconds / 1e12)
                    if reference is None:
                        reference = (value, grads)
                    rec.update(hopper_variants.agreement(value, grads, *reference))
            result["records"].append(rec)
            result["seconds"] = round(time.perf_counter() - t_start, 1)
            json_path.write_text(json.dumps(result, indent=1))
            print(_line(rec, None), flush=True)
    return result


def _line(r: dict, first_ms) -> str:
    head = f"| {r['loss']} | {r['two_n']} | {r['d']} | {r['label']} |"
    if "skipped" in r or "error" in r:
        return f"{head} {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['error'][:200]} | | | |"
    speedup = f"{first_ms / r['ms']:.2f}x" if first_ms else ""
    return (f"{head} {r['ms']:.3f} | {r['tflops']:.1f} | {speedup} | {'yes' if r['agrees'] else 'NO'} "
            f"({r['loss_rel_diff']:.1e}, {r['grad_rel_diff']:.1e}) |")


def table(result: dict) -> str:
    """The records as a markdown table, with each row's speed-up over the first row of its case."""
    first = {}
    for r in result["records"]:
        first.setdefault((r["loss"], r["two_n"], r["d"]), r.get("ms"))
    lines = [f"{result['device']}, torch {result['torch']}; fwd+bwd, {result['dtype']}, median of {result['reps']}; "
             f"{result['seconds']} s in all",
             "", "| loss | 2N | D | row | ms | model TFLOP/s | vs triton | agrees (loss, grad rel. diff) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [_line(r, first[(r["loss"], r["two_n"], r["d"])]) for r in result["records"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, every row on the torch backend (CPU)")
    parser.add_argument("--json", default="cuda_variants.json", help="where to write the records")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per row and case (after one warm-up)")
    parser.add_argument("--budget-s", type=float, default=80.0, help="rows past this many seconds are skipped")
    parser.add_argument("--rows", default="", help="comma-separated row labels to run (the first row always runs)")
    args = parser.parse_args(argv)
    _setup()
    only_rows = set(args.rows.split(",")) if args.rows else None
    if only_rows and only_rows - {r.label for r in ROWS}:
        parser.error(f"--rows: unknown {sorted(only_rows - {r.label for r in ROWS})}; known: {[r.label for r in ROWS]}")
    result = run(args.dry_run, args.reps, args.budget_s, Path(args.json), only_rows)
    print("\n" + table(result))
    bad = [f"{r['label']} on {r['loss']} 2N={r['two_n']} D={r['d']}" for r in result["records"]
           if r.get("agrees") is False or "error" in r]  # fmt: skip
    if bad:
        print("rows that failed or disagree with the Triton backend: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
