#!/usr/bin/env bash
# One short GPU check, within 9 minutes (a GPU session's command is capped at 10): build the CUDA
# extension unless a prebuilt one loads, run the cuda-marked tests (each failing test's name printed
# as it fails), time the opt-in Triton Hopper variants against today's kernels and the cuda backend's
# kernel sets against the Triton backend, run the headline benchmarks, the DINO and SigLIP
# comparisons, and the report. Logs go to OUTDIR as each step runs.
#
#   scripts/gpu_check.sh [--dry-run] OUTDIR
#
# --dry-run prints the plan (each step, its time limit and command, and what was detected) and
# runs nothing; its limits assume that every earlier step uses all of its own. OUTDIR receives
# steps.tsv (step, exit code or why it did not run, seconds), one <step>.log per step that ran,
# hopper_variants.json, cuda_variants.json, benchmarks.json and benchmarks_new.json, report.md and new/report.md,
# RESULTS.md (a copy of benchmarks/RESULTS.md whose cuda section the report refreshed: copy it back
# and commit it), and auto_table.md (auto's table as measured here, proposed and printed at the end;
# benchmarks/auto_table.py --write writes it into fastssl/auto_gpu_table.json). The machine
# (nvidia-smi, versions) is printed first.
#
# The extension: a fastssl._C that imports is reused; otherwise the just-in-time loader builds it
# (fastssl/kernels/cuda/_ext.py), linking the kernel objects of `python -m
# fastssl.kernels.cuda.prebuild` when build/csrc holds them for this GPU's arch (carry build/csrc from
# the CPU machine: then only bindings.cpp is compiled here), with the sm_90a kernels on an sm_90 GPU.
# Its cache is build/torch_extensions (TORCH_EXTENSIONS_DIR), which the later steps load from.
#
# Environment: PYTHON (default python3, else python); FASTSSL_CHECK_DEADLINE_S (default 540: every
# step's limit is cut to the time left, and a step with under 20 s left is recorded as
# skipped-deadline); FASTSSL_CHECK_WORKERS (pytest-xdist workers, default 8; 0 = none);
# FASTSSL_CHECK_LOSSES (default the GPU targets' losses and CLIP; "all" = every loss);
# FASTSSL_CUDA_ARCH_LIST (default: the visible GPU's, else 9.0). Nothing is installed from an index.
# Exit status: 0 when every step ran and passed, 1 otherwise, 2 on bad usage.
set -u

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
OUT="$1"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
START=$(date +%s)
CLOCK=$START  # the dry run's clock: advanced by each planned step's limit
now() { if [ "$DRY_RUN" = 1 ]; then echo "$CLOCK"; else date +%s; fi; }
DEADLINE=$(( START + ${FASTSSL_CHECK_DEADLINE_S:-540} ))
MIN_STEP_S=20
REPORT_S=30  # kept back for the report after the benchmarks
NEW_LOSSES_S=50  # kept back for the DINO and SigLIP comparisons after the headline benchmarks

# What is here decides the plan, probed in one Python process: "<prebuilt> <xdist> <timeout> <arch>".
read -r PREBUILT HAS_XDIST HAS_TIMEOUT GPU_ARCH <<< "$("$PY" - 2> /dev/null <<'PROBE'
import importlib.util


def has(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a module that fails to import is not there
        return False


try:
    from fastssl import _C  # noqa: F401
    prebuilt = True
except ImportError:
    prebuilt = False
try:
    import torch

    arch = "%d.%d" % torch.cuda.get_device_capability()
except Exception:  # no GPU visible
    arch = "-"
print(int(prebuilt), int(has("xdist")), int(has("pytest_timeout")), arch)
PROBE
)"
BUILD=$([ "${PREBUILT:-0}" = 1 ] && echo reuse || echo build)
ARCH="${FASTSSL_CUDA_ARCH_LIST:-${GPU_ARCH:--}}"
[ "$ARCH" = "-" ] && ARCH=9.0
WORKERS="${FASTSSL_CHECK_WORKERS:-8}"
PYTEST_OPTS=(-m cuda -v -rf -p no:cacheprovider)
if [ "$WORKERS" != "0" ] && [ "${HAS_XDIST:-0}" = 1 ]; then
  PYTEST_OPTS+=(-n "$WORKERS")
  XDIST="-n $WORKERS"
