"""Shared pieces of the fastssl benchmarks: losses, sizes, cases, providers, FLOP models, peak memory.

Used by the pytest-benchmark suite (bench_contrastive.py, bench_frobenius.py, conftest.py,
_runner.py), by the standalone summary (summary.py) and by max_batch.py / profile_ncu.py, so that
all of them time and measure exactly the same calls. The losses and their reference
(materialising) formulas are those of docs/design.md, "The losses (the spec)"; the FLOP models count
the GEMMs of docs/design.md's kernel families 1 (pairwise LSE) and 2 (off-diagonal Frobenius).

Size convention: a case's ``batch`` is 2N, the number of rows of NT-Xent's Z = [n(z1); n(z2)];
every two-view loss gets N = batch/2 pairs of (N, D) embeddings, MoCo a bank of K = 2N rows,
uniformity one (2N, D) matrix and ArCL (N, m, D) views.

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



def configure_threads(device: str) -> None:
    """Set torch's intra-op threads for a benchmark process: FASTSSL_BENCH_THREADS, else 1 on the CPU.

    Why 1 by default on the CPU: on a shared machine, intra-op threads that wait at barriers for a
    descheduled sibling make timings swing by 10x or more (2N = 1024 NT-Xent forward+backward took
    18 ms on one thread and 716 ms on two, on a busy 2-core machine). Called by the entry points
    (conftest, summary, max_batch), never at import, so that importing this module changes nothing.
    The helper process of PeakRssProbe calls it too.
    """
    threads = os.environ.get("FASTSSL_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif device == "cpu":
        torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the suite calls one loss: its functions, inputs, keyword arguments and lightly peer."""

    name: str  # the suite's key (test ids, extra_info["loss"], report tables)
    function: str  # fastssl.<function> and fastssl.reference.<function>
    family: str  # "pairwise" (docs/design.md family 1, bench_contrastive.py) or "frobenius" (family 2)
    inputs: str = "pair"  # "pair": z1, z2 (N, D); "moco": + bank (K, D); "single": z (2N, D); "views": (N, m, D)
    kwargs: tuple[tuple[str, object], ...] = ()  # extra keyword arguments, the same for every provider
    views: int = 0  # m, for inputs == "views"
    lightly: Optional[str] = None  # lightly 1.6's module taking the same inputs, constructed with `kwargs`


_SPECS = [
    LossSpec("nt_xent", "nt_xent_loss", "pairwise", lightly="NTXentLoss"),
    LossSpec("moco", "moco_loss", "pairwise", inputs="moco"),  # lightly's module owns its bank: not comparable
    LossSpec("dcl", "dcl_loss", "pairwise", lightly="DCLLoss"),
    LossSpec("dclw", "dcl_loss", "pairwise", kwargs=(("sigma", 0.5),), lightly="DCLWLoss"),
    LossSpec("clip", "clip_loss", "pairwise"),
    LossSpec("uniformity", "uniformity", "pairwise", inputs="single"),
    LossSpec("vicreg_exp", "vicreg_exp_loss", "pairwise"),
    LossSpec("vicreg_ctr", "vicreg_ctr_loss", "pairwise"),
    LossSpec("arcl_m4", "arcl_loss", "pairwise", inputs="views", views=4),
    LossSpec("arcl_m8", "arcl_loss", "pairwise", inputs="views", views=8),
    LossSpec("barlow_twins", "barlow_twins_loss", "frobenius", lightly="BarlowTwinsLoss"),
    LossSpec("vicreg", "vicreg_loss", "frobenius", lightly="VICRegLoss"),
    LossSpec("spectral_contrastive", "spectral_contrastive_loss", "frobenius"),
]
#: Every benchmarked loss, by key.
SPECS = {spec.name: spec for spec in _SPECS}
LOSSES = tuple(spec.name for spec in _SPECS if spec.family == "pairwise")
#: The off-diagonal Frobenius family (bench_frobenius.py); fastssl runs them on each `route`.
FROBENIUS_LOSSES = tuple(spec.name for spec in _SPECS if spec.family == "frobenius")
FROBENIUS_ROUTES = ("covariance", "gram")
#: The suite's providers. "fastssl-<backend>" calls fastssl.<function>(..., backend=<backend>);
#: the summary also uses "fastssl-auto", the backend a user gets by default.
PROVIDERS = (
    "fastssl-triton", "fastssl-cuda", "fastssl-torch", "reference", "reference-compiled", "lightly", "inf_cl",
)
MODES = ("fwd", "fwd+bwd")
DTYPES = ("bfloat16", "float32")
MIB = 2**20

