"""Calling the ``acestep`` orchestrator with ``tritonclient`` over HTTP or gRPC (``acestep-trt triton-client``).

Example::

    from acestep_trt.runtime.triton.client import request_audio
    audio, rate = request_audio("127.0.0.1:8000", "http", prompt="lo-fi piano, rain", audio_duration=10.0, seed=42)
    # audio: float32 [2, samples]; rate: 48000

Each keyword becomes one request tensor of shape [1]: strings as BYTES, ``audio_duration``/``shift``/
``guidance_scale`` as FP32, ``seed``/``num_inference_steps``/``bpm`` as INT64. ``None`` values are not sent
(the orchestrator's defaults apply). A request the server rejects raises :class:`BackendError` with the
server's message.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendError, InputError
from .config import ORCHESTRATOR, ORCHESTRATOR_AUDIO_INPUTS, ORCHESTRATOR_INPUTS

PROTOCOLS = ("http", "grpc")
_WIRE = {"string": ("BYTES", np.object_), "float32": ("FP32", np.float32), "int64": ("INT64", np.int64)}
_KINDS = {name: dtype for name, dtype, _ in ORCHESTRATOR_INPUTS}


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}.", f"use one of {', '.join(PROTOCOLS)}.")
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError:
        raise BackendError("tritonclient is not installed.", "pip install 'acestep-trt[triton]'.") from None
    return module


def _input(module, name: str, value):
    if name in ORCHESTRATOR_AUDIO_INPUTS:  # FP32 [channels, samples]
        array = np.ascontiguousarray(value, dtype=np.float32)
        tensor = module.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        return tensor
    if isinstance(value, (list, tuple)) and name == "complete_track_classes":
        value = ",".join(value)
    if name not in _KINDS:
        raise InputError(f"`{name}` is not an input of the acestep model.", f"use one of {sorted(_KINDS)}.")
    wire, dtype = _WIRE[_KINDS[name]]
    array = np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=dtype)
    tensor = module.InferInput(name, [1], wire)
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(module, **values) -> list:
    """InferInputs for the non-None ``values`` (names from the orchestrator config)."""
    return [_input(module, name, value) for name, value in values.items() if value is not None]


def request_audio(url: str, protocol: str = "http", model: str = ORCHESTRATOR, timeout: float = 600.0,
                  **values) -> tuple[np.ndarray, int]:
    """One request -> (audio float32 [channels, samples], sample rate)."""
    module = _module(protocol)
    from tritonclient.utils import InferenceServerException

    try:
        if protocol == "http":
            client = module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        else:
            client = module.InferenceServerClient(url)
        outputs = [module.InferRequestedOutput("audio"), module.InferRequestedOutput("sample_rate")]
        kwargs = {"client_timeout": timeout} if protocol == "grpc" else {}
        result = client.infer(model, build_inputs(module, **values), outputs=outputs, **kwargs)
    except InferenceServerException as exc:
        # The server's message already names the problem and its fix.
        raise BackendError(f"Triton at {url} ({protocol}) refused the request: {exc.message()}") from None
    except (ConnectionError, OSError) as exc:
        raise BackendError(f"cannot reach Triton at {url} ({protocol}): {exc}",
                           "start the server or pass the right --url.") from None
    finally:
        if "client" in locals():
            client.close()
    return result.as_numpy("audio"), int(result.as_numpy("sample_rate").reshape(-1)[0])
