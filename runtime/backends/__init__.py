"""Execution backends: each turns a graph spec + artifact into ``run(feeds) -> outputs``."""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from ..errors import BackendError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort", "trt")
DEVICES = ("cpu", "cuda")


class GraphRunner(Protocol):
    """One loaded graph. ``run`` takes and returns NumPy arrays keyed by spec tensor names."""

    name: str
    providers: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def resolve_backend(backend: str, device: str, artifacts_dir=None, engine_dir=None) -> str:
    """Pick the concrete backend (``"ort"`` or ``"trt"``) for ``backend``/``device`` or raise :class:`BackendError`.

    ``auto`` picks TensorRT when ``device`` is ``cuda`` and engines built by ``acestep-trt build`` exist
    for ``artifacts_dir`` (in ``engine_dir``, default ``ARTIFACTS_DIR/engines``) and may run here
    (TensorRT and a GPU present, same TensorRT version and GPU, same ONNX files); else ONNX Runtime.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}.", f"use one of {', '.join(BACKENDS)}.")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}.", f"use one of {', '.join(DEVICES)}.")
    if backend == "trt" and device != "cuda":
        raise BackendError("the TensorRT backend runs on the GPU only.", "pass --device cuda, or use --backend ort.")
    if backend != "auto":
        return backend
    if device != "cuda" or artifacts_dir is None:
        return "ort"
    from .trt import engines_usable

    reason = engines_usable(artifacts_dir, engine_dir)
    if reason is None:
        return "trt"
    log.info("backend auto: ONNX Runtime (%s)", reason)
    return "ort"
