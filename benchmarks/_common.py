"""Shared pieces of the fastssl benchmarks: cases, providers, the FLOP model, timing and peak memory.

Used by the pytest-benchmark suite (bench_contrastive.py, conftest.py) and by the standalone
summary (summary.py), so that both time and measure exactly the same calls. The losses and their
reference (materialising) formulas are those of DESIGN.md, "The losses (the spec)".

Size convention: a case's ``batch`` is 2N, the number of rows of NT-Xent's Z = [n(z1); n(z2)];
every loss gets N = batch/2 pairs of (N, D) embeddings, and MoCo a bank of K = 2N rows.

Run as a script (``python benchmarks/_common.py --probe-worker``) this file is the helper process
that measures peak memory on the CPU (see PeakRssProbe).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # so that `python benchmarks/summary.py` finds fastssl
    sys.path.append(str(REPO_ROOT))

import fastssl  # noqa: E402
from fastssl import backends, reference  # noqa: E402
from fastssl.ops.frobenius import choose_side  # noqa: E402

# On a shared CPU, intra-op threads that wait at barriers for a descheduled sibling make timings
# swing by 10x; FASTSSL_BENCH_THREADS=1 gives stable numbers there (the helper process inherits it).
if os.environ.get("FASTSSL_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTSSL_BENCH_THREADS"]))

LOSSES = ("nt_xent", "clip", "dcl", "moco")
#: The off-diagonal Frobenius family (bench_frobenius.py); fastssl runs them on each `route`.
FROBENIUS_LOSSES = ("barlow_twins", "vicreg", "spectral")
FROBENIUS_ROUTES = ("covariance", "gram")
#: fastssl / reference function names, where they are not f"{loss}_loss".
_FUNCTION_NAMES = {"spectral": "spectral_contrastive_loss"}
#: The suite's providers. "fastssl-<backend>" calls fastssl.<loss>_loss(..., backend=<backend>);
#: the summary also uses "fastssl-auto", the backend a user gets by default.
PROVIDERS = ("fastssl-triton", "fastssl-cuda", "fastssl-torch", "reference", "reference-compiled", "lightly")
#: The peer: lightly 1.6's modules, with the same temperatures as fastssl's defaults (its own defaults).
LIGHTLY_MODULES = {"nt_xent": "NTXentLoss", "dcl": "DCLLoss", "barlow_twins": "BarlowTwinsLoss",
                   "vicreg": "VICRegLoss"}
MODES = ("fwd", "fwd+bwd")
MIB = 2**20

# Sizes as (2N, D). The CPU default must finish in about a minute on a 2-core machine.
SIZE_SETS = {
    ("cpu", "small"): [(2048, 128)],
    ("cpu", "large"): [(2048, 128), (8192, 128), (2048, 512), (8192, 512)],
    ("cuda", "small"): [(8192, 128)],
    ("cuda", "large"): [(b, d) for b in (8192, 32768, 131072) for d in (128, 512)],
}
#: The Frobenius family's sizes, also as (2N, D): N x D embeddings, N = 2N/2. The GPU set is the
#: issue's (N, D) = (2048, 8192) and (256, 65536); the CPU sets show both routes winning.
FROBENIUS_SIZE_SETS = {
    ("cpu", "small"): [(1024, 2048)],
    ("cpu", "large"): [(1024, 8192), (4096, 512)],
    ("cuda", "small"): [(4096, 8192)],
    ("cuda", "large"): [(4096, 8192), (512, 65536)],
}


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked call: a loss, a provider, a mode and a shape."""

    loss: str
    provider: str
    mode: str
    batch: int  # 2N
    dim: int
    dtype: str = "float32"
    device: str = "cpu"
    route: str = "auto"  # the Frobenius family's route (fastssl providers only)

    @property
    def n_pairs(self) -> int:
        return self.batch // 2

    @property
    def bank_rows(self) -> int:
        return self.batch if self.loss == "moco" else 0

    @property
    def label(self) -> str:
        if self.loss in FROBENIUS_LOSSES:
            return f"{self.loss} {self.mode} N={self.n_pairs} D={self.dim} {self.dtype}"
        return f"{self.loss} {self.mode} 2N={self.batch} D={self.dim} {self.dtype}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        return cls(**json.loads(text))


