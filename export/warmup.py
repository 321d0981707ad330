"""Work the export's fork server does once so that each tracing child does not (``export/_preload.py``).

Measured on the tiny checkpoint (CPU seconds, 2 cores): the first ``torch.onnx.export`` in a process pays
about 1.2 s of one-off set-up (lazy imports and caches of torch.export, dynamo and onnxscript), and every
call rebuilds torch's registry of ONNX decompositions from onnxscript's torchlib, parsing the source of
about 500 functions (about 0.8 s). A child forked after :func:`warm_up` inherits both.
"""

from __future__ import annotations

import functools


def reuse_onnx_registry() -> None:
    """Build torch's ONNX decomposition registry once per opset and hand the same one to every export.

    ``torch.onnx.export`` (torch 2.13, ``_compat.export_compat``) calls ``ONNXRegistry.from_torchlib`` on
    each call; nothing mutates the result except ``custom_translation_table``, which this toolkit never
    passes. Skipped (exports only get slower) if torch renames that private API.
    """
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return
    original = getattr(_registration.ONNXRegistry, "from_torchlib", None)
    if original is None or getattr(original, "_acestep_cached", False):
        return
    cached = functools.lru_cache(maxsize=None)(original.__func__)

    def from_torchlib(cls, *args, **kwargs):
        return cached(cls, *args, **kwargs)

    from_torchlib._acestep_cached = True
    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)


def warm_up() -> None:
    """Export a three-operator module with a dynamic dim, in memory: the one-off set-up of the exporter.

    Tensors stay far below torch's parallel grain size, so no OpenMP thread pool exists when children fork.
    """
    import torch

    class Toy(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, (4,)).softmax(-1) @ x.transpose(-1, -2)

    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        torch.onnx.export(Toy(), (torch.randn(2, 3, 4),), dynamo=True, dynamic_shapes=({0: batch},),
                          opset_version=20, optimize=True, verbose=False)
