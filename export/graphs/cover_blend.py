"""``cover_blend`` graph, written directly with ``onnx.helper`` (four elementwise nodes, no weights).

See :func:`acestep_trt.runtime.specs.cover_blend_spec`: ``s * cover + (1 - s) * text2music`` on the device, so
the device-resident loop serves cover strength without copying latents to the host every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from acestep_trt.runtime.specs import GraphSpec


def write_cover_blend(spec: GraphSpec, path: Path, opset: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (cover, plain, strength), (out,) = spec.inputs, spec.outputs
    nodes = [
        helper.make_node("Sub", ["one", strength.name], ["rest"]),  # 1 - s
        helper.make_node("Mul", [cover.name, strength.name], ["cover_part"]),
        helper.make_node("Mul", [plain.name, "rest"], ["plain_part"]),
        helper.make_node("Add", ["cover_part", "plain_part"], [out.name]),
    ]

    def value(t):
        return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))

    graph = helper.make_graph(nodes, spec.name, [value(t) for t in spec.inputs], [value(out)],
                              initializer=[numpy_helper.from_array(np.array([1.0], np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="acestep-trt")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NumPy reference: s * cover + (1 - s) * text2music."""
    s = feeds["strength"][0]
    blended = s * feeds["cover_latents"] + (np.float32(1.0) - s) * feeds["text2music_latents"]
    return {"latents": blended.astype(np.float32)}
