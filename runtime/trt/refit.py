"""Refit a TensorRT engine's weights in place (LoRA adapters on the ``dit_step`` engine).

An engine built with ``BuilderFlag.REFIT`` (``acestep-trt build --refit``) keeps its weights replaceable:
``trt.Refitter(engine, logger)`` lists them by name (``get_all_weights``; the ONNX parser names them after
the graph's initializers, which is what the manifest's DiT parameter map records), takes new values with
``set_named_weights`` in the initializer's layout and dtype, and ``refit_cuda_engine`` swaps them on the GPU.
Every name is checked against the refittable set first, so a wrong map fails before anything changes.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendError

_REBUILD = "rebuild the engines with `acestep-trt build ARTIFACTS_DIR --refit` (and your other options)."


def refittable_names(trt, engine) -> set[str]:
    """Names of the engine's refittable weights; :class:`BackendError` when it was built without REFIT."""
    if not getattr(engine, "refittable", False):
        raise BackendError("the dit_step engine was built without --refit, so LoRA adapters cannot change its "
                           "weights.", _REBUILD)
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    return set(refitter.get_all_weights())


def _weights(trt, array: np.ndarray):
    """A ``trt.Weights`` view of ``array`` (bf16 given as uint16 bits); the array must outlive the refit."""
    kind = {np.dtype(np.float32): trt.DataType.FLOAT, np.dtype(np.float16): trt.DataType.HALF,
            np.dtype(np.uint16): getattr(trt.DataType, "BF16", None)}[array.dtype]
    return trt.Weights(kind, array.ctypes.data, array.size)


def refit(trt, engine, values: dict[str, np.ndarray]) -> None:
    """Replace the named weights of ``engine`` with ``values`` {initializer name: array}; all or nothing."""
    names = refittable_names(trt, engine)
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    unknown = sorted(set(values) - names)
    if unknown:
        raise BackendError(f"the dit_step engine has no refittable weight named {', '.join(unknown[:3])}: it was "
                           "built from other ONNX files than these artifacts.", _REBUILD)
    keep = []  # the host arrays TensorRT reads during refit_cuda_engine
    for name, array in values.items():
        array = np.ascontiguousarray(array)
        keep.append(array)
        if not refitter.set_named_weights(name, _weights(trt, array)):
            raise BackendError(f"TensorRT refused new values for {name} (shape or type differs from the engine's).",
                               _REBUILD)
    missing = list(refitter.get_missing_weights())
    if missing:
        raise BackendError(f"TensorRT needs {len(missing)} more weights to refit ({', '.join(missing[:3])}).",
                           _REBUILD)
    if not refitter.refit_cuda_engine():
        raise BackendError("TensorRT could not refit the dit_step engine (see the TensorRT log).", _REBUILD)
    del keep
