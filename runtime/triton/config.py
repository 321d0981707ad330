"""``config.pbtxt`` text derived from the graph specs.

Batching choice: every graph's inputs and outputs all start with the same ``"batch"`` dim, so each graph
model is written with ``max_batch_size: N > 0`` and the batch dim dropped from ``dims`` (Triton's own
convention), plus ``dynamic_batching``. Triton then checks the batch size against ``N`` and, when several
orchestrator instances run at once, may merge their calls into one execution. The dynamic batcher only
merges requests whose other dims are equal (no ``allow_ragged_batch``), so requests with different text or
latent lengths are never padded together; that matters because the text encoder and the DiT's
cross-attention see padding. With ``max_batch_size: 0`` the full dims would be listed instead, but Triton
could then neither enforce the batch limit nor batch across requests.

A tensor whose only dim is the batch (``timestep [batch]``) would have empty ``dims``, which Triton
refuses; it is declared ``dims: [ 1 ]`` with ``reshape { shape: [ ] }`` (the documented idiom), so a
client sends ``[B, 1]`` and the model receives ``[B]``. :func:`wire_shape` applies that rule for callers.

The orchestrator (``acestep``, python backend) handles one prompt per request: ``max_batch_size: 0``,
scalars as ``dims: [ 1 ]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..specs import GraphSpec, ModelConfig, TensorSpec

# NumPy dtype names used in specs -> Triton data types.
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "bool": "TYPE_BOOL", "string": "TYPE_STRING"}

ONNX_PLATFORM = 'platform: "onnxruntime_onnx"'
PLAN_PLATFORM = 'platform: "tensorrt_plan"'
PYTHON_BACKEND = 'backend: "python"'
ORCHESTRATOR = "acestep"


def triton_dtype(dtype: str) -> str:
    """``"float32"`` -> ``"TYPE_FP32"``; KeyError names the unsupported dtype."""
    try:
        return DTYPES[dtype]
    except KeyError:
        raise KeyError(f"dtype {dtype!r} has no Triton data type (known: {sorted(DTYPES)})") from None


def is_batch_only(tensor: TensorSpec) -> bool:
    """True for ``[batch]`` tensors, declared ``dims: [1]`` + ``reshape: []`` (see module doc)."""
    return tuple(tensor.dims) == ("batch",)


def config_dims(tensor: TensorSpec) -> list[int]:
    """Triton ``dims`` of a batched graph tensor: batch dropped, symbolic dims -> -1."""
    if not tensor.dims or tensor.dims[0] != "batch":
        raise ValueError(f"{tensor.name}: first dim must be 'batch' for a batched Triton model, got {tensor.dims}")
    if is_batch_only(tensor):
        return [1]
    return [d if isinstance(d, int) else -1 for d in tensor.dims[1:]]


def wire_shape(tensor: TensorSpec, array: np.ndarray) -> np.ndarray:
    """The array as a Triton client must send it: ``[B]`` -> ``[B, 1]`` for batch-only tensors."""
    return array.reshape(array.shape + (1,)) if is_batch_only(tensor) else array


def _dims(values: list[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _tensor_block(tensor: TensorSpec, optional: bool = False) -> str:
    lines = [f'    name: "{tensor.name}"', f"    data_type: {triton_dtype(tensor.dtype)}",
             f"    dims: {_dims(config_dims(tensor))}"]
    if is_batch_only(tensor):
        lines.append("    reshape: { shape: [ ] }")
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _io(kind: str, blocks: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]"


@dataclass(frozen=True)
class LeafOptions:
    """How graph models are served: engine kind, batch limit, instances per model."""

    platform_line: str = ONNX_PLATFORM
    max_batch: int = 8
    instances: int = 1

    @property
    def instance_kind(self) -> str:
        # TensorRT plans need a GPU; ONNX Runtime follows Triton's default (GPU when present, else CPU).
        return "KIND_GPU" if self.platform_line == PLAN_PLATFORM else "KIND_AUTO"


def graph_model_config(spec: GraphSpec, options: LeafOptions, max_batch: int | None = None) -> str:
    """``config.pbtxt`` of one graph model, named after the graph. ``max_batch`` overrides the options'."""
    batch = options.max_batch if max_batch is None else max_batch
    return "\n".join([
        f'name: "{spec.name}"',
        options.platform_line,
        f"max_batch_size: {batch}",
        _io("input", [_tensor_block(t) for t in spec.inputs]),
        _io("output", [_tensor_block(t) for t in spec.outputs]),
        f"instance_group [ {{ count: {options.instances} kind: {options.instance_kind} }} ]",
        "dynamic_batching { }",
        "",
    ])


def with_platform(config_text: str, platform_line: str) -> str:
    """The same config with its platform/backend line replaced (used for the python ONNX shim)."""
    lines = config_text.split("\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(("platform:", "backend:")))
    lines[index] = platform_line
    return "\n".join(lines)


# Orchestrator request tensors: (name, spec dtype, optional). Scalars are ``dims: [ 1 ]``.
ORCHESTRATOR_INPUTS = (
    ("prompt", "string", False),
    ("lyrics", "string", True),
    ("audio_duration", "float32", True),
    ("seed", "int64", True),
    ("num_inference_steps", "int64", True),
    ("shift", "float32", True),
    ("guidance_scale", "float32", True),
    ("vocal_language", "string", True),
    ("bpm", "int64", True),
    ("keyscale", "string", True),
    ("timesignature", "string", True),
    # audio-to-audio tasks (runtime/tasks.py); complete_track_classes is comma-separated
    ("task_type", "string", True),
    ("track_name", "string", True),
    ("complete_track_classes", "string", True),
    ("audio_codes", "string", True),
    ("repainting_start", "float32", True),
    ("repainting_end", "float32", True),
    ("audio_cover_strength", "float32", True),
)
# Audio request tensors: FP32 [channels, samples] at the model's rate, optional.
ORCHESTRATOR_AUDIO_INPUTS = ("src_audio", "reference_audio")


def _plain_block(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    lines = [f'    name: "{name}"', f"    data_type: {triton_dtype(dtype)}", f"    dims: {_dims(dims)}"]
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def orchestrator_config(cfg: ModelConfig, instances: int) -> str:
    """``config.pbtxt`` of ``acestep``: prompt (+ optional settings) -> audio [channels, samples], sample_rate."""
    inputs = [_plain_block(name, dtype, [1], optional) for name, dtype, optional in ORCHESTRATOR_INPUTS]
    inputs += [_plain_block(name, "float32", [cfg.audio_channels, -1], True) for name in ORCHESTRATOR_AUDIO_INPUTS]
    outputs = [_plain_block("audio", "float32", [cfg.audio_channels, -1]),
               _plain_block("sample_rate", "int64", [1])]
    return "\n".join([
        f'name: "{ORCHESTRATOR}"',
        PYTHON_BACKEND,
        "max_batch_size: 0",
        _io("input", inputs),
        _io("output", outputs),
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
        "",
    ])
