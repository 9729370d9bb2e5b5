"""Trainer augmentations (pure PyTorch, batched), models, evaluation helpers, LARS and the schedule."""

import math

import pytest
import torch

from fastssl.train.augment import Augment, hsv_to_rgb, rgb_to_grayscale, rgb_to_hsv
from fastssl.train.engine import LARS, warmup_cosine
from fastssl.train.evaluate import knn_accuracy, linear_probe_accuracy
from fastssl.train.models import ResNet18, SmallCNN, build_model

OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_identity_settings_return_the_image():
    x = _images()
    y = Augment(size=16, **OFF)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x.float() / 255, atol=1e-5, rtol=0)


def test_flip_and_normalisation():
    x = _images()
    kw = dict(OFF, flip_p=1.0, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    y = Augment(size=16, **kw)(x)
    expect = (x.float().flip(-1) / 255 - torch.tensor(kw["mean"]).view(1, 3, 1, 1)) / torch.tensor(kw["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=0)


def test_crop_zooms_into_the_image():
    # a 2x2 checkerboard of 8x8 blocks; a crop of area <= 1/4 at most touches a few blocks but is resized
    # back to 16x16, so a single view never reproduces the full pattern and stays within the input range
    x = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    x[:, :, :8, :8] = 255
    x[:, :, 8:, 8:] = 255
    aug = Augment(size=16, **dict(OFF, crop_scale=(0.05, 0.1)))
    y = aug(x, torch.Generator().manual_seed(3))
    assert y.shape == (4, 3, 16, 16) and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, x.float() / 255)


def test_views_are_seeded_and_differ():
    x = _images()
    aug = Augment(size=12)
    v1 = aug.views(x, 3, torch.Generator().manual_seed(5))
    v2 = aug.views(x, 3, torch.Generator().manual_seed(5))
    assert v1.shape == (3, 6, 3, 12, 12) and v1.dtype == torch.float32
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    assert not torch.allclose(v1[0], v1[1])
    assert torch.equal(x, _images())  # input not modified


def test_grayscale_and_hsv():
    x = _images()
    y = Augment(size=16, **dict(OFF, gray_p=1.0))(x)
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(y[:, 0], luma.float() / 255, atol=1e-5, rtol=0)
    rgb = torch.rand(50, 3, 4, 4)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5, rtol=0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    hsv = rgb_to_hsv(red)
    hsv[:, 0] = (hsv[:, 0] + 1 / 3) % 1.0  # a third of a turn: red -> green
    torch.testing.assert_close(hsv_to_rgb(hsv), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1), atol=1e-6, rtol=0)
    assert rgb_to_grayscale(red).item() == pytest.approx(0.299)


def test_brightness_only_jitter_scales_within_strength():
    x = torch.full((64, 3, 8, 8), 100, dtype=torch.uint8)
    aug = Augment(size=8, **dict(OFF, jitter_p=1.0), brightness=0.3, contrast=0.0, saturation=0.0, hue=0.0)
    ratio = aug(x, torch.Generator().manual_seed(0)) / (100 / 255)
    assert ratio.min() >= 0.7 - 1e-5 and ratio.max() <= 1.3 + 1e-5
    per_image = ratio[:, 0, 0, 0]
    assert per_image.std() > 0.05  # each image draws its own factor
    assert torch.allclose(ratio, per_image.view(-1, 1, 1, 1).expand_as(ratio))


def test_blur_keeps_constants_and_smooths_noise():
    flat = torch.full((3, 3, 16, 16), 77, dtype=torch.uint8)
    aug = Augment(size=16, **dict(OFF, blur_p=1.0), blur_sigma=(1.5, 2.0))
    torch.testing.assert_close(aug(flat), flat.float() / 255, atol=1e-5, rtol=0)
    noise = _images(3, 16)
    assert aug(noise).std() < 0.8 * (noise.float() / 255).std()


@pytest.mark.parametrize("kw", [dict(flip_p=1.5), dict(crop_scale=(0.5, 0.2)), dict(hue=0.7), dict(brightness=-0.1)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Augment(**kw)


def test_models_shapes():
    x = torch.randn(3, 3, 32, 32)
    assert SmallCNN(width=4)(x).shape == (3, 16)
    assert ResNet18(width=4)(x).shape == (3, 32)
    m = build_model("resnet18", width=4, proj_hidden=8, proj_dim=5)
    assert m(x).shape == (3, 5) and m.encoder(x).shape == (3, 32)
    assert sum(p.numel() for p in ResNet18().parameters()) == pytest.approx(11.17e6, rel=0.01)  # ResNet-18's size
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vit")
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model("small-cnn", norm="instance")


def test_knn_and_linear_probe_on_separable_and_random_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    y = torch.arange(200) % 4
    f = centres[y] + torch.randn(200, 16, generator=g)
    assert knn_accuracy(f[:150], y[:150], f[150:], y[150:], k=5) == 1.0
    assert linear_probe_accuracy(f[:150], y[:150], f[150:], y[150:]) == 1.0
    noise = torch.randn(400, 16, generator=g)
    ry = torch.randint(0, 4, (400,), generator=g)
    assert linear_probe_accuracy(noise[:300], ry[:300], noise[300:], ry[300:]) < 0.45  # chance is 0.25


def test_lars_step_matches_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))   # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])  # ‖g‖ = 1
    opt = LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.01)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * 0.01 * 5 * torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 0.5]))  # 1-d: plain SGD


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert all(warmup_cosine(s, 100, 10) >= warmup_cosine(s + 1, 100, 10) for s in range(10, 99))
    assert warmup_cosine(3, 50, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 50)))
