"""`nn.Module` losses with lightly 1.6's names, constructor arguments, defaults and state.

``from lightly.loss import NTXentLoss`` -> ``from fastssl.nn import NTXentLoss`` is the whole
migration: the same values and gradients, and memory that grows as O(N·D). Every module also
takes a keyword-only `backend` ("auto", "triton", "torch", "reference"). The math lives in
fastssl.functional; these are thin wrappers that hold hyper-parameters and state.

`gather_distributed` (lightly's name; True, or "ring" for the contrastive losses) computes the loss
over the global batch of a torch.distributed job, with gradients that are right after DDP's
averaging; without an initialised process group, or with one rank, it is the single-process loss
(as in lightly). Semantics per loss: docs/distributed.md and fastssl.distributed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import distributed, functional, reference
from fastssl._validation import (check_flag, check_memory_bank_size, check_optional_callable, check_positive,
                                 nonnegative_number, positive_number)
from fastssl.backends import BACKENDS, resolve_backend
from fastssl.ops.frobenius import check_route

__all__ = [
    "MemoryBankModule",
    "NTXentLoss",
    "DCLLoss",
    "DCLWLoss",
    "CLIPLoss",
    "BarlowTwinsLoss",
    "VICRegLoss",
    "SpectralContrastiveLoss",
    "VICRegExpLoss",
    "VICRegCtrLoss",
    "ArCLLoss",
]


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_gather(gather_distributed: object, *, ring: bool = True) -> Union[bool, str]:
    """False, True or (contrastive losses) "ring"; ValueError if torch.distributed is missing (as lightly)."""
    return distributed.check_gather(gather_distributed, ring=ring)


class MemoryBankModule(nn.Module):
    """A FIFO queue of past embeddings, with lightly 1.6's `MemoryBankModule` semantics.

    `size` is 0 (no bank) or (K, D). The bank buffer is (K, D), initialised with L2-normalised
    Gaussian rows (the same draw as lightly's, so a seeded run gives the same bank). `forward`
    returns a detached copy of the bank *before* the update, in (K, D) layout, and then, when
    `update`, enqueues the batch; like lightly, a batch that reaches the end of the queue fills it up
    and the rest of that batch is dropped (the pointer restarts at 0). With `gather_distributed`,
    the batches of all ranks are gathered (rank order) and enqueued, so every rank keeps the same bank.
    """

    def __init__(self, size: Union[int, Sequence[int]] = 0, gather_distributed: Union[bool, str] = False):
        super().__init__()
        self.gather_distributed = _check_gather(gather_distributed)
        size_tuple = check_memory_bank_size("size", size)
        self.size = size_tuple
        self.register_buffer("bank", torch.empty(size_tuple, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size_tuple) == 2:
            with torch.no_grad():
                self.bank = F.normalize(torch.randn(size_tuple), dim=-1)

    @property
    def enabled(self) -> bool:
        return self.size[0] > 0

    def forward(self, batch: Tensor, update: bool = False) -> Optional[Tensor]:
        """The bank (K, D) before this batch, or None when disabled; enqueue `batch` if `update`."""
        if not self.enabled:
            return None
        bank = self.bank.clone().detach()
        if update:
            self._enqueue(batch)
        return bank

    @torch.no_grad()
    def _enqueue(self, batch: Tensor) -> None:
        if distributed.is_active(self.gather_distributed):
            batch = distributed.gather_cat(batch.detach())
        k, n = self.size[0], batch.shape[0]
        # The pointer is a buffer (state_dict/device move like lightly); reading it syncs, as in lightly.
        ptr = int(self.bank_ptr)
        if ptr + n >= k:
            self.bank[ptr:] = batch[: k - ptr].detach().to(self.bank.dtype)
            self.bank_ptr.zero_()
        else:
            self.bank[ptr : ptr + n] = batch.detach().to(self.bank.dtype)
            self.bank_ptr[0] = ptr + n

    def extra_repr(self) -> str:
        return f"size={self.size}"


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) loss; with `memory_bank_size=(K, D)`, MoCo-style negatives from a memory bank.

    Without a bank: `fastssl.nt_xent_loss` (2N anchors, in-batch negatives). With a bank: anchors
    n(out0), positives n(out1), negatives the K bank rows (`fastssl.moco_loss`); after the loss the
    batch n(out1) is enqueued when out0 requires grad (training), exactly as lightly does.

    Args:
        temperature: τ > 0 (default 0.5).
        memory_bank_size: 0 or (K, D).
        gather_distributed: False; True (lightly's: local anchors, every rank's negatives, and with a
            bank every rank's keys enqueued); or "ring" (the same loss, negatives passed round the
            ranks by send/recv instead of one all-gather).
        backend: keyword-only, see `fastssl.available_backends()`.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: Union[bool, str] = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        self.temperature = positive_number("temperature", temperature)
        if float(self.temperature) < 1e-8:  # lightly's NTXentLoss refuses |τ| < 1e-8 (a tensor τ too)
            raise ValueError(f"temperature must be >= 1e-8 (as in lightly 1.6's NTXentLoss), got {float(temperature)}")
        memory_bank_size = check_memory_bank_size("memory_bank_size", memory_bank_size)
        self.gather_distributed = _check_gather(gather_distributed)
        self.backend = _check_backend(backend)
        self.memory_bank = MemoryBankModule(size=memory_bank_size, gather_distributed=gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """out0, out1: (N, D) projections of two views. Returns the mean loss (0-dim)."""
        gather = self.gather_distributed
        if not self.memory_bank.enabled:
            return functional.nt_xent_loss(
                out0, out1, self.temperature, gather_distributed=gather, backend=self.backend
            )
        bank = self.memory_bank(out1, update=False)
        loss = functional.moco_loss(
            out0, out1, bank.to(device=out0.device, dtype=out0.dtype), self.temperature,
            gather_distributed=gather, backend=self.backend,
        )
        if out0.requires_grad:
            self.memory_bank(F.normalize(out1.detach(), dim=1), update=True)
        return loss

    def extra_repr(self) -> str:
        bank = f", memory_bank_size={self.memory_bank.size}" if self.memory_bank.enabled else ""
        return f"temperature={self.temperature}{bank}{_gather_repr(self)}, backend={self.backend!r}"


class DCLLoss(nn.Module):
    """Decoupled contrastive learning loss (positive removed from the denominator), as lightly's.

    Args:
        temperature: τ > 0 (default 0.1).
        weight_fn: optional `w(out0, out1) -> (N,)` weights of the positive term, called on the
            L2-normalised views (and with the views swapped for the second half), as in lightly;
            under gather_distributed, on this rank's views (lightly's semantics).
        gather_distributed: False, True (every rank's negatives, lightly's) or "ring".
        backend: keyword-only.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        gather_distributed: Union[bool, str] = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        self.temperature = positive_number("temperature", temperature)
        self.weight_fn = check_optional_callable("weight_fn", weight_fn)
        self.sigma: Optional[float] = None  # set by DCLWLoss, whose weights the reference knows
        self.gather_distributed = _check_gather(gather_distributed)
        self.backend = _check_backend(backend)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """out0, out1: (N, D). Returns ½(loss(out0, out1) + loss(out1, out0)) (0-dim)."""
        functional._check_pair(out0, out1, ("out0", "out1"))
        check_positive("temperature", self.temperature)
        backend = resolve_backend(self.backend, out0)
        mode = functional._distributed_mode(self.gather_distributed, backend)
        if backend != "reference":
            return functional._dcl(out0, out1, self.temperature, self.weight_fn, backend, mode)
        if self.weight_fn is not None and self.sigma is None:
            raise ValueError("backend='reference' supports no custom weight_fn (DCLWLoss's sigma weights only)")
        return functional.dcl_loss(out0, out1, self.temperature, sigma=self.sigma, backend="reference")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}{_gather_repr(self)}, backend={self.backend!r}"


