"""Exported graphs against TensorRT's documented ONNX operator support (runtime/trt/tensorrt_onnx_operators.json).

Walks every (operator, data type) pair of every exported graph, fp32 and reduced precision, and checks it
against the onnx-tensorrt operator matrix kept as data; also the rewrites that keep the graphs inside it
(no INT64 CumSum in the text encoder, no TopK in the condition encoder's packing).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from acestep_trt.runtime.specs import AUDIO_GRAPH_NAMES, GRAPH_NAMES
from acestep_trt.runtime.trt.onnx_support import graph_uses, support_table, unsupported


@pytest.mark.parametrize("fixture", ["tiny", "variant", "reduced"])
def test_exported_graphs_use_only_documented_tensorrt_operators(fixture, request):
    model = request.getfixturevalue(fixture)
    seen = set()
    audio = [g for g in AUDIO_GRAPH_NAMES if (model.artifacts / f"{g}.onnx").is_file()]  # engines too (build)
    assert fixture != "tiny" or len(audio) == 4
    for name in (*GRAPH_NAMES, *audio):
        path = model.artifacts / f"{name}.onnx"
        assert unsupported(path) == [], name
        _, uses, _ = graph_uses(path)
        seen |= {u.dtype for u in uses}
        ops = {u.op for u in uses}
        assert "TopK" not in ops, name  # K < 3840 would cap lyric + text length
        assert ("CumSum", "INT64") not in {(u.op, u.dtype) for u in uses}, name
    if fixture == "reduced":  # the walk saw the reduced types, not only the fp32 interface casts
        assert {"BF16", "FP16", "FP32", "INT64", "BOOL"} <= seen
    else:
        assert "BF16" not in seen and "FP16" not in seen


def _model(nodes, inputs, outputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_support_check_names_what_the_old_graphs_had(tmp_path):
    """INT64 CumSum, a TopK whose K is not a constant, an operator without a row, an opset out of range."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s"])
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    nodes = [
        helper.make_node("CumSum", ["ids", "axis"], ["c"], name="cumsum"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "axis"], ["k0"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["k0", "zero"], ["k"], name="unsq"),
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="sort", axis=1),
        helper.make_node("HardSwish", ["x"], ["h"], name="hs"),
    ]
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in
            (("c", TensorProto.INT64), ("v", TensorProto.FLOAT), ("i", TensorProto.INT64), ("h", TensorProto.FLOAT))]
    path = tmp_path / "old.onnx"
    onnx.save(_model(nodes, [ids, x], outs, [axis, zero], opset=25), path)
    problems = "\n".join(unsupported(path))
    assert "CumSum on INT64 (node 'cumsum'): TensorRT 10.15 documents FP32, FP16, BF16 only" in problems
    assert "TopK node 'sort': input 1 is not a constant" in problems and "less than 3840" in problems
    assert "HardSwish (node 'hs') has no row" in problems
    assert "opset 25 is outside TensorRT 10.15's 9..24" in problems


def test_support_check_bounds_a_constant_topk_and_float_cumsum_passes(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    outs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("i", TensorProto.INT64, None),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, None)]
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="sort", axis=1),
             helper.make_node("CumSum", ["x", "axis"], ["c"], name="cumsum")]
    path = tmp_path / "k.onnx"
    onnx.save(_model(nodes, [x], outs, [k, axis]), path)
    assert unsupported(path) == ["TopK node 'sort': input 1 exceeds 3839 (sorted must be 1; K must be less than 3840)"]


def test_support_table_records_its_source_and_only_known_types():
    table = support_table()
    source = table["source"]
    assert source["tensorrt_version"] == "10.15" and "onnx-tensorrt" in source["url"]
    assert source["opset_range"] == [9, 24]
    known = {"FP32", "FP16", "BF16", "FP8", "FP4", "INT4", "INT8", "INT32", "INT64", "UINT8", "BOOL"}
    for op, row in table["operators"].items():
        assert row["types"] and set(row["types"]) <= known, op


def test_packing_equals_diffusers_stable_argsort_beyond_the_topk_limit():
    """pack_sequences (no sort) == diffusers' _pack_sequences (stable argsort), also for 4000+ tokens."""
    import torch
    from diffusers.pipelines.ace_step.modeling_ace_step import _pack_sequences

    from acestep_trt.export.graphs.condition_encoder import pack_sequences

    gen = torch.Generator().manual_seed(0)
    for batch, len1, len2 in ((1, 5, 1), (3, 17, 9), (2, 1, 1), (2, 3900, 257)):
        h1, h2 = torch.randn(batch, len1, 3, generator=gen), torch.randn(batch, len2, 3, generator=gen)
        m1 = (torch.rand(batch, len1, generator=gen) > 0.4).long()
        m2 = (torch.rand(batch, len2, generator=gen) > 0.5).long()
        m1[0] = 0  # an item with no valid token in the first sequence
        got, got_mask = pack_sequences(h1, h2, m1, m2)
        ref, ref_mask = _pack_sequences(h1, h2, m1, m2)
        assert torch.equal(got, ref) and torch.equal(got_mask, ref_mask), (batch, len1, len2)


def test_text_encoder_mask_of_ones_is_no_mask(tiny):
    """The adapter's all-ones mask (which keeps transformers' INT64 CumSum out) equals diffusers' call."""
    import torch

    from acestep_trt.export.graphs.text_encoder import TextEncoderAdapter

    encoder = tiny.pipe.text_encoder
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 200, size=(2, 11)))
    with torch.no_grad():
        ref = encoder(input_ids=ids).last_hidden_state  # pipeline_ace_step.py encode_prompt: no mask
        got = TextEncoderAdapter(encoder)(ids)
    assert torch.equal(got, ref)


def test_condition_encoder_graph_beyond_the_old_topk_limit_matches_diffusers(tiny):
    """The exported graph (no TopK) at cond_len = 3000 + 1 + 900 > 3840, batch 2 with padding, vs diffusers."""
    import onnxruntime as ort
    import torch

    from acestep_trt.export.exporter import _cond_ref
    from acestep_trt.export.validate import make_inputs
    from acestep_trt.runtime.artifacts import load_artifacts

    artifacts = load_artifacts(tiny.artifacts)
    spec = artifacts.specs["condition_encoder"]
    feeds = make_inputs(spec, {"batch": 2, "text_len": 900, "lyric_len": 3000, "timbre_len": 11}, artifacts.config)
    session = ort.InferenceSession(str(artifacts.graph_path("condition_encoder")), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in spec.outputs], session.run([o.name for o in spec.outputs], feeds)))
    with torch.no_grad():
        ref = _cond_ref(tiny.pipe.condition_encoder, {k: torch.from_numpy(v) for k, v in feeds.items()})
    assert got["encoder_hidden_states"].shape == (2, 3901, artifacts.config.cond_hidden)
    np.testing.assert_array_equal(got["encoder_attention_mask"], ref["encoder_attention_mask"].numpy())
    states = ref["encoder_hidden_states"].numpy()
    assert np.max(np.abs(got["encoder_hidden_states"] - states)) <= spec.tolerance.bound(float(np.max(np.abs(states))))
