"""``cover_blend`` graph, written directly with ``onnx.helper`` (nine elementwise/shape nodes, no weights).

See :func:`acestep_trt.runtime.specs.cover_blend_spec`: the doubled batch [2B, T, C] is viewed as [2, B*T*C],
weighted by (s, 1 - s), summed and doubled again, so the device-resident loop never leaves the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from acestep_trt.runtime.specs import GraphSpec


def write_cover_blend(spec: GraphSpec, path: Path, opset: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (x_spec, s_spec), (y_spec,) = spec.inputs, spec.outputs
    const = {
        "halves": np.array([2, -1], np.int64),
        "one": np.array([1.0], np.float32),
        "axis0": np.array([0], np.int64),
        "column": np.array([2, 1], np.int64),
    }
    nodes = [
        helper.make_node("Shape", [x_spec.name], ["shape"]),
        helper.make_node("Reshape", [x_spec.name, "halves"], ["flat"]),  # [2, B*T*C]: cover half, text2music half
        helper.make_node("Sub", ["one", s_spec.name], ["rest"]),  # 1 - s
        helper.make_node("Concat", [s_spec.name, "rest"], ["weights"], axis=0),  # [2]
        helper.make_node("Reshape", ["weights", "column"], ["weights2"]),  # [2, 1]
        helper.make_node("Mul", ["flat", "weights2"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axis0"], ["blended"], keepdims=1),  # [1, B*T*C]
        helper.make_node("Concat", ["blended", "blended"], ["doubled"], axis=0),  # [2, B*T*C]
        helper.make_node("Reshape", ["doubled", "shape"], [y_spec.name]),
    ]

    def value(t):
        return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))

    graph = helper.make_graph(nodes, spec.name, [value(x_spec), value(s_spec)], [value(y_spec)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in const.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="acestep-trt")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NumPy reference: tile(s * x[:B] + (1 - s) * x[B:], 2)."""
    x, s = feeds["next_latents"], float(feeds["strength"][0])
    half = x.shape[0] // 2
    blended = s * x[:half] + (1.0 - s) * x[half:]
    return {"latents": np.concatenate([blended, blended]).astype(np.float32)}
