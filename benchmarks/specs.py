"""What the benchmark suite runs: the losses, the size sets, the cases and the policy that skips some.

The losses and their reference (materialising) formulas are those of docs/design.md, "The losses
(the spec)". Size convention: a case's ``batch`` is 2N, the number of rows of NT-Xent's
Z = [n(z1); n(z2)]; every two-view loss gets N = batch/2 pairs of (N, D) embeddings, MoCo a bank of
K = 2N rows, uniformity and KoLeo one (2N, D) matrix and ArCL (N, m, D) views. In the prototype
family (DINO, iBOT, SwaV, MSN) ``batch`` is the number of student rows scored against the case's
``prototypes`` (K) rows of the head's last layer (providers.make_inputs says how they split into crops).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from env import default_device
from formatting import SHORT_DTYPE

# --------------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the suite calls one loss: its functions, inputs, keyword arguments and lightly peer."""

    name: str  # the suite's key (test ids, extra_info["loss"], report tables)
    function: str  # fastssl.<function> and fastssl.reference.<function>
    family: str  # "pairwise" (bench_contrastive.py), "frobenius" (bench_frobenius.py), "prototype" (bench_prototype.py)
    # "pair": z1, z2 (N, D); "moco": + bank (K, D); "single": z (2N, D); "views": (N, m, D);
    # "labelled": z1, z2 + labels (N,); "tico": z_a, z_b + covariance (D, D); "crops", "tokens", "swav",
    # "msn": the prototype family's (providers.make_inputs)
    inputs: str = "pair"
    kwargs: tuple[tuple[str, object], ...] = ()  # extra keyword arguments, the same for every provider
    views: int = 0  # m for inputs == "views"; crops per image for "crops", "swav", "msn"
    global_views: int = 0  # DINO's teacher (global) crops; SwaV's high-resolution crops (of `views`)
    lightly: Optional[str] = None  # lightly 1.6's module taking the same inputs, constructed with `kwargs`
    op: str = "pairwise_lse"  # the fastssl.ops module of its kernels (which backends it has)


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
    # The losses added after the first suite: lightly 1.6's MACL, DirectCLR, KoLeo, FroSSL, TiCo, DINO,
    # iBOT, SwaV and MSN, and SigLIP and SupCon, which lightly lacks.
    LossSpec("macl", "macl_loss", "pairwise", lightly="MACLLoss"),
    LossSpec("directclr", "directclr_loss", "pairwise", lightly="DirectCLRLoss"),  # loss_dim 64 of D
    LossSpec("siglip", "siglip_loss", "pairwise", op="pairwise_sigmoid"),
    LossSpec("supcon", "supcon_loss", "pairwise", inputs="labelled"),  # two views, labels repeated
    LossSpec("koleo", "koleo_loss", "pairwise", inputs="single", lightly="KoLeoLoss", op="pairwise_max"),
    LossSpec("frossl", "frossl_loss", "frobenius"),  # two views
    LossSpec("tico", "tico_loss", "frobenius", inputs="tico"),  # a step with the running covariance
    # DINO: 2 global + 10 local crops (Caron et al. 2021); iBOT: masked patch tokens; SwaV: 2 + 6 crops
    # (Caron et al. 2020); MSN: 11 anchor views (1 random + 10 focal, Assran et al. 2022).
    LossSpec("dino", "dino_loss", "prototype", inputs="crops", views=12, global_views=2, op="prototype_ce"),
    LossSpec("ibot", "ibot_patch_loss", "prototype", inputs="tokens", op="prototype_ce"),
    LossSpec("swav", "swav_loss", "prototype", inputs="swav", views=8, global_views=2, op="prototype_ce"),
    LossSpec("msn", "msn_loss", "prototype", inputs="msn", views=11, op="prototype_ce"),
]
#: Every benchmarked loss, by key.
SPECS = {spec.name: spec for spec in _SPECS}
LOSSES = tuple(spec.name for spec in _SPECS if spec.family == "pairwise")
#: The off-diagonal Frobenius family (bench_frobenius.py); fastssl runs them on each `route`.
FROBENIUS_LOSSES = tuple(spec.name for spec in _SPECS if spec.family == "frobenius")
#: The prototype cross-entropy family (bench_prototype.py): rows scored against K prototypes.
PROTOTYPE_LOSSES = tuple(spec.name for spec in _SPECS if spec.family == "prototype")
#: The losses added after the first suite (each has a lightly-formula or paper baseline in baselines.py).
RECENT_LOSSES = ("macl", "directclr", "siglip", "supcon", "koleo", "frossl", "tico", "dino", "ibot", "swav", "msn")
#: iBOT's images have 14 x 14 patch tokens, 64 of them masked (about a third, as iBOT's block masking).
IBOT_PATCHES, IBOT_MASKED_PER_IMAGE = 14, 64
FROBENIUS_ROUTES = ("covariance", "gram")
#: The suite's providers. "fastssl-<backend>" calls fastssl.<function>(..., backend=<backend>);
#: the summary also uses "fastssl-auto", the backend a user gets by default.
PROVIDERS = (
    "fastssl-triton", "fastssl-cuda", "fastssl-torch", "reference", "reference-compiled", "materialising",
    "materialising-compiled", "materialising-bf16", "materialising-bf16-compiled", "lightly", "inf_cl",
)
MODES = ("fwd", "fwd+bwd")
DTYPES = ("bfloat16", "float32")

