"""Frozen-feature evaluation of an encoder: linear probe, k-NN, and Huang et al. (2023)'s diagnostics.

* linear probe: multinomial logistic regression on standardised frozen features of the train split
  (full-batch L-BFGS on mean cross-entropy + wd·‖W‖²), accuracy on the test split;
* k-NN (Wu et al. 2018, as in SimCLR/DINO evaluations): cosine similarity of L2-normalised features,
  the k nearest train samples vote with weight exp(s/T), T = 0.07;
* alignment E‖n(f(x1)) − n(f(x2))‖² over two augmented views, uniformity log E exp(−2‖n(f_i) − n(f_j)‖²),
  class-centre divergence max_{k≠l} μ_kᵀμ_l (fastssl.metrics), on encoder features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import metrics

__all__ = ["extract_features", "knn_accuracy", "linear_probe_accuracy", "representation_metrics",
           "calibrate_batchnorm"]


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Tensor, transform, device: torch.device, batch_size: int = 512,
                     autocast=None) -> Tensor:
    """encoder(transform(images)) in eval mode, batched: (N, 3, H, W) uint8 -> (N, F) float32 on `device`."""
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = transform(images[i: i + batch_size].to(device, non_blocking=True))
            if autocast is not None:
                with autocast():
                    f = encoder(x)
            else:
                f = encoder(x)
            out.append(f.float())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def calibrate_batchnorm(encoder: nn.Module, images: Tensor, transform, device: torch.device, batch_size: int = 256,
                        max_images: int = 2048) -> None:
    """Set BatchNorm running statistics to the cumulative batch statistics of (up to) `max_images` images.

    A randomly initialised network's running stats are (0, 1), which would make its eval-mode features
    meaningless; the random-init baseline is calibrated with this so the comparison is fair. Modifies
    `encoder` (the baseline copy) in place; no-op without BatchNorm.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    was_training = encoder.training
    encoder.train()
    for i in range(0, min(images.shape[0], max_images), batch_size):
        encoder(transform(images[i: i + batch_size].to(device)))
    for m, mom in saved:
        m.momentum = mom
    encoder.train(was_training)


def knn_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, k: int = 20,
                 t: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted k-NN accuracy: train_f (N, F), test_f (M, F), labels int (N,), (M,)."""
    if train_f.shape[0] == 0 or test_f.shape[0] == 0:
        raise ValueError(f"k-NN needs train and test features, got {tuple(train_f.shape)} and {tuple(test_f.shape)}")
    c = int(num_classes if num_classes is not None else int(max(train_y.max(), test_y.max())) + 1)
    k = min(k, train_f.shape[0])
    a, b = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    train_y = train_y.to(a.device)
    correct = 0
    for i in range(0, b.shape[0], chunk):
        sim, idx = (b[i: i + chunk] @ a.T).topk(k, dim=1)                  # (m, k)
        votes = torch.zeros(sim.shape[0], c, device=a.device)
        votes.scatter_add_(1, train_y[idx], torch.exp(sim / t))
        correct += (votes.argmax(1) == test_y[i: i + chunk].to(a.device)).sum().item()
    return correct / b.shape[0]


def linear_probe_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor,
                          weight_decay: float = 5e-4, max_iter: int = 300, num_classes: int | None = None) -> float:
    """Test accuracy of a logistic-regression probe fit on standardised train features (full-batch L-BFGS)."""
    c = int(num_classes if num_classes is not None else int(max(train_y.max(), test_y.max())) + 1)
    x = train_f.float()
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_f.float() - mean) / std
    y = train_y.to(x.device)
    with torch.enable_grad():
        w = torch.zeros(x.shape[1], c, device=x.device, requires_grad=True)
        b = torch.zeros(c, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return ((xt @ w + b).argmax(1) == test_y.to(x.device)).float().mean().item()


@torch.no_grad()
def representation_metrics(encoder: nn.Module, images: Tensor, labels: Tensor, augment, device: torch.device,
                           seed: int = 1234, autocast=None) -> dict:
    """alignment (two augmented views, a fixed generator), uniformity and class-centre divergence.

    Computed on L2-normalised encoder features of `images` (eval mode), so the numbers are comparable
    across losses and epochs.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    plain = extract_features(encoder, images, augment.plain, device, autocast=autocast)
    # each batch gets two views from one generator stream: a fixed pair per image for every epoch
    v1, v2 = [], []
    for i in range(0, images.shape[0], 512):
        x = images[i: i + 512].to(device)
        v1.append(augment(x, g))
        v2.append(augment(x, g))
    ident = lambda t: t  # noqa: E731  (views are already transformed)
    f1 = extract_features(encoder, torch.cat(v1), ident, device, autocast=autocast)
    f2 = extract_features(encoder, torch.cat(v2), ident, device, autocast=autocast)
    zn = F.normalize(plain, dim=1)
    return {
        "alignment": metrics.alignment(F.normalize(f1, dim=1), F.normalize(f2, dim=1)).item(),
        "uniformity": metrics.uniformity(zn).item(),
        "divergence": metrics.class_center_divergence(plain, labels.to(plain.device)).item(),
    }
