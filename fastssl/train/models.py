"""Encoders and projector of the reference trainer: a small CNN for the default data, a CIFAR ResNet-18.

`SSLModel(encoder, projector)` returns the projector output (what the loss sees); `model.encoder(x)`
returns the representation (what the linear probe and k-NN see), as in SimCLR. For DINO the projector
is a `DINOHead`, whose last layer (K prototypes) is handed to the fused loss instead of being applied.

Normalisation layers matter for `--chunks` (GradCache): GroupNorm and LayerNorm compute their statistics
per sample, so running the encoder in chunks changes nothing and the chunked gradient equals the
unchunked one exactly. BatchNorm in training mode normalises with the statistics of the batch it sees,
so with K chunks each chunk is normalised on its own (as each GPU is under DDP without SyncBatchNorm,
or "ghost batch norm"); the gradient is then exactly that of the per-chunk-statistics objective, not of
the full-batch one. Both models default to BatchNorm, because it learns much faster here (on the default
data, 200 SimCLR steps: linear probe 0.65 with BatchNorm, 0.44 with GroupNorm); pass `norm="gn"`
(`--norm gn`) for chunked training whose gradient must equal the full-batch one exactly.

ResNet-18 for 32x32 inputs (He et al. 2016; the CIFAR variant used by SimCLR and solo-learn): a 3x3
stride-1 stem without max-pooling, then four stages of two BasicBlocks (64, 128, 256, 512 channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SmallCNN", "ResNet18", "ProjectionMLP", "DINOHead", "SSLModel", "build_model", "MODELS", "NORMS"]

MODELS = ("small-cnn", "resnet18")
NORMS = ("gn", "bn", "ln", "none")


def _norm2d(norm: str, c: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(c)
    if norm == "gn":
        return nn.GroupNorm(min(8, c), c)  # 8 groups (fewer channels: one per channel)
    if norm == "ln":
        return nn.GroupNorm(1, c)          # LayerNorm over (C, H, W)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _norm1d(norm: str, c: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm1d(c)
    if norm in ("gn", "ln"):
        return nn.LayerNorm(c)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class SmallCNN(nn.Module):
    """conv3x3(3→w) then three stride-2 conv3x3 stages (w→2w→4w→4w), each norm + ReLU; global mean pool.

    (B, 3, H, W) -> (B, 4w). At w = 16 on 32x32 inputs: ~70 k parameters, ~3.5 M multiply-adds per image.
    """

    def __init__(self, width: int = 16, norm: str = "bn"):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        w = width
        chans = [(3, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 4 * w, 2)]
        layers: list[nn.Module] = []
        for cin, cout, stride in chans:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none"), _norm2d(norm, cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.out_dim = 4 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm2d(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm2d(norm, cout))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.n1(self.conv1(x)))
        return self.relu(self.n2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: (B, 3, H, W) -> (B, 8w) features (512 at the standard width w = 64)."""

    def __init__(self, width: int = 64, norm: str = "bn"):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), _norm2d(norm, w), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        cin = w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            blocks += [_BasicBlock(cin, cout, stride, norm), _BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = 8 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class ProjectionMLP(nn.Module):
    """SimCLR's projector: Linear(in, hidden) → norm → ReLU → Linear(hidden, out). (B, in) -> (B, out)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: str = "bn"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=norm == "none"), _norm1d(norm, hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021) without the product by its last layer:
    Linear(in, hidden) → norm → GELU → Linear(hidden, hidden) → norm → GELU → Linear(hidden, bottleneck) →
    L2 normalisation, (B, in) -> (B, bottleneck) unit rows. `norm` as the trainer's other heads (BatchNorm
    by default, DINO's `use_bn_in_head` for convolutional backbones).

    The last layer is `prototypes` (K, bottleneck): the raw weight v of DINO's weight-normalised layer with
    its gain fixed at 1 (norm_last_layer), so the logits are n(z)·v_kᵀ/‖v_k‖. The head does not compute
    them: the trainer passes z and v to fastssl's fused DINO loss (normalize_prototypes=True), which never
    stores the (B, K) logits.
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, prototypes: int, norm: str = "bn"):
        super().__init__()
        if min(in_dim, hidden_dim, bottleneck_dim, prototypes) < 1:
            raise ValueError(f"DINOHead needs positive sizes, got in_dim={in_dim}, hidden_dim={hidden_dim}, "
                             f"bottleneck_dim={bottleneck_dim}, prototypes={prototypes}")
        bias = norm == "none"  # a norm layer's shift replaces the bias
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=bias), _norm1d(norm, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim, bias=bias), _norm1d(norm, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck_dim))  # rows uniform in direction

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=1)


class SSLModel(nn.Module):
    """encoder + projector; forward returns the projection, `.encoder` the representation."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.encoder(x))


def build_model(name: str = "small-cnn", *, width: int | None = None, norm: str | None = None,
                proj_hidden: int = 512, proj_dim: int = 128, prototypes: int = 0) -> SSLModel:
    """The trainer's model: `name` in MODELS; width/norm default to 16/"bn" (small-cnn), 64/"bn" (resnet18).

    prototypes = K > 0: a DINOHead (hidden proj_hidden, bottleneck proj_dim, K prototypes) instead of the
    ProjectionMLP.
    """
    if name == "small-cnn":
        encoder: nn.Module = SmallCNN(width or 16, norm or "bn")
    elif name == "resnet18":
        encoder = ResNet18(width or 64, norm or "bn")
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if proj_hidden < 1 or proj_dim < 1:
        raise ValueError(f"proj_hidden and proj_dim must be positive, got {proj_hidden}, {proj_dim}")
    if prototypes:
        return SSLModel(encoder, DINOHead(encoder.out_dim, proj_hidden, proj_dim, prototypes, norm or "bn"))
    return SSLModel(encoder, ProjectionMLP(encoder.out_dim, proj_hidden, proj_dim, norm or "bn"))
