#!/usr/bin/env bash
# Create .venv in the repository root and install the toolkit with its export, ONNX Runtime and test extras.
# torch is pinned to 2.13.0 and installed first: that version is a local CPU wheel on our machines, and an
# unpinned torch would download gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[export,ort,test]"