# --------------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------------

_CPU_PAIRWISE = [(2048, 128)]
_CPU_FROBENIUS = [(1024, 2048)]
# CUDA: the headline size first (2N = 32,768, D = 256; Barlow Twins / VICReg at N = 2048,
# D = 8192), then sizes past the point where the materialising reference runs out of memory on an
# 80 GB GPU. The reference upcasts to fp32: at 2N = 131,072 the 2N x 2N logits alone are 64 GiB
# (and autograd keeps more than one such matrix); at D = 131,072 Barlow Twins' C is 64 GiB.
_GPU_N_SWEEP = [(32768, 256), (131072, 256)]
_GPU_N_SWEEP_LONG = [(32768, 256), (131072, 256), (262144, 256)]  # N x N losses (CLIP, VICReg-ctr, spectral)
_GPU_D_SWEEP = [(4096, 8192), (4096, 32768), (4096, 131072)]  # N = 2048, D x D losses

#: Named size sets, as (2N, D) per loss; the first size of each loss is its *headline* size (the
#: one also run in the second dtype and, where enabled, with torch.compile). The sweep sizes after
#: it ascend: fastssl's Triton autotuning keys on coarse size classes, so the first (cheapest)
#: size of a class is the one that pays for autotuning.
SIZE_SETS: dict[tuple[str, str], dict[str, list[tuple[int, int]]]] = {
    ("cpu", "small"): {
        **{name: _CPU_PAIRWISE for name in LOSSES},
        "nt_xent": [(2048, 128), (1024, 128), (4096, 128)],  # three points: the CPU run's plot has lines
        **{name: _CPU_FROBENIUS for name in FROBENIUS_LOSSES},
    },
    ("cpu", "large"): {
        **{name: [(2048, 128), (8192, 128), (2048, 512), (8192, 512)] for name in LOSSES},
        **{name: [(1024, 8192), (4096, 512)] for name in FROBENIUS_LOSSES},
    },
    ("cuda", "small"): {
        **{name: [(32768, 256)] for name in LOSSES},
        "vicreg_exp": [(4096, 8192)],
        **{name: [(4096, 8192)] for name in FROBENIUS_LOSSES},
        "spectral_contrastive": [(32768, 256)],
    },
    ("cuda", "large"): {
        **{name: _GPU_N_SWEEP for name in LOSSES},
        "nt_xent": [(32768, 256), (8192, 256), (16384, 256), (65536, 256), (131072, 256), (262144, 256)],
        "clip": _GPU_N_SWEEP_LONG,
        "vicreg_ctr": _GPU_N_SWEEP_LONG,
        "vicreg_exp": _GPU_D_SWEEP,  # its logits are D x D: the sweep is over D
        "barlow_twins": _GPU_D_SWEEP,
        "vicreg": _GPU_D_SWEEP,
        "spectral_contrastive": _GPU_N_SWEEP_LONG,  # the reference builds z1 z2ᵀ (N x N)
    },
}
#: Losses with a target in issue 7 (and CLIP, Inf-CL's loss): run first, so that a run cut short by
#: its time budget still has them (conftest.py orders the cases).
PRIORITY_LOSSES = ("nt_xent", "barlow_twins", "vicreg", "clip")
#: Losses that torch.compile(reference) runs for, at their headline size, by device (compiling
#: takes 5-30 s per loss, shape and dtype; FASTSSL_BENCH_COMPILE=all compiles every case).
COMPILE_LOSSES = {"cpu": ("nt_xent",), "cuda": ("nt_xent", "clip", "barlow_twins", "vicreg")}


