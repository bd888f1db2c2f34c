#!/usr/bin/env bash
# The one GPU job: the GPU test suite, the benchmarks and compute-sanitizer, writing logs and
# JSON under $OUT (at most 8 files come back from the device tool).
#
#   bash benchmarks/run_gpu.sh [tests] [bench] [probe] [model] [sanitize] [demo] [sweep]
#   (default: tests bench model sanitize demo; probe = PROBES="probe_x ..." from benchmarks/;
#   sweep = the accuracy sweep, benchmarks/sweep_accuracy.py)
#
# Files: run.log (summary), tests.log, tests_large.log, sanitize.log, sweep.log, and results.tgz holding the benchmarks' JSON
# (selective_scan, causal_conv1d, decode, torch_overhead, layer_norm, model, generation) and plots:
# the device tool brings back at most 8 files. BENCHES=... picks the kernel benchmarks.
# PYTEST_ARGS=... (split on spaces) and PYTEST_K="expr with spaces" (one -k) narrow the suite
# (either one skips the large-shape step). The repository is the device's working tree as sent:
# do not `git stash` there (the device's git HEAD is the landed commit; a stash reverts to it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssmkit_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/ssmkit_cupy_cache}
PY=${PY:-python3}
JOBS=${JOBS:-12}
steps="${*:-tests bench model sanitize demo}"
# DEADLINE=seconds: a budget for the whole script (the device tool kills a call at its limit and
# then only files already under $OUT come back): every step's timeout is cut to what is left,
# and a step with under 10 s left is skipped, so the JSON is still packed at the end.
DEADLINE=${DEADLINE:-100000}
left() {  # left <wanted timeout>: the timeout to use now (0: skip)
  local rest=$((DEADLINE - SECONDS - 15))
  (( rest < 10 )) && { echo 0; return; }
  (( $1 < rest )) && echo "$1" || echo "$rest"
}
JSON="$OUT/json"
mkdir -p "$JSON"
LOG="$OUT/run.log"
{
  echo "== $(date -u) steps: $steps"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  $PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'nvrtc', cupy.cuda.nvrtc.getVersion())"
} 2>&1 | tee -a "$LOG"

if [[ " $steps " == *" tests "* ]]; then
  echo "== GPU tests (-m gpu, $JOBS workers)" | tee -a "$LOG"
  t0=$SECONDS
  # test_large_shapes runs alone afterwards: each of its tests takes up to ~33 GiB and NaN-fills
  # up to 48 GiB of CuPy's pool, which would starve (or skip) the tests running beside it.
  timeout $(left ${TEST_TIMEOUT:-330}) $PY -m pytest tests -m gpu -q -p no:cacheprovider -o addopts="-ra" \
      -n "$JOBS" --ignore=tests/test_large_shapes.py ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/tests.log" 2>&1
  echo "pytest rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -30 | tee -a "$LOG"
  tl=$(left ${LARGE_TIMEOUT:-150})
  if (( tl > 0 )) && [[ -z "${PYTEST_ARGS:-}${PYTEST_K:-}" ]]; then
    echo "== GPU tests: test_large_shapes.py, one process" | tee -a "$LOG"
    t0=$SECONDS
    timeout $tl $PY -m pytest tests/test_large_shapes.py -m gpu -q -p no:cacheprovider -o addopts="-ra" \
        -p no:xdist > "$OUT/tests_large.log" 2>&1
    echo "pytest rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_large.log" | tail -12 | tee -a "$LOG"
  fi
fi
if [[ " $steps " == *" bench "* ]]; then
  for b in ${BENCHES:-selective_scan causal_conv1d decode torch_overhead layer_norm}; do
    [[ -f "benchmarks/bench_$b.py" ]] || continue
    tl=$(left ${BENCH_TIMEOUT:-170}); (( tl == 0 )) && { echo "skip bench_$b (deadline)" | tee -a "$LOG"; continue; }
    echo "== bench_$b" | tee -a "$LOG"
    t0=$SECONDS
    timeout $tl $PY "benchmarks/bench_$b.py" --out "$JSON" >> "$LOG" 2>&1
    echo "rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
  done
