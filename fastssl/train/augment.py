"""SimCLR augmentations in pure PyTorch, batched on the training device (no torchvision).

Each transform draws its random parameters per image from an explicit `torch.Generator`, so a
seeded run (and a resumed one) sees the same views. The semantics follow torchvision's transforms as
SimCLR (Chen et al. 2020, appendix A) uses them:

* random resized crop: area fraction s ~ U(scale), log aspect ratio ~ U(log ratio), crop side
  w = √(s·r)·W, h = √(s/r)·H (clamped to the image; torchvision retries instead), uniform position,
  resized back with bilinear sampling. Horizontal flip is folded into the same affine sampling grid.
* colour jitter (applied with probability p): brightness x·b, contrast (x − mean(gray))·c + mean(gray),
  saturation gray + (x − gray)·s, hue: the HSV hue rotated by h (fractions of a turn), b, c, s ~ U(1 ± strength),
  h ~ U(±hue). torchvision applies the four in random order; here the order is fixed (b, c, s, h).
* grayscale with probability p: the ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B on all three channels.
* Gaussian blur with probability p: σ ~ U(0.1, 2.0), kernel side ≈ 10 % of the image (odd), reflect padding.

SimCLR's ImageNet defaults are the defaults of `Augment`; the trainer's CLI defaults are the CIFAR-style
variant (blur off for 32x32 images), see fastssl.train.cli.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "rgb_to_grayscale", "rgb_to_hsv", "hsv_to_rgb"]

_LUMA = (0.299, 0.587, 0.114)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, 0.299 R + 0.587 G + 0.114 B."""
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, all three in [0, 1] (hue in turns)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of rgb_to_hsv: (B, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    # f(n) = v − v·s·max(0, min(k, 4 − k, 1)), k = (n + 6h) mod 6, for n = 5, 3, 1 -> R, G, B
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h) % 6.0
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


@dataclass
class Augment:
    """Batched SimCLR view generator. `aug(x, generator)` -> one view; `aug.views(x, m, generator)` -> m.

    Input: (B, 3, H, W) uint8 or float in [0, 1], on any device. Output: float32 (B, 3, size, size),
    normalised with `mean`/`std`. Parameters are the torchvision/SimCLR names; probabilities in [0, 1].
    """

    size: int = 32
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    mean: Sequence[float] = field(default=(0.5, 0.5, 0.5))
    std: Sequence[float] = field(default=(0.5, 0.5, 0.5))

    def __post_init__(self):
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0 + 1e-9:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _u(n: int, lo: float, hi: float, x: Tensor, g: Optional[torch.Generator]) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, device=x.device, generator=g)

    @staticmethod
    def _coin(n: int, p: float, x: Tensor, g: Optional[torch.Generator]) -> Tensor:
        return torch.rand(n, device=x.device, generator=g) < p

    def _crop_flip(self, x: Tensor, g) -> Tensor:
        n = x.shape[0]
        area = self._u(n, *self.crop_scale, x, g)
        log_r = self._u(n, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), x, g)
        r = torch.exp(log_r)
        w = torch.sqrt(area * r).clamp(max=1.0)                   # crop side / image side
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = self._u(n, -1.0, 1.0, x, g) * (1 - w)                # centre in [-1, 1] coords, crop inside
        cy = self._u(n, -1.0, 1.0, x, g) * (1 - h)
        flip = torch.where(self._coin(n, self.flip_p, x, g), -1.0, 1.0)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, (n, 3, self.size, self.size), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: Tensor, g) -> Tensor:
        n = x.shape[0]
        apply = self._coin(n, self.jitter_p, x, g).view(n, 1, 1, 1)
        y = x
        if self.brightness > 0:
            b = self._u(n, 1 - self.brightness, 1 + self.brightness, x, g).view(n, 1, 1, 1)
            y = (y * b).clamp(0, 1)
        if self.contrast > 0:
            c = self._u(n, 1 - self.contrast, 1 + self.contrast, x, g).view(n, 1, 1, 1)
            m = rgb_to_grayscale(y).mean(dim=(2, 3), keepdim=True)
            y = ((y - m) * c + m).clamp(0, 1)
        if self.saturation > 0:
            s = self._u(n, 1 - self.saturation, 1 + self.saturation, x, g).view(n, 1, 1, 1)
            gray = rgb_to_grayscale(y)
            y = ((y - gray) * s + gray).clamp(0, 1)
        if self.hue > 0:
            hshift = self._u(n, -self.hue, self.hue, x, g).view(n, 1, 1)
            hsv = rgb_to_hsv(y)
            hsv = torch.stack([(hsv[:, 0] + hshift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
            y = hsv_to_rgb(hsv).clamp(0, 1)
        return torch.where(apply, y, x)

    def _gray(self, x: Tensor, g) -> Tensor:
        n = x.shape[0]
        apply = self._coin(n, self.gray_p, x, g).view(n, 1, 1, 1)
        return torch.where(apply, rgb_to_grayscale(x).expand_as(x), x)

    def _blur(self, x: Tensor, g) -> Tensor:
        n, c, hh, ww = x.shape
        apply = self._coin(n, self.blur_p, x, g).view(n, 1, 1, 1)
        sigma = self._u(n, *self.blur_sigma, x, g)
        k = max(3, int(round(0.1 * self.size)) // 2 * 2 + 1)      # odd, ~10 % of the side
        half = k // 2
        t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
        kern = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        kern = kern / kern.sum(dim=1, keepdim=True)                # (n, k)
        kern = kern.repeat_interleave(c, dim=0)                     # one per (image, channel): grouped conv
        y = x.reshape(1, n * c, hh, ww)
        y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), kern.view(n * c, 1, 1, k), groups=n * c)
        y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), kern.view(n * c, 1, k, 1), groups=n * c)
        return torch.where(apply, y.view(n, c, hh, ww), x)

    def normalize(self, x: Tensor) -> Tensor:
        """(x − mean)/std per channel, x float in [0, 1]."""
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @staticmethod
    def to_float(x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
        return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()

    # -- public -----------------------------------------------------------------------------------
    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One augmented view of every image: (B, 3, H, W) -> (B, 3, size, size), normalised float32."""
        y = self._crop_flip(self.to_float(x), generator)
        if self.jitter_p > 0:
            y = self._jitter(y, generator)
        if self.gray_p > 0:
            y = self._gray(y, generator)
        if self.blur_p > 0:
            y = self._blur(y, generator)
        return self.normalize(y)

    def views(self, x: Tensor, m: int = 2, generator: Optional[torch.Generator] = None) -> Tensor:
        """m independent views: (m, B, 3, size, size). m >= 1 (ArCL uses m > 2)."""
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        return torch.stack([self(x, generator) for _ in range(m)])

    def plain(self, x: Tensor) -> Tensor:
        """The evaluation view: no augmentation, resized to `size` if needed, normalised."""
        y = self.to_float(x)
        if y.shape[-1] != self.size or y.shape[-2] != self.size:
            y = F.interpolate(y, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.normalize(y)