def default_device() -> str:
    return os.environ.get("FASTSSL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str) -> str:
    return os.environ.get("FASTSSL_BENCH_DTYPE") or ("bfloat16" if device == "cuda" else "float32")


def bench_sizes(device: str, spec: Optional[str] = None, sets: Optional[dict] = None) -> list[tuple[int, int]]:
    """(2N, D) pairs from ``FASTSSL_BENCH_SIZES``: "small", "large" or a list like "2048x128,8192x512".

    Default: "small" on the CPU, "large" (the full GPU set) on CUDA. `sets`: the named size sets
    (SIZE_SETS, the contrastive losses', unless given).
    """
    spec = spec if spec is not None else os.environ.get("FASTSSL_BENCH_SIZES", "")
    spec = spec.strip() or ("large" if device == "cuda" else "small")
    key = (device, spec)
    sets = SIZE_SETS if sets is None else sets
    if key in sets:
        return sets[key]
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in spec.split(",") if item.strip()]
        if not sizes or any(len(s) != 2 or s[0] < 4 or s[0] % 2 or s[1] < 1 for s in sizes):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"FASTSSL_BENCH_SIZES must be 'small', 'large' or a list of 2NxD with even 2N >= 4, got {spec!r}"
        ) from None
    return sizes  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# providers and steps
# --------------------------------------------------------------------------------------------------


def provider_unavailable(provider: str, device: str, loss: str) -> Optional[str]:
    """Why `provider` cannot benchmark `loss` on `device`, or None when it can."""
    if provider.startswith("fastssl-"):
        backend = provider[len("fastssl-") :]
        if backend not in backends.BACKENDS:
            return f"fastssl has no backend {backend!r} yet (it has {backends.BACKENDS})"
        if backend == "triton" and device != "cuda":
            return "backend 'triton' needs CUDA tensors (the Triton CPU interpreter is not benchmarked)"
        if backend == "triton" and not backends.triton_usable(torch.device(device)):
            return "triton is not importable"
    if provider == "lightly":
        if importlib.util.find_spec("lightly") is None:
            return "lightly is not installed (it needs torchvision; see README, 'Checking against lightly')"
        if loss not in LIGHTLY_MODULES:
            return f"lightly 1.6 has no {loss} module that takes the same inputs"
    return None


@functools.lru_cache(maxsize=None)
def _compiled(loss: str) -> Callable:
    # dynamic=False: one static graph per shape, as a user with a fixed batch size gets.
    return torch.compile(getattr(reference, _FUNCTION_NAMES.get(loss, f"{loss}_loss")), dynamic=False)


