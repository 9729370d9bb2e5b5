"""NT-Xent at a batch whose logits would not fit: the O(N·D) memory promise on the CPU default backend.

32,768 pairs (2N = 65,536 rows) at D = 128: the 2N x 2N fp32 logits alone are 16 GiB. The run happens
in a fresh process (tests/scripts/large_nt_xent.py) so that its peak resident set is its own, not
the test session's. About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "large_nt_xent.py"
GIB = 2**30


@pytest.mark.slow
def test_nt_xent_65536_rows_fits_in_3_gib():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the default backend: torch
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, str(SCRIPT), "32768", "128"], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_bytes = 65536**2 * 4
    assert result["peak_rss_bytes"] < 3 * GIB, (
        f"peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB (the logits alone would be {logits_bytes / GIB:.0f} GiB)"
    )
    assert abs(result["loss"] - result["loss64"]) < 1e-4, result
    assert result["grads_finite"] and result["grad_norm"] > 0, result
