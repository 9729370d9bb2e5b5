"""fastssl: fused kernels for self-supervised-learning losses, as autograd-aware torch ops.

Swap ``from lightly.loss import NTXentLoss`` for ``from fastssl.nn import NTXentLoss`` and get the
same values and gradients with O(N·D) memory. The math of every loss is in docs/design.md.
"""

__version__ = "0.1.0"

from fastssl.backends import available_backends
from fastssl.functional import (
    alignment,
    arcl_loss,
    barlow_twins_loss,
    clip_loss,
    dcl_loss,
    dino_loss,
    dino_loss_from_logits,
    directclr_loss,
    frossl_loss,
    ibot_patch_loss,
    ibot_patch_loss_from_logits,
    koleo_loss,
    macl_loss,
    moco_loss,
    msn_loss,
    nt_xent_loss,
    siglip_loss,
    spectral_contrastive_loss,
    supcon_loss,
    swav_loss,
    swav_loss_from_scores,
    tico_loss,
    uniformity,
    vicreg_ctr_loss,
    vicreg_exp_loss,
    vicreg_loss,
)
from fastssl import autograd, distributed, metrics, nn, reference  # noqa: E402  (submodules, after the functions they wrap)

__all__ = [
    "__version__",
    "available_backends",
    "alignment",
    "clip_loss",
    "dcl_loss",
    "moco_loss",
    "nt_xent_loss",
    "uniformity",
    "barlow_twins_loss",
    "vicreg_loss",
    "spectral_contrastive_loss",
    "vicreg_exp_loss",
    "vicreg_ctr_loss",
    "arcl_loss",
    "dino_loss",
    "dino_loss_from_logits",
    "ibot_patch_loss",
    "ibot_patch_loss_from_logits",
    "macl_loss",
    "directclr_loss",
    "frossl_loss",
    "tico_loss",
    "koleo_loss",
    "siglip_loss",
    "supcon_loss",
    "swav_loss",
    "swav_loss_from_scores",
    "msn_loss",
    "autograd",
    "distributed",
    "metrics",
    "nn",
    "reference",
]
