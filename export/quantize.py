"""The ``int8`` recipe: int8 weights and dynamically quantised activations for the matrix products.

A CPU deployment recipe. ONNX Runtime's dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``)
replaces each MatMul whose second operand is a weight by ``DynamicQuantizeLinear`` (per-tensor uint8
activations, scale and zero point computed at run time from the actual values) and ``MatMulInteger`` over
int8 weights quantised per output channel, then rescales to fp32; at session creation ONNX Runtime's CPU
provider fuses that into ``DynamicQuantizeMatMul``, whose MLAS kernels use VNNI (AVX-512 / AVX-VNNI) or
AMX-INT8 where the CPU has them. Everything else stays fp32, so the graph keeps the fp32 interface of its
spec and the runtime, the TensorRT profiles (which refuse int8 graphs) and the Triton configs do not change.

What stays fp32: the DiT's islands of the bf16 recipe (:mod:`acestep_trt.export.precision`). Of those,
only the timestep-embedding MLPs are matrix products; they are excluded by name scope (:data:`KEEP_FP32`,
data). AdaLN tables, RMSNorms, the patch-embedding convolution, the output ConvTranspose and the Euler
update are no weight products and keep fp32 by construction. Attention's activation-by-activation products (Q K^T, P V) have no constant operand
and are left alone (``MatMulConstBOnly``). The VAE is all convolutions and stays fp32.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from acestep_trt.runtime.specs import DIT_STEP

log = logging.getLogger(__name__)

# Name scopes (torch module paths recorded by the dynamo exporter in each node's metadata) whose matrix
# products keep fp32 in the int8 recipe.
KEEP_FP32 = {DIT_STEP: ("dit.time_embed", "dit.time_embed_r")}
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def excluded_nodes(model, graph: str) -> list[str]:
    """Names of the MatMul/Gemm nodes of ``model`` under a :data:`KEEP_FP32` scope of ``graph``.

    ``quantize_dynamic`` first rewrites every Gemm as MatMul + Add (``ONNXModel.replace_gemm_with_matmul``),
    naming the MatMul ``<gemm name>_MatMul``: that name is excluded too.
    """
    prefixes = KEEP_FP32.get(graph, ())
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == _SCOPES_KEY), "")
        if any(f"'{prefix}" in scopes for prefix in prefixes):
            out.append(node.name)
            if node.op_type == "Gemm":
                out.append(f"{node.name}_MatMul")
    return out


class _NoPreprocessHint(logging.Filter):
    """Drops ``quantize_dynamic``'s root-logger advice to run its pre-processing first (symbolic shape
    inference and ONNX Runtime's graph optimisations saved into the file). It does not apply here: ONNX
    Runtime optimises the quantised graph when it loads it, and the recipe is validated as written."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(path: Path, graph: str) -> dict:
    """Rewrite the fp32 graph at ``path`` (and its ``.data`` file) in place as its int8 recipe.

    Returns ``{"quantized": n, "kept_fp32": [node names]}`` for the log. Written to a temporary directory
    beside ``path`` and moved over the fp32 files only when complete.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(path), load_external_data=False)
    keep = excluded_nodes(model, graph)
    del model
    hint = _NoPreprocessHint()
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.int8-", dir=path.parent) as work:
        target = Path(work) / path.name
        logging.getLogger().addFilter(hint)
        try:
            quantize_dynamic(
                path, target, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                nodes_to_exclude=keep, use_external_data_format=True,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            logging.getLogger().removeFilter(hint)
        quantized = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                        for n in onnx.load(str(target), load_external_data=False).graph.node)
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        shutil.move(str(target), path)
        written = target.with_name(target.name + ".data")
        if written.exists():
            shutil.move(str(written), data)
    log.info("%s: %d matrix products in int8, those under %s kept fp32", graph, quantized, KEEP_FP32.get(graph, ()))
    return {"quantized": quantized, "kept_fp32": keep}
