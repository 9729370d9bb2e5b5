"""`python -m fastssl.train.plot RUN_DIR`: loss and metric curves of a trainer run, as PNG files.

Reads RUN_DIR/log.jsonl (written by fastssl.train) and writes RUN_DIR/curves.png: the step loss and the
learning rate, then per epoch the k-NN accuracy, alignment, uniformity and class-centre divergence.
Needs matplotlib (`pip install fastssl[plot]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(run_dir: Path) -> tuple[list, list]:
    """(step records, epoch records) of RUN_DIR/log.jsonl."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be the --out folder of a fastssl.train run")
    steps, epochs = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                (steps if rec.get("type") == "step" else epochs if rec.get("type") == "epoch" else []).append(rec)
    return steps, epochs


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of `run_dir` into `out` (default RUN_DIR/curves.png); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or fastssl[plot])") from None
    steps, epochs = read_log(Path(run_dir))
    panels = [("loss", "loss (per step)", steps, "step"), ("lr", "learning rate", steps, "step"),
              ("knn_acc", "k-NN accuracy", epochs, "epoch"), ("alignment", "alignment (lower better)", epochs, "epoch"),
              ("uniformity", "uniformity (lower better)", epochs, "epoch"),
              ("divergence", "class-centre divergence", epochs, "epoch")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title, recs, x) in zip(axes.flat, panels):
        pts = [(r[x], r[key]) for r in recs if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="." if x == "epoch" else None)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    fig.suptitle(f"fastssl.train: {Path(run_dir).resolve().name}")
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastssl.train.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a fastssl.train run")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    try:
        path = plot(args.run_dir, args.out)
    except (FileNotFoundError, ImportError, ValueError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
