"""ONNX Runtime backend (CPU, or CUDA when onnxruntime-gpu and a GPU are present)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, BackendError
from ..specs import GraphSpec

log = logging.getLogger(__name__)

_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError(
            "ONNX Runtime is not installed.", "pip install 'acestep-trt[ort]' (or onnxruntime-gpu for CUDA)."
        ) from None
    return ort


def check_device(device: str) -> None:
    """Raise unless ``device`` has an ONNX Runtime provider here (no silent CPU fallback)."""
    ort = _import_ort()
    if _PROVIDER[device] not in ort.get_available_providers():
        raise BackendError(
            f"device {device!r} is not available to ONNX Runtime here (providers: {ort.get_available_providers()}).",
            "install onnxruntime-gpu on a machine with an NVIDIA GPU and CUDA 12/13, or use --device cpu.",
        )


class OrtGraph:
    """One ONNX graph in an ``InferenceSession``; feeds are checked against the spec first."""

    def __init__(self, path: Path, spec: GraphSpec, device: str = "cpu", threads: int | None = None):
        ort = _import_ort()
        check_device(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = [_PROVIDER[device]] + (["CPUExecutionProvider"] if device != "cpu" else [])
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(
                f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0][:300]}",
                "re-run `acestep-trt export MODEL_DIR ARTIFACTS_DIR --overwrite`.",
            ) from None
        self.providers = self.session.get_providers()
        if self.providers[0] != _PROVIDER[device]:
            raise BackendError(
                f"ONNX Runtime placed {spec.name} on {self.providers[0]} instead of {_PROVIDER[device]}.",
                "check the CUDA installation (nvidia-smi, CUDA libraries on LD_LIBRARY_PATH) or use --device cpu.",
            )
        self.name = spec.name
        self.spec = spec
        self._outputs = [o.name for o in spec.outputs]

        self.device = device

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds)
        values = self.session.run(self._outputs, {t.name: feeds[t.name] for t in self.spec.inputs})
        return dict(zip(self._outputs, values))

    # -- device-resident execution (IO binding): the same code path on "cuda" and, for tests, on "cpu" --

    def to_device(self, array: np.ndarray):
        """Copy a host array into an ``OrtValue`` on this graph's device."""
        ort = _import_ort()
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty(self, shape: tuple[int, ...], dtype=np.float32):
        """Preallocate an ``OrtValue`` on this graph's device (reused across calls of one shape)."""
        ort = _import_ort()
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, 0)

    def run_bound(self, inputs: dict, outputs: dict) -> None:
        """Run with every input and output bound to device ``OrtValue``s; nothing crosses to the host."""
        binding = self.session.io_binding()
        for spec in self.spec.inputs:
            binding.bind_ortvalue_input(spec.name, inputs[spec.name])
        for name in self._outputs:
            binding.bind_ortvalue_output(name, outputs[name])
        self.session.run_with_iobinding(binding)
