"""Trainer data: the embedded digits, CIFAR pickles and image folders written here in their real formats."""

import pickle

import numpy as np
import pytest
import torch

from fastssl.train import data
from fastssl.train.data import DataError, load_cifar, load_dataset, load_digits, load_image_folder


def test_digit_asset_is_the_uci_set():
    images, labels = data.load_digit_bitmaps()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and labels.shape == (1797,)
    assert images.max() == 16 and images.min() == 0
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.sum() == 1797 and counts.min() >= 170 and counts.max() <= 190


def test_digits_render_deterministic_split_and_shapes():
    a = load_digits(limit=60)
    b = load_digits(limit=60)
    c = load_digits(limit=60, render_seed=1)
    assert a.train_x.shape == (60, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (20, 3, 32, 32)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.num_classes == 10 and int(a.train_y.max()) <= 9


def test_digits_full_split_is_stratified_and_disjoint():
    ds = load_digits()
    assert ds.train_x.shape[0] + ds.test_x.shape[0] == 1797
    test_counts = torch.bincount(ds.test_y, minlength=10)
    assert test_counts.min() >= 40 and test_counts.max() <= 48  # 25 % of 174..183 per class
    assert len(ds.mean) == 3 and all(0 < s for s in ds.std)


def test_render_places_a_brighter_digit():
    bitmap = torch.zeros(1, 8, 8, dtype=torch.long)
    bitmap[0, 2:6, 3:5] = 16  # a bar of ink
    g = torch.Generator().manual_seed(0)
    img = data.render_digits(bitmap, g, clutter=0.0, noise=0.0).float()
    luma = img.mean(1)[0]
    assert luma.max() - luma.min() > 0.4 * 255  # the ink is visible over the background
    empty = data.render_digits(torch.zeros(1, 8, 8, dtype=torch.long), torch.Generator().manual_seed(0),
                               clutter=0.0, noise=0.0).float()
    assert empty.std(dim=(2, 3)).max() < 1.0  # no ink, no clutter, no noise: a flat background


def _write_cifar(root, name, n_train, n_test, rng):
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        files = [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]
        key, meta, names = b"labels", "batches.meta", b"label_names"
        n_classes = 10
    else:
        folder = root / "cifar-100-python"
        folder.mkdir()
        files = [("train", n_train), ("test", n_test)]
        key, meta, names = b"fine_labels", "meta", b"fine_label_names"
        n_classes = 100
    written = {}
    for fname, n in files:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: rng.integers(0, n_classes, n).tolist()}
        written[fname] = d
        with open(folder / fname, "wb") as f:
            pickle.dump(d, f)
    with open(folder / meta, "wb") as f:
        pickle.dump({names: [f"c{i}".encode() for i in range(n_classes)]}, f)
    return folder, written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_format(tmp_path, name):
    rng = np.random.default_rng(0)
    folder, written = _write_cifar(tmp_path, name, 4, 3, rng)
    for root in (tmp_path, folder):  # the parent or the extracted folder itself
        ds = load_cifar(root, name)
        n_train = 20 if name == "cifar10" else 4
        assert ds.train_x.shape == (n_train, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
        first = written["data_batch_1" if name == "cifar10" else "train"]
        row = first[b"data"][1]
        # layout: 1024 red values, then green, then blue, each row-major 32x32
        assert ds.train_x[1, 0, 0, 5].item() == row[5]
        assert ds.train_x[1, 1, 2, 3].item() == row[1024 + 2 * 32 + 3]
        assert ds.train_x[1, 2, 31, 31].item() == row[3071]
        key = b"labels" if name == "cifar10" else b"fine_labels"
        assert ds.train_y[:4].tolist() == first[key]
        assert ds.classes[3] == "c3" and ds.num_classes == (10 if name == "cifar10" else 100)


def test_cifar_missing_names_layout(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py.*data_batch_1"):
        load_cifar(tmp_path, "cifar10")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar100")


def test_cifar_corrupt_batch(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for f in ("train", "test"):
        (folder / f).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a cifar100 batch"):
        load_cifar(tmp_path, "cifar100")


def _png(path, colour, size=(12, 9)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


def test_image_folder_flat_and_split_layouts(tmp_path):
    pytest.importorskip("PIL", reason="the image-folder loader needs Pillow")
    flat = tmp_path / "flat"
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for cls, colour in colours.items():
        (flat / cls).mkdir(parents=True)
        for i in range(5):
            _png(flat / cls / f"{i}.png", colour)
    (flat / "cat" / "notes.txt").write_text("ignored")
    ds = load_image_folder(flat, image_size=16)
    assert ds.classes == ["cat", "dog"]
    assert ds.train_x.shape[1:] == (3, 16, 16) and len(ds.train_y) + len(ds.test_y) == 10
    assert len(ds.test_y) == 2  # 20 % of each class
    for x, y in zip(ds.train_x, ds.train_y):  # pixels and labels stay together
        assert tuple(x[:, 0, 0].tolist()) == colours[ds.classes[y]]

    split = tmp_path / "split"
    for part, n in (("train", 3), ("val", 2)):
        for cls, colour in colours.items():
            (split / part / cls).mkdir(parents=True)
            for i in range(n):
                _png(split / part / cls / f"{i}.jpg", colour)
    ds = load_dataset("folder", str(split), image_size=8)
    assert len(ds.train_y) == 6 and len(ds.test_y) == 4 and ds.train_x.shape[-1] == 8


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL", reason="the image-folder loader needs Pillow")
    with pytest.raises(DataError, match="does not exist.*one sub-folder per class"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "only").mkdir()
    _png(tmp_path / "only" / "a.png", (0, 0, 0))
    with pytest.raises(DataError, match="1 class folder"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="dataset must be one of"):
        load_dataset("imagenet", str(tmp_path))
