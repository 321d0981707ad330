"""Execution backends: each turns a graph spec + artifact into ``run(feeds) -> outputs``."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import BackendError

BACKENDS = ("auto", "ort", "trt")
DEVICES = ("cpu", "cuda")


class GraphRunner(Protocol):
    """One loaded graph. ``run`` takes and returns NumPy arrays keyed by spec tensor names."""

    name: str
    providers: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def resolve_backend(backend: str, device: str) -> str:
    """Pick the concrete backend for ``backend``/``device`` or raise :class:`BackendError`."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}.", f"use one of {', '.join(BACKENDS)}.")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}.", f"use one of {', '.join(DEVICES)}.")
    if backend == "trt":
        raise BackendError(
            "the TensorRT backend is not part of this release (engines cannot be built or run yet).",
            "use --backend ort (ONNX Runtime), or --backend auto.",
        )
    return "ort"