else
  XDIST="not used (pytest-xdist not installed, or FASTSSL_CHECK_WORKERS=0)"
fi
if [ "${HAS_TIMEOUT:-0}" = 1 ]; then
  PYTEST_OPTS+=(--timeout 120)
  TIMEOUT_PLUGIN="--timeout 120 per test"
else
  TIMEOUT_PLUGIN="not used (pytest-timeout not installed)"
fi
LOSSES="${FASTSSL_CHECK_LOSSES:-nt_xent,barlow_twins,vicreg,clip}"
[ "$LOSSES" = "all" ] && LOSSES=""

echo "gpu_check: python $PY; extension: $BUILD (arch $ARCH); xdist: $XDIST; pytest-timeout: $TIMEOUT_PLUGIN"
echo "gpu_check: deadline ${FASTSSL_CHECK_DEADLINE_S:-540} s; logs in $OUT"
if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$OUT"
  OUT="$(cd "$OUT" && pwd)"
  printf 'step\texit_code\tseconds\n' > "$OUT/steps.tsv"
fi

# step NAME LIMIT_S [--stream REGEX] CMD...: CMD under `timeout`, its output in OUT/NAME.log (with
# --stream, the lines matching REGEX are also printed as they come); the exit code in steps.tsv.
step() {
  local name="$1" limit="$2" pattern="" t0 left rc
  shift 2
  if [ "$1" = "--stream" ]; then
    pattern="$2"
    shift 2
  fi
  t0=$(now)
  left=$(( DEADLINE - t0 ))
  [ "$limit" -gt "$left" ] && limit=$left
  [ "$limit" -lt 0 ] && limit=0
  if [ "$DRY_RUN" = 1 ]; then
    echo "step $name (at most ${limit}s): $*"
    CLOCK=$(( CLOCK + limit ))
    return 0
  fi
  if [ "$limit" -lt "$MIN_STEP_S" ]; then
    printf '%s\tskipped-deadline\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "=== [$name] skipped: ${left}s left before the deadline"
    return 0
  fi
  echo "=== [$name] (at most ${limit}s): $*"
  if [ -n "$pattern" ]; then
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep --line-buffered -E "$pattern"
    rc=${PIPESTATUS[0]}
  else
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  echo "    exit $rc after $(( $(date +%s) - t0 ))s; log $OUT/$name.log"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    | /'
}

export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}"
# The build step is the only place the extension is built: later steps load it from the cache the
# build step filled, or (when it failed) are not allowed to build it.
export FASTSSL_CUDA_JIT=0

# 1. The machine, on the console only.
if [ "$DRY_RUN" = 0 ]; then
  timeout 30 nvidia-smi || echo "nvidia-smi: not found or failed"
  timeout 60 "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
fi

# 2. The extension: reuse fastssl._C when it loads, else the just-in-time loader builds it (no index).
if [ "$BUILD" = "reuse" ]; then
  step build 60 "$PY" -c "from fastssl import _C; print('fastssl._C prebuilt, reused:', _C.__file__)"
else
  # Carried kernel objects leave only bindings.cpp to compile (and the link).
  build_s=$([ -d "build/csrc/sm_${ARCH//./}" ] && echo 90 || echo 150)
  step build "$build_s" env FASTSSL_CUDA_JIT=1 FASTSSL_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 "$PY" -c "import sys; \
from fastssl.kernels.cuda import _ext; m = _ext.load(); m is None and sys.exit('fastssl: the CUDA extension \
cannot be built: ' + _ext.unavailable_reason()); print('fastssl CUDA extension:', m.__file__, \
'| sm_90a kernels linked:', hasattr(m, 'pairwise_lse_forward_sm90'))"
  if [ "$DRY_RUN" = 0 ] && awk -F'\t' '$1 == "build" && $2 == "0" { ok = 1 } END { exit !ok }' "$OUT/steps.tsv"; then
    export FASTSSL_CUDA_JIT=1  # the cache holds it now: loading it compiles nothing
  fi
