"""The largest batch 2N for which NT-Xent forward+backward runs on this device, fastssl vs the reference.

    python benchmarks/max_batch.py [--json PATH] [--d 128] [--dtype bf16]
                                   [--providers fastssl,reference,materialising-bf16]
                                   [--device cuda|cpu] [--limit 2N] [--start 2N] [--step S] [--max-seconds T]

For each provider, one forward+backward of NT-Xent (2N rows of dimension D, as in the suite:
providers.make_step) is tried at 2N = start, 2·start, 4·start, ... until a try runs out of memory
(torch.cuda.OutOfMemoryError, or the CPU allocator's "can't allocate memory") or 2N reaches the
limit; then bisection between the largest 2N that ran and the smallest that failed, to a multiple
of `step`. Memory is freed between tries (gc, torch.cuda.empty_cache). fastssl's memory grows as
O(N·D) but its time as O(N²·D), so the search also stops when the next doubling would take longer
than --max-seconds (estimated as 4x the last try): the result then says "time", not "oom".

Defaults: on CUDA start 4096, limit 2N = 2,097,152 (the GPU target is 2N ≥ 1,000,000), step
1024; on the CPU (``--device cpu``, a quick self-test of the search) start 256, limit 4096, step 2.
The JSON (``--json``) is read by report.py (``--max-batch``, or max_batch.json beside the suite's JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works both as a script and with -m

import torch  # noqa: E402

import env  # noqa: E402
import memory  # noqa: E402
import providers  # noqa: E402
import specs  # noqa: E402

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
          "fp16": "float16", "float16": "float16"}
#: --providers names -> suite providers ("fastssl" is the default backend, as a user gets it).
PROVIDERS = {"fastssl": "fastssl-auto", "fastssl-triton": "fastssl-triton", "fastssl-cuda": "fastssl-cuda",
             "fastssl-torch": "fastssl-torch", "reference": "reference", "reference-compiled": "reference-compiled",
             "materialising-bf16": "materialising-bf16"}
DEFAULTS = {"cuda": {"start": 4096, "limit": 2**21, "step": 1024}, "cpu": {"start": 256, "limit": 4096, "step": 2}}


@dataclasses.dataclass
class Search:
    """Outcome of search_max: the largest 2N that ran, the smallest that failed, why the search stopped."""

    max_2n: int  # 0 when not even the smallest try ran
    first_failure: Optional[int]  # None when nothing failed
    limited_by: str  # "oom" (a failure bounds it), "limit" (reached the limit), "time" (next try too slow)
    tries: list[dict]


def search_max(
    fits: Callable[[int], dict],
    start: int,
    limit: int,
    step: int = 2,
    max_seconds: Optional[float] = None,
) -> Search:
    """Largest multiple of `step` in [step, limit] for which `fits` succeeds: doubling, then bisection.

    fits(two_n) returns a dict with at least "ok" (bool) and optionally "seconds"; it is assumed
    monotone (fits at x implies fits below x). Doubling from `start` finds the first failure (or
    reaches `limit`); bisection then halves the gap [largest ok, smallest failed] until it is one
    `step`, so the answer is exact to a multiple of `step` in O(log(limit/start) + log(gap/step)) tries.
    With max_seconds, doubling also stops when the next try would take more than that (4x the
    last success: NT-Xent's time grows as (2N)²).
    """
    if step < 2 or step % 2:
        raise ValueError(f"step must be an even number >= 2 (2N is even), got {step}")
    if not step <= start <= limit:
        raise ValueError(f"need step <= start <= limit, got step={step}, start={start}, limit={limit}")
    start, limit = start // step * step, limit // step * step
    tries: list[dict] = []

    def attempt(two_n: int) -> dict:
        result = dict(fits(two_n), two_n=two_n)
        tries.append(result)
        return result

    ok, failed, limited_by = 0, None, "limit"
    x = start
    while True:  # doubling
        result = attempt(x)
        if not result["ok"]:
            failed, limited_by = x, "oom"
            break
        ok = x
        if x >= limit:
            break
        if max_seconds is not None and 4 * result.get("seconds", 0.0) > max_seconds:
            limited_by = "time"
            break
        x = min(2 * x, limit)
    if failed is not None:  # bisection in (ok, failed)
        while failed - ok > step:
            mid = max((ok + failed) // 2 // step * step, ok + step)
            if attempt(mid)["ok"]:
                ok = mid
            else:
                failed = mid
    return Search(ok, failed, limited_by, tries)


def nt_xent_fits(provider: str, dim: int, dtype: str, device: str) -> Callable[[int], dict]:
    """fits(two_n) for search_max: one NT-Xent forward+backward of the suite's case; OOM is a False."""

    def fits(two_n: int) -> dict:
        case = specs.Case("nt_xent", provider, "fwd+bwd", two_n, dim, dtype, device)
        outcome: dict = {}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            step = providers.make_step(case)
            start = time.perf_counter()
            step()
            outcome = {"ok": True, "seconds": time.perf_counter() - start}
            if device == "cuda":
                outcome["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            del step
        except Exception as exc:
            if not memory.is_oom(exc):
                raise
            outcome = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        memory.free_memory(device)  # outside the except block: the failed try's tensors are unreferenced
        return outcome

    return fits


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the result here (read by report.py)")
    parser.add_argument("--d", type=int, default=128, help="embedding dimension D (default 128)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default bf16)")
    parser.add_argument("--providers", default="fastssl,reference,materialising-bf16",
                        help=f"comma-separated, from {', '.join(PROVIDERS)} (default: %(default)s)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    parser.add_argument("--limit", type=int, help="largest 2N tried (default: 2,097,152 on CUDA, 4096 on the CPU)")
    parser.add_argument("--start", type=int, help="first 2N tried (default: 4096 on CUDA, 256 on the CPU)")
    parser.add_argument("--step", type=int, help="resolution of the bisection, even (default: 1024 on CUDA, 2 on the CPU)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop doubling when the next try would take longer (default 60)")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (use --device cpu for a self-test)")
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROVIDERS]
    if unknown or not names:
        parser.error(f"--providers: unknown {unknown} (choose from {', '.join(PROVIDERS)})")
    if args.d < 2:
        parser.error(f"--d must be >= 2, got {args.d}")
    defaults = DEFAULTS[device]
    limit = args.limit or defaults["limit"]
    step = args.step or defaults["step"]
    start = min(args.start or defaults["start"], limit)
    dtype = DTYPES[args.dtype]
    env.configure_threads(device)

    machine = env.environment(device)
    doc = {
        "device": device, "d": args.d, "dtype": dtype, "limit": limit, "start": start, "step": step,
        "max_seconds": args.max_seconds, "date": _dt.date.today().isoformat(), **machine, "results": {},
    }
    print(f"{machine['device_name']}: NT-Xent forward+backward, D = {args.d}, {dtype}; 2N from {start:,} doubling to at "
          f"most {limit:,}, then bisection to a multiple of {step}")
    for name in names:
        provider = PROVIDERS[name]
        why = providers.provider_unavailable(provider, device, "nt_xent", args.d, dtype)
        if why:
            print(f"{name}: skipped ({why})")
            doc["results"][name] = {"skipped": why}
            continue
        found = search_max(nt_xent_fits(provider, args.d, dtype, device), start, limit, step, args.max_seconds)
        backend = fastssl_backend(provider, device)
        doc["results"][name] = {"provider": provider, "backend": backend, **dataclasses.asdict(found)}
        bound = {
            "oom": lambda: f"{found.first_failure:,} ran out of memory",
            "limit": lambda: f"the search limit {limit:,} reached, no OOM",
            "time": lambda: "the next doubling would exceed --max-seconds",
        }[found.limited_by]()
        print(f"{name}{f' ({backend})' if backend else ''}: largest 2N = {found.max_2n:,} ({bound}; "
              f"{len(found.tries)} tries)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def fastssl_backend(provider: str, device: str) -> Optional[str]:
    """The concrete fastssl backend a provider runs on (auto resolved), None for the reference."""
    if not provider.startswith("fastssl-"):
        return None
    from fastssl import backends

    return backends.resolve_backend(provider[len("fastssl-") :], torch.empty(0, device=device))


if __name__ == "__main__":
    sys.exit(main())