def loss_function(loss: str, provider: str, route: str = "auto") -> Callable:
    """The callable that computes `loss` for `provider` (on `route`), taking the tensors of make_inputs."""
    name = _FUNCTION_NAMES.get(loss, f"{loss}_loss")
    if provider == "reference":
        return getattr(reference, name)
    if provider == "reference-compiled":
        return _compiled(loss)
    if provider.startswith("fastssl-"):
        kwargs = {"route": route} if loss in FROBENIUS_LOSSES else {}
        return functools.partial(getattr(fastssl, name), backend=provider[len("fastssl-") :], **kwargs)
    if provider == "lightly":
        import lightly.loss

        return getattr(lightly.loss, LIGHTLY_MODULES[loss])()
    raise ValueError(f"unknown provider {provider!r}")


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """Random embeddings for `case` (fixed seed): (z1, z2), or (query, key, bank) for MoCo."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)

    def leaf(rows: int, grad: bool = True) -> torch.Tensor:
        x = torch.randn(rows, case.dim, generator=gen).to(device=case.device, dtype=dtype)
        return x.requires_grad_(grad)

    inputs = (leaf(case.n_pairs), leaf(case.n_pairs))
    if case.loss == "moco":  # lightly keeps the bank L2-normalised and without grad
        inputs += (F.normalize(leaf(case.bank_rows, grad=False), dim=1),)
    return inputs


def make_step(case: Case) -> Callable[[], None]:
    """A no-argument callable running one `case.mode` call and waiting for the device.

    "fwd" runs the forward with grad enabled (as in training: the graph and whatever it saves are
    built, then dropped); "fwd+bwd" also takes the gradients with torch.autograd.grad, so nothing
    accumulates into .grad between calls. Outputs are dropped inside, so a measured peak is the
    call's working memory above the inputs.
    """
    fn = loss_function(case.loss, case.provider, case.route)
    inputs = make_inputs(case)
    wrt = [t for t in inputs if t.requires_grad]
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    if case.mode == "fwd":

        def step() -> None:
            fn(*inputs)
            sync()

    elif case.mode == "fwd+bwd":

        def step() -> None:
            torch.autograd.grad(fn(*inputs), wrt)
            sync()

    else:
        raise ValueError(f"unknown mode {case.mode!r}")
    return step


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` means the device (or host) ran out of memory."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def time_step(step: Callable[[], None], reps: int, warmup: int = 1) -> float:
    """Median wall time of `step` in seconds over `reps` calls, after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------

# Per loss: the logit GEMMs of the materialising algorithm as (rows, cols, operands with a gradient),
# and how many pairwise-LSE passes fastssl runs (CLIP does one over rows and one over columns).
_LOGITS = {
    "nt_xent": lambda c: (c.batch, c.batch, 2, 1),  # Z Zᵀ, (2N, 2N)
    "dcl": lambda c: (c.batch, c.batch, 2, 1),  # [a; b][a; b]ᵀ in four N x N blocks
    "clip": lambda c: (c.n_pairs, c.n_pairs, 2, 2),  # n(z1) n(z2)ᵀ, (N, N)
    "moco": lambda c: (c.n_pairs, c.bank_rows, 1, 1),  # q bankᵀ, (N, K); the bank has no grad
}


def _frobenius_flops(case: Case, executed: bool) -> int:
    """GEMM FLOPs of the Frobenius family, per DESIGN.md family 2.

    One product of an S x S matrix over the other dimension costs g = 2·N·D·S (S = D on the
    covariance side, N on the Gram side). The materialising reference builds C = AᵀB (Barlow Twins,
    S = D), two covariances XᵀX (VICReg, S = D) or abᵀ (spectral, S = N). fastssl's route either
    forms one cross product (Barlow Twins' covariance route, spectral's Gram route) — forward g,
    backward 3g (recompute, da, db) — or two Grams (the other routes) — forward 2g, backward 4g; VICReg's
    shared operand is one Gram per view: forward g, backward 2g (recompute, dx), twice.
    """
    n, d = case.n_pairs, case.dim
    forward = case.mode == "fwd"
    if case.loss == "vicreg":
        side = choose_side(n, d, case.route) if executed else "covariance"
        per_view = 1 if forward else (3 if executed else 2)
        return 2 * per_view * 2 * n * d * (d if side == "covariance" else n)
    if not executed:  # the reference: one product forward, two more backward
        g = 2 * n * d * (n if case.loss == "spectral" else d)
        return g if forward else 3 * g
    side = choose_side(n, d, case.route)
    g = 2 * n * d * (d if side == "covariance" else n)
    one_cross_product = (side == "covariance") == (case.loss == "barlow_twins")
    if one_cross_product:
        return g if forward else 4 * g
    return 2 * g if forward else 6 * g


def model_flops(case: Case) -> int:
    """GEMM FLOPs of the materialising algorithm (the same for every provider, so TFLOP/s compare).

    Forward 2·R·C·D for the R x C logit matrix; backward 2·R·C·D per operand with a gradient.
    Elementwise work (exp, LSE, normalisation) is not counted.
    """
    if case.loss in FROBENIUS_LOSSES:
        return _frobenius_flops(case, executed=False)
    rows, cols, grads, _ = _LOGITS[case.loss](case)
    gemm = 2 * rows * cols * case.dim
    return gemm * (1 + grads) if case.mode == "fwd+bwd" else gemm


