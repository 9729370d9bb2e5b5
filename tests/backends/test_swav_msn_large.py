"""SwaV and MSN at a large head size on the CPU default backend: the O((N + K)·D) memory of family 4.

SwaV: 512 images x 8 crops (2 high-resolution, 6 low) and a queue of 1,536 rows per high-resolution
crop; MSN: 8 anchor views of 512 images; both against K = 65,536 prototypes of D = 128. The scores of
the crops (the anchors' probabilities) alone would be 1 GiB in fp32, and a materialising loss holds
more (the codes of 2,048 rows per high-resolution crop, the log-softmax autograd keeps). Each runs in a
fresh process (tests/scripts/large_swav_msn.py) so that the peak resident set is its own: forward +
backward must stay below the bytes of those scores alone, and the value within 1e-4 of the float64
value of the same inputs (itself computed in chunks, by the torch backend in float64).

Measured here (2 shared cores): SwaV peak RSS 0.60 GiB, forward 22 s, backward 5 s,
|loss − loss64| = 1.4e-6 at loss 10.40; MSN peak RSS 0.65 GiB, forward 12 s, backward 11 s,
|loss − loss64| = 1.6e-7 at loss 9.70.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "large_swav_msn.py"
GIB = 2**30


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["swav", "msn"])
def test_large_head_fits_in_memory_and_matches_float64(loss):
    images, k, d = 512, 65536, 128
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}  # the default backend: torch
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, str(SCRIPT), loss, str(images), str(k), str(d)], env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dense_bytes"] == GIB
    assert result["peak_rss_bytes"] < result["dense_bytes"], (
        f"peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB ≥ the {result['dense_bytes'] / GIB:.1f} GiB of scores "
        "a materialising loss would hold"
    )
    assert abs(result["loss"] - result["loss64"]) <= 1e-4 * max(1.0, abs(result["loss64"])), result
    assert result["grads_finite"] and min(result["grad_norms"]) > 0, result
