#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU. GPU tests are skipped without a GPU.
# pytest's exit code is passed through: 5 (no tests collected) is a failure, as is any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
