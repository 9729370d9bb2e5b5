"""The trainer's `--loss` choices, each a fastssl.nn module (docs/design.md, "The losses").

A `Criterion` maps the projector outputs of the views to a scalar: `criterion(zs, keys)` with `zs` a
list of (N, D) tensors (2 views, or m for ArCL; 1 for MoCo, whose second view goes through the momentum
encoder and arrives as `keys`). Hyper-parameters are the modules' defaults unless given: `temperature`
overrides τ where the loss has one, and `options` passes any other constructor argument by name (e.g.
`lambda_param=0.01` for Barlow Twins, `sigma=0.3` for DCLW, `mu=2` for the spectral loss).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor, nn

from fastssl import nn as fnn

__all__ = ["LOSSES", "Criterion", "build_criterion"]

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
}
# Not offered: KoLeo is a regulariser, not a loss on its own; SupCon is supervised (it needs the
# batch's labels, which the criterion is not given).


@dataclass
class Criterion:
    """A loss module plus how the trainer feeds it."""

    name: str
    module: nn.Module
    n_views: int                  # views the online encoder sees per sample
    momentum_keys: bool = False   # MoCo: a second view goes through the EMA encoder
    call: Callable = field(default=None, repr=False)

    def __call__(self, zs: list, keys: Optional[Tensor] = None) -> Tensor:
        return self.call(self.module, zs, keys)


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


def build_criterion(name: str, proj_dim: int, *, backend: str = "auto", temperature: Optional[float] = None,
                    views: Optional[int] = None, memory_bank: int = 4096, options: Optional[dict] = None) -> Criterion:
    """The Criterion for `--loss name` on (N, proj_dim) projections.

    views: number of views for ArCL (default 4, must be >= 2); the other losses take exactly 2.
    memory_bank: K, the MoCo queue length (the bank is (K, proj_dim)).
    """
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    options = dict(options or {})
    cls_name = LOSSES[name][0]
    cls = getattr(fnn, cls_name, None)
    if cls is None:
        raise ValueError(f"--loss {name} needs fastssl.nn.{cls_name}, which this fastssl does not have")
    kwargs = _module_kwargs(cls, temperature, options, backend)
    if name == "arcl":
        m = 4 if views is None else views
        if m < 2:
            raise ValueError(f"--views must be >= 2 for arcl, got {m}")
        return Criterion(name, cls(**kwargs), m, call=lambda mod, zs, keys: mod(list(zs)))
    if views not in (None, 2):
        raise ValueError(f"--views {views} is only for --loss arcl; {name} uses 2 views")
    if name == "moco":
        if memory_bank < 1:
            raise ValueError(f"--memory-bank must be >= 1 for moco, got {memory_bank}")
        module = cls(memory_bank_size=(memory_bank, proj_dim), **kwargs)
        return Criterion(name, module, 1, momentum_keys=True, call=lambda mod, zs, keys: mod(zs[0], keys))
    return Criterion(name, cls(**kwargs), 2, call=lambda mod, zs, keys: mod(zs[0], zs[1]))
