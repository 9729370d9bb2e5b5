"""The trainer's `--loss` choices, each a fastssl.nn module (docs/design.md, "The losses").

A `Criterion` maps the projector outputs of the views to a scalar: `criterion(zs, teacher_zs)` with `zs`
a list of (N, D) tensors, the student's views in the order of its `ViewPlan`, and `teacher_zs` the EMA
teacher's (T, N, D) embeddings of its views (None without a teacher). Its `views` say which crops a step
draws and which network embeds each: 2 views for most losses, m for ArCL; MoCo's second view goes
through the momentum encoder only (its keys); DINO's student sees 2 global and `local_crops` small
crops, its teacher the 2 global ones. Hyper-parameters are the modules' defaults unless given:
`temperature` overrides τ where the loss has one, and `options` passes any other constructor argument by
name (e.g. `lambda_param=0.01` for Barlow Twins, `sigma=0.3` for DCLW, `mu=2` for the spectral loss,
`output_dim=4096` for DINO's K).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor, nn

from fastssl import nn as fnn

__all__ = ["LOSSES", "DINO_DEFAULTS", "ViewPlan", "Criterion", "build_criterion", "head_prototypes"]

#: name -> (module class name in fastssl.nn, short description)
LOSSES: dict[str, tuple[str, str]] = {
    "simclr": ("NTXentLoss", "NT-Xent over 2N anchors (SimCLR), tau=0.5"),
    "moco": ("NTXentLoss", "InfoNCE against a FIFO memory bank of momentum-encoder keys (MoCo), tau=0.5"),
    "dcl": ("DCLLoss", "decoupled contrastive loss, tau=0.1"),
    "dclw": ("DCLWLoss", "DCL with von Mises-Fisher positive weights, tau=0.1, sigma=0.5"),
    "clip": ("CLIPLoss", "symmetric two-tower InfoNCE, tau=0.07"),
    "barlow": ("BarlowTwinsLoss", "Barlow Twins, lambda=5e-3"),
    "vicreg": ("VICRegLoss", "VICReg 25/25/1"),
    "vicreg-exp": ("VICRegExpLoss", "VICReg with a LogSumExp covariance term (Garrido et al. 2023), tau=0.1"),
    "vicreg-ctr": ("VICRegCtrLoss", "VICReg-exp on z^T, sample-contrastive (Garrido et al. 2023), tau=0.1"),
    "spectral": ("SpectralContrastiveLoss", "spectral contrastive loss (HaoChen et al.), mu=1"),
    "arcl": ("ArCLLoss", "SimCLR with each sample's worst pair of m views (ArCL), tau=0.5"),
    "macl": ("MACLLoss", "NT-Xent with a model-aware temperature (MACL, Huang et al. 2023), tau=0.1, alpha=0.5"),
    "directclr": ("DirectCLRLoss", "NT-Xent on the first loss_dim=64 dimensions (DirectCLR, Jing et al. 2022), tau=0.5"),
    "frossl": ("FroSSLLoss", "log-Frobenius-norm regulariser + invariance (FroSSL, Skean et al. 2024), weight 1"),
    "tico": ("TiCoLoss", "invariance + contrast against a running covariance (TiCo, Zhu et al. 2022), beta=0.9, rho=8"),
    # Its learnable t' and b are parameters of the criterion module: the engine hands them to the
    # optimiser with the model's and checkpoints them.
    "siglip": ("SigLIPLoss", "pairwise sigmoid loss (SigLIP, Zhai et al. 2023) with learnable t=10 and b=-10"),
    "dino": ("DINOLoss", "self-distillation from an EMA teacher over K=256 prototypes with multi-crop (DINO, "
                         "Caron et al. 2021), student tau 0.1, teacher tau 0.04 -> 0.07"),
}

# Not offered: KoLeo is a regulariser, not a loss on its own; SupCon is supervised (it needs the
# batch's labels, which the criterion is not given).

#: The trainer's DINOLoss arguments where they differ from the module's (lightly's): K = 256 prototypes
#: instead of ImageNet's 65,536, and DINO's warm-up of the teacher temperature from 0.04 to 0.07 (over the
#: module's 30 epochs). --loss-option overrides them.
DINO_DEFAULTS = dict(output_dim=256, warmup_teacher_temp=0.04, teacher_temp=0.07)


@dataclass(frozen=True)
class ViewPlan:
    """The crops one training step draws per image, and which network embeds each.

    `global_views` full-size views are drawn, in order; the student embeds `global_views[student]`, the
    EMA teacher `global_views[teacher]` (None: no teacher). `local_views` small crops (multi-crop,
    Caron et al. 2020) follow, for the student only.
    """

    global_views: int
    student: slice
    teacher: Optional[slice] = None
    local_views: int = 0

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None

    @property
    def student_views(self) -> int:
        return len(range(self.global_views)[self.student]) + self.local_views


@dataclass
class Criterion:
    """A loss module plus how the trainer feeds it: `criterion(zs, teacher_zs, prototypes=..., epoch=...)`."""

    name: str
    module: nn.Module
    views: ViewPlan
    call: Callable = field(default=None, repr=False)

    def __call__(self, zs: list, teacher_zs: Optional[Tensor] = None, *, prototypes: Optional[Tensor] = None,
                  teacher_prototypes: Optional[Tensor] = None, epoch: int = 0) -> Tensor:
        return self.call(self.module, zs, teacher_zs, prototypes=prototypes, teacher_prototypes=teacher_prototypes,
                         epoch=epoch)


def _two_views(mod, zs, teacher_zs, **head):
    return mod(zs[0], zs[1])


def _all_views(mod, zs, teacher_zs, **head):
    return mod(list(zs))


def _moco(mod, zs, teacher_zs, **head):
    return mod(zs[0], teacher_zs[0])  # the query view against the key view's momentum embedding


def _dino(mod, zs, teacher_zs, *, prototypes, teacher_prototypes, epoch):
    # Student crops in plan order (its 2 global crops first, as the teacher's): DINOLoss skips the pairs
    # of a crop with itself. The prototypes are the raw weight of the weight-normalised last layer
    # (gain fixed at 1), normalised inside the fused loss; the centre update uses the teacher's.
    return mod.forward_fused(list(teacher_zs.unbind(0)), list(zs), prototypes, teacher_prototypes, epoch=epoch,
                             normalize_prototypes=True)


def _module_kwargs(cls, temperature, options: dict, backend: str) -> dict:
    params = inspect.signature(cls.__init__).parameters
    kwargs = dict(options)
    for key in kwargs:
        if key not in params or key in ("self", "backend", "gather_distributed", "memory_bank_size"):
            allowed = [p for p in params if p not in ("self", "backend", "gather_distributed", "memory_bank_size")]
            raise ValueError(f"loss option {key!r} is not an argument of fastssl.nn.{cls.__name__} (it takes {allowed})")
    if temperature is not None:
        if "temperature" not in params:
            raise ValueError(f"--temperature does not apply to fastssl.nn.{cls.__name__} (it has no temperature)")
        kwargs["temperature"] = temperature
    kwargs["backend"] = backend
    return kwargs


def head_prototypes(name: str, options: Optional[dict] = None) -> int:
    """K of the prototype head that `--loss name` needs (DINO: its output_dim), 0 for a plain projector.
    The engine passes such a head's prototypes, the student's and the teacher's, to the loss."""
    if name != "dino":
        return 0
    k = {**DINO_DEFAULTS, **(options or {})}["output_dim"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"loss option output_dim must be a positive integer (K, the number of prototypes), got {k!r}")
    return k