def default_device() -> str:
    return os.environ.get("FASTSSL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str) -> str:
    """The summary's dtype (the suite runs both, see suite_cases)."""
    return os.environ.get("FASTSSL_BENCH_DTYPE") or ("bfloat16" if device == "cuda" else "float32")


def _parse_sizes(spec: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in spec.split(",") if item.strip()]
        if not sizes or any(len(s) != 2 or s[0] < 4 or s[0] % 2 or s[1] < 2 for s in sizes):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"FASTSSL_BENCH_SIZES must be 'small', 'large' or a list of 2NxD with even 2N >= 4 and D >= 2, "
            f"got {spec!r}"
        ) from None
    return sizes  # type: ignore[return-value]


def size_set_name(device: str, spec: Optional[str] = None) -> str:
    """The size set in force: FASTSSL_BENCH_SIZES, or "small" on the CPU and "large" on CUDA."""
    spec = spec if spec is not None else os.environ.get("FASTSSL_BENCH_SIZES", "")
    return spec.strip() or ("large" if device == "cuda" else "small")


def bench_sizes(device: str, loss: str = "nt_xent", spec: Optional[str] = None) -> list[tuple[int, int]]:
    """(2N, D) sizes of `loss` on `device`: a named set ("small", "large") or FASTSSL_BENCH_SIZES's
    explicit list like "2048x128,8192x512" (then the same list for every loss; the first is the headline)."""
    name = size_set_name(device, spec)
    if (device, name) in SIZE_SETS:
        return SIZE_SETS[(device, name)][loss]
    return _parse_sizes(name)


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
    headline: bool = True  # the loss's first (headline) size in its size set

    @property
    def spec(self) -> LossSpec:
        return SPECS[self.loss]

    @property
    def n_pairs(self) -> int:
        return self.batch // 2

    @property
    def bank_rows(self) -> int:
        return self.batch if self.spec.inputs == "moco" else 0

    @property
    def implementation(self) -> str:
        """The provider, with the route for fastssl's Frobenius-family runs."""
        if self.spec.family == "frobenius" and self.provider.startswith("fastssl-"):
            return f"{self.provider} ({self.route})"
        return self.provider

    @property
    def label(self) -> str:
        if self.spec.family == "frobenius":
            return f"{self.loss} {self.mode} N={self.n_pairs} D={self.dim} {self.dtype}"
        return f"{self.loss} {self.mode} 2N={self.batch} D={self.dim} {self.dtype}"

    @property
    def test_id(self) -> str:
        route = f"-{self.route}" if self.spec.family == "frobenius" and self.provider.startswith("fastssl-") else ""
        size = f"N{self.n_pairs}" if self.spec.family == "frobenius" else f"2N{self.batch}"
        return f"{self.loss}-{self.provider}{route}-{self.mode}-{size}-D{self.dim}-{_SHORT_DTYPE[self.dtype]}-{self.device}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        return cls(**json.loads(text))


_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def suite_cases(family: str, device: Optional[str] = None) -> list[Case]:
    """Every case of `family` ("pairwise" or "frobenius") that the suite collects on this machine.

    On a machine without CUDA the CUDA size set is collected as well, so that `--collect-only`
    shows the GPU run; policy_skip skips those cases with the reason. Dtypes: FASTSSL_BENCH_DTYPE
    if set; else on CUDA bf16 at every size and fp32 at the headline size; on the CPU fp32 at every
    size and bf16 at the headline size (fwd+bwd, fastssl-torch and reference only: see policy_skip).
    FASTSSL_BENCH_LOSSES / FASTSSL_BENCH_PROVIDERS (comma-separated) keep only those losses / providers.
    """
    device = device or default_device()
    losses = _env_list("FASTSSL_BENCH_LOSSES", tuple(SPECS))
    providers = _env_list("FASTSSL_BENCH_PROVIDERS", PROVIDERS)
    named_set = size_set_name(device) in ("small", "large")
    devices = [device] if device == "cuda" or not named_set else [device, "cuda"]
    forced = os.environ.get("FASTSSL_BENCH_DTYPE")
    cases = []
    for dev in devices:
        main_dtype, second_dtype = ("bfloat16", "float32") if dev == "cuda" else ("float32", "bfloat16")
        for spec in _SPECS:
            if spec.family != family or spec.name not in losses:
                continue
            for index, (batch, dim) in enumerate(bench_sizes(dev, spec.name)):
                dtypes = [forced] if forced else [main_dtype] + ([second_dtype] if index == 0 else [])
                for dtype in dtypes:
                    for provider in providers:
                        routes = FROBENIUS_ROUTES if family == "frobenius" and provider.startswith("fastssl-") else ("auto",)
                        for route in routes:
                            for mode in MODES:
                                cases.append(Case(spec.name, provider, mode, batch, dim, dtype, dev, route, index == 0))
    return cases


