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
from fastssl._common import compute_dtype
from fastssl._validation import (
    check_flag,
    check_loss_dim,
    check_memory_bank_size,
    check_nonnegative,
    check_norm_degree,
    check_optional_callable,
    check_pair,
    check_positive,
    check_route,
    check_unit_interval,
    nonnegative_number,
    positive_number,
)
from fastssl.backends import BACKENDS, resolve

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
    "MACLLoss",
    "DirectCLRLoss",
    "FroSSLLoss",
    "TiCoLoss",
    "KoLeoLoss",
    "DINOLoss",
    "IBOTPatchLoss",
    "SigLIPLoss",
    "SupConLoss",
    "SwaVLoss",
    "MSNLoss",
]


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_gather(gather_distributed: object, *, ring: bool = True) -> Union[bool, str]:
    """False, True or (contrastive losses, SigLIP) "ring"; ValueError if torch.distributed is missing (as lightly)."""
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
        weights = dict(sigma=self.sigma) if self.sigma is not None else dict(weight_fn=self.weight_fn)
        return functional.dcl_loss(out0, out1, self.temperature, **weights, gather_distributed=self.gather_distributed,
                                   backend=self.backend)  # fmt: skip

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


# ==================================================================================================
# lightly 1.6's further losses (appended section): MACLLoss, DirectCLRLoss, FroSSLLoss, TiCoLoss,
# KoLeoLoss — lightly's names, constructor arguments and defaults, plus keyword-only `backend`.
# ==================================================================================================