def build_criterion(name: str, proj_dim: int, *, backend: str = "auto", temperature: Optional[float] = None,
                    views: Optional[int] = None, memory_bank: int = 4096, local_crops: Optional[int] = None,
                    options: Optional[dict] = None) -> Criterion:
    """The Criterion for `--loss name` on (N, proj_dim) projections.

    views: number of views for ArCL (default 4, must be >= 2); the other losses take exactly 2.
    memory_bank: K, the MoCo queue length (the bank is (K, proj_dim)).
    local_crops: DINO's small crops per image besides its 2 global ones (default 2, >= 0).
    """
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    if local_crops is not None and name != "dino":
        raise ValueError(f"--local-crops {local_crops} is only for --loss dino")
    options = dict(options or {})
    if name == "dino":
        options = {**DINO_DEFAULTS, **options}
    cls_name = LOSSES[name][0]
    cls = getattr(fnn, cls_name, None)
    if cls is None:
        raise ValueError(f"--loss {name} needs fastssl.nn.{cls_name}, which this fastssl does not have")
    kwargs = _module_kwargs(cls, temperature, options, backend)
    if name == "arcl":
        m = 4 if views is None else views
        if m < 2:
            raise ValueError(f"--views must be >= 2 for arcl, got {m}")
        return Criterion(name, cls(**kwargs), ViewPlan(m, slice(0, m)), call=_all_views)
    if views not in (None, 2):
        raise ValueError(f"--views {views} is only for --loss arcl; {name} uses 2 views")
    if name == "moco":
        if memory_bank < 1:
            raise ValueError(f"--memory-bank must be >= 1 for moco, got {memory_bank}")
        module = cls(memory_bank_size=(memory_bank, proj_dim), **kwargs)
        return Criterion(name, module, ViewPlan(2, student=slice(0, 1), teacher=slice(1, 2)), call=_moco)
    if name == "dino":
        local = 2 if local_crops is None else local_crops
        if isinstance(local, bool) or not isinstance(local, int) or local < 0:
            raise ValueError(f"--local-crops must be an integer >= 0, got {local!r}")
        module = cls(**kwargs)
        plan = ViewPlan(2, student=slice(0, 2), teacher=slice(0, 2), local_views=local)
        return Criterion(name, module, plan, call=_dino)
    return Criterion(name, cls(**kwargs), ViewPlan(2, slice(0, 2)), call=_two_views)