class DCLWLoss(DCLLoss):
    """Weighted DCL: the positive term weighted by w = 2 − N·softmax(n(out0)·n(out1)/σ), no gradient.

    Args: temperature τ (default 0.1), sigma σ (default 0.5), gather_distributed, backend (keyword).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sigma: float = 0.5,
        gather_distributed: Union[bool, str] = False,
        *,
        backend: str = "auto",
    ):
        sigma = positive_number("sigma", sigma)
        super().__init__(
            temperature=temperature,
            weight_fn=functional._mises_fisher_weights(sigma),
            gather_distributed=gather_distributed,
            backend=backend,
        )
        self.sigma = sigma

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, sigma={self.sigma}{_gather_repr(self)}, backend={self.backend!r}"


class CLIPLoss(nn.Module):
    """CLIP-style symmetric InfoNCE between two towers (`fastssl.clip_loss`).

    With `learnable_temperature=True` the module owns CLIP's `logit_scale` = log(1/τ) parameter
    (initialised from `temperature`, clamped to at most log(100) as in CLIP) and τ = exp(−logit_scale)
    receives gradients through the fused kernel. `gather_distributed` (keyword-only; True or "ring"):
    every rank's rows and columns of S, this rank's share of the global loss (fastssl.clip_loss).
    """

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = False, *,
                 gather_distributed: Union[bool, str] = False, backend: str = "auto"):  # fmt: skip
        super().__init__()
        temperature = positive_number("temperature", temperature)
        self.gather_distributed = _check_gather(gather_distributed)
        self.learnable_temperature = check_flag("learnable_temperature", learnable_temperature)
        self.backend = _check_backend(backend)
        if learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.temperature = temperature

    def current_temperature(self) -> Union[float, Tensor]:
        """τ now: a float, or a 0-dim tensor that carries the gradient to `logit_scale`."""
        if self.learnable_temperature:
            return torch.exp(-self.logit_scale.clamp(max=math.log(100.0)))
        return self.temperature

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """out0, out1: (N, D) embeddings of matching pairs. Returns the mean loss (0-dim)."""
        return functional.clip_loss(out0, out1, self.current_temperature(), gather_distributed=self.gather_distributed,
                                    backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        tau = "learnable" if self.learnable_temperature else self.temperature
        return f"temperature={tau}{_gather_repr(self)}, backend={self.backend!r}"


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss (`fastssl.barlow_twins_loss`), lightly 1.6's names and defaults.

    Args:
        lambda_param: weight λ ≥ 0 of the off-diagonal (redundancy) term (default 5e-3).
        gather_distributed: True: lightly's — each rank batch-normalises its own slice and C is the
            mean of the ranks' C_r (all-reduced); every rank gets the same loss.
        route: keyword-only; "auto" (the smaller of the D x D and N x N sides), "covariance", "gram".
        backend: keyword-only.
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *, route: str = "auto",
                 backend: str = "auto"):  # fmt: skip
        super().__init__()
        self.lambda_param = nonnegative_number("lambda_param", lambda_param)
        self.gather_distributed = _check_gather(gather_distributed, ring=False)
        self.route = check_route(route)
        self.backend = _check_backend(backend)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """z_a, z_b: (N, D) projections of two views. Returns the loss (0-dim)."""
        return functional.barlow_twins_loss(z_a, z_b, self.lambda_param, gather_distributed=self.gather_distributed,
                                            route=self.route, backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        return f"lambda_param={self.lambda_param}{_gather_repr(self)}, route={self.route!r}, backend={self.backend!r}"


class VICRegLoss(nn.Module):
    """VICReg loss (`fastssl.vicreg_loss`), lightly 1.6's argument order, names and defaults.

    Args:
        lambda_param: invariance weight λ (default 25). mu_param: variance weight μ (default 25).
        nu_param: covariance weight ν (default 1). eps: added to the variance under the sqrt (1e-4).
        gather_distributed: True: lightly's — the invariance term on this rank's pairs, the variance
            and covariance terms on the gathered global batch.
        route, backend: keyword-only, as in `BarlowTwinsLoss`.
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 0.0001,
        *,
        route: str = "auto",
        backend: str = "auto",
    ):
        super().__init__()
        self.lambda_param = nonnegative_number("lambda_param", lambda_param)
        self.mu_param = nonnegative_number("mu_param", mu_param)
        self.nu_param = nonnegative_number("nu_param", nu_param)
        self.eps = positive_number("eps", eps)
        self.gather_distributed = _check_gather(gather_distributed, ring=False)
        self.route = check_route(route)
        self.backend = _check_backend(backend)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """z_a, z_b: (N, D). Returns the loss (0-dim)."""
        return functional.vicreg_loss(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, self.eps,
                                      gather_distributed=self.gather_distributed, route=self.route,
                                      backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"lambda_param={self.lambda_param}, mu_param={self.mu_param}, nu_param={self.nu_param}, "
                f"eps={self.eps}{_gather_repr(self)}, route={self.route!r}, backend={self.backend!r}")  # fmt: skip


