"""Export-time graph rewrites (``export/graph_rewrites.py``): RMSNorms in the form ONNX Runtime fuses.

Parity of the exported graphs with PyTorch and diffusers runs through test_parity.py and the export's own
validation; here: the rule on hand-built graphs, and the fusion it enables on the tiny export's graphs.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from acestep_trt.export import graph_rewrites
from acestep_trt.runtime.specs import CONDITION_ENCODER, DIT_STEP, TEXT_ENCODER


def _norm_graph(reciprocal_first: bool, shared: bool) -> onnx.ModelProto:
    """x [2, 5, 8] -> x * 1/sqrt(mean(x^2) + eps) (and, if ``shared``, that reciprocal as a second output)."""
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["v"]),
        helper.make_node("Sqrt", ["v"], ["s"]),
        helper.make_node("Reciprocal", ["s"], ["r"]),
        helper.make_node("Mul", ["r", "x"] if reciprocal_first else ["x", "r"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])]
    if shared:
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 5, 1]))
    graph = helper.make_graph(
        nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])], outputs,
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
                     helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})


@pytest.mark.parametrize("reciprocal_first", [False, True])
def test_times_reciprocal_sqrt_becomes_a_division(reciprocal_first):
    proto = _norm_graph(reciprocal_first, shared=False)
    model = ir.serde.deserialize_model(proto)
    assert graph_rewrites.apply(model) == 1
    rewritten = ir.serde.serialize_model(model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") == 1 and ops.count("Sqrt") == 1
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32) * 3
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(_run(rewritten, x)[0], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run(rewritten, x)[0], _run(proto, x)[0], rtol=1e-6, atol=1e-7)


def test_a_reciprocal_used_elsewhere_is_left_alone():
    model = ir.serde.deserialize_model(_norm_graph(False, shared=True))
    assert graph_rewrites.apply(model) == 0
    assert "Reciprocal" in [n.op_type for n in ir.serde.serialize_model(model).graph.node]


@pytest.mark.parametrize("name", [TEXT_ENCODER, CONDITION_ENCODER, DIT_STEP])
def test_onnx_runtime_fuses_every_rms_norm_of_the_export(tiny, tmp_path, name):
    """The exported graph has no Reciprocal(Sqrt) products left, and ONNX Runtime's CPU optimiser turns every
    RMSNorm into one SimplifiedLayerNormalization (before the rewrite: none, and a Pow per norm)."""
    path = tiny.artifacts / f"{name}.onnx"
    exported = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    assert exported["Reciprocal"] == 0 and exported["Sqrt"] > 0
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = collections.Counter(
        n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node)
    assert optimized["SimplifiedLayerNormalization"] == exported["Sqrt"], optimized
    assert optimized["Pow"] == 0 and optimized["Sqrt"] == 0, optimized
