"""Datasets of the reference trainer: the embedded cluttered digits, CIFAR-10/100 pickles, image folders.

Every loader returns a `Dataset`: uint8 image tensors (N, 3, H, W) for a train and a test split, integer
labels, and per-channel mean/std of the train split. The trainer keeps the whole split in memory (on the
training device) and augments batches there (fastssl.train.augment), so there is no DataLoader.

The default, `digits`, needs no download: the 1,797 UCI handwritten digits that scikit-learn bundles
(8x8, shipped in assets/digits.npz, CC BY 4.0; see assets/make_digits.py) are rendered into 32x32 RGB
images with a random position, scale, rotation, hue, brightness, smooth background colour noise and random
bars (clutter). Those are the nuisance factors of Huang et al. 2023: the class is the digit's shape, and views
that share the digit but not the nuisances are what crop + colour augmentation produce, so a contrastively
trained encoder learns to ignore them, while a random encoder's features are dominated by them (default
run: linear probe 0.74 after SSL vs 0.18 at random init; docs/trainer.md). The colour nuisance is one hue
per image, which a ±0.5-turn hue jitter removes completely: a per-image colour that augmentation cannot
remove (independent foreground/background colours, brightness levels spread wider than the jitter) is an
instance-identity shortcut, and SimCLR then learns the colour instead of the digit (measured: k-NN at
chance). The rendering is a fixed function of `render_seed`, so every run sees the
same images.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl.train.augment import hsv_to_rgb

__all__ = ["Dataset", "DataError", "DATASETS", "load_dataset", "render_digits", "load_cifar", "load_image_folder"]

DATASETS = ("digits", "cifar10", "cifar100", "folder")
ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class DataError(ValueError):
    """A dataset that is missing or malformed; the message names the expected layout."""


@dataclass
class Dataset:
    """Two in-memory splits. Images uint8 (N, 3, H, W), labels int64 (N,)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list
    mean: tuple
    std: tuple

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _stats(x: Tensor) -> tuple[tuple, tuple]:
    xf = x.float() / 255.0
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def _make(name, train_x, train_y, test_x, test_y, classes) -> Dataset:
    mean, std = _stats(train_x)
    return Dataset(name, train_x.contiguous(), train_y.long(), test_x.contiguous(), test_y.long(), list(classes),
                   mean, std)


# ---------------------------------------------------------------------------------------------------
# The embedded default: cluttered digits
# ---------------------------------------------------------------------------------------------------

def load_digit_bitmaps() -> tuple[np.ndarray, np.ndarray]:
    """The shipped UCI digits: images (1797, 8, 8) uint8 in 0..16, labels (1797,) uint8."""
    path = ASSETS / "digits.npz"
    if not path.is_file():
        raise DataError(f"the embedded digits are missing: expected {path} (regenerate it with "
                        "fastssl/train/assets/make_digits.py, or reinstall fastssl)")
    with np.load(path) as f:
        return f["images"], f["labels"]