class MACLLoss(nn.Module):
    """Model-aware contrastive loss (`fastssl.macl_loss`, Huang et al. 2023), as lightly's `MACLLoss`.

    Args:
        temperature: base τ > 0 (default 0.1).
        alpha: α ∈ [0, 1], how far the temperature follows the alignment (default 0.5).
        A_0: the alignment threshold A_0 ∈ [0, 1] (default 0).
        backend: keyword-only.

    `forward(z0, z1)`: (N, D) embeddings of two views; returns the mean loss (0-dim).
    """

    def __init__(self, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        check_positive("temperature", temperature)
        check_unit_interval("alpha", alpha)
        check_unit_interval("A_0", A_0)
        self.temperature, self.alpha, self.A_0 = temperature, alpha, A_0
        self.eps = functional.MACL_EPS
        self.backend = _check_backend(backend)

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        return functional.macl_loss(z0, z1, self.temperature, self.alpha, self.A_0, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, A_0={self.A_0}, backend={self.backend!r}"


class DirectCLRLoss(NTXentLoss):
    """DirectCLR (`fastssl.directclr_loss`, Jing et al. 2022): NTXentLoss on the first `loss_dim`
    dimensions of each flattened embedding, as lightly's `DirectCLRLoss` (a subclass of NTXentLoss).

    Args:
        loss_dim: number of leading dimensions the loss sees (default 64).
        temperature, memory_bank_size, gather_distributed: as NTXentLoss (0.5, 0, False); a memory
            bank holds truncated rows, so its size is (K, loss_dim).
        backend: keyword-only.

    `forward(out0, out1)`: (N, ...) backbone outputs of two views (no projection head); returns the loss.
    """

    def __init__(
        self,
        loss_dim: int = 64,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: Union[bool, str] = False,
        *,
        backend: str = "auto",
    ):
        super().__init__(temperature=temperature, memory_bank_size=memory_bank_size,
                         gather_distributed=gather_distributed, backend=backend)  # fmt: skip
        self.loss_dim = check_loss_dim(loss_dim)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return super().forward(functional._leading_dims(out0, self.loss_dim),
                               functional._leading_dims(out1, self.loss_dim))  # fmt: skip

    def extra_repr(self) -> str:
        return f"loss_dim={self.loss_dim}, {super().extra_repr()}"


class FroSSLLoss(nn.Module):
    """FroSSL (`fastssl.frossl_loss`, Skean et al. 2024), lightly 1.6's `FroSSLLoss`.

    Args:
        invariance_weight: weight ≥ 0 of the invariance term (default 1).
        route, backend: keyword-only, as in `BarlowTwinsLoss`.

    `forward(z_views)`: a list of V ≥ 2 (N, D) views, as lightly's; `forward(z0, z1, ...)` with the
    views as separate tensors is the same call. Returns the loss (0-dim).
    """

    def __init__(self, invariance_weight: float = 1.0, *, route: str = "auto", backend: str = "auto"):
        super().__init__()
        check_nonnegative("invariance_weight", invariance_weight)
        self.invariance_weight = invariance_weight
        self.route = check_route(route)
        self.backend = _check_backend(backend)

    def forward(self, *z_views: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        if len(z_views) == 0:
            raise TypeError("FroSSLLoss() needs views: a list of (N, D) tensors, or the tensors themselves")
        views = z_views[0] if len(z_views) == 1 else list(z_views)
        return functional.frossl_loss(views, self.invariance_weight, route=self.route, backend=self.backend)

    def extra_repr(self) -> str:
        return f"invariance_weight={self.invariance_weight}, route={self.route!r}, backend={self.backend!r}"


class TiCoLoss(nn.Module):
    """TiCo (`fastssl.tico_loss`, Zhu et al. 2022), lightly 1.6's `TiCoLoss`, with its running covariance.

    Args:
        beta: EMA coefficient β ∈ [0, 1] of the covariance (default 0.9).
        rho: weight ρ ≥ 0 of the covariance-contrast term (default 8).
        gather_distributed: True: z_a, z_b are gathered from every rank (lightly's); the loss and the
            update of C are those of the global batch, on every rank.
        route, backend: keyword-only, as in `BarlowTwinsLoss`.

    State: `C`, the D x D running covariance (None before the first call, zeros after it, as
    lightly's; a non-persistent buffer: it follows `.to()` and stays out of the state_dict, as
    lightly's attribute does). `forward(z_a, z_b, update_covariance_matrix=True)`: with the update,
    C ← β·C + (1 − β)·n(z_a)ᵀn(z_a)/N is formed once (an N·D² product, no gradient: the state is
    D x D by nature) and the loss is the product of n(z_a) with that new C; without it, the loss is
    `fastssl.tico_loss` against the stored C, whose B part stays on the fused Frobenius route.
    """

    def __init__(self, beta: float = 0.9, rho: float = 8.0, gather_distributed: bool = False, *,
                 route: str = "auto", backend: str = "auto"):  # fmt: skip
        super().__init__()
        check_unit_interval("beta", beta)
        check_nonnegative("rho", rho)
        self.beta, self.rho = beta, rho
        self.gather_distributed = _check_gather(gather_distributed, ring=False)
        self.route = check_route(route)
        self.backend = _check_backend(backend)
        self.C: Optional[Tensor]
        self.register_buffer("C", None, persistent=False)

    def forward(self, z_a: Tensor, z_b: Tensor, update_covariance_matrix: bool = True) -> Tensor:
        """z_a, z_b: (N, D) embeddings of two views. Returns the loss (0-dim)."""
        check_pair(z_a, z_b, ("z_a", "z_b"))
        _, mode = resolve(self.backend, z_a, self.gather_distributed, ring=False, op="sq_frobenius")
        if mode is not None:
            sizes = distributed.batch_sizes(z_a)
            z_a, z_b = distributed.gather_cat(z_a, sizes), distributed.gather_cat(z_b, sizes)
        n, d = z_a.shape
        acc = compute_dtype(z_a)
        if self.C is None:
            self.C = torch.zeros(d, d, dtype=acc, device=z_a.device)
        elif tuple(self.C.shape) != (d, d):
            raise ValueError(f"TiCoLoss's running covariance C is {tuple(self.C.shape)} but z_a has shape "
                             f"{tuple(z_a.shape)}: D changed; use a new TiCoLoss")  # fmt: skip
        covariance, beta = self.C, self.beta
        if update_covariance_matrix:
            with torch.no_grad():
                a = F.normalize(z_a.detach().to(acc), dim=1)
                covariance = self.beta * self.C.to(device=a.device, dtype=acc) + (1 - self.beta) * (a.T @ a) / n
            beta = 1.0  # the loss's C is the new state itself
        loss = functional.tico_loss(z_a, z_b, covariance, beta, self.rho, route=self.route, backend=self.backend)
        if update_covariance_matrix:
            self.C = covariance
        return loss

    def extra_repr(self) -> str:
        return f"beta={self.beta}, rho={self.rho}{_gather_repr(self)}, route={self.route!r}, backend={self.backend!r}"


class KoLeoLoss(nn.Module):
    """KoLeo regulariser (`fastssl.koleo_loss`, Sablayrolles et al. 2019), lightly 1.6's `KoLeoLoss`.

    Args:
        p: norm degree p > 0 of the nearest-neighbour distance (default 2).
        eps: eps > 0 of the normalisation, the distance and the log (default 1e-8).
        backend: keyword-only.

    `forward(x)`: x (N, D). Returns the loss (0-dim).
    """

    def __init__(self, p: float = 2, eps: float = 1e-8, *, backend: str = "auto"):
        super().__init__()
        check_norm_degree(p)
        check_positive("eps", eps)
        self.p, self.eps = p, eps
        self.backend = _check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:
        return functional.koleo_loss(x, self.p, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}, backend={self.backend!r}"

# --------------------------------------------------------------------------------------------------
# Prototype cross-entropy (docs/design.md, family 4): DINO, iBOT's patch loss. Appended section.
# --------------------------------------------------------------------------------------------------


def _all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of x over the ranks of an initialised torch.distributed job (lightly's centre rule), else x."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
        x = x / torch.distributed.get_world_size()
    return x


class DINOLoss(nn.Module):
    """DINO's loss (Caron et al. 2021) with lightly 1.6's constructor, `forward`, centre buffer and update.

    `forward(teacher_out, student_out, teacher_temp=None, epoch=None)` takes finished logits, lists of
    (B, K) tensors (or (views, B, K) tensors), as lightly's does, and returns the same value
    (`fastssl.dino_loss_from_logits`); then the centre is updated from the teacher logits' batch mean.

    `forward_fused(teacher_embeddings, student_embeddings, prototypes, teacher_prototypes=None,
    teacher_temp=None, epoch=None)` takes instead what enters the head's last layer, (B, D) per view,
    and the last layer's weight W (K, D) (and the EMA teacher's, W_t; None: W detached): the same
    loss, and the same centre update from mean(t)·W_tᵀ, but the views x K logits are never stored
    (`fastssl.dino_loss`). Use it when K is large (DINO: 65,536).

    Args (lightly's):
        output_dim: K (default 65,536), the size of the centre.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: the teacher temperature rises
            linearly from warmup_teacher_temp to teacher_temp over the first epochs (used when
            `epoch` is passed); defaults 0.04, 0.04, 30.
        student_temp: τs (default 0.1).
        center_momentum: m (default 0.9); c ← m·c + (1 − m)·batch mean of the teacher logits
            (averaged over ranks when torch.distributed is initialised, as lightly does).
        center_mode: "mean" only.
        backend: keyword-only; used by forward_fused.
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean", *, backend: str = "auto"):  # fmt: skip
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        if isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1:
            raise ValueError(f"output_dim must be a positive int (K, the number of prototypes), got {output_dim!r}")
        for name, value in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp),
                            ("student_temp", student_temp)):  # fmt: skip
            check_positive(name, value)
        check_nonnegative("center_momentum", center_momentum)
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.backend = _check_backend(backend)

    def _teacher_temperature(self, teacher_temp: Optional[float], epoch: Optional[int]) -> Tensor:
        """lightly's rule: an explicit teacher_temp, else the warm-up schedule at `epoch`, else teacher_temp."""
        if teacher_temp is not None:
            return torch.tensor(teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return self.teacher_temp_schedule[epoch]
        return torch.tensor(self.teacher_temp)

    def forward(self, teacher_out: Sequence[Tensor], student_out: Sequence[Tensor],
                teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> Tensor:  # fmt: skip
        """teacher_out: T views of (B, K) teacher logits; student_out: S views of (B, K) student logits.
        Returns the mean cross-entropy over the view pairs q ≠ v and the batch (0-dim)."""
        first = teacher_out[0] if isinstance(teacher_out, (list, tuple)) and teacher_out else teacher_out
        self._check_k("teacher_out", first)
        loss = functional.dino_loss_from_logits(
            teacher_out, student_out, self.center, student_temp=self.student_temp,
            teacher_temp=self._teacher_temperature(teacher_temp, epoch),
        )  # fmt: skip
        self.update_center(teacher_out)
        return loss

    def forward_fused(self, teacher_embeddings: Union[Tensor, Sequence[Tensor]],
                      student_embeddings: Union[Tensor, Sequence[Tensor]], prototypes: Tensor,
                      teacher_prototypes: Optional[Tensor] = None, teacher_temp: Optional[float] = None,
                      epoch: Optional[int] = None, *, normalize_prototypes: bool = False) -> Tensor:  # fmt: skip
        """The loss of `forward` on the logits t·W_tᵀ and s·Wᵀ, from the embeddings (T or S views of
        (B, D)) and W (K, D), W_t (K, D) (None: W), never storing the logits; then the centre update.
        normalize_prototypes: as fastssl.dino_loss. Returns the loss (0-dim)."""
        self._check_k("prototypes", prototypes, rows=True)
        out = functional.dino_loss(
            student_embeddings, teacher_embeddings, prototypes, self.center, student_temp=self.student_temp,
            teacher_temp=self._teacher_temperature(teacher_temp, epoch), teacher_prototypes=teacher_prototypes,
            normalize_prototypes=normalize_prototypes, return_batch_center=True, backend=self.backend,
        )  # fmt: skip
        self._momentum_update(out.batch_center)
        return out.loss

    def _check_k(self, name: str, t: object, rows: bool = False) -> None:
        """The K of `t` (its last dim, or rows) is output_dim (other problems: the functional's checks)."""
        if isinstance(t, Tensor) and t.dim() >= 1:
            k = t.shape[0] if rows else t.shape[-1]
            if k != self.center.shape[-1]:
                what = "rows (prototypes)" if rows else "columns (logits)"
                raise ValueError(f"DINOLoss(output_dim={self.center.shape[-1]}) got {name} with {k} {what}, "
                                 f"shape {tuple(t.shape)}")  # fmt: skip

    @torch.no_grad()
    def update_center(self, teacher_out: Union[Tensor, Sequence[Tensor]]) -> None:
        """c ← m·c + (1 − m)·mean over views and batch of the teacher logits (T views of (B, K))."""
        views = list(teacher_out)
        total = views[0].float().sum(0)
        for view in views[1:]:
            total += view.float().sum(0)
        self._momentum_update(total / (len(views) * views[0].shape[0]))

    @torch.no_grad()
    def _momentum_update(self, batch_center: Tensor) -> None:
        batch_center = _all_reduce_mean(batch_center.reshape(self.center.shape).to(self.center))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def extra_repr(self) -> str:
        return (f"output_dim={self.center.shape[-1]}, teacher_temp={self.teacher_temp}, "
                f"warmup_teacher_temp_epochs={self.warmup_teacher_temp_epochs}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, backend={self.backend!r}")  # fmt: skip


class _Center(nn.Module):
    """lightly's `Center` as IBOTPatchLoss holds it (buffer `center` of shape (1, K)), so that state
    dicts carry over: `value`, and `update_from_mean(batch_center)` with c ← m·c + (1 − m)·mean."""

    def __init__(self, k: int, momentum: float):
        super().__init__()
        self.register_buffer("center", torch.zeros(1, k))
        self.momentum = momentum

    @property
    def value(self) -> Tensor:
        return self.center

    @torch.no_grad()
    def update_from_mean(self, batch_center: Tensor) -> None:
        batch_center = _all_reduce_mean(batch_center.reshape(self.center.shape).to(self.center))
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)


class IBOTPatchLoss(nn.Module):
    """iBOT's masked-patch loss (Zhou et al. 2022; DINOv2's form, Oquab et al. 2023) with lightly 1.6's
    constructor, `forward`, centre (submodule `center`, buffer (1, K)) and update.

    `forward(teacher_out, student_out, mask, teacher_temp=None)` takes the (M, K) logits of the M
    masked tokens (mask (B, H, W) bool, True where masked), as lightly's; `fastssl.ibot_patch_loss_from_logits`.
    `forward_fused(teacher_embeddings, student_embeddings, mask, prototypes, teacher_prototypes=None,
    teacher_temp=None)` takes the (M, D) embeddings of the masked tokens and the last layer's W (K, D):
    the same loss and centre update, without the M x K logits (`fastssl.ibot_patch_loss`).

    Args (lightly's): output_dim K (65,536), teacher_temp (0.04), student_temp (0.1), center_mode
    ("mean" only), center_momentum (0.9); backend: keyword-only, used by forward_fused.
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_mode: str = "mean", center_momentum: float = 0.9, *, backend: str = "auto"):  # fmt: skip
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        if isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1:
            raise ValueError(f"output_dim must be a positive int (K, the number of prototypes), got {output_dim!r}")
        check_positive("teacher_temp", teacher_temp)
        check_positive("student_temp", student_temp)
        check_nonnegative("center_momentum", center_momentum)
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center = _Center(output_dim, center_momentum)
        self.backend = _check_backend(backend)

    def _check_k(self, name: str, t: object, rows: bool = False) -> None:
        if isinstance(t, Tensor) and t.dim() >= 1:
            k = t.shape[0] if rows else t.shape[-1]
            if k != self.center.center.shape[-1]:
                what = "rows (prototypes)" if rows else "columns (logits)"
                raise ValueError(f"IBOTPatchLoss(output_dim={self.center.center.shape[-1]}) got {name} with {k} "
                                 f"{what}, shape {tuple(t.shape)}")  # fmt: skip

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor,
                teacher_temp: Optional[float] = None) -> Tensor:  # fmt: skip
        """teacher_out, student_out: (M, K) logits of the masked tokens; mask (B, H, W). Returns the loss."""
        self._check_k("teacher_out", teacher_out)
        loss = functional.ibot_patch_loss_from_logits(
            teacher_out, student_out, mask, self.center.value, student_temp=self.student_temp,
            teacher_temp=torch.tensor(self.teacher_temp if teacher_temp is None else teacher_temp),
        )  # fmt: skip
        self.center.update_from_mean(teacher_out.detach().float().mean(0))
        return loss

    def forward_fused(self, teacher_embeddings: Tensor, student_embeddings: Tensor, mask: Tensor, prototypes: Tensor,
                      teacher_prototypes: Optional[Tensor] = None, teacher_temp: Optional[float] = None, *,
                      normalize_prototypes: bool = False) -> Tensor:  # fmt: skip
        """The loss of `forward` on t·W_tᵀ and s·Wᵀ from the (M, D) embeddings and W (K, D) (W_t: None
        means W), never storing the logits; then the centre update. Returns the loss (0-dim)."""
        self._check_k("prototypes", prototypes, rows=True)
        out = functional.ibot_patch_loss(
            student_embeddings, teacher_embeddings, prototypes, mask, self.center.value,
            student_temp=self.student_temp,
            teacher_temp=torch.tensor(self.teacher_temp if teacher_temp is None else teacher_temp),
            teacher_prototypes=teacher_prototypes, normalize_prototypes=normalize_prototypes,
            return_batch_center=True, backend=self.backend,
        )  # fmt: skip
        self.center.update_from_mean(out.batch_center)
        return out.loss

    def extra_repr(self) -> str:
        return (f"output_dim={self.center.center.shape[-1]}, teacher_temp={self.teacher_temp}, "
                f"student_temp={self.student_temp}, center_momentum={self.center.momentum}, backend={self.backend!r}")

# SigLIP (Zhai et al. 2023) and SupCon (Khosla et al. 2020) — appended section. Neither is in lightly.
# ==================================================================================================



class SigLIPLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (`fastssl.siglip_loss`) with its learnable temperature and bias.

    As in the paper, t = exp(t') is log-parametrised: with `learnable=True` the module owns
    `logit_scale` = t' (initialised to log(init_temperature)) and `logit_bias` = b (initialised to
    init_bias), both 0-dim parameters that receive gradients through the fused kernel and must be
    given to the optimiser (module.parameters()). With `learnable=False` t and b are constants.
    t multiplies the cosine similarities (it is an inverse temperature in InfoNCE terms).

    Args:
        init_temperature: t at initialisation, > 0 (default 10, the paper's).
        init_bias: b at initialisation (default −10, the paper's).
        learnable: whether t' and b are parameters (default True).
        gather_distributed: False, True (this rank's rows against every rank's columns, gathered)
            or "ring" (the same loss, the columns sent round a ring: no all-gather, at most three
            blocks held); see fastssl.siglip_loss — under DDP, wrap this module with the model so
            that t' and b are averaged over the ranks.
        backend: keyword-only.
    """

    def __init__(self, init_temperature: float = reference.SIGLIP_INIT_TEMPERATURE,
                 init_bias: float = reference.SIGLIP_INIT_BIAS, learnable: bool = True,
                 gather_distributed: Union[bool, str] = False, *, backend: str = "auto"):  # fmt: skip
        super().__init__()
        check_positive("init_temperature", init_temperature)
        if isinstance(init_bias, bool) or not isinstance(init_bias, (int, float)) or not math.isfinite(init_bias):
            raise ValueError(f"init_bias must be a finite number, got {init_bias!r}")
        self.learnable = bool(learnable)
        self.gather_distributed = _check_gather(gather_distributed)
        self.backend = _check_backend(backend)
        if self.learnable:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(init_temperature)))
            self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))
        else:
            self.temperature = float(init_temperature)
            self.bias = float(init_bias)

    def current_scale(self) -> Union[float, Tensor]:
        """t now: a float, or exp(logit_scale), a 0-dim tensor that carries the gradient."""
        return self.logit_scale.exp() if self.learnable else self.temperature

    def current_bias(self) -> Union[float, Tensor]:
        """b now: a float, or the `logit_bias` parameter."""
        return self.logit_bias if self.learnable else self.bias

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """out0, out1: (N, D) embeddings of matching pairs (e.g. image and text). Returns the loss (0-dim)."""
        return functional.siglip_loss(out0, out1, self.current_scale(), self.current_bias(),
                                      gather_distributed=self.gather_distributed, backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        if self.learnable:
            state = f"learnable, t={float(self.logit_scale.detach().exp()):g}, b={float(self.logit_bias.detach()):g}"
        else:
            state = f"t={self.temperature:g}, b={self.bias:g}"
        return f"{state}{_gather_repr(self)}, backend={self.backend!r}"


class SupConLoss(nn.Module):
    """Supervised contrastive loss (`fastssl.supcon_loss`, Khosla et al. 2020, L_out): needs class labels.

    `forward(out0, labels, out1=None)`: out0 (N, D) embeddings, labels (N,) integer class ids
    (−1: unlabeled, whose only positive is its other view), out1 (N, D) a second view or None.
    Anchors without a positive are left out of the mean.

    Args:
        temperature: τ > 0 (default 0.1, the paper's).
        backend: keyword-only.
    """

    def __init__(self, temperature: float = reference.SUPCON_TEMPERATURE, *, backend: str = "auto"):
        super().__init__()
        check_positive("temperature", temperature)
        self.temperature = temperature
        self.backend = _check_backend(backend)

    def forward(self, out0: Tensor, labels: Tensor, out1: Optional[Tensor] = None) -> Tensor:
        """out0 (N, D), labels (N,), out1 (N, D) or None. Returns the loss (0-dim)."""
        return functional.supcon_loss(out0, labels, self.temperature, z2=out1, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"


# --------------------------------------------------------------------------------------------------
# Prototype codes (docs/design.md, family 4): SwaV, MSN. Appended section.
# --------------------------------------------------------------------------------------------------



class SwaVLoss(nn.Module):
    """SwaV's loss (Caron et al. 2020) with lightly 1.6's constructor, `subloss` and `forward`.

    `forward(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)` takes the prototype
    layer's scores, lists of (B, K) tensors (queue: one (Bq, K) per high-resolution view), as
    lightly's does, and returns the same value and gradients (`fastssl.swav_loss_from_scores`; the
    Sinkhorn-Knopp steps run in the log domain).

    `forward_fused(high_resolution_embeddings, low_resolution_embeddings, prototypes,
    queue_embeddings=None)` takes instead what enters the prototype layer, (B, D) per view (queue:
    (Bq, D) per high-resolution view), and its weight W (K, D): the loss of `forward` on the scores
    x·Wᵀ, without ever storing a (B, K) score matrix (`fastssl.swav_loss`).

    Args (lightly's): temperature τ (0.1), sinkhorn_iterations (3), sinkhorn_epsilon ε (0.05),
    sinkhorn_gather_distributed (False: the codes of each rank's batch; True: the prototypes' totals
    over every rank's rows). backend: keyword-only, used by forward_fused. The loss is 0-dim
    (lightly's is a 1-element tensor of the same value).
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False, *, backend: str = "auto"):  # fmt: skip
        super().__init__()
        functional._check_swav_args(temperature, sinkhorn_iterations, sinkhorn_epsilon)
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_gather_distributed = distributed.check_gather(
            sinkhorn_gather_distributed, ring=False, name="sinkhorn_gather_distributed"
        )
        self.backend = _check_backend(backend)

    def _kwargs(self) -> dict:
        return dict(temperature=self.temperature, sinkhorn_iterations=self.sinkhorn_iterations,
                    sinkhorn_epsilon=self.sinkhorn_epsilon,
                    sinkhorn_gather_distributed=self.sinkhorn_gather_distributed)  # fmt: skip

    def subloss(self, z: Tensor, q: Tensor) -> Tensor:
        """−mean_b Σ_k q_bk·log_softmax_k(z_b/τ): the cross-entropy of scores z (B, K) against codes q (B, K)."""
        acc = compute_dtype(z)
        return -(q.to(acc) * torch.log_softmax(z.to(acc) / self.temperature, dim=1)).sum(dim=1).mean()

    def forward(self, high_resolution_outputs: Sequence[Tensor], low_resolution_outputs: Sequence[Tensor],
                queue_outputs: Optional[Sequence[Tensor]] = None) -> Tensor:  # fmt: skip
        """H views of (B, K) scores, L views of (B, K) scores, and H views of (Bq, K) queue scores or
        None. Returns the loss averaged over the H x (H + L − 1) view pairs (0-dim)."""
        return functional.swav_loss_from_scores(high_resolution_outputs, low_resolution_outputs, queue_outputs,
                                                **self._kwargs())  # fmt: skip

    def forward_fused(self, high_resolution_embeddings: Union[Tensor, Sequence[Tensor]],
                      low_resolution_embeddings: Union[Tensor, Sequence[Tensor], None], prototypes: Tensor,
                      queue_embeddings: Union[Tensor, Sequence[Tensor], None] = None) -> Tensor:  # fmt: skip
        """The loss of `forward` on the scores x·Wᵀ, from the embeddings (H, L views of (B, D); queue
        H views of (Bq, D)) and W (K, D), never storing the scores. Returns the loss (0-dim)."""
        return functional.swav_loss(high_resolution_embeddings, low_resolution_embeddings, prototypes,
                                    queue_embeddings, backend=self.backend, **self._kwargs())  # fmt: skip

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
                f"sinkhorn_epsilon={self.sinkhorn_epsilon}, "
                f"sinkhorn_gather_distributed={self.sinkhorn_gather_distributed}, backend={self.backend!r}")  # fmt: skip


class MSNLoss(nn.Module):
    """MSN's loss (Assran et al. 2022) with lightly 1.6's constructor, `forward` and `regularization_loss`.

    `forward(anchors, targets, prototypes, target_sharpen_temperature=0.25)`: anchors (V·B, D) (V
    views of the B images, view-major), targets (B, D), prototypes (K, D), as lightly's; the same
    value and gradients, computed by `fastssl.msn_loss` without the V·B x K and B x K probability
    matrices.

    Args (lightly's): temperature τ (0.1), sinkhorn_iterations (3; 0 disables Sinkhorn-Knopp),
    regularization_weight λ (1.0; ≤ 0 disables the mean-entropy regulariser), gather_distributed
    (False; True: the Sinkhorn-Knopp totals over every rank's targets). backend: keyword-only.
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, regularization_weight: float = 1.0,
                 gather_distributed: bool = False, *, backend: str = "auto"):  # fmt: skip
        super().__init__()
        check_positive("temperature", temperature)
        functional._check_iterations("sinkhorn_iterations", sinkhorn_iterations)
        functional._check_number("regularization_weight", regularization_weight)
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.regularization_weight = regularization_weight
        self.gather_distributed = distributed.check_gather(gather_distributed, ring=False)
        self.backend = _check_backend(backend)

    def forward(self, anchors: Tensor, targets: Tensor, prototypes: Tensor,
                target_sharpen_temperature: float = 0.25) -> Tensor:  # fmt: skip
        """The mean cross-entropy of the anchors against their images' sharpened targets, plus λ times
        the mean-entropy regulariser (0-dim)."""
        return functional.msn_loss(
            anchors, targets, prototypes, target_sharpen_temperature, temperature=self.temperature,
            sinkhorn_iterations=self.sinkhorn_iterations, regularization_weight=self.regularization_weight,
            gather_distributed=self.gather_distributed, backend=self.backend,
        )  # fmt: skip

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """Σ_k p̄_k·log p̄_k + log K of the mean anchor probabilities p̄ (K,) (lightly's; 0·log 0 = 0)."""
        return torch.special.xlogy(mean_anchor_probs, mean_anchor_probs).sum() + math.log(float(len(mean_anchor_probs)))

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
                f"regularization_weight={self.regularization_weight}, gather_distributed={self.gather_distributed}, "
                f"backend={self.backend!r}")  # fmt: skip
