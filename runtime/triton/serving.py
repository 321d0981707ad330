"""What the ``acestep`` orchestrator runs inside Triton's python backend.

The generation loop is :class:`~acestep_trt.runtime.AceStepRuntime`'s own: only its ``runners`` differ.
Locally a runner is an ONNX Runtime session; here it is a :class:`BlsGraph` that sends the same feeds to
the graph model of the same name through Business Logic Scripting (BLS). ``pb_utils`` (the module
``triton_python_backend_utils``, which exists only inside the python backend stub) is passed in, so this
module imports and unit-tests without Triton.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import Artifacts, load_artifacts
from ..errors import ArtifactError, BackendError, InputError
from ..pipeline import AceStepRuntime, check_arguments
from ..specs import COVER_BLEND, GRAPH_NAMES, GraphSpec
from .config import ORCHESTRATOR_AUDIO_INPUTS, wire_shape

log = logging.getLogger(__name__)

ORCHESTRATOR_JSON = "orchestrator.json"
ARTIFACTS_SUBDIR = "artifacts"
_REGENERATE = "re-run `acestep-trt triton ARTIFACTS_DIR REPOSITORY_DIR --overwrite`."


class BlsGraph:
    """A graph runner that executes graph model ``model_name`` through BLS.

    ``run(feeds)`` takes and returns NumPy arrays keyed by spec tensor names, like ``OrtGraph.run``.
    """

    def __init__(self, spec: GraphSpec, model_name: str, pb_utils):
        self.name = spec.name
        self.spec = spec
        self.model_name = model_name
        self.providers = [f"triton:{model_name}"]
        self._pb = pb_utils
        self._outputs = [t.name for t in spec.outputs]
        self.should_stop: Callable[[str], None] | None = None  # set per request by watch_request

    def _request(self, feeds: dict[str, np.ndarray]):
        pb = self._pb
        inputs = [pb.Tensor(t.name, np.ascontiguousarray(wire_shape(t, feeds[t.name]))) for t in self.spec.inputs]
        kwargs = {"model_name": self.model_name, "requested_output_names": self._outputs, "inputs": inputs}
        if hasattr(pb, "PreferredMemory"):  # ask for host outputs: the loop runs in NumPy
            kwargs["preferred_memory"] = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0)
        return pb.InferenceRequest(**kwargs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds)
        if self.should_stop is not None:  # a cancelled or timed-out request stops before its next graph call
            self.should_stop(self.name)
        response = self._request(feeds).exec()
        if response.has_error():
            raise BackendError(f"graph model {self.model_name!r} failed: {response.error().message()}",
                               "check the Triton server log for that model.")
        out = {}
        for name in self._outputs:
            tensor = self._pb.get_output_tensor_by_name(response, name)
            if not tensor.is_cpu():
                raise BackendError(f"graph model {self.model_name!r} returned {name} in GPU memory.",
                                   "use a Triton release whose BLS honours preferred_memory (23.04 or later).")
            out[name] = tensor.as_numpy()
        return out


def served_graphs(artifacts: Artifacts) -> list[str]:
    """The graphs served as Triton models: the four core graphs and the audio-to-audio ones present
    (``cover_blend`` serves only the device-resident loop, which the orchestrator does not run)."""
    return [*GRAPH_NAMES, *(g for g in artifacts.audio_graphs if g != COVER_BLEND)]


def load_orchestrator_artifacts(root: Path) -> Artifacts:
    """The artifact files the orchestrator needs (manifest, constants, tokenizer) without the graphs.

    The manifest is the export's own (provenance); the graph files it lists live in the graph models,
    so only the other files are verified (sizes and SHA-256).
    """
    return load_artifacts(root, verify=True, graphs=False)


def load_orchestrator(version_dir: Path, pb_utils) -> AceStepRuntime:
    """``AceStepRuntime`` whose runners call the graph models named in ``orchestrator.json`` via BLS."""
    try:
        settings = json.loads((version_dir / ORCHESTRATOR_JSON).read_text(encoding="utf-8"))
        graph_models = settings["graph_models"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{version_dir / ORCHESTRATOR_JSON} is missing or invalid ({exc}).", _REGENERATE) from None
    artifacts = load_orchestrator_artifacts(version_dir / ARTIFACTS_SUBDIR)
    runners = {name: BlsGraph(artifacts.spec(name), graph_models[name], pb_utils)
               for name in served_graphs(artifacts) if name in graph_models}
    runtime = AceStepRuntime(artifacts, runners, backend="triton", device="triton",
                             vae_window=int(settings.get("vae_window", 256)))
    runtime.request_timeout_s = float(settings.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S))
    return runtime


DEFAULT_REQUEST_TIMEOUT_S = 900.0


def watch_request(runtime: AceStepRuntime, is_cancelled: Callable[[], bool], client_timeout_us: int = 0) -> float:
    """Make every graph call of ``runtime``'s next request first check that the request is still wanted.

    The request stops (``BackendError``, the request's error response) before its next graph call once the
    client has cancelled it (``InferenceRequest.is_cancelled``, e.g. a gRPC call cancelled or past its
    deadline) or once it has run longer than the server's limit (``orchestrator.json`` ``request_timeout_s``,
    ``acestep-trt triton --request-timeout``) or the request's own timeout (Triton's ``timeout`` field, in
    microseconds), whichever is shorter. Returns that limit in seconds (0: none).
    """
    limits = [t for t in (getattr(runtime, "request_timeout_s", 0.0), client_timeout_us / 1e6) if t and t > 0]
    limit = min(limits) if limits else 0.0
    started = time.monotonic()

    def check(stage: str) -> None:
        if is_cancelled():
            raise BackendError(f"the request was cancelled by its client; stopped before {stage}.",
                               "nothing to fix on the server; resend the request if it is still wanted.")
        if limit and time.monotonic() - started > limit:
            raise BackendError(f"the request ran longer than its time limit of {limit:g} s; stopped before {stage}.",
                               "ask for a shorter clip or fewer steps, or raise the limit (the request's timeout, "
                               "or `acestep-trt triton --request-timeout`).")

    for runner in runtime.runners.values():
        runner.should_stop = check
    return limit


# ---------------------------------------------------------------------------------------------- requests

_STRINGS = ("prompt", "lyrics", "vocal_language", "keyscale", "timesignature", "task_type", "track_name",
            "complete_track_classes", "audio_codes")
_FLOATS = ("audio_duration", "shift", "guidance_scale", "repainting_start", "repainting_end", "audio_cover_strength")
_INTS = ("seed", "num_inference_steps", "bpm")


def _scalar(name: str, array: np.ndarray):
    if array.size != 1:
        raise InputError(f"`{name}` must hold exactly one value, got shape {list(array.shape)}.",
                         f"send {name} with shape [1].")
    return array.reshape(-1)[0]


def _text(name: str, value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"`{name}` is not valid UTF-8.", f"send {name} as UTF-8 text.") from None
    if isinstance(value, str):
        return value
    raise InputError(f"`{name}` must be a string (BYTES), got {type(value).__name__}.", f"send {name} as BYTES.")


def _number(name: str, value, kind):
    if kind is int:
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise InputError(f"`{name}` must be an integer, got {value!r}.", f"send {name} as INT64.")
        return int(value)
    if not isinstance(value, (float, int, np.floating, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise InputError(f"`{name}` must be a number, got {value!r}.", f"send {name} as FP32.")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"`{name}` must be finite, got {value}.", f"send a finite {name}.")
    return value


def request_kwargs(get: Callable[[str], np.ndarray | None]) -> dict:
    """Runtime keyword arguments from request tensors. ``get(name)`` returns the array or None when absent.

    Raises :class:`InputError` for a missing prompt, a non-scalar tensor, a wrong type or a negative seed;
    numeric ranges (duration, steps, shift) are checked by the runtime itself.
    """
    kwargs: dict = {}
    for name in _STRINGS + _FLOATS + _INTS:
        array = get(name)
        if array is None:
            continue
        value = _scalar(name, np.asarray(array))
        if name in _STRINGS:
            kwargs[name] = _text(name, value)
        else:
            kwargs[name] = _number(name, value, int if name in _INTS else float)
    if "prompt" not in kwargs:
        raise InputError("the request has no `prompt`.", "send a BYTES tensor `prompt` of shape [1].")
    if kwargs.get("seed", 0) < 0:
        raise InputError(f"`seed` must be >= 0, got {kwargs['seed']}.", "send a non-negative INT64 seed.")
    if "complete_track_classes" in kwargs:
        kwargs["complete_track_classes"] = [c.strip() for c in kwargs["complete_track_classes"].split(",") if c.strip()]
    for name in ORCHESTRATOR_AUDIO_INPUTS:  # FP32 [channels, samples]; checked by runtime.tasks.check_audio
        array = get(name)
        if array is not None:
            kwargs[name] = np.asarray(array)
    if "src_audio" not in kwargs and "audio_codes" not in kwargs:  # else the source sets the length
        kwargs.setdefault("audio_duration", 30.0)
        # The request limits (runtime/limits.py: duration, steps, memory) are the runtime's own, checked in
        # AceStepRuntime.__call__ before its first graph call; check duration and steps here already, as the
        # CLI does (with a source or codes the length comes from them: checked there).
        check_arguments(kwargs["audio_duration"], kwargs.get("num_inference_steps", 8), kwargs.get("shift", 3.0),
                        kwargs.get("guidance_scale", 7.0))
    return kwargs


def generate(runtime: AceStepRuntime, kwargs: dict) -> tuple[np.ndarray, int]:
    """One request through the runtime's loop -> (audio [channels, samples] float32, sample rate)."""
    out = runtime(**kwargs, show_progress=False)
    return np.ascontiguousarray(out.audios[0], dtype=np.float32), int(out.sample_rate)
