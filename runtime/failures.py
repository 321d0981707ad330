"""Backend failures during a call -> one :class:`BackendError` naming the stage and the remedy.

The request limits (:mod:`.limits`) refuse what is known not to fit before any work; what cannot be foreseen
(an allocation that fails anyway, a CUDA error, a TensorRT enqueue failure, a Triton graph model that fails)
surfaces here. Each graph runner of an :class:`~acestep_trt.runtime.AceStepRuntime` is wrapped in a
:class:`GuardedRunner`, so the exception types of ONNX Runtime, cuda-bindings and NumPy never reach the
caller, and the runtime object stays usable: the sessions and engines themselves are left as they are
(ONNX Runtime frees a failed run's buffers; the TensorRT runner's buffers are sized per call).
"""

from __future__ import annotations

import functools
import logging

from .errors import AceStepError, BackendError

log = logging.getLogger(__name__)

_MEMORY_WORDS = ("alloc", "out of memory", "bad_alloc", "cudaerrormemoryallocation", "oom")
_MEMORY_FIX = ("the request did not fit in memory: generate a shorter clip, fewer prompts per call, or decode with a "
               "smaller VAE window (--vae-window / AceStepRuntime.load(vae_window=)); close other programs using "
               "the {where}.")
_OTHER_FIX = ("retry the call; if it fails again, run with -v and report the message together with the backend "
              "(--backend ort or --device cpu avoid the GPU path).")


def _is_backend_exception(exc: BaseException) -> bool:
    """ONNX Runtime's pybind exception types (``onnxruntime.capi.onnxruntime_pybind11_state``), MemoryError, and
    the RuntimeError/OSError that cuda-bindings, cupy and TensorRT's bindings raise."""
    if isinstance(exc, AceStepError):
        return False
    if isinstance(exc, (MemoryError, RuntimeError, OSError)):
        return True
    return type(exc).__module__.startswith("onnxruntime")


def backend_error(exc: BaseException, stage: str, device: str = "cpu") -> BackendError:
    """The one BackendError for ``exc`` raised in ``stage`` (a graph name or a step of the call)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    text = f"{type(exc).__name__} {first}".lower()
    memory = isinstance(exc, MemoryError) or any(word in text for word in _MEMORY_WORDS)
    where = "GPU" if device == "cuda" else "machine"
    if memory:
        return BackendError(f"{stage} ran out of memory ({first or type(exc).__name__}).",
                            _MEMORY_FIX.format(where=where))
    return BackendError(f"{stage} failed in the backend ({type(exc).__name__}: {first}).", _OTHER_FIX)


class GuardedRunner:
    """A graph runner whose methods raise :class:`BackendError` instead of the backend's own exceptions.

    Attribute reads and writes go to the wrapped runner (``providers``, ``spec``, ``session``, ...); methods
    are wrapped on access. ``None``-returning probes such as ``getattr(runner, "denoise", None)`` keep working.
    """

    def __init__(self, runner, device: str = "cpu"):
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "_device", device)

    @property
    def wrapped(self):
        return self._runner

    def __getattr__(self, name):
        value = getattr(self._runner, name)
        if not callable(value) or name.startswith("__"):
            return value
        stage = getattr(self._runner, "name", None) or type(self._runner).__name__

        @functools.wraps(value)
        def guarded(*args, **kwargs):
            try:
                return value(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  filtered: only backend failures are translated
                if not _is_backend_exception(exc):
                    raise
                log.debug("%s.%s failed", stage, name, exc_info=True)
                raise backend_error(exc, stage, self._device) from None

        return guarded

    def __setattr__(self, name, value):
        setattr(self._runner, name, value)


def guard_runners(runners: dict, device: str = "cpu") -> dict:
    """``{name: GuardedRunner(runner)}`` (idempotent)."""
    return {name: r if isinstance(r, GuardedRunner) else GuardedRunner(r, device) for name, r in runners.items()}


def guard_call(method):
    """Decorator for ``AceStepRuntime.__call__``: a MemoryError in the host-side NumPy work (noise, context,
    guidance halves, the decoded audio) becomes the same BackendError as one inside a graph."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except MemoryError as exc:
            raise backend_error(exc, "host memory (NumPy)", getattr(self, "device", "cpu")) from None

    return guarded
