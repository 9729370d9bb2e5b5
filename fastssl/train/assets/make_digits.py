"""Regenerate `digits.npz`, the embedded default dataset of `python -m fastssl.train`.

Source: the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin and C. Kaynak,
1998; https://archive.ics.uci.edu/dataset/80), licensed CC BY 4.0; this is the 1,797-image copy of its
test set that scikit-learn bundles as `sklearn.datasets.load_digits` (43 writers' digits, each an 8x8
block count of a 32x32 bitmap, integers 0..16, ten classes). We ship it so that the trainer's default run
needs no download and scikit-learn is not a dependency; it is stored unchanged, as uint8.

Usage (scikit-learn only has to exist while this runs, e.g. `pip install --target /tmp/skl scikit-learn`):

    PYTHONPATH=/tmp/skl python fastssl/train/assets/make_digits.py
    python fastssl/train/assets/make_digits.py --csv /tmp/skl/sklearn/datasets/data/digits.csv.gz

The file holds `images` (1797, 8, 8) uint8 in 0..16 and `labels` (1797,) uint8 in 0..9, in the
original order.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_rows(csv: str | None) -> np.ndarray:
    """(1797, 65) integer rows: 64 pixels then the label, from sklearn or its bundled csv.gz."""
    if csv is None:
        from sklearn.datasets import load_digits  # only needed here, never at runtime

        d = load_digits()
        return np.concatenate([d.data.astype(np.int64), d.target[:, None].astype(np.int64)], axis=1)
    opener = gzip.open if csv.endswith(".gz") else open
    with opener(csv, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=None, help="sklearn's digits.csv.gz (default: import sklearn)")
    parser.add_argument("--out", default=str(HERE / "digits.npz"), help="output file (default: %(default)s)")
    args = parser.parse_args()
    rows = load_rows(args.csv)
    if rows.shape != (1797, 65) or rows.min() < 0 or rows[:, :64].max() > 16 or rows[:, 64].max() > 9:
        raise SystemExit(f"unexpected digits data: shape {rows.shape}, range {rows.min()}..{rows.max()}")
    images = rows[:, :64].reshape(-1, 8, 8).astype(np.uint8)
    labels = rows[:, 64].astype(np.uint8)
    np.savez_compressed(args.out, images=images, labels=labels)
    print(f"wrote {args.out}: {images.shape[0]} images, {Path(args.out).stat().st_size} bytes")


if __name__ == "__main__":
    main()
