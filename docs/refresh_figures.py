"""Rewrite the measured figures of README.md and docs/trainer.md from a trainer run's summary.json.

The docs quote the default run of `python -m fastssl.train`. Typing those numbers by hand lets them
drift from what the code prints, so they live in marked sections that this script regenerates:

    <!-- figures:NAME -->
    ...generated text, replaced on every run...
    <!-- /figures:NAME -->

NAME is one of RENDERERS below. Usage, after a default run:

    python -m fastssl.train --out runs/default
    python docs/refresh_figures.py runs/default [--date YYYY-MM-DD] [--machine "a 2-core ... CPU"]

The date defaults to the day summary.json was written, the machine to this machine's CPU (or GPU,
for a CUDA run): run the script where the run ran, or say where with --machine. `--check` rewrites
nothing and exits 1 if a file is out of date. A summary whose options differ from the defaults is
refused, because the marked sections describe the default run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]

#: The files with marked sections, relative to the repository root.
FILES = ("README.md", "docs/trainer.md")

#: Options that do not change the result of a run (where it writes, how it prints, how many threads).
NEUTRAL_OPTIONS = {"out", "resume", "progress", "save_every", "log_every", "threads", "device"}

_BEGIN = re.compile(r"<!-- figures:([a-z0-9-]+) -->")


def _end_marker(name: str) -> str:
    return f"<!-- /figures:{name} -->"


def _margin(summary: dict) -> float:
    """Points of linear-probe accuracy that self-supervision adds, as the trainer prints it."""
    return 100 * (summary["linear_probe_acc"] - summary["baseline_linear_probe_acc"])


def _where(date: str, machine: str) -> str:
    return f"measured {date} on {machine}"


def render_readme_default_run(summary: dict, date: str, machine: str) -> str:
    """README's sentence on the default run."""
    return (
        f"The default run (`python -m fastssl.train`: SimCLR on the default data, seed 0), "
        f"{_where(date, machine)}: linear probe {summary['linear_probe_acc']:.3f} vs "
        f"{summary['baseline_linear_probe_acc']:.3f} at random initialisation ({_margin(summary):+.1f} points), "
        f"k-NN {summary['knn_acc']:.3f} vs {summary['baseline_knn_acc']:.3f}, {summary['seconds']:.0f} s for "
        f"the whole run."
    )


def render_trainer_default_run(summary: dict, date: str, machine: str) -> str:
    """docs/trainer.md's table of the default run's summary, both encoders side by side."""
    rows = [
        ("linear probe accuracy", "linear_probe_acc"),
        ("k-NN accuracy (k = 20)", "knn_acc"),
        ("alignment (lower is better)", "alignment"),
        ("uniformity (lower is more uniform)", "uniformity"),
        ("class-centre divergence (lower is better)", "divergence"),
    ]
    lines = [
        f"`python -m fastssl.train`, {_where(date, machine)} (torch {summary['torch']}, "
        f"device {summary['device']}): {summary['steps']} steps in {summary['train_seconds']:.0f} s of training, "
        f"{summary['seconds']:.0f} s for the whole run, {summary['images_per_s']:.0f} train images/s, "
        f"final loss {summary['loss']:.4f}.",
        "",
        "| `summary.json` | SSL encoder | random init (`baseline_*`) |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {summary[key]:.3f} | {summary['baseline_' + key]:.3f} |" for label, key in rows]
    lines += ["", f"Self-supervision adds {_margin(summary):+.1f} points of linear-probe accuracy."]
    return "\n".join(lines)


#: Section name -> renderer(summary, date, machine) -> the section's new text.
RENDERERS: dict[str, Callable[[dict, str, str], str]] = {
    "readme-default-run": render_readme_default_run,
    "trainer-default-run": render_trainer_default_run,
}


def rewrite(text: str, summary: dict, date: str, machine: str) -> str:
    """`text` with every marked section replaced by its renderer's output; everything else untouched.

    Raises ValueError for a section name without a renderer or a begin marker without its end marker.
    """
    out, pos = [], 0
    for match in _BEGIN.finditer(text):
        if match.start() < pos:
            raise ValueError(f"figures:{match.group(1)} begins inside another marked section")
        name = match.group(1)
        if name not in RENDERERS:
            raise ValueError(f"unknown figures section {name!r}; known: {', '.join(RENDERERS)}")
        end = text.find(_end_marker(name), match.end())
        if end < 0:
            raise ValueError(f"figures:{name} has no end marker {_end_marker(name)!r}")
        out += [text[pos : match.end()], "\n", RENDERERS[name](summary, date, machine), "\n"]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def check_default_run(summary: dict) -> None:
    """ValueError unless `summary` comes from a run with every result-changing option at its default."""
    from fastssl.train import Config

    defaults = Config().to_dict()
    given = summary.get("config", {})
    differ = sorted(
        key for key in defaults if key not in NEUTRAL_OPTIONS and _plain(given.get(key)) != _plain(defaults[key])
    )
    if differ:
        raise ValueError(
            "the marked sections describe the default run, but this run changed "
            + ", ".join(f"{k}={given.get(k)!r} (default {defaults[k]!r})" for k in differ)
        )


def _plain(value):
    """JSON turns tuples into lists; compare both as lists."""
    return list(value) if isinstance(value, (tuple, list)) else value


def this_machine(device: str) -> str:
    """A short description of this machine's CPU, or of GPU 0 for a CUDA run."""
    if device.startswith("cuda"):
        import torch

        return f"one {torch.cuda.get_device_name(0)} GPU" if torch.cuda.is_available() else "a CUDA GPU"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"a {os.cpu_count()}-core {model} CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the --out folder of a default run (holds summary.json)")
    parser.add_argument("--date", help="date of the run, YYYY-MM-DD (default: when summary.json was written)")
    parser.add_argument("--machine", help="where the run ran, e.g. 'a 2-core Intel Xeon CPU VM' (default: here)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)

    path = args.run / "summary.json"
    summary = json.loads(path.read_text())
    check_default_run(summary)
    date = args.date or _dt.date.fromtimestamp(path.stat().st_mtime).isoformat()
    machine = args.machine or this_machine(summary.get("device", "cpu"))
    stale = []
    for name in FILES:
        file = REPO / name
        old = file.read_text()
        new = rewrite(old, summary, date, machine)
        if new != old:
            stale.append(name)
            if not args.check:
                file.write_text(new)
    verb = "out of date" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "every marked section is up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