def render_digits(bitmaps: Tensor, generator: torch.Generator, size: int = 32, clutter: float = 1.0,
                  extent=(0.75, 1.0), max_angle: float = 10.0, shift: float = 1.0, noise: float = 0.03,
                  contrast=(0.5, 0.7), bg_range=(0.05, 0.3), sat_range=(0.3, 0.8)) -> Tensor:
    """Render (N, 8, 8) digit bitmaps (values 0..16) into (N, 3, size, size) uint8 cluttered RGB images.

    Per image: the digit is scaled to `extent` (fractions of the image side), rotated by up to
    `max_angle` degrees, shifted anywhere that keeps it inside the frame (`shift` = 1) and painted over a
    background of the same random hue (saturation in `sat_range`, background value in `bg_range`, the
    digit `contrast` brighter); then smooth colour noise (a 4x4 random field upsampled, amplitude
    0.15·clutter) and two random bars (opacity 0.4·clutter) are added to the background, and Gaussian
    pixel noise of std `noise` to everything.
    """
    n = bitmaps.shape[0]
    g = generator

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    src = bitmaps.float().div(16.0)[:, None]                        # (N, 1, 8, 8) ink in [0, 1]
    # affine_grid maps output coords in [-1, 1] to input coords: x_in = A x_out + t.
    extent = u(n, lo=extent[0], hi=extent[1])                                   # digit side / image side
    angle = u(n, lo=-max_angle, hi=max_angle) * (math.pi / 180)
    room = 1.0 - extent                                             # centre offset that keeps it inside
    cx, cy = u(n, lo=-1, hi=1) * room * shift, u(n, lo=-1, hi=1) * room * shift
    cos, sin = torch.cos(angle) / extent, torch.sin(angle) / extent
    theta = torch.stack([torch.stack([cos, -sin, -(cos * cx - sin * cy)], 1),
                         torch.stack([sin, cos, -(sin * cx + cos * cy)], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    ink = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (N,1,S,S)

    # One random hue per image for digit and background (a hue jitter of ±0.5 turn, the augmentation's
    # maximum, makes it uninformative); the digit is always brighter than the background, because a
    # polarity flip is a nuisance that no augmentation undoes.
    hue = u(n)
    sat = u(n, lo=sat_range[0], hi=sat_range[1])
    bg_v = u(n, lo=bg_range[0], hi=bg_range[1])
    fg_v = (bg_v + u(n, lo=contrast[0], hi=contrast[1])).clamp(max=1.0)
    bg = hsv_to_rgb(torch.stack([hue, sat, bg_v], 1)[:, :, None, None])
    fg = hsv_to_rgb(torch.stack([hue, sat, fg_v], 1)[:, :, None, None])

    field = F.interpolate(u(n, 3, 4, 4, lo=-1, hi=1), size=(size, size), mode="bilinear", align_corners=False)
    background = bg + 0.15 * clutter * field
    ys = torch.arange(size).float()[None, :, None]
    xs = torch.arange(size).float()[None, None, :]
    for _ in range(2):                                              # random bars (horizontal or vertical)
        horizontal = (torch.rand(n, generator=g) < 0.5)[:, None, None]
        pos = u(n, lo=0, hi=size)[:, None, None]
        width = u(n, lo=1, hi=3)[:, None, None]
        start = u(n, lo=0, hi=size / 2)[:, None, None]
        length = u(n, lo=size / 4, hi=size)[:, None, None]
        across = torch.where(horizontal, ys, xs)
        along = torch.where(horizontal, xs, ys)
        bar = ((across - pos).abs() < width / 2) & (along >= start) & (along < start + length)
        colour = u(n, 3, lo=0, hi=1)[:, :, None, None]
        alpha = 0.4 * clutter * bar[:, None].float()
        background = background * (1 - alpha) + colour * alpha
    image = background * (1 - ink) + fg * ink + noise * torch.randn(n, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def load_digits(render_seed: int = 0, copies: int = 1, test_fraction: float = 0.25, clutter: float = 1.0,
                limit: Optional[int] = None, **render) -> Dataset:
    """The embedded default: cluttered 32x32 renderings of the UCI digits.

    A fixed stratified split (by `render_seed`) puts `test_fraction` of the 1,797 digits in the test
    split; each train digit is rendered `copies` times (independent nuisances), each test digit once.
    `limit` keeps a random `limit` train and max(limit // 3, 10) test digits (for tests and smoke runs).
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = load_digit_bitmaps()
    images, labels = torch.from_numpy(images.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))
    g = torch.Generator().manual_seed(render_seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):                                             # stratified split
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(len(idx) * test_fraction)]] = True
    tr, te = torch.nonzero(~test_mask).flatten(), torch.nonzero(test_mask).flatten()
    if limit is not None:  # subset before rendering: smoke tests should not pay for 1,797 renderings
        tr = tr[torch.randperm(len(tr), generator=g)[:limit]]
        te = te[torch.randperm(len(te), generator=g)[: max(limit // 3, 10)]]
    tr_bitmaps = images[tr].repeat(copies, 1, 1)
    train_x = render_digits(tr_bitmaps, g, clutter=clutter, **render)
    train_y = labels[tr].repeat(copies)
    test_x = render_digits(images[te], g, clutter=clutter, **render)
    test_y = labels[te]
    perm = torch.randperm(len(train_y), generator=g)                # interleave copies and classes
    train_x, train_y = train_x[perm], train_y[perm]
    return _make("digits", train_x, train_y, test_x, test_y, [str(i) for i in range(10)])


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, python-pickle format
# ---------------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                "batches.meta", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(root: str | Path, name: str = "cifar10") -> Dataset:
    """CIFAR-10 or CIFAR-100 in the python-pickle format of https://www.cs.toronto.edu/~kriz/cifar.html.

    `root` is either the extracted folder (cifar-10-batches-py/ or cifar-100-python/) or its parent.
    Each batch file is a pickled dict with b"data" (N, 3072) uint8 (1024 R, then G, then B, row-major 32x32)
    and b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100).
    """
    if name not in _CIFAR:
        raise ValueError(f"name must be one of {tuple(_CIFAR)}, got {name!r}")
    folder, train_files, test_files, label_key, meta_file, names_key = _CIFAR[name]
    root = Path(root)
    base = root if (root / train_files[0]).is_file() else root / folder
    layout = (f"expected {root}/{folder}/ (or {root}/ itself) holding {', '.join(train_files + test_files)} "
              f"as in the python version of {name.upper()} (https://www.cs.toronto.edu/~kriz/cifar.html)")
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise DataError(f"{name} not found: missing {', '.join(missing)}; {layout}")

    def read(files):
        xs, ys = [], []
        for f in files:
            try:
                d = _unpickle(base / f)
                data = np.asarray(d[b"data"], dtype=np.uint8)
                ys.append(np.asarray(d[label_key], dtype=np.int64))
            except (KeyError, pickle.UnpicklingError, EOFError, TypeError) as e:
                raise DataError(f"{base / f} is not a {name} batch ({type(e).__name__}: {e}); {layout}") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(ys[-1]):
                raise DataError(f"{base / f}: data must be (N, 3072) with N labels, got {data.shape}; {layout}")
            xs.append(data.reshape(-1, 3, 32, 32))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    n_classes = 10 if name == "cifar10" else 100
    classes = [str(i) for i in range(n_classes)]
    if (base / meta_file).is_file():
        try:
            classes = [c.decode() for c in _unpickle(base / meta_file)[names_key]]
        except (KeyError, pickle.UnpicklingError, EOFError, AttributeError):
            pass  # names are cosmetic; the labels are what matters
    return _make(name, train_x, train_y, test_x, test_y, classes)


# ---------------------------------------------------------------------------------------------------
# Generic image folder
# ---------------------------------------------------------------------------------------------------

def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_images(root: Path, classes: list[str], size: int, image_mod) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with image_mod.open(f) as im:
                    im = im.convert("RGB").resize((size, size), image_mod.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())
            except OSError as e:
                raise DataError(f"cannot read image {f}: {e}") from None
            ys.append(label)
    if not xs:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def load_image_folder(root: str | Path, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Images in one sub-folder per class, resized to image_size x image_size RGB (needs Pillow).

    Layout: either root/train/<class>/*.png and root/test/<class>/*.png (or root/val/), or
    root/<class>/*.png, split at random (fixed by `seed`) with `test_fraction` of each class in the test
    split. Class names are the sorted sub-folder names of the train folder.
    """
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    root = Path(root)
    layout = (f"expected {root}/<class>/<image> (one sub-folder per class) or {root}/train/<class>/<image> "
              f"with {root}/test/<class>/<image>; image files {', '.join(IMAGE_SUFFIXES)}")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; {layout}")
    test_dir = next((root / t for t in ("test", "val") if (root / t).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = [p.name for p in _class_dirs(root / "train")]
        train_x, train_y = _read_images(root / "train", classes, image_size, Image)
        test_x, test_y = _read_images(test_dir, classes, image_size, Image)
    else:
        classes = [p.name for p in _class_dirs(root)]
        x, y = _read_images(root, classes, image_size, Image)
        g = torch.Generator().manual_seed(seed)
        test_mask = torch.zeros(len(y), dtype=torch.bool)
        for c in range(len(classes)):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            test_mask[idx[: round(len(idx) * test_fraction)]] = True
        train_x, train_y, test_x, test_y = x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]
    if len(classes) < 2:
        raise DataError(f"image folder {root} has {len(classes)} class folder(s), need at least 2; {layout}")
    if len(train_y) < 2 or len(test_y) < 1:
        raise DataError(f"image folder {root} has {len(train_y)} train and {len(test_y)} test images; {layout}")
    return _make(f"folder:{root.name}", train_x, train_y, test_x, test_y, classes)


def load_dataset(name: str, data_dir: Optional[str] = None, *, image_size: int = 32, render_seed: int = 0,
                 copies: int = 1, clutter: float = 1.0, limit: Optional[int] = None) -> Dataset:
    """Dispatch on `name` (one of DATASETS). `data_dir` is required for cifar10/cifar100/folder."""
    if name == "digits":
        return load_digits(render_seed=render_seed, copies=copies, clutter=clutter, limit=limit)
    if name not in DATASETS:
        raise DataError(f"dataset must be one of {DATASETS}, got {name!r}")
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs --data-dir (the folder holding it)")
    ds = load_cifar(data_dir, name) if name.startswith("cifar") else load_image_folder(data_dir, image_size)
    if limit is not None:
        ds = _make(ds.name, ds.train_x[:limit], ds.train_y[:limit], ds.test_x[: max(limit // 3, 10)],
                   ds.test_y[: max(limit // 3, 10)], ds.classes)
    return ds
