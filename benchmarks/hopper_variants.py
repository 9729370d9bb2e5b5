"""Today's Triton pairwise-LSE kernels against their opt-in Hopper variants (`HopperVariant` in
fastssl/kernels/triton/pairwise_lse.py), on one GPU, in one short run.

    python benchmarks/hopper_variants.py [--json hopper_variants.json] [--budget-s 85] [--reps 5]
    python benchmarks/hopper_variants.py --rows tma,tma+pipeline   # these rows (and today's) only
    python benchmarks/hopper_variants.py --dry-run     # the same plan, tiny sizes, interpreter, CPU

NT-Xent forward + backward (backend="triton", bf16) at 2N ∈ {8192, 32768} and D ∈ {128, 256, 512};
per shape, each row of `plan` — a variant and one pinned config per kernel (PINNED_CONFIGS: no
autotuning sweep, one compile per kernel and row) — is timed with CUDA events (median of --reps
after one warm-up call, which compiles; --dry-run times its one call), and its loss and gradients
are compared with the first row's, today's kernels in today's first config, on the same inputs.
Rows past --budget-s are listed as skipped, a row that fails records its error, and the others run
on. Prints each row as it is measured, then the table; the JSON file is rewritten after every row.
Exit status 1 if a row failed or disagrees.

The rows: today's kernels; "tma", "pipeline" and both in the same configs (what each switch buys);
"host_tma" alone and with "pipeline" in those configs too (host-built descriptors and TMA stores
against "tma"'s device-side ones); "tma" and "pipeline" in each of the first two "wide" configs
that survive pruning (HOPPER_CONFIGS); today's pointer path in the first wide config (what the
tiles alone buy). NT-Xent's backward is the symmetric pass
("sym") at resident D and the blocked route at D = 512, where only the forward has variants.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

#: (2N, D) on a GPU, and the tiny shapes of --dry-run with the same roles (resident D twice, then
#: the D loop: bf16 rows past 256 wide).
SHAPES = {"gpu": [(8192, 128), (32768, 128), (8192, 256), (32768, 256), (8192, 512), (32768, 512)],
          "dry-run": [(32, 16), (48, 16), (32, 32), (48, 32), (32, 272), (48, 272)]}  # fmt: skip
TEMPERATURE = 0.1
#: A row agrees with the first when |Δloss| ≤ LOSS_RTOL·|loss| and max|Δgrad| ≤ GRAD_RTOL·max|grad|
#: (the configs differ in summation order; bf16 gradients round to 2^-8 relative).
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-2


def agreement(loss: float, grads, ref_loss: float, ref_grads) -> dict:
    """loss_rel_diff, grad_rel_diff (max |Δgrad| / max |grad| of the reference) and whether both are
    within LOSS_RTOL and GRAD_RTOL: one row against the first row on the same inputs."""
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    grad_rel = float((grads - ref_grads).abs().max() / ref_grads.abs().max().clamp_min(1e-30))
    return dict(loss_rel_diff=loss_rel, grad_rel_diff=grad_rel, agrees=loss_rel <= LOSS_RTOL and grad_rel <= GRAD_RTOL)


def _setup(dry_run: bool) -> None:
    """--dry-run: the interpreter, set before triton is imported."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def plan(d: int, dtype_itemsize: int = 2, smem_limit: int = 232448) -> list:
    """[(label, variant text, {kind: (BLOCK_M, BLOCK_N, num_warps, num_stages)})] for feature size `d`:
    the configs are the first ones `candidate_configs` keeps at this D (on sm_90's shared memory)."""
    import torch

    from fastssl.kernels.triton import pairwise_lse as K

    dtype = torch.bfloat16 if dtype_itemsize == 2 else torch.float32
    block_k, single_k, block_dout = K.tile_dims(d, dtype)
    bwd = "sym" if single_k else "weights"
    bwd_k = block_k if single_k else K.blocked_block_k(d, dtype)

    def shapes(configs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]

    today = {"fwd": shapes(K.candidate_configs("fwd", dtype_itemsize, block_k, single_k, block_dout, smem_limit))[0],
             bwd: shapes(K.candidate_configs(bwd, dtype_itemsize, bwd_k, single_k, block_dout, smem_limit))[0]}
    wide_fwd = shapes(K.wide_candidates("fwd", dtype_itemsize, block_k, single_k, smem_limit))[:2]
    # The blocked route's "weights" has no wide configs: today's, there.
    wide_bwd = shapes(K.wide_candidates(bwd, dtype_itemsize, bwd_k, single_k, smem_limit)) if single_k else []
    rows = [("today", "", today), ("tma", "tma", today), ("pipeline", "pipeline", today),
            ("tma+pipeline", "tma,pipeline", today), ("host_tma", "host_tma", today),
            ("host_tma+pipeline", "host_tma,pipeline", today)]  # fmt: skip
    wide = [{"fwd": fwd, bwd: wide_bwd[min(i, len(wide_bwd) - 1)] if wide_bwd else today[bwd]}
            for i, fwd in enumerate(wide_fwd)]  # fmt: skip
    rows += [(f"tma+pipeline wide{i}", "tma,pipeline", configs) for i, configs in enumerate(wide)]
    return rows + [("pointers wide0", "", wide[0])] if wide else rows


