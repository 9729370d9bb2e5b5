"""Sizes whose materialised matrix would not fit: the O(N·D) memory promise of the CPU default backend.

Each case runs in a fresh process (tests/scripts/large_loss.py) so that its peak resident set is its
own, not the test session's, and checks forward + backward peak RSS and the value against float64
(relative 1e-4: Barlow Twins' loss is ~1e4, where fp32 itself resolves only ~1e-3).

| case | the matrix a materialising implementation builds | measured here (2 cores) |
|---|---|---|
| NT-Xent, 32,768 pairs (2N = 65,536), D = 128 | 2N x 2N logits, 16 GiB | 0.66 GiB, 87 s |
| Barlow Twins, N = 512, D = 32,768 | C (D x D), 4 GiB | 1.14 GiB, 7 s |
| spectral, N = 65,536, D = 64 | z1 z2ᵀ (N x N), 16 GiB | 0.58 GiB, 4 s |
| VICReg-exp, N = 256, D = 16,384 | Cov (D x D), 1 GiB | 0.74 GiB, 29 s |
| ArCL, N = 16,384 samples x 4 views, D = 128 | 2N x 2N logits, 4 GiB | 0.61 GiB, 33 s |
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "large_loss.py"
GIB = 2**30

CASES = [
    # (loss, N, D, peak RSS limit in GiB, bytes of the matrix a materialising implementation builds)
    ("nt_xent", 32768, 128, 3, 65536**2 * 4),
    ("barlow_twins", 512, 32768, 2, 32768**2 * 4),
    ("spectral", 65536, 64, 2, 65536**2 * 4),
    ("vicreg_exp", 256, 16384, 2, 16384**2 * 4),
    ("arcl", 16384, 128, 2, 32768**2 * 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("loss,n,d,limit_gib,matrix_bytes", CASES, ids=[c[0] for c in CASES])
def test_fits_in_memory_and_matches_float64(loss, n, d, limit_gib, matrix_bytes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the default backend: torch
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, str(SCRIPT), loss, str(n), str(d)], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["peak_rss_bytes"] < limit_gib * GIB, (
        f"{loss}: peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB > {limit_gib} GiB "
        f"(the materialised matrix alone would be {matrix_bytes / GIB:.0f} GiB)"
    )
    assert abs(result["loss"] - result["loss64"]) <= 1e-4 * max(1.0, abs(result["loss64"])), result
    assert result["grads_finite"] and result["grad_norm"] > 0, result
