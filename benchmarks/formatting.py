"""Plain-text output shared by the benchmark scripts: dtype abbreviations and aligned tables.

Imports nothing but the standard library, so that report.py (which reads only JSON) can use it too.
"""

from __future__ import annotations

import re
from typing import Optional

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(re.fullmatch(r"[-+0-9.,x×e]+|—|OOM|-", r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, cells)])



def format_share(fraction: Optional[float]) -> str:
    """A share of the same-run matmul peak as a percentage ("42.0"), never above 100.

    `fraction` is the route FLOPs' rate / the probe's rate (flops.route_flops). Above 1 the call's
    GEMMs ran faster than the probe's one square matmul — the probe is then below the machine's
    peak, and a share would be meaningless — so the cell says that, and by how much, instead.
    """
    if fraction is None:
        return "—"
    if fraction > 1:
        return f"above the probe ({fraction:.2f}×)"
    return f"{100 * fraction:.1f}"
