"""Turn the suite's pytest-benchmark JSON into Markdown tables, PNG plots and a RESULTS.md section.

    python benchmarks/report.py RESULTS.json [--out DIR] [--results-md benchmarks/RESULTS.md]
                                [--max-batch max_batch.json] [--no-results-md]

Reads the JSON written by ``pytest benchmarks/ --benchmark-only --benchmark-json RESULTS.json``
(each benchmark's ``extra_info`` is documented in benchmarks/README.md) and writes:

* ``DIR/report.md``: one table per loss — time, TFLOP/s, % of the same-run matmul peak, peak
  memory, speed-up vs the eager reference and vs torch.compile(reference) — then the GPU
  targets (met, missed by how much, or not in this run) and the maximum batch (max_batch.py's
  JSON: ``--max-batch``, or ``max_batch.json`` beside RESULTS.json when it exists);
* ``DIR/<loss>_<dtype>_<fixed size>.png``: time and peak memory against the batch size 2N (or
  against D, for the losses whose sweep is over D), log-log, one line per implementation, a cross
  where one ran out of memory — for every loss, dtype and fixed size with at least two sizes;
* the generated section of RESULTS.md for the JSON's device (``cpu`` or ``cuda``), between the
  markers ``<!-- report.py:begin DEVICE -->`` and ``<!-- report.py:end DEVICE -->``; the rest of the
  file (hand-written notes, the other device's section) is kept. Without the markers the section
  is appended.

Speed-up "vs X" = X's median time / this row's median time at the same loss, mode, dtype and size
(above 1: this row is faster). Only the JSON is read: no torch import, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works both as a script and with -m

from formatting import SHORT_DTYPE, format_share  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
#: Row order of implementations within a size (unknown ones follow, sorted).
PROVIDER_ORDER = (
    "fastssl-triton", "fastssl-cuda", "fastssl-torch", "fastssl-auto", "reference", "reference-compiled",
    "materialising", "materialising-compiled", "materialising-bf16", "materialising-bf16-compiled", "lightly", "inf_cl",
)
#: What each row's time is compared with: (provider, column, its name in "<name> OOM"). The first
#: ALWAYS_SHOWN columns are in every table, the others where the loss has a row of that provider.
BASELINES = (
    ("reference", "vs reference", "ref"),
    ("reference-compiled", "vs compile", "compile"),
    ("materialising", "vs formula eager", "formula"),
    ("materialising-compiled", "vs formula compiled", "formula compiled"),
    ("materialising-bf16", "vs bf16 eager", "bf16"),
    ("materialising-bf16-compiled", "vs bf16 compiled", "bf16 compiled"),
    ("lightly", "vs lightly", "lightly"),
    ("inf_cl", "vs Inf-CL", "Inf-CL"),
)
ALWAYS_SHOWN = 2
MODE_ORDER = ("fwd", "fwd+bwd")
#: Table order of the losses (the suite's, specs._SPECS); unknown ones follow in JSON order.
LOSS_ORDER = ("nt_xent", "moco", "dcl", "dclw", "clip", "uniformity", "vicreg_exp", "vicreg_ctr", "arcl_m4", "arcl_m8",
              "barlow_twins", "vicreg", "spectral_contrastive", "macl", "directclr", "siglip", "supcon", "koleo",
              "frossl", "tico", "dino", "ibot", "swav", "msn")


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One benchmarked case: its description (extra_info) and its median time (None when OOM)."""

    loss: str
    family: str
    provider: str
    implementation: str
    mode: str
    dtype: str
    batch_2n: int
    n_pairs: int
    dim: int
    prototypes: int  # K of the prototype family, else 0
    oom: bool
    median_s: Optional[float]
    peak_mib: Optional[float]
    model_flops: int
    route_flops: Optional[int]  # None in a JSON written before the suite recorded it
    matmul_peak_tflops: float
    info: dict

    @property
    def size_key(self) -> tuple:
        return (self.loss, self.mode, self.dtype, self.batch_2n, self.dim, self.prototypes)

    @property
    def tflops(self) -> Optional[float]:
        """Model FLOPs / median: the same work for every implementation, so higher = faster."""
        return None if self.median_s is None else self.model_flops / self.median_s / 1e12

    @property
    def fraction_of_peak(self) -> Optional[float]:
        """Route FLOPs / median / the matmul peak (flops.route_flops): above 1 only if the call's GEMMs
        really ran faster than the probe's matmul, and then printed as such (format_share)."""
        if self.median_s is None or self.route_flops is None:
            return None
        return self.route_flops / self.median_s / 1e12 / self.matmul_peak_tflops


