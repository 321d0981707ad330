#!/bin/bash
# GPU figures for the README, in phases that each fit one call on the lent GPU host (no network there;
# onnxruntime-gpu and diffusers come from ../shared/tools/gpu-stage parts unpacked into /tmp/site).
#
#   scripts/gpu_bench.sh setup        install the staged wheels and this checkout (no dependencies fetched)
#   scripts/gpu_bench.sh checkpoint   full-size random checkpoint        -> $WORK/ckpt
#   scripts/gpu_bench.sh export       fp32 and bf16 exports (bf16 validated natively on CUDA) -> $WORK/fp32, $WORK/bf16
#   scripts/gpu_bench.sh bench        30 s and 240 s clips, ours (fp32, bf16) against diffusers bf16; compare
#
# Results (JSON and text) go to ${OUT:-$WORK/results}. WORK defaults to /tmp/acestep (the host's /tmp is
# lost when the machine is given back, so run the phases back to back).
set -euo pipefail
WORK=${WORK:-/tmp/acestep}
RESULTS=${OUT:-$WORK/results}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$WORK" "$RESULTS"
py=python3
cli=("$py" -m acestep_trt.cli)

case "${1:-}" in
  setup)
    cat /tmp/stage/part-* > /tmp/stage/all.tar && mkdir -p /tmp/whl && tar -xf /tmp/stage/all.tar -C /tmp/whl
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
    "$py" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
    ;;
  checkpoint)
    "$py" scripts/random_checkpoint.py --size full "$WORK/ckpt"
    ;;
  export)
    "${cli[@]}" export "$WORK/ckpt" "$WORK/fp32" --overwrite | tee "$RESULTS/export-fp32.txt"
    "${cli[@]}" export "$WORK/ckpt" "$WORK/bf16" --precision bf16 --overwrite | tee "$RESULTS/export-bf16.txt"
    ;;
  bench)
    for precision in bf16 fp32; do
      for seconds in 30 240; do
        "${cli[@]}" bench "$WORK/ckpt" "$WORK/$precision" --device cuda --diffusers-dtype bf16 --duration "$seconds" \
          --runs 5 --warmup 2 --json "$RESULTS/bench-$precision-$seconds.json" | tee "$RESULTS/bench-$precision-$seconds.txt"
      done
    done
    "${cli[@]}" compare "$WORK/fp32" "$WORK/bf16" --device cuda --duration 30 --seeds 2 \
      --json "$RESULTS/compare-bf16.json" | tee "$RESULTS/compare-bf16.txt"
    ;;
  *)
    sed -n 2,12p "$0"
    exit 2
    ;;
esac