def executed_flops(case: Case) -> int:
    """GEMM FLOPs the provider actually runs: model_flops plus the fused backward's recompute."""
    if not case.provider.startswith("fastssl-"):
        return model_flops(case)
    if case.loss in FROBENIUS_LOSSES:
        return _frobenius_flops(case, executed=True)
    rows, cols, grads, passes = _LOGITS[case.loss](case)
    gemm = 2 * rows * cols * case.dim * passes
    return gemm * (2 + grads) if case.mode == "fwd+bwd" else gemm


# --------------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------------


def cuda_peak_mib(step: Callable[[], None]) -> float:
    """Peak CUDA memory allocated by one call of `step`, above what was allocated before it (MiB)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def rss_peak_mib(step: Callable[[], None]) -> float:
    """Peak growth of this process's resident set during one call of `step` (MiB, Linux only).

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the current
    RSS, so VmHWM − VmRSS(before) is the call's peak. Only honest in a process whose allocator
    returns freed blocks to the OS (see PeakRssProbe): otherwise a call reuses pages an earlier
    call left resident and the growth reads too low.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) / 1024


class PeakRssProbe:
    """Measures CPU peak memory of cases in one helper process (this file run with --probe-worker).

    Why a helper: glibc malloc keeps freed blocks of up to 32 MiB resident for reuse, so in the
    benchmarking process an RSS reading depends on what ran before. The helper starts with
    MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, so every larger block is mmap'ed and unmapped on free;
    for each case it builds the inputs, runs one warm-up call (lazy initialisation, torch.compile),
    then measures one more call with rss_peak_mib. The timed process keeps the default allocator.
    The figure counts touched pages of everything the call allocates: tensors, and also oneDNN
    scratch buffers and other native memory.
    """

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--probe-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )

    def measure(self, case: Case) -> float | str:
        """Peak MiB of one call of `case`, or "OOM"; raises RuntimeError on any other failure."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        self._proc.stdin.write(case.to_json() + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:  # the helper died
            returncode = self._proc.wait(timeout=60)
            self.close()
            if returncode == -9:  # SIGKILL: on Linux, the kernel's OOM killer
                return "OOM"
            raise RuntimeError(f"peak-memory helper exited with status {returncode} on {case.label}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peak-memory probe failed for {case.label}: {reply['error']}")
        return reply["peak_mib"]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # end of input: the helper's loop ends and it exits
            self._proc.wait(timeout=60)
            self._proc.stdout.close()
        self._proc = None


def _probe_worker() -> None:
    """Helper-process loop: one JSON Case per stdin line, one JSON reply per stdout line."""
    # Replies get a private copy of stdout; anything else printed (warnings, C++ logs) goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        case, step = Case.from_json(line), None
        try:
            step = make_step(case)
            step()  # warm-up
            reply = {"peak_mib": rss_peak_mib(step)}
        except Exception as exc:  # noqa: BLE001  (reported back, not swallowed)
            reply = {"peak_mib": "OOM"} if is_oom(exc) else {"error": f"{type(exc).__name__}: {exc}"[:500]}
        del step
        print(json.dumps(reply), file=replies, flush=True)


# --------------------------------------------------------------------------------------------------
# environment and reporting
# --------------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{name} ({threads} thread{'' if threads == 1 else 's'})"


def environment(device: str) -> dict:
    """Device and versions, for extra_info, machine_info and the summary header."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fastssl": fastssl.__version__,
    }


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(re.fullmatch(r"[-+0-9.,x×e]+|—|OOM|-", r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, cells)])


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe-worker"]:
        _probe_worker()
    else:
        sys.exit("usage: python benchmarks/_common.py --probe-worker  (used by PeakRssProbe)")