# --------------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------------

_CPU_PAIRWISE = [(2048, 128)]
_CPU_FROBENIUS = [(1024, 2048)]
# Prototype family (rows, D): DINO 64 images x 12 crops, iBOT 16 images x 64 masked tokens, SwaV
# 128 images x 8 crops, MSN 64 images x 11 anchor views.
_CPU_PROTOTYPE = {"dino": [(768, 128)], "ibot": [(1024, 128)], "swav": [(1024, 128)], "msn": [(704, 128)]}
# CUDA. Pairwise losses: the GPU targets' headline size first (2N = 32,768, D = 256), then sizes past
# the point where the materialising reference runs out of memory: it upcasts to fp32, so at
# 2N = 131,072 the 2N x 2N logits alone are 64 GiB (and autograd keeps more than one such matrix).
_GPU_N_SWEEP = [(32768, 256), (131072, 256)]
_GPU_N_SWEEP_LONG = [(32768, 256), (131072, 256), (262144, 256)]  # N x N losses (CLIP)
# The covariance / Gram losses (the Frobenius family, VICReg-exp and VICReg-ctr), as (N, D): the
# Barlow Twins / VICReg target (2048, 8192) first, then both extremes of the D x D / N x N trade-off,
# one side 256 times the other (the D x D matrix at (256, 65536) and the N x N one at (65536, 128)
# are 16 GiB each in fp32), and a middle shape; ascending in N·D after the headline.
_GPU_COVARIANCE_ND = [(2048, 8192), (65536, 128), (256, 65536), (8192, 2048)]
_GPU_COVARIANCE = [(2 * n, d) for n, d in _GPU_COVARIANCE_ND]
COVARIANCE_LOSSES = ("vicreg_exp", "vicreg_ctr", *FROBENIUS_LOSSES)
# ArCL: N = 65,536 samples (2N = 131,072 anchors), D = 128, m = 4 and 8 views.
_GPU_ARCL = [(131072, 128)]

# The recent losses at one GPU size each, the scale their papers train at: the pairwise ones at the
# GPU targets' 2N = 32,768, D = 256; SigLIP at N = 32,768 (its paper's batch), D = 512; FroSSL and
# TiCo at the Barlow Twins / VICReg target. Prototype family, as (rows, D) with K in PROTOTYPES:
# DINO 1,024 images x 12 crops = 12,288 student rows (lightly's student logits alone are 3.2 GB in
# fp32 at K = 65,536); iBOT 512 images x 64 masked tokens; SwaV 4,096 images x 8 crops; MSN 1,024
# images x 11 anchor views.
_GPU_RECENT = {
    "macl": [(32768, 256)], "directclr": [(32768, 256)], "supcon": [(32768, 256)], "koleo": [(32768, 256)],
    "siglip": [(65536, 512)],
    "frossl": [(4096, 8192)], "tico": [(4096, 8192)],
    "dino": [(12288, 256)], "ibot": [(32768, 256)], "swav": [(32768, 128)], "msn": [(11264, 256)],
}

