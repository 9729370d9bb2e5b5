"""A short summary of what fastssl buys: NT-Xent forward+backward, fastssl vs what users run otherwise.

For each size, ``fastssl.nt_xent_loss`` with the default backend (auto: Triton on CUDA, the
chunked torch backend on the CPU), ``fastssl.reference.nt_xent_loss`` (materialising the
2N x 2N logits in fp32), on CUDA the bf16 materialising baseline eager and compiled
(baselines.nt_xent: lightly's formula, bf16 matmul) and, where it is installed, lightly 1.6's
NTXentLoss are timed (median of a few forward+backward calls after a warm-up; providers that do
not run here are listed with the reason) and their peak memory above the inputs is measured
(CUDA: torch.cuda.max_memory_allocated; CPU: RSS growth in a helper process, see
memory.PeakRssProbe). No pytest needed:

    python -m benchmarks.summary            # CPU: 2N = 2048, 8192 (D = 128, fp32); CUDA: 2N = 8192..131072 (bf16)
    python benchmarks/summary.py --quick    # the smallest size only, fewer repetitions
    python -m benchmarks.summary --sizes 4096,16384 --dim 256 --reps 5
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works both as a script and with -m

import torch  # noqa: E402

import env  # noqa: E402
import formatting  # noqa: E402
import memory  # noqa: E402
import providers  # noqa: E402
import specs  # noqa: E402
from fastssl import backends  # noqa: E402

DEFAULT_SIZES = {"cpu": [2048, 8192], "cuda": [8192, 32768, 131072]}
PROVIDERS = ("fastssl-auto", "reference", "materialising-bf16", "materialising-bf16-compiled", "lightly")


def measure(case: specs.Case, reps: int, probe: memory.PeakRssProbe) -> tuple["float | str", "float | str"]:
    """(median seconds, peak MiB) of one forward+backward of `case`; "OOM" where it ran out of memory."""
    try:
        step = providers.make_step(case)
        seconds = providers.time_step(step, reps, warmup=1)
        peak = memory.cuda_peak_mib(step) if case.device == "cuda" else probe.measure(case)
        return seconds, peak
    except Exception as exc:
        if not memory.is_oom(exc):
            raise
    # Out of memory. Freed here, outside the except block, once the traceback's tensors are unreferenced.
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return "OOM", "OOM"


def _ratio(theirs: "float | str", ours: "float | str", digits: int) -> str:
    """theirs / ours, or the reason there is no number (a baseline that ran out of memory)."""
    if isinstance(theirs, str) or isinstance(ours, str):
        return theirs if isinstance(theirs, str) and not isinstance(ours, str) else "—"
    return f"{theirs / ours:.{digits}f}×"


def main(argv: "list[str] | None" = None) -> None:
    device = env.default_device()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="comma-separated 2N values (default: %s on this device)" % DEFAULT_SIZES[device])
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension D (default 128)")
    parser.add_argument("--reps", type=int, help="timed repetitions per case (default 3, 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the smallest size only (unless --sizes), fewer reps")
    args = parser.parse_args(argv)
    env.configure_threads(device)

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else DEFAULT_SIZES[device]
    if args.quick and not args.sizes:
        sizes = sizes[:1]
    reps = args.reps or (2 if args.quick else 3)
    dtype = env.default_dtype(device)
    auto = backends.resolve_backend("auto", torch.empty(0, device=device))

    machine = env.environment(device)
    print(f"device  {machine['device_name']}")
    print(f"torch {machine['torch']}, triton {machine['triton']}, fastssl {machine['fastssl']}; dtype {dtype}, D = {args.dim}")
    print(f"NT-Xent forward+backward: median of {reps} after 1 warm-up; peak memory above the inputs\n")

    skipped = {p: providers.provider_unavailable(p, device, "nt_xent", args.dim, dtype) for p in PROVIDERS}
    rows = []
    probe = memory.PeakRssProbe()
    try:
        for batch in sizes:
            results = {
                p: measure(specs.Case("nt_xent", p, "fwd+bwd", batch, args.dim, dtype, device), reps, probe)
                for p in PROVIDERS
                if not skipped[p]
            }
            our_time, our_peak = results["fastssl-auto"]
            for provider, (seconds, peak) in results.items():
                ours = provider == "fastssl-auto"
                rows.append([
                    f"fastssl (auto: {auto})" if ours else provider,
                    batch,
                    seconds if isinstance(seconds, str) else f"{seconds * 1e3:.1f}",
                    peak if isinstance(peak, str) else f"{peak:.1f}",
                    "—" if ours else _ratio(seconds, our_time, 2),
                    "—" if ours else _ratio(peak, our_peak, 1),
                ])
    finally:
        probe.close()

    headers = ["provider", "2N", "time ms", "peak MiB", "fastssl speed-up", "fastssl memory saving"]
    print(formatting.format_table(headers, rows))
    print("\nOn each baseline's row: speed-up = its time / fastssl's time; memory saving = its peak / fastssl's peak.")
    for provider, why in skipped.items():
        if why:
            print(f"not run: {provider} ({why})")


if __name__ == "__main__":
    main()
