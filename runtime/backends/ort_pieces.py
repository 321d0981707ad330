"""ONNX Runtime sessions over parts ("pieces") of an exported graph file, for the CPU runtime's graph splits.

``ort_snake.py`` runs the VAE's convolutions as pieces with NumPy Snakes between them; ``ort_memo.py`` runs
the condition encoder's timbre part as a piece of its own, once per distinct reference. A piece is built
from the graph file's own nodes and initializer records (external-data references included): nothing is
written and no weight is copied; ONNX Runtime reads a piece's weights from the graph's data file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import ArtifactError
from .ort import _import_ort

FLOAT = 1  # onnx.TensorProto.FLOAT


def element_types(model) -> Callable[[str], int]:
    """value name -> ONNX element type (0 if unknown), from shape inference on the graph without its weights."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    return lambda name: types.get(name, 0)


def piece_io(nodes, later: set[str], constants: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) of a run of nodes: values it reads that come from before it (not initializers),
    and values it makes that ``later`` (steps after it, the graph's outputs) read."""
    made = {out for node in nodes for out in node.output}
    inputs = []
    for node in nodes:
        for name in node.input:
            if name and name not in made and name not in constants and name not in inputs:
                inputs.append(name)
    outputs = tuple(out for node in nodes for out in node.output if out in later)
    return tuple(inputs), outputs


def piece_model(model, nodes, inputs, outputs, elem: Callable[[str], int], name: str = "piece"):
    """A ModelProto of ``nodes`` of ``model`` with these inputs and outputs (no shapes) and the initializers
    they read, as stored (external-data records stay references into the graph's data file)."""
    from onnx import helper

    used = {value for node in nodes for value in node.input}
    return helper.make_model(
        helper.make_graph(nodes, f"{model.graph.name}_{name}",
                          [helper.make_tensor_value_info(n, elem(n), None) for n in inputs],
                          [helper.make_tensor_value_info(n, elem(n), None) for n in outputs],
                          [t for t in model.graph.initializer if t.name in used]),
        opset_imports=model.opset_import, ir_version=model.ir_version)


def memory_initializer(name: str, array):
    """An initializer record whose data ONNX Runtime takes from memory (``piece_session``'s
    ``initializers``): an external-data reference that is never read, so no copy goes into the model."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape),
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", f"{name}.in-memory"), ("offset", "0"), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def piece_session(path: Path, piece, threads: int | None, arena: bool, fallback: str,
                  initializers: dict | None = None):
    """An ONNX Runtime CPU session over ``piece`` (a ModelProto of a part of the graph file ``path``).

    ``fallback``: the load option that runs the graph whole instead, named in the error's remedy.
    ``initializers``: name -> float32 array for the piece's external-data initializers that are not in the
    data file (rearranged weights, see :func:`memory_initializer`); ONNX Runtime copies them in, so the
    arrays may be dropped once the session exists.
    """
    ort = _import_ort()
    options = ort.SessionOptions()
    if initializers:
        options.add_external_initializers(list(initializers),
                                          [ort.OrtValue.ortvalue_from_numpy(a) for a in initializers.values()])
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    # the piece is handed over as bytes: its external initializers are read from the graph's data file
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    try:
        return ort.InferenceSession(piece.SerializeToString(), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ArtifactError(
            f"ONNX Runtime cannot load a part of {path.name}: {str(exc).splitlines()[0][:300]}",
            f"re-run `acestep-trt export MODEL_DIR ARTIFACTS_DIR --overwrite`, or load with {fallback} to run "
            "the graph whole.",
        ) from None