_CUDA_LARGE = {
    **{name: _GPU_N_SWEEP for name in LOSSES},
    "nt_xent": [(32768, 256), (8192, 256), (16384, 256), (65536, 256), (131072, 256), (262144, 256)],
    "clip": _GPU_N_SWEEP_LONG,
    **{name: _GPU_COVARIANCE for name in COVARIANCE_LOSSES},
    "arcl_m4": _GPU_ARCL,
    "arcl_m8": _GPU_ARCL,
    **_GPU_RECENT,
}

#: K, the prototypes (rows of the head's last layer) of the prototype family, by device: DINO and
#: iBOT 65,536 (DINO's and DINOv2's heads), SwaV 3,000, MSN 1,024 (their papers'); on the CPU
#: small enough that each case takes well under a second.
PROTOTYPES = {
    "cuda": {"dino": 65536, "ibot": 65536, "swav": 3000, "msn": 1024},
    "cpu": {"dino": 4096, "ibot": 4096, "swav": 3000, "msn": 1024},
}

#: Named size sets, as (2N, D) per loss; the first size of each loss is its *headline* size (the
#: one also run in the second dtype and, where enabled, with torch.compile(reference)). The sweep
#: sizes after it ascend: fastssl's Triton autotuning keys on coarse size classes, so the first
#: (cheapest) size of a class is the one that pays for autotuning. CUDA "small" is the headline
#: size of each loss.
SIZE_SETS: dict[tuple[str, str], dict[str, list[tuple[int, int]]]] = {
    ("cpu", "small"): {
        **{name: _CPU_PAIRWISE for name in LOSSES},
        "nt_xent": [(2048, 128), (1024, 128), (4096, 128)],  # three points: the CPU run's plot has lines
        **{name: _CPU_FROBENIUS for name in FROBENIUS_LOSSES},
        **_CPU_PROTOTYPE,
    },
    ("cpu", "large"): {
        **{name: [(2048, 128), (8192, 128), (2048, 512), (8192, 512)] for name in LOSSES},
        **{name: [(1024, 8192), (4096, 512)] for name in FROBENIUS_LOSSES},
        **{name: [(rows, dim), (4 * rows, dim)] for name, [(rows, dim)] in _CPU_PROTOTYPE.items()},
    },
    ("cuda", "small"): {name: sizes[:1] for name, sizes in _CUDA_LARGE.items()},
    ("cuda", "large"): _CUDA_LARGE,
}
#: Losses with a GPU target (and CLIP, Inf-CL's loss): run first, so that a run cut short by
#: its time budget still has them (conftest.py orders the cases).
PRIORITY_LOSSES = ("nt_xent", "barlow_twins", "vicreg", "clip")
#: Losses that torch.compile(reference) runs for, at their headline size, by device (compiling
#: takes 5-30 s per loss, shape and dtype; FASTSSL_BENCH_COMPILE=all compiles every case). The
#: bf16 baseline's compiled provider runs at every bf16 GPU case.
COMPILE_LOSSES = {"cpu": ("nt_xent",), "cuda": ("nt_xent", "clip", "barlow_twins", "vicreg")}


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
    prototypes: int = 0  # K, the prototype family's head rows (0 for the other families)

    def __post_init__(self) -> None:
        if (self.spec.family == "prototype") != (self.prototypes > 0):
            raise ValueError(f"{self.loss}: prototypes (K) must be > 0 exactly for the prototype family, "
                             f"got {self.prototypes}")  # fmt: skip
        if self.spec.views and self.spec.inputs != "views" and self.batch % self.spec.views:
            raise ValueError(f"{self.loss}: {self.batch} rows are not a whole number of images of "
                             f"{self.spec.views} crops")  # fmt: skip

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
    def images(self) -> int:
        """The prototype family's images: B of DINO's, SwaV's and MSN's crops, iBOT's masked images."""
        if self.spec.inputs == "tokens":
            return -(-self.batch // IBOT_MASKED_PER_IMAGE)
        return self.batch // self.spec.views if self.spec.family == "prototype" else 0

    @property
    def label(self) -> str:
        if self.spec.family == "frobenius":
            return f"{self.loss} {self.mode} N={self.n_pairs} D={self.dim} {self.dtype}"
        if self.spec.family == "prototype":
            return f"{self.loss} {self.mode} rows={self.batch} K={self.prototypes} D={self.dim} {self.dtype}"
        return f"{self.loss} {self.mode} 2N={self.batch} D={self.dim} {self.dtype}"

    @property
    def test_id(self) -> str:
        route = f"-{self.route}" if self.spec.family == "frobenius" and self.provider.startswith("fastssl-") else ""
        size = {"frobenius": f"N{self.n_pairs}", "prototype": f"R{self.batch}-K{self.prototypes}"}.get(
            self.spec.family, f"2N{self.batch}")
        return f"{self.loss}-{self.provider}{route}-{self.mode}-{size}-D{self.dim}-{SHORT_DTYPE[self.dtype]}-{self.device}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        return cls(**json.loads(text))



def suite_cases(family: str, device: Optional[str] = None) -> list[Case]:
    """Every case of `family` ("pairwise", "frobenius" or "prototype") that the suite collects on this machine.

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
            prototypes = PROTOTYPES[dev].get(spec.name, 0)
            for index, (batch, dim) in enumerate(bench_sizes(dev, spec.name)):
                if spec.family == "prototype" and spec.views:  # whole images (an explicit size may not be)
                    batch = max(spec.views, batch // spec.views * spec.views)
                dtypes = [forced] if forced else [main_dtype] + ([second_dtype] if index == 0 else [])
                for dtype in dtypes:
                    for provider in providers:
                        frobenius_route = family == "frobenius" and provider.startswith("fastssl-")
                        for route in FROBENIUS_ROUTES if frobenius_route else ("auto",):
                            for mode in MODES:
                                cases.append(Case(spec.name, provider, mode, batch, dim, dtype, dev, route, index == 0,
                                                  prototypes))
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
    compile_setting = os.environ.get("FASTSSL_BENCH_COMPILE", "")
    if case.provider.endswith("-compiled") and compile_setting == "none":
        return "torch.compile cases disabled (FASTSSL_BENCH_COMPILE=none)"
    # The bf16 baseline is compiled wherever it runs (what a user who compiles gets), and so is the
    # fp32 formula on CUDA; the fp32 reference, the accuracy baseline, only where COMPILE_LOSSES says,
    # and the fp32 formula on the CPU likewise (each CPU compile takes 5-30 s).
    compiled_by_table = case.provider == "reference-compiled" or (
        case.provider == "materialising-compiled" and case.device == "cpu")
    if compiled_by_table and compile_setting != "all":
        main_dtype = "bfloat16" if case.device == "cuda" else "float32"
        if not (case.headline and case.dtype == main_dtype and case.loss in COMPILE_LOSSES[case.device]):
            return (f"torch.compile of the fp32 reference or formula runs only at the headline size of "
                    f"{', '.join(COMPILE_LOSSES[case.device])}"
                    f" on {case.device} (each compile takes seconds; FASTSSL_BENCH_COMPILE=all runs every case)")
    if case.device == "cuda" and not case.headline and os.environ.get("FASTSSL_BENCH_SWEEP", "") != "all":
        if case.provider == "fastssl-torch":
            return ("fastssl-torch on CUDA runs at the headline size only (the fallback backend; it would take "
                    "minutes at the sweep's largest sizes; FASTSSL_BENCH_SWEEP=all runs it)")
    if case.device == "cpu" and case.dtype == "bfloat16" and not os.environ.get("FASTSSL_BENCH_DTYPE"):
        if case.mode != "fwd+bwd" or case.provider not in ("fastssl-torch", "reference"):
            return "bf16 on the CPU: fwd+bwd of fastssl-torch and reference only (to keep the CPU run short)"
    return None

