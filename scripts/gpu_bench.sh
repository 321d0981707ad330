#!/bin/bash
# GPU figures for the README, sized for a 15-minute device session (machine start and the wheel uploads
# included): one `setup` call after the staged parts are on the host, then one `run` call.
#
#   scripts/gpu_bench.sh setup   install the staged wheels (onnxruntime-gpu, diffusers from ../shared/tools/gpu-stage,
#                                copied to /tmp/stage/) and this checkout into /tmp/site; no network needed
#   scripts/gpu_bench.sh run     what matters most, in order, each step's output kept as it finishes:
#                                full-size random checkpoint; bf16 export validated natively on CUDA;
#                                30 s and 240 s clips against diffusers bf16, 3 runs after 1 warm-up
#
# Results (text and JSON) go to ${OUT:-$WORK/results} as each step ends, so a run cut short by the time
# limit still returns what it finished. WORK defaults to /tmp/acestep (the host's /tmp is lost when the
# machine is given back: run the two calls back to back). STEP_TIMEOUT (seconds, default 240) bounds each
# step so that one slow step cannot eat the steps after it.
set -euo pipefail
WORK=${WORK:-/tmp/acestep}
RESULTS=${OUT:-$WORK/results}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$WORK" "$RESULTS"
py=python3
cli=("$py" -m acestep_trt.cli)

step() {  # step NAME COMMAND...: run with a time limit, log to $RESULTS/NAME.txt, keep going on failure
  local name=$1; shift
  local started=$SECONDS
  echo "== $name ($(date -u +%T))"
  if timeout "$STEP_TIMEOUT" "$@" > "$RESULTS/$name.txt" 2>&1; then
    echo "   ok in $((SECONDS - started)) s"
  else
    echo "   FAILED or timed out (exit $?) after $((SECONDS - started)) s; tail:"; tail -n 5 "$RESULTS/$name.txt"
  fi
}

case "${1:-}" in
  setup)
    cat /tmp/stage/part-* > /tmp/stage/all.tar && mkdir -p /tmp/whl && tar -xf /tmp/stage/all.tar -C /tmp/whl
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
    "$py" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
    ;;
  run)
    step checkpoint "$py" scripts/random_checkpoint.py --size full "$WORK/ckpt"
    step export-bf16 "${cli[@]}" export "$WORK/ckpt" "$WORK/bf16" --precision bf16 --overwrite
    for seconds in 30 240; do
      step "bench-bf16-$seconds" "${cli[@]}" bench "$WORK/ckpt" "$WORK/bf16" --device cuda --diffusers-dtype bf16 \
        --duration "$seconds" --runs 3 --warmup 1 --json "$RESULTS/bench-bf16-$seconds.json"
    done
    ls -la "$RESULTS"
    ;;
  *)
    sed -n 2,15p "$0"
    exit 2
    ;;
esac