fi
if [[ " $steps " == *" probe "* ]]; then
  for pr in ${PROBES:-probe_decode_stream}; do
    tl=$(left ${PROBE_TIMEOUT:-60}); (( tl == 0 )) && { echo "skip $pr (deadline)" | tee -a "$LOG"; continue; }
    echo "== $pr" | tee -a "$LOG"
    t0=$SECONDS
    # the whole output in probes.log (one file for all probes: the tool brings back 8 files)
    timeout $tl $PY "benchmarks/$pr.py" --out "$JSON" 2>&1 | tee -a "$OUT/probes.log" | tail -20 | tee -a "$LOG"
    echo "rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$LOG"
  done
fi
if [[ " $steps " == *" model "* ]]; then
  echo "== bench_model ${MODEL_ARGS:-}" | tee -a "$LOG"
  t0=$SECONDS
  timeout $(left ${MODEL_TIMEOUT:-420}) $PY benchmarks/bench_model.py --out "$JSON" ${MODEL_ARGS:-} 2>&1 | tee -a "$LOG" | tail -20
  echo "rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$LOG"
fi
if [[ " $steps " == *" sanitize "* ]]; then
  SAN="$OUT/sanitize.log"
  for s in benchmarks/sanitize_*.py; do
    tools="memcheck racecheck"
    # racecheck inspects shared memory: selective_state_update uses none.
    [[ "$s" == *selective_state_update* ]] && tools="memcheck"
    for tool in $tools; do
      tl=$(left ${SAN_TIMEOUT:-120}); (( tl == 0 )) && { echo "skip $tool $s (deadline)" | tee -a "$LOG"; continue; }
      echo "== compute-sanitizer --tool $tool $s" | tee -a "$SAN"
      timeout $tl compute-sanitizer --tool $tool --error-exitcode 9 $PY "$s" >> "$SAN" 2>&1
      rc=$?; echo "rc=$rc" | tee -a "$SAN"
      echo "sanitize $tool $s rc=$rc" >> "$LOG"
    done
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rc=" "$SAN" | tee -a "$LOG"
fi
if [[ " $steps " == *" demo "* ]]; then
  for size in small large; do
    echo "== python -m ssmkit.demo --size $size" | tee -a "$LOG"
    tl=$(left 120); (( tl == 0 )) && { echo "skip demo (deadline)" | tee -a "$LOG"; continue; }
    timeout $tl $PY -m ssmkit.demo --size $size 2>&1 | tail -25 | tee -a "$LOG"
    echo "rc=${PIPESTATUS[0]}" | tee -a "$LOG"
  done
fi
if [[ " $steps " == *" sweep "* ]]; then
  # The accuracy sweep (issue 13): results.json + sweep.md into the packed JSON folder.
  tl=$(left ${SWEEP_TIMEOUT:-240})
  if (( tl == 0 )); then echo "skip sweep (deadline)" | tee -a "$LOG"; else
    echo "== sweep_accuracy ${SWEEP_ARGS:-}" | tee -a "$LOG"
    t0=$SECONDS
    timeout $tl $PY benchmarks/sweep_accuracy.py --out "$JSON/sweep" --jobs "${SWEEP_JOBS:-16}" \
        --time-limit $((tl - 40 > 20 ? tl - 40 : 20)) ${SWEEP_ARGS:-} > "$OUT/sweep.log" 2>&1
    echo "rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
    tail -5 "$OUT/sweep.log" | tee -a "$LOG"
  fi
fi
if compgen -G "$JSON/*" > /dev/null; then tar -czf "$OUT/results.tgz" -C "$JSON" . && rm -rf "$JSON"; fi
echo "== done $(date -u)" | tee -a "$LOG"
