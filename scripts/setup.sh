#!/usr/bin/env bash
# Create .venv in the repository root and install the toolkit with its export, ONNX Runtime, Triton client and
# test extras. torch is pinned to 2.13.0 and installed first: that version is a local CPU wheel on our machines,
# and an unpinned torch would download gigabytes of CUDA wheels.
#
# Also create .venv-triton: the Python environment of the Triton server shipped in nvidia-pytriton (used by
# tests/test_triton.py and docs/triton.md). Triton's python backend needs numpy<2, so it cannot share .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(-m pip install -q --disable-pip-version-check)
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python "${PIP[@]}" --upgrade pip
.venv/bin/python "${PIP[@]}" "torch==2.13.0"
.venv/bin/python "${PIP[@]}" -e ".[export,ort,triton,test]"
# The full TensorRT bindings wheel (1.3 MB, from PyPI), downloaded, never installed: it cannot be imported
# without TensorRT's native libraries, so tests/test_trt_real_api.py reads its extension module's strings.
TRT_BINDINGS="tensorrt-cu13-bindings==11.4.0.106"  # keep in step with tests/real_trt.py TRT_VERSION
if ! ls .venv/trt-wheels/tensorrt_cu13_bindings-11.4.0.106-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d .venv/trt-wheels "$TRT_BINDINGS"
fi

if [[ ! -x .venv-triton/bin/python ]]; then
  python3 -m venv .venv-triton
fi
.venv-triton/bin/python "${PIP[@]}" "numpy<2" "nvidia-pytriton==0.7.0" "onnxruntime>=1.18" "tokenizers>=0.20" \
  "safetensors>=0.4" "tqdm>=4.60"