def load(path: "str | Path") -> tuple[dict, list[Row]]:
    """(the JSON document, its rows). Benchmarks without the suite's extra_info are ignored."""
    with open(path) as f:
        doc = json.load(f)
    rows = []
    for bench in doc.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if "loss" not in info or "provider" not in info:
            continue
        oom = info.get("status") == "OOM"
        # An OOM case is timed on a no-op placeholder (_runner.py): its stats are not a time.
        median = None if oom else bench["stats"]["median"]
        peak = info.get("peak_mib")
        rows.append(Row(
            loss=info["loss"],
            family=info.get("family", "pairwise"),
            provider=info["provider"],
            implementation=info.get("implementation", info["provider"]),
            mode=info["mode"],
            dtype=info["dtype"],
            batch_2n=int(info["batch_2n"]),
            n_pairs=int(info.get("n_pairs", int(info["batch_2n"]) // 2)),
            dim=int(info["dim"]),
            prototypes=int(info.get("prototypes", 0)),
            oom=oom,
            median_s=median,
            peak_mib=None if oom or isinstance(peak, str) or peak is None else float(peak),
            model_flops=int(info["model_flops"]),
            route_flops=int(info["route_flops"]) if "route_flops" in info else None,
            matmul_peak_tflops=float(info["matmul_peak_tflops"]),
            info=info,
        ))
    return doc, rows


def _provider_rank(implementation: str) -> tuple:
    base = implementation.split(" ")[0]
    return (PROVIDER_ORDER.index(base) if base in PROVIDER_ORDER else len(PROVIDER_ORDER), implementation)


def sort_rows(rows: Iterable[Row], loss_order: list[str]) -> list[Row]:
    return sorted(rows, key=lambda r: (
        loss_order.index(r.loss), MODE_ORDER.index(r.mode) if r.mode in MODE_ORDER else 9, r.dtype != "bfloat16",
        r.dtype, r.batch_2n, r.dim, _provider_rank(r.implementation),
    ))


def speedup(row: Row, baseline: Optional[Row]) -> Optional[float]:
    """baseline's time / row's time, or None where either has no time."""
    if baseline is None or baseline.median_s is None or row.median_s is None:
        return None
    return baseline.median_s / row.median_s


def _baselines(rows: list[Row]) -> dict[tuple, dict[str, Row]]:
    providers = {provider for provider, _, _ in BASELINES}
    by_size: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        if r.provider in providers:
            by_size[r.size_key][r.provider] = r
    return by_size


# --------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------


def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def fmt_sig(value: Optional[float], digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def fmt_ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _vs(row: Row, baseline: Optional[Row], provider: str, short: str) -> str:
    """The speed-up cell: a ratio, "<short> OOM" where the baseline ran out of memory, "—" otherwise."""
    if row.provider == provider or row.oom:
        return "—"
    if baseline is not None and baseline.oom:
        return f"{short} OOM"
    return fmt_ratio(speedup(row, baseline))


def _size_cells(row: Row) -> list[str]:
    if row.family == "prototype":
        return [f"{row.batch_2n:,}", f"{row.prototypes:,}", f"{row.dim:,}"]
    return [f"{row.batch_2n:,}", f"{row.n_pairs:,}", f"{row.dim:,}"]


TABLE_HEADERS = ["mode", "dtype", "2N", "N", "D", "implementation", "time ms", "model TFLOP/s", "% of peak",
                 "peak MiB"]  # then one "vs <baseline>" column per BASELINES entry shown
#: The prototype family's size columns: student rows, prototypes, D.
PROTOTYPE_SIZE_HEADERS = ["rows", "K", "D"]


def markdown_table(headers: list[str], cells: list[list[str]], right: Iterable[int] = ()) -> str:
    right = set(right)
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def loss_tables(rows: list[Row]) -> dict[str, str]:
    """One Markdown table per loss (LOSS_ORDER), rows sorted by mode, dtype, size, implementation."""
    seen = list(dict.fromkeys(r.loss for r in rows))
    loss_order = [name for name in LOSS_ORDER if name in seen] + [name for name in seen if name not in LOSS_ORDER]
    base = _baselines(rows)
    present = {(r.loss, r.provider) for r in rows}
    shown = {loss: [b for i, b in enumerate(BASELINES) if i < ALWAYS_SHOWN or (loss, b[0]) in present]
             for loss in loss_order}
    tables: dict[str, list[list[str]]] = defaultdict(list)
    for r in sort_rows(rows, loss_order):
        b = base.get(r.size_key, {})
        tables[r.loss].append([
            r.mode, SHORT_DTYPE.get(r.dtype, r.dtype), *_size_cells(r), r.implementation,
            "OOM" if r.oom else fmt_ms(r.median_s),
            "OOM" if r.oom else fmt_sig(r.tflops),
            "OOM" if r.oom else format_share(r.fraction_of_peak),
            "OOM" if r.oom else ("—" if r.peak_mib is None else f"{r.peak_mib:,.1f}"),
            *(_vs(r, b.get(provider), provider, short) for provider, _, short in shown[r.loss]),
        ])
    tables_md = {}
    families = {r.loss: r.family for r in rows}
    for loss, cells in tables.items():
        headers = TABLE_HEADERS + [column for _, column, _ in shown[loss]]
        if families[loss] == "prototype":
            headers[2:5] = PROTOTYPE_SIZE_HEADERS
        right = [i for i, h in enumerate(headers) if h not in ("mode", "dtype", "implementation")]
        tables_md[loss] = markdown_table(headers, cells, right=right)
    return tables_md


# --------------------------------------------------------------------------------------------------
# GPU targets and the maximum batch
# --------------------------------------------------------------------------------------------------


def _find(rows: list[Row], loss: str, mode: str, dtype: str, batch: int, dim: int) -> dict[str, Row]:
    return {r.implementation: r for r in rows if r.size_key[:5] == (loss, mode, dtype, batch, dim)}


def _best_fastssl(found: dict[str, Row]) -> Optional[Row]:
    timed = [r for name, r in found.items() if name.startswith("fastssl-") and r.median_s is not None]
    return min(timed, key=lambda r: r.median_s) if timed else None


def _ratio_target(what: str, ours: Optional[Row], baseline: Optional[Row], goal: Optional[float]) -> list[str]:
    """One line of the targets table: fastssl's speed-up over `baseline` against `goal` (None: no
    target, the ratio is reported for what users would otherwise run)."""
    goal_cell = "no target" if goal is None else f"≥ {goal:g}×"
    if ours is None or baseline is None:
        missing = "fastssl" if ours is None else "the baseline"
        return [what, goal_cell, f"not in this run ({missing} not measured at this size)", "—"]
    if baseline.oom:
        return [what, goal_cell, f"{ours.implementation}: {fmt_ms(ours.median_s)} ms; baseline OOM",
                "reported (baseline OOM)" if goal is None else "met (baseline OOM)"]
    ratio = speedup(ours, baseline)
    if goal is None:
        status = "reported"
    else:
        status = "met" if ratio >= goal else f"missed by {goal / ratio:.2f}× (reached {ratio / goal:.0%} of the goal)"
    return [what, goal_cell,
            f"{ratio:.2f}× ({ours.implementation} {fmt_ms(ours.median_s)} ms vs {fmt_ms(baseline.median_s)} ms)",
            status]


def _bf16_baseline_lines(found: dict[str, Row], ours: Optional[Row]) -> list[list[str]]:
    """fastssl's ratio to the bf16 materialising baselines (eager, compiled) at a target's size."""
    return [_ratio_target(f"same: vs the bf16 materialising baseline{' (torch.compile)' if compiled else ''}", ours,
                          found.get("materialising-bf16" + ("-compiled" if compiled else "")), None)
            for compiled in (False, True)]


def targets_table(rows: list[Row], max_batch: Optional[dict]) -> str:
    """The GPU targets, each met / missed by how much / not in this run, from the rows."""
    cells = []
    nt = _find(rows, "nt_xent", "fwd+bwd", "bfloat16", 32768, 256)
    ours = _best_fastssl(nt)
    cells.append(_ratio_target("NT-Xent fwd+bwd, 2N = 32,768, D = 256, bf16: vs reference eager", ours,
                               nt.get("reference"), 4.0))
    cells.append(_ratio_target("same: vs torch.compile(reference)", ours, nt.get("reference-compiled"), 2.0))
    cells += _bf16_baseline_lines(nt, ours)
    if ours is None:
        cells.append(["same: fraction of the same-run bf16 matmul peak (model FLOPs)", "≥ 50%", "not in this run", "—"])
    else:
        # NT-Xent's route FLOPs are its model FLOPs: 3 (2N)²·D products, the fused backward's recompute not counted.
        frac = ours.fraction_of_peak
        share = format_share(frac)
        status = "met" if frac >= 0.5 else f"missed by {0.5 / frac:.2f}× (at {share}%)"
        cells.append(["same: fraction of the same-run bf16 matmul peak (model FLOPs)", "≥ 50%",
                      f"{share}{'%' if frac <= 1 else ''} of {ours.matmul_peak_tflops:.0f} TFLOP/s", status])
    fastssl_max = None
    if max_batch:
        fastssl_max = next((v for k, v in max_batch.get("results", {}).items()
                            if k.startswith("fastssl") and "max_2n" in v), None)
    if fastssl_max is None:
        cells.append(["NT-Xent fwd+bwd D = 128 bf16: largest 2N in one step", "≥ 1,000,000",
                      "not in this run (max_batch.py)", "—"])
    else:
        largest = fastssl_max["max_2n"]
        bound = " (search limit reached, not OOM)" if fastssl_max.get("limited_by") == "limit" else ""
        status = "met" if largest >= 1_000_000 else f"missed by {1_000_000 / max(largest, 1):.2f}×"
        cells.append(["NT-Xent fwd+bwd D = 128 bf16: largest 2N in one step", "≥ 1,000,000",
                      f"{largest:,}{bound} on {max_batch.get('device_name', '?')}", status])
    for loss, name in (("barlow_twins", "Barlow Twins"), ("vicreg", "VICReg")):
        found = _find(rows, loss, "fwd+bwd", "bfloat16", 4096, 8192)
        ours = _best_fastssl(found)
        cells.append(_ratio_target(f"{name} fwd+bwd, N = 2048, D = 8192, bf16: vs reference eager", ours,
                                   found.get("reference"), 3.0))
        cells += _bf16_baseline_lines(found, ours)
    return markdown_table(["GPU target", "goal", "measured", "status"], cells)


def max_batch_table(doc: dict) -> str:
    cells = []
    for provider, res in doc.get("results", {}).items():
        if "skipped" in res:
            cells.append([provider, "—", "—", f"skipped: {res['skipped']}", "0"])
            continue
        cells.append([provider, f"{res['max_2n']:,}", "—" if res.get("first_failure") is None else f"{res['first_failure']:,}",
                      res.get("limited_by", "?"), str(len(res.get("tries", [])))])
    head = (f"NT-Xent forward+backward, D = {doc.get('d')}, {doc.get('dtype')}, on {doc.get('device_name')} "
            f"(search limit 2N ≤ {doc.get('limit', 0):,}):\n\n")
    return head + markdown_table(["implementation", "largest 2N that ran", "smallest 2N that failed", "limited by",
                                  "tries"], cells, right=(1, 2, 4))


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def plot_groups(rows: list[Row]) -> dict[tuple, list[Row]]:
    """{(loss, dtype, axis, fixed value): rows} for every group with at least two sizes on its axis.

    axis is "batch_2n" (fixed D) unless the loss's sizes vary only in D (then "dim", fixed 2N).
    """
    by_loss: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        by_loss[(r.loss, r.dtype)].append(r)
    groups: dict[tuple, list[Row]] = {}
    for (loss, dtype), group in by_loss.items():
        batches = {r.batch_2n for r in group}
        dims = {r.dim for r in group}
        axis, other = ("batch_2n", "dim") if len(batches) > 1 or len(dims) == 1 else ("dim", "batch_2n")
        fixed_values = sorted({getattr(r, other) for r in group})
        for fixed in fixed_values:
            members = [r for r in group if getattr(r, other) == fixed]
            if len({getattr(r, axis) for r in members}) >= 2:
                groups[(loss, dtype, axis, fixed)] = members
    return groups


def _count(value: float, _pos: object = None) -> str:
    """Axis label of a size: 1,024 -> "1k", 1,048,576 -> "1M"."""
    for unit, name in ((2**20, "M"), (2**10, "k")):
        if value >= unit and value % unit == 0:
            return f"{value / unit:g}{name}"
    return f"{value:g}"


def write_plots(rows: list[Row], out: Path) -> list[Path]:
    """One PNG per plot group: rows fwd / fwd+bwd, columns time / peak memory; log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    paths = []
    for (loss, dtype, axis, fixed), members in sorted(plot_groups(rows).items()):
        modes = [m for m in MODE_ORDER if any(r.mode == m for r in members)]
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
        x_label = "batch 2N (rows)" if axis == "batch_2n" else "embedding dimension D"
        fixed_label = f"D = {fixed:,}" if axis == "batch_2n" else f"N = {fixed // 2:,}"
        impls = sorted({r.implementation for r in members}, key=_provider_rank)
        colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
        for i, mode in enumerate(modes):
            for j, (metric, y_label) in enumerate((("time", "median time (ms)"), ("memory", "peak memory above inputs (MiB)"))):
                ax = axes[i][j]
                ooms = []
                for name in impls:
                    pts = sorted((getattr(r, axis), r) for r in members if r.mode == mode and r.implementation == name)
                    xs, ys = [], []
                    for x, r in pts:
                        value = r.median_s * 1e3 if metric == "time" and r.median_s else (
                            r.peak_mib if metric == "memory" else None)
                        if r.oom:
                            ooms.append((x, name))
                        elif value:
                            xs.append(x)
                            ys.append(value)
                    if xs:
                        ax.plot(xs, ys, marker="o", label=name, color=colours[name])
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.xaxis.set_major_locator(FixedLocator(sorted({getattr(r, axis) for r in members})))
                ax.xaxis.set_major_formatter(FuncFormatter(_count))
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
                low, high = ax.get_ylim()
                # Label the minor ticks only where the axis spans too little for major ones to be useful.
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: f"{v:g}") if 0 < low and high / low < 20 else NullFormatter())
                ax.set_xlabel(x_label)
                ax.set_ylabel(y_label)
                ax.set_title(f"{loss} {mode}, {SHORT_DTYPE.get(dtype, dtype)}, {fixed_label}: {metric}")
                ax.grid(True, which="both", alpha=0.3)
                if ooms:
                    top = ax.get_ylim()[1]
                    for x, name in ooms:
                        ax.scatter([x], [top], marker="x", s=80, color=colours[name], clip_on=False, zorder=5)
                        ax.annotate("OOM", (x, top), textcoords="offset points", xytext=(4, -12), fontsize=8,
                                    color=colours[name])
                ax.legend(fontsize=8)
        fig.tight_layout()
        tag = f"D{fixed}" if axis == "batch_2n" else f"N{fixed // 2}"
        path = out / f"{loss}_{SHORT_DTYPE.get(dtype, dtype)}_{tag}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------


def _run_date(doc: dict) -> str:
    stamp = doc.get("datetime")
    if stamp:
        try:
            return _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).date().isoformat()
        except ValueError:
            pass
    return _dt.date.today().isoformat()


def _device(rows: list[Row]) -> str:
    devices = {r.info.get("device", "cpu") for r in rows}
    return "cuda" if "cuda" in devices else "cpu"


def header(doc: dict, rows: list[Row], json_name: str) -> str:
    first = rows[0].info
    device = _device(rows)
    peak_method = ("`torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus what was allocated "
                   "before the call" if device == "cuda" else
                   "growth of the resident set (VmHWM − VmRSS) of one call in a helper process (benchmarks/README.md)")
    timed = [r for r in rows if not r.oom]
    lines = [
        f"Measured {_run_date(doc)} on **{first.get('device_name')}**: torch {first.get('torch')}, triton "
        f"{first.get('triton')}, CUDA {first.get('cuda') or '—'}, Python {first.get('python', '?')}, fastssl "
        f"{first.get('fastssl', '?')} (backends {', '.join(first.get('fastssl_backends') or []) or '?'}).",
        f"Same-run matmul peak: {first.get('matmul_peak')} = **{first.get('matmul_peak_tflops'):.3g} TFLOP/s**; "
        f"% of peak = route FLOPs / time / that (flops.py).",
        f"Peak memory: {peak_method}. Time: median of the timed rounds (each call synchronises the device), after "
        f"warm-up. {len(timed)} cases timed, {len(rows) - len(timed)} out of memory (OOM). Source: `{json_name}`.",
    ]
    return "\n".join(lines)


def render(doc: dict, rows: list[Row], json_name: str, max_batch: Optional[dict], plots: list[Path],
           plot_base: Optional[Path]) -> str:
    """The Markdown body: header, targets, maximum batch, one table per loss, plot links."""
    parts = [header(doc, rows, json_name), ""]
    if _device(rows) == "cuda":
        parts += ["#### Targets", "", targets_table(rows, max_batch), ""]
    else:  # the targets are GPU sizes and GPU rates: a CPU table would only say "not in this run"
        parts += ["The targets are GPU targets: see the cuda section for their status.", ""]
    if max_batch:
        parts += ["#### Maximum batch (`max_batch.py`)", "", max_batch_table(max_batch), ""]
    parts += ["Columns: `time ms` median; `model TFLOP/s` = model FLOPs (the materialising algorithm's GEMMs, the "
              "same for every implementation) / time, an effective rate that can pass the peak where an "
              "implementation does less arithmetic (fastssl's Gram route when N < D); `% of peak` = route FLOPs (the "
              "GEMMs of the route that ran, recomputation not counted) / time / the matmul peak, never above 100: "
              "`above the probe (r×)` where those GEMMs ran r times faster than the probe's matmul; `peak MiB` "
              "above the inputs; `vs reference` / `vs compile` = that baseline's time / this row's time (above 1: "
              "faster); OOM = ran out of memory (a result, not an error).", ""]
    for loss, table in loss_tables(rows).items():
        parts += [f"#### {loss}", "", table, ""]
    if plots:
        parts += ["#### Plots", ""]
        for path in plots:
            if plot_base is not None:
                parts.append(f"![{path.stem}]({os.path.relpath(path, plot_base).replace(os.sep, '/')})")
            else:
                parts.append(f"- `{path.name}`")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def markers(device: str) -> tuple[str, str]:
    return f"<!-- report.py:begin {device} -->", f"<!-- report.py:end {device} -->"


def refresh_section(text: str, device: str, body: str) -> str:
    """`text` with the section between `device`'s markers replaced by `body` (appended when absent)."""
    begin, end = markers(device)
    block = f"{begin}\n<!-- generated by benchmarks/report.py from a benchmark JSON: do not edit by hand -->\n\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON of `pytest benchmarks/ --benchmark-only`")
    parser.add_argument("--out", type=Path, help="output folder (default: <json name>-report beside the JSON)")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD,
                        help="RESULTS.md whose generated section for this device is refreshed (default: %(default)s)")
    parser.add_argument("--no-results-md", action="store_true", help="do not touch any RESULTS.md")
    parser.add_argument("--max-batch", type=Path, help="max_batch.py's JSON (default: max_batch.json beside the JSON, if any)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)

    doc, rows = load(args.json)
    if not rows:
        print(f"report.py: {args.json} holds no fastssl benchmark (run pytest benchmarks/ --benchmark-only "
              f"--benchmark-json {args.json})", file=sys.stderr)
        return 1
    out = args.out or args.json.with_name(args.json.stem + "-report")
    out.mkdir(parents=True, exist_ok=True)
    max_batch_path = args.max_batch or (args.json.parent / "max_batch.json")
    max_batch = json.loads(max_batch_path.read_text()) if max_batch_path.is_file() else None
    plots = [] if args.no_plots else write_plots(rows, out)

    report = render(doc, rows, args.json.name, max_batch, plots, out)
    (out / "report.md").write_text(f"# fastssl benchmark report ({_device(rows)})\n\n" + report)
    print(f"wrote {out / 'report.md'} and {len(plots)} plot(s) in {out}")

    if not args.no_results_md:
        md = args.results_md
        base = md.resolve().parent
        # Link the plots from RESULTS.md only when they sit beside it (committed with it).
        inside = all(base in p.resolve().parents for p in plots)
        section = render(doc, rows, args.json.name, max_batch, plots, base if inside else None)
        if plots and not inside:
            section += f"\nPlots: written to `{out}` (not beside {md.name}, so not linked).\n"
        text = md.read_text() if md.is_file() else "# Measured results\n"
        md.write_text(refresh_section(text, _device(rows), section))
        print(f"refreshed the {_device(rows)} section of {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
