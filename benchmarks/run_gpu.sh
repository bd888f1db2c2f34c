#!/usr/bin/env bash
# The one GPU job: the GPU test suite, the benchmarks and compute-sanitizer, writing logs and
# JSON under $OUT (at most 8 files come back from the device tool).
#
#   bash benchmarks/run_gpu.sh [tests] [bench] [sanitize] [demo]      (default: all four)
#
# Files: run.log (summary), tests.log, sanitize.log, selective_scan.json, causal_conv1d.json,
# decode.json, torch_overhead.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssmkit_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/ssmkit_cupy_cache}
PY=${PY:-python3}
JOBS=${JOBS:-12}
steps="${*:-tests bench sanitize demo}"
LOG="$OUT/run.log"
{
  echo "== $(date -u) steps: $steps"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  $PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'nvrtc', cupy.cuda.nvrtc.getVersion())"
} 2>&1 | tee -a "$LOG"

if [[ " $steps " == *" tests "* ]]; then
  echo "== GPU tests (-m gpu, $JOBS workers)" | tee -a "$LOG"
  t0=$SECONDS
  timeout ${TEST_TIMEOUT:-330} $PY -m pytest tests -m gpu -q -p no:cacheprovider -o addopts="-ra" \
      -n "$JOBS" ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1
  echo "pytest rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -30 | tee -a "$LOG"
fi
if [[ " $steps " == *" bench "* ]]; then
  for b in selective_scan causal_conv1d decode torch_overhead; do
    echo "== bench_$b" | tee -a "$LOG"
    t0=$SECONDS
    timeout ${BENCH_TIMEOUT:-170} $PY "benchmarks/bench_$b.py" --out "$OUT" >> "$LOG" 2>&1
    echo "rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
  done
fi
if [[ " $steps " == *" sanitize "* ]]; then
  SAN="$OUT/sanitize.log"
  for s in benchmarks/sanitize_*.py; do
    tools="memcheck racecheck"
    # racecheck inspects shared memory: selective_state_update uses none.
    [[ "$s" == *selective_state_update* ]] && tools="memcheck"
    for tool in $tools; do
      echo "== compute-sanitizer --tool $tool $s" | tee -a "$SAN"
      timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool $tool --error-exitcode 9 $PY "$s" >> "$SAN" 2>&1
      rc=$?; echo "rc=$rc" | tee -a "$SAN"
      echo "sanitize $tool $s rc=$rc" >> "$LOG"
    done
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rc=" "$SAN" | tee -a "$LOG"
fi
if [[ " $steps " == *" demo "* ]]; then
  for size in small large; do
    echo "== python -m ssmkit.demo --size $size" | tee -a "$LOG"
    timeout 120 $PY -m ssmkit.demo --size $size 2>&1 | tail -25 | tee -a "$LOG"
    echo "rc=${PIPESTATUS[0]}" | tee -a "$LOG"
  done
fi
echo "== done $(date -u)" | tee -a "$LOG"