def priority(case: Case) -> tuple[int, int]:
    """Run order of a case (lower first): headline sizes of the priority losses, other headline
    sizes, sweep sizes, then the second dtype; within a tier, smaller sizes first."""
    main_dtype = "bfloat16" if case.device == "cuda" else "float32"
    if case.dtype != main_dtype:
        tier = 3
    elif not case.headline:
        tier = 2
    else:
        tier = 0 if case.loss in PRIORITY_LOSSES else 1
    return tier, case.batch * case.dim if tier == 2 else 0


def _env_list(name: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The comma-separated names in environment variable `name` (all of `allowed` when unset)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return allowed
    names = tuple(item.strip() for item in value.split(",") if item.strip())
    unknown = [item for item in names if item not in allowed]
    if unknown:
        raise ValueError(f"{name}={value!r}: unknown {unknown}; choose from {', '.join(allowed)}")
    return names


def policy_skip(case: Case) -> Optional[str]:
    """Why the suite does not run `case` on this machine by choice (time, device), or None.

    The reasons are deliberately generic so that pytest's skip summary groups them.
    """
    if case.device == "cuda" and not torch.cuda.is_available():
        return "GPU-only size: needs CUDA (this machine runs the CPU set)"
    if case.provider == "reference-compiled" and os.environ.get("FASTSSL_BENCH_COMPILE", "") != "all":
        if os.environ.get("FASTSSL_BENCH_COMPILE") == "none":
            return "torch.compile cases disabled (FASTSSL_BENCH_COMPILE=none)"
        main_dtype = "bfloat16" if case.device == "cuda" else "float32"
        if not (case.headline and case.dtype == main_dtype and case.loss in COMPILE_LOSSES[case.device]):
            return (f"torch.compile(reference) runs only at the headline size of {', '.join(COMPILE_LOSSES[case.device])}"
                    f" on {case.device} (each compile takes seconds; FASTSSL_BENCH_COMPILE=all runs every case)")
    if case.device == "cuda" and not case.headline and os.environ.get("FASTSSL_BENCH_SWEEP", "") != "all":
        if case.provider == "fastssl-torch":
            return ("fastssl-torch on CUDA runs at the headline size only (the fallback backend; it would take "
                    "minutes at the sweep's largest sizes; FASTSSL_BENCH_SWEEP=all runs it)")
        if case.spec.family == "frobenius" and case.provider.startswith("fastssl-") and \
                case.route != choose_side(case.n_pairs, case.dim, "auto"):
            return ("the route that route='auto' does not pick runs at the headline size only on CUDA "
                    "(FASTSSL_BENCH_SWEEP=all runs it)")
    if case.device == "cpu" and case.dtype == "bfloat16" and not os.environ.get("FASTSSL_BENCH_DTYPE"):
        if case.mode != "fwd+bwd" or case.provider not in ("fastssl-torch", "reference"):
            return "bf16 on the CPU: fwd+bwd of fastssl-torch and reference only (to keep the CPU run short)"
    return None


# --------------------------------------------------------------------------------------------------
# providers and steps
# --------------------------------------------------------------------------------------------------


def provider_unavailable(provider: str, device: str, loss: str, dim: Optional[int] = None) -> Optional[str]:
    """Why `provider` cannot benchmark `loss` on `device` (with embedding dimension `dim`), or None."""
    spec = SPECS[loss]
    if provider.startswith("fastssl-"):
        backend = provider[len("fastssl-") :]
        if backend == "triton" and device != "cuda":
            return "backend 'triton' needs CUDA tensors (the Triton CPU interpreter is not benchmarked)"
        if backend != "auto" and backend not in fastssl.available_backends():
            if backend not in backends.BACKENDS:
                return f"fastssl has no backend {backend!r} in this checkout (it has {backends.BACKENDS})"
            why = ""
            if backend == "cuda" and hasattr(backends, "cuda_unavailable_reason"):
                why = backends.cuda_unavailable_reason()
            return f"fastssl backend {backend!r} is not available here{f': {why}' if why else ''}"
        if not hasattr(fastssl, spec.function):
            return f"fastssl has no {spec.function} in this checkout"
    if provider == "lightly":
        if importlib.util.find_spec("lightly") is None:
            return "lightly is not installed (it needs torchvision; see README, 'Checking against lightly')"
        if spec.lightly is None:
            return "lightly 1.6 has no module for this loss that takes the same inputs"
    if provider == "inf_cl":
        if loss != "clip":
            return ("Inf-CL computes the CLIP loss only (no self-mask, so NT-Xent-style losses are not "
                    "comparable)")
        if importlib.util.find_spec("inf_cl") is None:
            return "Inf-CL (pip package inf-cl, module inf_cl) is not installed"
        if device != "cuda":
            return "Inf-CL's kernels are Triton GPU kernels: CUDA only"
        if dim is not None and dim % _inf_cl_head_dim(dim):
            return f"Inf-CL needs D to be a multiple of its head_dim (16..256), got D={dim}"
    return None


def _inf_cl_head_dim(dim: int) -> int:
    """Inf-CL splits D into heads of head_dim ∈ {16, 32, 64, 128, 256}: the largest that divides D."""
    return next((h for h in (256, 128, 64, 32, 16) if dim % h == 0), 256)


def _inf_cl_clip_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """CLIP loss through Inf-CL's ``cal_inf_loss`` (one direction per call), as its README composes it.

    Inf-CL scales the query rows and computes mean_i LSE_j(q_i·k_j) − q_i·k_i, in fp32 (its kernels
    upcast q and k; TF32 tensor cores). The temperature is folded into the query here rather than
    passed as ``scale=``: its ``scale`` path all-reduces the gradient and needs torch.distributed.
    """
    from inf_cl import cal_inf_loss

    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    head_dim = _inf_cl_head_dim(a.shape[1])
    return 0.5 * (cal_inf_loss(a / temperature, b, head_dim=head_dim) + cal_inf_loss(b / temperature, a, head_dim=head_dim))


#: What each provider's numbers mean beyond its name (extra_info["provider_note"]).
PROVIDER_NOTES = {
    "inf_cl": "Inf-CL upcasts to fp32 (TF32 tensor cores) and has no self-mask: CLIP loss only",
    "reference-compiled": "torch.compile(reference, dynamic=False): one static graph per shape and dtype",
    "lightly": "lightly 1.6 module with the loss's default arguments",
}


@functools.lru_cache(maxsize=None)
def _compiled(function: str) -> Callable:
    # Many shapes and dtypes per function: without a higher limit dynamo would silently fall back
    # to eager after 8 recompiles and the "compiled" numbers would be eager ones.
    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, 64)
    else:  # torch < 2.6
        config.cache_size_limit = max(config.cache_size_limit, 64)
    # dynamic=False: one static graph per shape, as a user with a fixed batch size gets.
    return torch.compile(getattr(reference, function), dynamic=False)


