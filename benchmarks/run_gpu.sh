#!/usr/bin/env bash
# The one GPU job: runs the GPU test suite, the benchmarks and compute-sanitizer in a single
# device call, writing logs and JSON under $OUT (at most 8 files come back).
#
#   bash benchmarks/run_gpu.sh [tests] [bench] [sanitize] [quick]     (default: tests bench sanitize)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssmkit_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/ssmkit_cupy_cache}
PY=${PY:-python3}
steps="${*:-tests bench sanitize}"
LOG="$OUT/run.log"
{
  echo "== $(date -u) steps: $steps"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  $PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'nvrtc', cupy.cuda.nvrtc.getVersion())"
} 2>&1 | tee "$LOG"

if [[ " $steps " == *" tests "* ]]; then
  echo "== GPU tests" | tee -a "$LOG"
  t0=$SECONDS
  $PY -m pytest tests -m "gpu or nvrtc" -q -p no:cacheprovider -x --maxfail=20 -o addopts="" \
      --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1
  echo "pytest rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
  tail -25 "$OUT/tests.log" | tee -a "$LOG"
fi
if [[ " $steps " == *" bench "* ]]; then
  quick=""; [[ " $steps " == *" quick "* ]] && quick="--quick"
  for b in benchmarks/bench_*.py; do
    echo "== $b" | tee -a "$LOG"
    timeout 400 $PY "$b" --out "$OUT" $quick >> "$LOG" 2>&1; echo "rc=$?" | tee -a "$LOG"
  done
fi
if [[ " $steps " == *" sanitize "* ]]; then
  for s in benchmarks/sanitize_*.py; do
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer $tool $s" | tee -a "$LOG"
      timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 $PY "$s" > "$OUT/san.tmp" 2>&1
      rc=$?; tail -6 "$OUT/san.tmp" | tee -a "$LOG"; echo "rc=$rc" | tee -a "$LOG"
    done
  done
  rm -f "$OUT/san.tmp"
fi
echo "== done $(date -u)" | tee -a "$LOG"
