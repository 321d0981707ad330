"""TensorRT's documented ONNX operator support, as data, and a check of an exported graph against it.

``tensorrt_onnx_operators.json`` holds rows of the onnx-tensorrt operator matrix (source and TensorRT version
recorded in the file). :func:`graph_uses` lists every (operator, data type) pair of an ONNX graph, and
:func:`unsupported` names the pairs, non-constant inputs and constant values the matrix does not cover.
A graph that passes can still fail TensorRT's parser for reasons the matrix does not document; one that
fails uses something TensorRT does not promise to parse.

Needs the ``onnx`` package (the ``ort`` or ``export`` extra), imported when a graph is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SUPPORT_TABLE = Path(__file__).with_name("tensorrt_onnx_operators.json")

# ONNX TensorProto element types -> the matrix's type names
TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 3: "INT8",
              11: "DOUBLE"}

# Inputs that are indices, shapes or axes by the ONNX spec (always INT64 or BOOL), not the data the matrix's
# "Supported Types" column is about. Every other input is checked; for Cast, Constant and ConstantOfShape the
# output is checked too (the type they produce).
PARAMETER_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Squeeze": {1}, "Unsqueeze": {1}, "Slice": {1, 2, 3, 4},
    "Gather": {1}, "GatherElements": {1}, "GatherND": {1}, "ScatterElements": {1}, "ScatterND": {1},
    "Pad": {1, 2, 3}, "Split": {1}, "CumSum": {1}, "TopK": {1}, "ReduceMean": {1}, "ReduceSum": {1},
    "ReduceMax": {1}, "Where": {0}, "ConstantOfShape": {0}, "Trilu": {1},
}
OUTPUT_TYPED = {"Cast", "Constant", "ConstantOfShape"}


@dataclass(frozen=True)
class OperatorUse:
    """One operator of a graph with the type of one of its data inputs (or outputs, see OUTPUT_TYPED)."""

    op: str
    dtype: str
    node: str  # the first node seen with this (op, dtype), for messages


@lru_cache(maxsize=1)
def support_table() -> dict:
    """The parsed ``tensorrt_onnx_operators.json``: ``{"source": {...}, "operators": {op: row}}``."""
    return json.loads(SUPPORT_TABLE.read_text(encoding="utf-8"))


def _load(path: str | Path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # types and dims only; weights are not needed
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the exporter's own value_info is used as it is
        pass
    return model


def graph_uses(path: str | Path) -> tuple[int, list[OperatorUse], list[str]]:
    """(opset, operator uses, problems) of the ONNX graph at ``path``.

    Problems are constant-input restrictions the matrix states and the graph breaks, and values whose type
    is unknown (so that a check can never pass by not seeing a type).
    """
    model = _load(path)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update({o: next((a.t for a in node.attribute if a.name == "value"), None) for o in node.output})
    types.update({name: t.data_type for name, t in constants.items() if t is not None})
    table = support_table()["operators"]
    uses: dict[tuple[str, str], OperatorUse] = {}
    problems: list[str] = []
    for node in graph.node:
        skip = PARAMETER_INPUTS.get(node.op_type, set())
        typed = [v for i, v in enumerate(node.input) if v and i not in skip]
        typed += list(node.output[:1]) if node.op_type in OUTPUT_TYPED else []
        for value in typed:
            name = TYPE_NAMES.get(types.get(value, 0))
            if name is None:
                problems.append(f"{node.op_type} node {node.name!r}: type of {value!r} unknown "
                                f"({types.get(value, 'no type information')})")
                continue
            uses.setdefault((node.op_type, name), OperatorUse(node.op_type, name, node.name))
        row = table.get(node.op_type, {})
        problems += _constant_problems(node, row, constants)
    return opset, sorted(uses.values(), key=lambda u: (u.op, u.dtype)), problems


def _constant_problems(node, row: dict, constants: dict) -> list[str]:
    """The row's ``constant_inputs`` must be initializers/Constants; ``max_constant`` bounds their values."""
    import onnx.numpy_helper

    problems = []
    for index in row.get("constant_inputs", []):
        if index < len(node.input) and node.input[index] and node.input[index] not in constants:
            problems.append(f"{node.op_type} node {node.name!r}: input {index} must be a build-time constant "
                            f"({row.get('restrictions', '')})")
    for index, limit in row.get("max_constant", {}).items():
        value = node.input[int(index)] if int(index) < len(node.input) else ""
        if value not in constants:
            problems.append(f"{node.op_type} node {node.name!r}: input {index} is not a constant, so the documented "
                            f"limit ({row.get('restrictions', '')}) cannot hold for every shape")
        elif int(onnx.numpy_helper.to_array(constants[value]).max()) > limit:
            problems.append(f"{node.op_type} node {node.name!r}: input {index} exceeds {limit} "
                            f"({row.get('restrictions', '')})")
    return problems


def unsupported(path: str | Path) -> list[str]:
    """Everything in the graph at ``path`` outside TensorRT's documented ONNX support (empty: all documented)."""
    source = support_table()["source"]
    table = support_table()["operators"]
    opset, uses, problems = graph_uses(path)
    lo, hi = source["opset_range"]
    out = [] if lo <= opset <= hi else [f"opset {opset} is outside TensorRT {source['tensorrt_version']}'s {lo}..{hi}"]
    for use in uses:
        row = table.get(use.op)
        if row is None:
            out.append(f"{use.op} (node {use.node!r}) has no row in {SUPPORT_TABLE.name}: copy it from the source "
                       f"({source['url']}) or avoid the operator")
        elif use.dtype not in row["types"]:
            out.append(f"{use.op} on {use.dtype} (node {use.node!r}): TensorRT {source['tensorrt_version']} documents "
                       f"{', '.join(row['types'])} only")
    return out + problems