def loss_function(loss: str, provider: str, route: str = "auto") -> Callable:
    """The callable that computes `loss` for `provider` (on `route`), taking the tensors of make_inputs."""
    spec = SPECS[loss]
    kwargs = dict(spec.kwargs)
    if provider == "reference":
        return functools.partial(getattr(reference, spec.function), **kwargs)
    if provider == "reference-compiled":
        return functools.partial(_compiled(spec.function), **kwargs)
    if provider.startswith("fastssl-"):
        if spec.family == "frobenius":
            kwargs["route"] = route
        return functools.partial(getattr(fastssl, spec.function), backend=provider[len("fastssl-") :], **kwargs)
    if provider == "lightly":
        import lightly.loss

        return getattr(lightly.loss, spec.lightly)()
    if provider == "inf_cl":
        return _inf_cl_clip_loss
    raise ValueError(f"unknown provider {provider!r}")


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """Random inputs for `case` (fixed seed), built on the CPU then moved, requiring grad:

    "pair": z1, z2 (N, D); "moco": query, key (N, D) and an L2-normalised bank (K = 2N, D) without
    grad (lightly keeps its bank so); "single": z (2N, D), row-normalised (uniformity is defined on
    the sphere; unnormalised Gaussians would make every exp(−2‖z_i − z_j‖²) underflow); "views":
    (N, m, D).
    """
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)
    spec = case.spec

    def leaf(*shape: int, grad: bool = True, normalise: bool = False) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen)
        if normalise:
            x = F.normalize(x, dim=-1)
        return x.to(device=case.device, dtype=dtype).requires_grad_(grad)

    if spec.inputs == "single":
        return (leaf(case.batch, case.dim, normalise=True),)
    if spec.inputs == "views":
        return (leaf(case.n_pairs, spec.views, case.dim),)
    inputs = (leaf(case.n_pairs, case.dim), leaf(case.n_pairs, case.dim))
    if spec.inputs == "moco":
        inputs += (leaf(case.bank_rows, case.dim, grad=False, normalise=True),)
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


