"""Graph precisions, and CPU emulation of reduced-precision graphs.

A graph exported with ``--precision bf16`` (or an fp16 override) holds bf16/fp16 weights and
intermediate values behind an fp32 interface. ONNX Runtime's CPU provider has no bf16 kernels (and
few fp16 ones), so such a graph runs natively on a GPU only. To check its numerics without one,
:func:`emulate` rewrites it into an fp32 graph that rounds every reduced-precision value to its
type: reduced initializers are cast up once, and each node that produced a reduced value computes
in fp32 and rounds its output (Cast to bf16/fp16 and back). That is what a GPU kernel accumulating
in fp32 computes, up to summation order: slower than the fp32 export, for validation only.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# Precisions ONNX Runtime's CPU provider runs natively; the others run there only emulated (below).
CPU_NATIVE = ("fp32", "int8")
# Least signal-to-error ratio (dB) a reduced-precision graph's output must keep against fp32 (export
# validation) or against ONNX Runtime (engine validation). Calibrated on random checkpoints (README).
# int8 (weights int8 per channel, activations quantised per tensor at run time: export/quantize.py).
MIN_SNR_DB = {"bf16": 30.0, "fp16": 40.0, "int8": 25.0}
_ROUND_SUFFIX = "__emulated"


def snr_db(got, ref) -> float:
    """Signal-to-error ratio of ``got`` against ``ref`` in dB: ``10 log10(sum ref^2 / sum (got - ref)^2)``.

    inf when equal; nan when either holds NaN or Inf.
    """
    import numpy as np

    ref = np.asarray(ref, dtype=np.float64)
    err = np.sum((np.asarray(got, dtype=np.float64) - ref) ** 2)
    if err == 0:
        return float("inf")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        value = 10.0 * np.log10(np.sum(ref ** 2) / err)
    return float(value) if np.isfinite(err) else float("nan")


def within_limit(max_abs: float, bound: float, snr: float, min_snr_db: float | None) -> bool:
    """A comparison passes: finite, and SNR >= ``min_snr_db`` when set (reduced precision), else max-abs <= bound."""
    import numpy as np

    if not np.isfinite(max_abs):
        return False
    return bool(snr >= min_snr_db) if min_snr_db is not None else bool(max_abs <= bound)


def limit_text(bound: float, min_snr_db: float | None) -> str:
    """The limit :func:`within_limit` applies, for tables: ``>=30 dB`` or ``<=1.20e-04``."""
    return f">={min_snr_db:g} dB" if min_snr_db is not None else f"<={bound:.2e}"


def json_number(value: float) -> float | str:
    """``value`` for JSON, which has no inf/nan: those become the strings ``"inf"``/``"nan"``."""
    import math

    return float(value) if math.isfinite(value) else str(float(value))


def _low_types():
    from onnx import TensorProto

    return {TensorProto.BFLOAT16, TensorProto.FLOAT16}


def _value_types(model) -> dict[str, int]:
    """Element type of every value in the main graph (after ONNX type inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _to_float_tensor(tensor):
    """A bf16/fp16 TensorProto (constant attribute) as an fp32 TensorProto of the same values."""
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def emulate(model) -> None:
    """Rewrite ``model`` in place into its fp32 emulation (see the module docstring).

    The interface must be fp32 already (graphs exported by this toolkit are); external data stays where it is.
    """
    from onnx import TensorProto, helper

    low = _low_types()
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type in low:
            raise ValueError(f"graph interface tensor {value.name} is reduced precision; emulation needs fp32 I/O")
    types = _value_types(model)
    nodes = []
    for init in graph.initializer:
        if init.data_type in low:
            stored = init.name + _ROUND_SUFFIX
            nodes.append(helper.make_node("Cast", [stored], [init.name], to=TensorProto.FLOAT))
            init.name = stored
    for node in graph.node:
        if any(attr.type == attr.GRAPH or attr.type == attr.GRAPHS for attr in node.attribute):
            raise ValueError(f"node {node.name} ({node.op_type}) has subgraphs; emulation handles flat graphs only")
        nodes.append(node)
        if node.op_type in ("Constant", "ConstantOfShape"):
            for attr in node.attribute:
                if attr.type == attr.TENSOR and attr.t.data_type in low:
                    attr.t.CopyFrom(_to_float_tensor(attr.t))
            continue
        for i, out in enumerate(node.output):
            kind = types.get(out)
            if kind not in low:
                continue
            raw = node.output[i] = out + _ROUND_SUFFIX
            if node.op_type != "Cast":  # a Cast to `kind` has rounded already
                nodes.append(helper.make_node("Cast", [raw], [raw + "_r"], to=kind))
                raw += "_r"
            nodes.append(helper.make_node("Cast", [raw], [out], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


def emulated_copy(path: Path, work_dir: Path) -> Path:
    """Write the fp32 emulation of the graph at ``path`` into ``work_dir``; return the new graph's path.

    Its external data files are hard-linked, or copied where the file systems differ (ONNX Runtime refuses
    external data that resolves outside the graph's directory, so symbolic links do not do).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    emulate(model)
    locations = {
        entry.value
        for init in model.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    for location in locations:
        src, dst = path.parent / location, work_dir / location
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    target = work_dir / path.name
    onnx.save(model, str(target))
    log.info("emulating the reduced precision of %s in fp32 on the CPU (validation only: slower)", path.name)
    return target