class SpectralContrastiveLoss(nn.Module):
    """Spectral contrastive loss (`fastssl.spectral_contrastive_loss`, HaoChen et al. 2021; not in lightly).

    Args:
        mu: μ > 0; rows are clipped to norm √μ and the loss is divided by μ (default 1).
        gather_distributed: keyword-only; True: the loss of the gathered global batch, on every rank.
        route, backend: keyword-only, as in `BarlowTwinsLoss`.
    """

    def __init__(self, mu: float = 1.0, *, gather_distributed: bool = False, route: str = "auto",
                 backend: str = "auto"):  # fmt: skip
        super().__init__()
        self.mu = positive_number("mu", mu)
        self.gather_distributed = _check_gather(gather_distributed, ring=False)
        self.route = check_route(route)
        self.backend = _check_backend(backend)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """z_a, z_b: (N, D). Returns the loss (0-dim)."""
        return functional.spectral_contrastive_loss(z_a, z_b, self.mu, gather_distributed=self.gather_distributed,
                                                    route=self.route, backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        return f"mu={self.mu}{_gather_repr(self)}, route={self.route!r}, backend={self.backend!r}"


class VICRegExpLoss(nn.Module):
    """VICReg-exp (`fastssl.vicreg_exp_loss`, Garrido et al. 2023): the covariance penalty as a LogSumExp over
    dimensions. Not in lightly; the arguments follow VICRegLoss's, with `temperature` first.

    Args:
        temperature: τ > 0 (default 0.1; why: fastssl.reference.vicreg_exp_loss).
        lambda_param, mu_param, nu_param, eps: as VICRegLoss (25, 25, 1, 1e-4).
        gather_distributed: keyword-only; True: the loss of the gathered global batch, on every rank
            (VICRegCtrLoss: local samples against every rank's, also "ring").
        backend: keyword-only.
    """

    _loss = staticmethod(functional.vicreg_exp_loss)
    _ring = False

    def __init__(self, temperature: float = reference.VICREG_EXP_TEMPERATURE, lambda_param: float = 25.0,
                 mu_param: float = 25.0, nu_param: float = 1.0, eps: float = 1e-4, *,
                 gather_distributed: Union[bool, str] = False, backend: str = "auto"):  # fmt: skip
        super().__init__()
        self.gather_distributed = _check_gather(gather_distributed, ring=self._ring)
        self.temperature = positive_number("temperature", temperature)
        self.lambda_param = nonnegative_number("lambda_param", lambda_param)
        self.mu_param = nonnegative_number("mu_param", mu_param)
        self.nu_param = nonnegative_number("nu_param", nu_param)
        self.eps = positive_number("eps", eps)
        self.backend = _check_backend(backend)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """z_a, z_b: (N, D). Returns the loss (0-dim)."""
        return self._loss(z_a, z_b, self.temperature, self.lambda_param, self.mu_param, self.nu_param, self.eps,
                          gather_distributed=self.gather_distributed, backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, lambda_param={self.lambda_param}, mu_param={self.mu_param}, "
                f"nu_param={self.nu_param}, eps={self.eps}{_gather_repr(self)}, backend={self.backend!r}")  # fmt: skip


class VICRegCtrLoss(VICRegExpLoss):
    """VICReg-ctr (`fastssl.vicreg_ctr_loss`, Garrido et al. 2023): VICReg-exp on zᵀ, sample-contrastive.
    Same arguments and defaults as VICRegExpLoss."""

    _loss = staticmethod(functional.vicreg_ctr_loss)
    _ring = True


class ArCLLoss(nn.Module):
    """ArCL (`fastssl.arcl_loss`, Zhao et al. 2023): SimCLR whose positive is each sample's worst pair
    of views. Not in lightly; the temperature default is NT-Xent's.

    Args:
        temperature: τ > 0 (default 0.5).
        gather_distributed: keyword-only; True or "ring": negatives from every rank, as NTXentLoss.
        backend: keyword-only.

    `forward(views)` takes an (N, m, D) tensor or a list of m (N, D) tensors; `forward(v0, v1, ...)`
    with m separate (N, D) tensors is the same call. m = 2 is NTXentLoss.
    """

    def __init__(self, temperature: float = 0.5, *, gather_distributed: Union[bool, str] = False,
                 backend: str = "auto"):  # fmt: skip
        super().__init__()
        self.temperature = positive_number("temperature", temperature)
        self.gather_distributed = _check_gather(gather_distributed)
        self.backend = _check_backend(backend)

    def forward(self, *views: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """views: one (N, m, D) tensor, one list of m (N, D) tensors, or m (N, D) tensors. Returns the loss."""
        if len(views) == 0:
            raise TypeError("ArCLLoss() needs views: an (N, m, D) tensor or m (N, D) tensors")
        return functional.arcl_loss(views[0] if len(views) == 1 else views, self.temperature,
                                    gather_distributed=self.gather_distributed, backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}{_gather_repr(self)}, backend={self.backend!r}"


def _gather_repr(module: nn.Module) -> str:
    gather = getattr(module, "gather_distributed", False)
    return f", gather_distributed={gather!r}" if gather else ""