def _config(shape):
    import triton

    bm, bn, warps, stages = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _time_ms(step, reps: int, cuda: bool) -> list:
    import torch

    if not cuda:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _row(nt_xent_loss, K, text: str, configs: dict, two_n: int, d: int, device: str, reps: int) -> tuple:
    """(times in ms, loss, gradients of [z1; z2] in fp32) of one row at one shape."""
    import torch

    gen = torch.Generator().manual_seed(two_n + d)
    z = torch.randn(two_n, d, generator=gen).to(device, torch.bfloat16)
    z1 = z[: two_n // 2].clone().requires_grad_()
    z2 = z[two_n // 2 :].clone().requires_grad_()

    def step():
        z1.grad = z2.grad = None
        loss = nt_xent_loss(z1, z2, TEMPERATURE, backend="triton")
        loss.backward()
        return loss

    K.HOPPER_VARIANT = K.parse_hopper_variant(text)
    K.PINNED_CONFIGS = {kind: _config(shape) for kind, shape in configs.items()}
    try:
        t0 = time.perf_counter()
        loss = float(step().detach())  # on a GPU the warm-up, which compiles this row's kernels
        warm_ms = (time.perf_counter() - t0) * 1e3
        grads = torch.cat([z1.grad, z2.grad]).float()
        # The interpreter compiles nothing: its one call is the timed one.
        times = _time_ms(step, reps, True) if device == "cuda" else [warm_ms]
    finally:
        K.HOPPER_VARIANT, K.PINNED_CONFIGS = K.HopperVariant(), {}
    return times, loss, grads


def run(dry_run: bool, reps: int, budget_s: float, json_path: Path, only_rows=None) -> dict:
    """Every row of `plan` (those labelled in `only_rows`, if given) at every shape; the JSON file is
    rewritten after each, so that a run cut short keeps what it measured. A row that fails records
    its error and the run goes on. The first row must be "today": the others are compared with it."""
    import torch
    import triton

    from fastssl.functional import nt_xent_loss
    from fastssl.kernels.triton import pairwise_lse as K

    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --dry-run for the CPU walk-through")
    device = "cuda" if cuda else "cpu"
    result = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter, --dry-run)",
        torch=torch.__version__, triton=triton.__version__, temperature=TEMPERATURE, reps=reps, budget_s=budget_s,
        agreement=dict(loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL), seconds=0.0, records=[],
    )  # fmt: skip
    t_start = time.perf_counter()
    all_shapes = SHAPES["dry-run" if dry_run else "gpu"]
    for d in sorted({d for _, d in all_shapes}):
        reference = {}  # 2N -> the first row's (loss, gradients)
        for label, text, configs in plan(d):
            if only_rows and label not in only_rows:
                continue
            for two_n in [n for n, dd in all_shapes if dd == d]:
                rec = dict(label=label, variant=text or "default", configs={k: list(v) for k, v in configs.items()},
                           two_n=two_n, d=d)  # fmt: skip
                if time.perf_counter() - t_start > budget_s:
                    rec["skipped"] = f"over the {budget_s:.0f} s budget"
                else:
                    try:
                        times, loss, grads = _row(nt_xent_loss, K, text, configs, two_n, d, device, reps)
                    except Exception as e:  # recorded, not raised: the other rows still run
                        rec["error"] = f"{type(e).__name__}: {e}"[:1000]
                    else:
                        ms = statistics.median(times)
                        rec.update(ms=ms, ms_all=times, loss=loss, tflops=6 * two_n**2 * d / (ms * 1e-3) / 1e12)
                        rec.update(agreement(loss, grads, *reference.setdefault(two_n, (loss, grads))))
                result["records"].append(rec)
                result["seconds"] = round(time.perf_counter() - t_start, 1)
                json_path.write_text(json.dumps(result, indent=1))
                print(_line(rec, None), flush=True)
    return result


def _line(r: dict, today_ms) -> str:
    configs = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in r["configs"].items())
    head = f"| {r['two_n']} | {r['d']} | {r['label']} | {configs} |"
    if "skipped" in r or "error" in r:
        return f"{head} {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['error'][:200]} | | | |"
    speedup = f"{today_ms / r['ms']:.2f}x" if today_ms else ""
    return (f"{head} {r['ms']:.3f} | {r['tflops']:.1f} | {speedup} | {'yes' if r['agrees'] else 'NO'} "
            f"({r['loss_rel_diff']:.1e}, {r['grad_rel_diff']:.1e}) |")


def table(result: dict) -> str:
    """The records as a markdown table, with each row's speed-up over today's kernels at its shape."""
    today = {(r["two_n"], r["d"]): r["ms"] for r in result["records"] if r["label"] == "today" and "ms" in r}
    lines = [f"{result['device']}, torch {result['torch']}, triton {result['triton']}; NT-Xent fwd+bwd, bf16, "
             f"median of {result['reps']}; {result['seconds']} s in all",
             "", "| 2N | D | row | configs | ms | TFLOP/s | vs today | agrees (loss, grad rel. diff) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [_line(r, today.get((r["two_n"], r["d"]))) for r in result["records"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes through the Triton interpreter (CPU)")
    parser.add_argument("--json", default="hopper_variants.json", help="where to write the records")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per row and shape (after one warm-up)")
    parser.add_argument("--budget-s", type=float, default=85.0, help="rows past this many seconds are skipped")
    parser.add_argument("--rows", default="", help="comma-separated row labels to run (today's always runs)")
    args = parser.parse_args(argv)
    _setup(args.dry_run)
    only_rows = {"today", *args.rows.split(",")} if args.rows else None
    result = run(args.dry_run, args.reps, args.budget_s, Path(args.json), only_rows)
    print("\n" + table(result))
    bad = [f"{r['label']} at 2N={r['two_n']} D={r['d']}" for r in result["records"]
           if r.get("agrees") is False or "error" in r]  # fmt: skip
    if bad:
        print("rows that failed or disagree with today's kernels: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
