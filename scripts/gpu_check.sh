#!/usr/bin/env bash
# One-command GPU check: build the CUDA extension, run the CUDA-marked tests and the whole suite,
# the benchmarks and their report, the max-batch and trainer-throughput probes, and an Nsight Compute
# profile of the NT-Xent kernels; logs and JSON go to OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR [STEP ...]
#
# With STEPs, only those steps run (names as in steps.tsv: nvidia_smi versions nvcc_version
# build_extension extension_loads tests_cuda tests_all benchmarks report max_batch report_final
# train_throughput ncu ncu_summary), so that a GPU session whose commands are capped at 10 minutes
# can split the work: e.g. `build_extension extension_loads tests_cuda tests_all`, then
# `benchmarks report max_batch report_final train_throughput`, then `ncu ncu_summary`.
#
# Assumes the preinstalled stack (PyTorch + CUDA, Triton, nvcc, ninja, pytest, pytest-benchmark) and
# NO network: nothing is pip-installed from an index. Every step runs under its own timeout, a failing
# step does not stop the others, and every step's exit code is written to OUTDIR/steps.tsv (and
# summarised at the end). Budget: a hard overall deadline (FASTSSL_DEADLINE_S, default 1380 s = 23
# min) caps every step's timeout by the time left, and steps that no longer fit are recorded as
# "skipped-deadline"; per-step limits can be changed with e.g. FASTSSL_T_BENCH=600.
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [STEP ...]" >&2
  exit 2
fi
OUT="$1"
shift
SELECTED=" $* "
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python}"
STEPS="$OUT/steps.tsv"
printf 'step\texit_code\tseconds\n' > "$STEPS"
START_ALL=$(date +%s)
DEADLINE=$(( START_ALL + ${FASTSSL_DEADLINE_S:-1380} ))

# run NAME TIMEOUT_SECONDS CMD...: stdout+stderr to OUT/NAME.log, exit code to steps.tsv.
run() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc left
  if [ "$SELECTED" != "  " ] && [[ "$SELECTED" != *" $name "* ]]; then
    return 0  # not asked for in this call
  fi
  t0=$(date +%s)
  left=$(( DEADLINE - t0 ))
  if [ "$left" -lt 30 ]; then
    printf '%s\t%s\t%s\n' "$name" "skipped-deadline" 0 >> "$STEPS"
    echo "=== [$name] skipped: the overall deadline is reached"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] (timeout ${limit}s): $*"
  timeout --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  echo "    exit $rc after $(( $(date +%s) - t0 ))s (log: $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    | /'
  return 0
}

export FASTSSL_BUILD_CUDA=1
export FASTSSL_CUDA_ARCH_LIST="${FASTSSL_CUDA_ARCH_LIST:-8.0;9.0}"
export PYTHONUNBUFFERED=1

# 1. Environment.
run nvidia_smi 60 nvidia-smi
run versions 120 "$PY" -c "
import sys, torch
print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print('triton', triton.__version__)
except Exception as e: print('triton missing', e)
"
run nvcc_version 60 nvcc --version

# 2. Build the extension in place (no index access: no build isolation, no dependencies).
run build_extension "${FASTSSL_T_BUILD:-420}" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
run extension_loads 120 "$PY" -c "
import fastssl
from fastssl.backends import available_backends, cuda_unavailable_reason
print('available:', available_backends()); print('reason if not:', cuda_unavailable_reason() or '-')
assert 'cuda' in available_backends()
"

# 3. Tests: the CUDA layer first (fast feedback), then everything.
run tests_cuda "${FASTSSL_T_TESTS_CUDA:-360}" "$PY" -m pytest tests -m cuda -q -x --maxfail=20 \
  --junitxml="$OUT/tests_cuda.xml"
run tests_all "${FASTSSL_T_TESTS_ALL:-300}" "$PY" -m pytest tests -q --junitxml="$OUT/tests_all.xml"

# 4. Benchmarks, their report, the memory probe and the trainer throughput.
run benchmarks "${FASTSSL_T_BENCH:-360}" "$PY" -m pytest benchmarks/ --benchmark-only \
  --benchmark-json "$OUT/benchmarks.json"
run report 60 "$PY" benchmarks/report.py "$OUT/benchmarks.json" --out "$OUT/report"
run max_batch "${FASTSSL_T_MAXBATCH:-180}" "$PY" benchmarks/max_batch.py --json "$OUT/max_batch.json"
# Again, now that max_batch.json sits beside the suite's JSON (the max-batch target), writing the
# plots where RESULTS.md links them: commit benchmarks/RESULTS.md and benchmarks/results/gpu after.
run report_final 60 "$PY" benchmarks/report.py "$OUT/benchmarks.json" --out benchmarks/results/gpu
run train_throughput "${FASTSSL_T_TRAIN:-180}" "$PY" -m fastssl.train.throughput --json "$OUT/train_throughput.json"

# 5. Nsight Compute: the NT-Xent forward/backward kernels at 2N = 32768, D = 256, bf16.
cat > "$OUT/ncu_target.py" <<'EOF'
import torch
import fastssl

n, d = 16384, 256  # 2N = 32768 rows
z1 = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
z2 = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
for backend in ("cuda", "triton"):
    for _ in range(2):  # the second iteration is past autotuning / the JIT build
        loss = fastssl.nt_xent_loss(z1, z2, 0.5, backend=backend)
        loss.backward()
    torch.cuda.synchronize()
    print(backend, float(loss))
EOF
if command -v ncu > /dev/null 2>&1; then
  # The csrc kernels are pairwise_lse_kernel; the Triton ones _pairwise_lse_*; one launch each after warm-up.
  run ncu "${FASTSSL_T_NCU:-240}" ncu --target-processes all --kernel-name-base demangled \
    --kernel-name "regex:pairwise_lse" --launch-skip 3 --launch-count 6 --set full \
    --export "$OUT/ncu_nt_xent" --force-overwrite "$PY" "$OUT/ncu_target.py"
  run ncu_summary 60 ncu --import "$OUT/ncu_nt_xent.ncu-rep" --print-summary per-kernel
elif [ "$SELECTED" = "  " ] || [[ "$SELECTED" == *" ncu "* ]]; then
  printf 'ncu\tnot-found\t0\n' >> "$STEPS"
  echo "=== [ncu] skipped: ncu is not on PATH"
fi

TOTAL=$(( $(date +%s) - START_ALL ))
echo
echo "=== summary (total ${TOTAL}s); exit codes in $STEPS"
column -t "$STEPS" 2> /dev/null || cat "$STEPS"
"$PY" - "$STEPS" "$OUT/summary.json" "$TOTAL" <<'EOF'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
json.dump({"total_seconds": int(sys.argv[3]), "steps": rows}, open(sys.argv[2], "w"), indent=2)
EOF
# The script's own status: 0 when every step that ran passed.
if awk -F'\t' 'NR > 1 && $2 != "0" && $2 != "not-found" { bad = 1 } END { exit bad }' "$STEPS"; then
  exit 0
fi
exit 1