fi

# 3. The cuda-marked tests; failures are printed by name as they happen, the summary at the end.
step tests_cuda 150 --stream '(FAILED|ERROR)( |$)|^=+ .* =+$' "$PY" -m pytest tests "${PYTEST_OPTS[@]}"

# 4. The opt-in Triton Hopper variants against today's kernels (NT-Xent, bf16, 6 shapes; each row
#    checked against the first; rows past the budget are listed as skipped).
step hopper_variants 70 "$PY" benchmarks/hopper_variants.py --json "$OUT/hopper_variants.json" --budget-s 55

# 4b. The cuda backend's kernel sets (today's, the opt-in sm_90a ones) against the Triton backend:
#     NT-Xent, CLIP, Barlow Twins and VICReg, bf16, each row checked against the Triton one.
step cuda_variants 60 "$PY" benchmarks/cuda_variants.py --json "$OUT/cuda_variants.json" --budget-s 45

# 5. The headline benchmarks (bf16, each loss's headline size), stopping in time for what follows:
#    cases that would start after FASTSSL_BENCH_BUDGET_S are skipped, and the JSON is still written.
bench_limit=$(( DEADLINE - $(now) - NEW_LOSSES_S - REPORT_S ))
step benchmarks "$bench_limit" env FASTSSL_BENCH_SIZES=small FASTSSL_BENCH_DTYPE=bfloat16 \
  FASTSSL_BENCH_LOSSES="$LOSSES" FASTSSL_BENCH_BUDGET_S=$(( bench_limit > 60 ? bench_limit - 45 : 15 )) \
  "$PY" -m pytest benchmarks/ --benchmark-only -p no:cacheprovider -rs --benchmark-json "$OUT/benchmarks.json"

# 6. DINO (the head's last layer + loss, 12,288 crops x K = 65,536 x D = 256) and SigLIP (N = 32,768,
#    D = 512) against lightly's formulas, eager and compiled, forward + backward.
step benchmarks_new "$NEW_LOSSES_S" env FASTSSL_BENCH_SIZES=small FASTSSL_BENCH_DTYPE=bfloat16 \
  FASTSSL_BENCH_LOSSES=dino,siglip FASTSSL_BENCH_BUDGET_S=$(( NEW_LOSSES_S - 20 )) \
  "$PY" -m pytest benchmarks/ --benchmark-only -p no:cacheprovider -rs \
  -k "((dino and R12288-K65536-D256) or (siglip and 2N65536-D512)) and fwd+bwd" \
  --benchmark-json "$OUT/benchmarks_new.json"

# 7. The reports, the headline one into a copy of RESULTS.md (the machine's working tree does not come back),
#    and auto's proposed table from the cuda_variants run (auto_table.md; the step's status stays the reports').
step report "$REPORT_S" bash -c "cp benchmarks/RESULTS.md '$OUT/RESULTS.md' && '$PY' benchmarks/report.py \
'$OUT/benchmarks.json' --out '$OUT' --results-md '$OUT/RESULTS.md' --no-plots; \
'$PY' benchmarks/report.py '$OUT/benchmarks_new.json' --out '$OUT/new' --no-results-md --no-plots; rc=\$?; \
'$PY' benchmarks/auto_table.py '$OUT/cuda_variants.json' --out-md '$OUT/auto_table.md'; exit \$rc"

[ "$DRY_RUN" = 1 ] && exit 0
echo
if [ -f "$OUT/auto_table.md" ]; then
  echo "=== auto's table on this GPU, as proposed (benchmarks/auto_table.py $OUT/cuda_variants.json --write to commit it):"
  cat "$OUT/auto_table.md"
  echo
fi
echo "=== done in $(( $(date +%s) - START ))s; steps:"
column -t -s $'\t' "$OUT/steps.tsv" 2> /dev/null || cat "$OUT/steps.tsv"
if awk -F'\t' 'NR > 1 && $2 != "0" { bad = 1 } END { exit bad }' "$OUT/steps.tsv"; then
  exit 0
fi
exit 1
