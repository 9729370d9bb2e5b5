"""The benchmark-tooling tests import benchmarks/' modules by their top-level names, as the scripts
there import each other (``import specs``, ``import report``)."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
