#!/usr/bin/env bash
# Set up (scripts/setup.sh), then build a tiny random-weight checkpoint, export it and generate a clip on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/acestep-trt demo --out-dir demo-out --overwrite "$@"