def free_memory(device: str) -> None:
    """Return freed memory after an OOM or a large case (call outside any except block, so that
    the traceback's tensors are already unreferenced)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


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


@dataclasses.dataclass(frozen=True)
class Gemm:
    """count products of an (rows x inner) by (inner x cols) matrix: 2·rows·cols·inner FLOPs each.

    grads: operands with a gradient (the backward runs one more such product per operand);
    passes: how many times fastssl's pairwise-LSE op sweeps this logit matrix (CLIP: rows, then columns).
    """

    rows: int
    cols: int
    inner: int
    grads: int = 2
    passes: int = 1
    count: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.cols * self.inner * self.count


def logit_gemms(case: Case) -> list[Gemm]:
    """The logit (similarity / covariance) products of a pairwise-family loss, per docs/design.md.

    NT-Xent, DCL, DCLW, uniformity: Z Zᵀ over the 2N rows; CLIP: n(z1) n(z2)ᵀ (N x N), two LSE
    passes; MoCo: q bankᵀ (N x K), the bank without gradient; VICReg-exp: one D x D covariance per
    view (over the N rows); VICReg-ctr: one N x N Gram per view (over D); ArCL: Z Zᵀ over views 0
    and 1 plus each sample's m x m Gram of its views.
    """
    n, d, two_n = case.n_pairs, case.dim, case.batch
    loss = case.loss
    if loss in ("nt_xent", "dcl", "dclw", "uniformity"):
        return [Gemm(two_n, two_n, d)]
    if loss == "clip":
        return [Gemm(n, n, d, passes=2)]
    if loss == "moco":
        return [Gemm(n, case.bank_rows, d, grads=1)]
    if loss == "vicreg_exp":
        return [Gemm(d, d, n, count=2)]
    if loss == "vicreg_ctr":
        return [Gemm(n, n, d, count=2)]
    if loss.startswith("arcl"):
        m = case.spec.views
        return [Gemm(two_n, two_n, d), Gemm(m, m, d, count=n)]
    raise ValueError(f"no FLOP model for {loss!r}")


def _frobenius_flops(case: Case, executed: bool) -> int:
    """GEMM FLOPs of the Frobenius family, per docs/design.md family 2.

    One product of an S x S matrix over the other dimension costs g = 2·N·D·S (S = D on the
    covariance side, N on the Gram side). The materialising reference builds C = AᵀB (Barlow Twins,
    S = D), two covariances XᵀX (VICReg, S = D) or abᵀ (spectral, S = N). fastssl's route either
    forms one cross product (Barlow Twins' covariance route, spectral's Gram route) — forward g,
    backward 3g (recompute, da, db) — or two Grams (the other routes) — forward 2g, backward 4g; VICReg's
    shared operand is one Gram per view: forward g, backward 2g (recompute, dx), twice.
    """
    n, d = case.n_pairs, case.dim
    forward = case.mode == "fwd"
    spectral = case.loss == "spectral_contrastive"
    if case.loss == "vicreg":
        side = choose_side(n, d, case.route) if executed else "covariance"
        per_view = 1 if forward else (3 if executed else 2)
        return 2 * per_view * 2 * n * d * (d if side == "covariance" else n)
    if not executed:  # the reference: one product forward, two more backward
        g = 2 * n * d * (n if spectral else d)
        return g if forward else 3 * g
    side = choose_side(n, d, case.route)
    g = 2 * n * d * (d if side == "covariance" else n)
    one_cross_product = (side == "covariance") == (case.loss == "barlow_twins")
    if one_cross_product:
        return g if forward else 4 * g
    return 2 * g if forward else 6 * g


def model_flops(case: Case) -> int:
    """GEMM FLOPs of the materialising algorithm (the same for every provider, so TFLOP/s compare).

    Per logit product (logit_gemms): forward 2·R·C·K for an R x C matrix over K; the backward
    adds 2·R·C·K per operand with a gradient (so fwd+bwd = 3x forward when both operands have
    one). Elementwise work (exp, LSE, normalisation) is not counted.
    """
    if case.spec.family == "frobenius":
        return _frobenius_flops(case, executed=False)
    bwd = case.mode == "fwd+bwd"
    return sum(g.flops * (1 + g.grads if bwd else 1) for g in logit_gemms(case))


def executed_flops(case: Case) -> int:
    """GEMM FLOPs the provider actually runs: model_flops plus the fused backward's recompute.

    fastssl's pairwise-LSE op: each pass computes the logits once forward; fwd+bwd recomputes them
    once and runs one product per gradient (2 + grads per pass). Other providers: model_flops.
    """
    if not case.provider.startswith("fastssl-"):
        return model_flops(case)
    if case.spec.family == "frobenius":
        return _frobenius_flops(case, executed=True)
    bwd = case.mode == "fwd+bwd"
    return sum(g.flops * g.passes * (2 + g.grads if bwd else 1) for g in logit_gemms(case))


# --------------------------------------------------------------------------------------------------
# the machine's practical peak: one matmul, measured in the same run
# --------------------------------------------------------------------------------------------------

#: (dtype, size) of the peak matmul: bf16 8192³ on CUDA (the issue's); on the CPU fp32 1024³ — a
#: bf16 8192³ product would take minutes on 2 cores and CPUs without AMX run bf16 GEMMs slower than fp32.
PEAK_MATMUL = {"cuda": ("bfloat16", 8192), "cpu": ("float32", 1024)}


def matmul_peak(device: str, reps: Optional[int] = None) -> dict:
    """TFLOP/s of torch.matmul on two random square matrices (PEAK_MATMUL), median of `reps` after warm-up."""
    dtype_name, size = PEAK_MATMUL[device]
    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        torch.matmul(a, b)
        sync()

    reps = reps or (20 if device == "cuda" else 5)
    seconds = time_step(step, reps, warmup=3)
    return {
        "tflops": 2 * size**3 / seconds / 1e12,
        "description": f"{_SHORT_DTYPE[dtype_name]} torch.matmul {size}x{size}x{size} on {device}, median of {reps}",
        "seconds": seconds,
    }


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
    configure_threads("cpu")
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
        "python": platform.python_version(),
        "fastssl": fastssl.__version__,
        "fastssl_backends": list(fastssl.available_backends()),
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
