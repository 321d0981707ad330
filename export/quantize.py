"""The ``int8`` recipe: int8 weights and dynamically quantised activations for the matrix products.

A CPU deployment recipe, written weight by weight by our own streaming quantiser (:func:`quantize_int8`).
It produces what ONNX Runtime's dynamic quantisation (``onnxruntime.quantization.quantize_dynamic`` with
``weight_type=QInt8, per_channel=True, op_types_to_quantize=["MatMul"], MatMulConstBOnly``) wrote before it,
node for node and bit for bit: each MatMul whose second operand is a constant fp32 initializer becomes

    DynamicQuantizeLinear(A) -> A_q uint8, a_scale, a_zero_point     (per tensor, at run time; one per A)
    MatMulInteger(A_q, W_q int8 [K, N], a_zero_point, W_zero_point)  -> int32
    Cast(float) * (a_scale * W_scale [N])                            -> the MatMul's fp32 output

with ``W`` quantised per output channel (column), symmetric: ``scale = max|w| over K / 127`` (computed as
``2 max|w| / 254`` in float64, stored fp32), ``q = round_half_even(w / scale)`` clipped to [-127, 127], zero
point 0. At session creation ONNX Runtime's CPU provider fuses each chain into ``DynamicQuantizeMatMul``, or,
where several MatMuls share one quantised activation (Q/K/V, gate/up), into one ``DynamicQuantizeLinear`` feeding
``MatMulIntegerToFloat`` nodes; their MLAS kernels use VNNI (AVX-512 / AVX-VNNI) or AMX-INT8 where the CPU has
them. Emitting the same chains (rather than ``com.microsoft.DynamicQuantizeMatMul`` directly, which would
quantise a shared activation once per consumer) keeps the optimised session identical to the one
``quantize_dynamic``'s graph gave. Gemm nodes (``alpha = beta = 1``, ``transA = 0``) are first rewritten as
MatMul (+ Add) over a transposed copy of a constant B, as that library did. Everything else stays fp32, so
the graph keeps the fp32 interface of its spec and the runtime, the TensorRT profiles (which refuse int8
graphs) and the Triton configs do not change.

Why not the library: it loads the whole fp32 graph with its weights as protobuf, runs shape inference on
copies of it and writes the int8 graph while holding all of it: 18.8 GiB peak for the full-size DiT (6.3 GB
of fp32 weights). This module reads the graph without its weights, reads one initializer at a time from the
external data file (plain reads into a buffer of its own, no mapping: the file's pages stay in the page
cache, not in this process), quantises it in NumPy and appends it to the new data file, copying the other
initializers through by byte ranges. It holds about one weight (fp32 in, a fp32 temporary, int8 out) at a
time: the full-size DiT quantises at 0.23 GiB peak in 12 s (README, "Export memory at full size").

What stays fp32: the DiT's islands of the bf16 recipe (:mod:`acestep_trt.export.precision`). Of those,
only the timestep-embedding MLPs are matrix products; they are excluded by name scope (:data:`KEEP_FP32`,
data). AdaLN tables, RMSNorms, the patch-embedding convolution, the output ConvTranspose and the Euler
update are no weight products and keep fp32 by construction. Attention's activation-by-activation products
(Q K^T, P V) have no constant operand and are left alone. The VAE is all convolutions and stays fp32.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from acestep_trt.runtime.errors import ArtifactError, ExportValidationError
from acestep_trt.runtime.specs import DIT_STEP

log = logging.getLogger(__name__)

# Name scopes (torch module paths recorded by the dynamo exporter in each node's metadata) whose matrix
# products keep fp32 in the int8 recipe.
KEEP_FP32 = {DIT_STEP: ("dit.time_embed", "dit.time_embed_r")}
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"

_COPY_CHUNK = 16 << 20  # bytes per read when copying an initializer through unchanged


def excluded_nodes(model, graph: str) -> list[str]:
    """Names of the MatMul/Gemm nodes of ``model`` under a :data:`KEEP_FP32` scope of ``graph``.

    A Gemm is first rewritten as MatMul + Add (as ``quantize_dynamic`` did), the MatMul named
    ``<gemm name>_MatMul``: that name is excluded too.
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


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 weight [..., N] -> (int8 [..., N], fp32 scale [N]): symmetric, one scale per output channel N.

    The arithmetic of ``onnxruntime.quantization`` (``compute_scale_zp`` and ``quantize_nparray``) step by
    step, so that the bits agree: the range always includes 0, the scale is ``(max - min) / (127 - -127)`` in
    float64 rounded to fp32 (1.0 where it would underflow fp32, e.g. an all-zero column), and the division
    ``w / scale`` is done in fp32 before rounding half to even.
    """
    flat = weight.reshape(-1, weight.shape[-1])  # [K, N] (a view)
    absmax = np.maximum(np.abs(np.minimum(flat.min(axis=0), 0)), np.maximum(flat.max(axis=0), 0))  # [N] fp32
    scale = absmax.astype(np.float64) * 2.0 / 254.0
    scale = np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)
    q = flat / scale  # [K, N] fp32: the one full-size temporary
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8).reshape(weight.shape), scale


# --- reading initializers one at a time ------------------------------------------------------------------

class _Reader:
    """Reads one initializer's bytes at a time from the fp32 graph's external data file(s) (or its proto).

    Reads into a fresh buffer: nothing is mapped, so what was read leaves this process with the buffer (the
    file's pages stay in the page cache, which the kernel reclaims as it needs). A mapping would keep every
    page it touched resident until unmapped or dropped (``export/weight_map.py`` has to ``madvise`` for that).
    """

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, object] = {}

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()

    def _where(self, init) -> tuple[object, int, int]:
        """(open file, offset, length) of an external initializer; raises ArtifactError if the file is short."""
        info = {e.key: e.value for e in init.external_data}
        location = info.get("location", "")
        if location not in self.files:
            try:
                self.files[location] = open(self.root / location, "rb", buffering=0)  # noqa: SIM115 (closed in close)
            except OSError as err:
                raise ArtifactError(f"cannot read the weights of {init.name} from {self.root / location}: {err}.",
                                    "export the fp32 graph again; its data file is missing.") from err
        handle = self.files[location]
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else os.fstat(handle.fileno()).st_size - offset
        if offset + length > os.fstat(handle.fileno()).st_size:
            raise ArtifactError(f"{self.root / location} ends before the weights of {init.name} "
                                f"(bytes {offset}..{offset + length}).",
                                "export the fp32 graph again; its data file is truncated (was the disk full?).")
        return handle, offset, length

    def read(self, init) -> np.ndarray:
        """The initializer as a NumPy array of its dtype and dims (a new buffer, owned by the caller)."""
        from onnx import TensorProto, helper, numpy_helper

        if init.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(init)
        handle, offset, length = self._where(init)
        out = np.empty(tuple(init.dims), helper.tensor_dtype_to_np_dtype(init.data_type))
        if out.nbytes != length:
            raise ArtifactError(f"the initializer {init.name} of {self.root} holds {length} bytes for dims "
                                f"{list(init.dims)} ({out.nbytes} expected).", "export the fp32 graph again.")
        _read_into(handle, offset, memoryview(out).cast("B"))
        return out

    def copy(self, init, sink: _Sink) -> None:
        """Append an external initializer's bytes to ``sink`` unchanged, in chunks; point ``init`` at them."""
        handle, offset, length = self._where(init)
        buffer = memoryview(bytearray(min(length, _COPY_CHUNK)))
        start, done = sink.position, 0
        while done < length:
            chunk = buffer[:min(len(buffer), length - done)]
            _read_into(handle, offset + done, chunk)
            sink.write(chunk)
            done += len(chunk)
        sink.point(init, start, length)


def _read_into(handle, offset: int, target: memoryview) -> None:
    """Fill ``target`` from ``handle`` at ``offset`` (looping over short reads)."""
    done = 0
    while done < len(target):
        handle.seek(offset + done)
        got = handle.readinto(target[done:])
        if not got:
            raise ArtifactError(f"{handle.name} ended early.", "export the fp32 graph again.")
        done += got


@dataclass
class _Sink:
    """The int8 graph's new data file, written front to back; ``location`` is its name beside the graph."""

    handle: object
    location: str
    position: int = 0

    def write(self, data: memoryview) -> None:
        self.handle.write(data)
        self.position += data.nbytes

    def point(self, init, offset: int, length: int) -> None:
        """Make ``init`` an external initializer at ``offset`` of this file."""
        from onnx import TensorProto

        init.ClearField("raw_data")
        del init.external_data[:]
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value

    def append(self, init, array: np.ndarray) -> None:
        """Write ``array`` (the tensor's data, C order) and point ``init`` at it."""
        array = np.ascontiguousarray(array)
        start = self.position
        self.write(memoryview(array).cast("B"))
        self.point(init, start, array.nbytes)


# --- the graph rewrite (no weights touched) --------------------------------------------------------------

@dataclass
class _Plan:
    """The int8 graph's nodes and where each of its new initializers comes from (nothing read yet).

    ``derived``: initializer name -> (source fp32 initializer name, transposed?, what): ``what`` is "fp32"
    for a Gemm's transposed weight kept fp32, or one of "q", "scale", "zero_point" of a quantised weight.
    """

    nodes: list = field(default_factory=list)
    derived: dict[str, tuple[str, bool, str]] = field(default_factory=dict)
    quantized: int = 0


class _Rewriter:
    """Walks the fp32 graph's nodes once and writes :class:`_Plan` (``quantize_dynamic``'s names and order)."""

    def __init__(self, model, keep: list[str]):
        from onnx import TensorProto

        self.inits = {t.name: t for t in model.graph.initializer}
        self.keep = set(keep)
        self.float = TensorProto.FLOAT
        self.taken = set(self.inits) | {n for node in model.graph.node for n in (*node.input, *node.output)}
        self.taken |= {v.name for v in (*model.graph.input, *model.graph.output)}
        self.activations: dict[str, tuple[str, str, str]] = {}  # A -> (A_q, a_scale, a_zero_point)
        self.weights: dict[str, tuple[str, str, str]] = {}  # W -> (W_q, W_scale, W_zero_point)
        self.transposed: dict[str, str] = {}  # B -> B_Transposed (a Gemm's constant B, transB = 1)
        self.plan = _Plan()

    def name(self, wanted: str) -> str:
        """``wanted``, or ``wanted_1``, ... if the graph already holds a tensor of that name."""
        out, i = wanted, 0
        while out in self.taken:
            i += 1
            out = f"{wanted}_{i}"
        self.taken.add(out)
        return out

    def source(self, name: str) -> tuple[str, bool] | None:
        """(fp32 initializer, transposed?) behind ``name``, or None when ``name`` is no fp32 constant."""
        if name in self.plan.derived:
            src, transposed, what = self.plan.derived[name]
            return (src, transposed) if what == "fp32" else None
        init = self.inits.get(name)
        return (name, False) if init is not None and init.data_type == self.float else None

    def run(self, nodes) -> _Plan:
        for node in nodes:
            default_domain = node.domain in ("", "ai.onnx")
            for one in self.gemm(node) if node.op_type == "Gemm" and default_domain else [node]:
                if one.op_type == "MatMul" and default_domain:
                    self.matmul(one)
                else:
                    self.plan.nodes.append(one)
        return self.plan

    def gemm(self, node) -> list:
        """A Gemm as MatMul (+ Add) over ``B^T`` when it is ``A @ op(B) + C`` (``alpha = beta = 1``, no transA)."""
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            return [node]
        out, b = [], node.input[1]
        if attrs.get("transB", 0):
            if self.source(b) is not None:
                if b not in self.transposed:
                    self.transposed[b] = self.name(f"{b}_Transposed")
                    self.plan.derived[self.transposed[b]] = (self.source(b)[0], True, "fp32")
                b = self.transposed[b]
            else:
                out.append(helper.make_node("Transpose", [b], [self.name(f"{b}_Transposed")],
                                            name=f"{node.name}_Transpose" if node.name else ""))
                b = out[-1].output[0]
        biased = len(node.input) > 2 and node.input[2]
        product = self.name(f"{node.output[0]}_MatMul") if biased else node.output[0]
        out.append(helper.make_node("MatMul", [node.input[0], b], [product],
                                    name=f"{node.name}_MatMul" if node.name else ""))
        if biased:
            out.append(helper.make_node("Add", [product, node.input[2]], list(node.output),
                                        name=f"{node.name}_Add" if node.name else ""))
        return out

    def matmul(self, node) -> None:
        """Quantise ``node`` if its B is a constant fp32 weight and it is not kept fp32; else keep it."""
        weight = self.source(node.input[1])
        # a constant A would be quantised statically by quantize_dynamic; our graphs have none: left fp32
        if weight is None or node.name in self.keep or node.input[0] in self.inits:
            self.plan.nodes.append(node)
            return
        self.plan.nodes.extend(self.integer_chain(node))
        self.plan.quantized += 1

    def integer_chain(self, node) -> list:
        """[DynamicQuantizeLinear (first use of A only), MatMulInteger, Cast, Mul, Mul] for one MatMul."""
        from onnx import TensorProto, helper

        a, b, y = node.input[0], node.input[1], node.output[0]
        out = []
        if a not in self.activations:
            self.activations[a] = (self.name(f"{a}_quantized"), self.name(f"{a}_scale"), self.name(f"{a}_zero_point"))
            out.append(helper.make_node("DynamicQuantizeLinear", [a], list(self.activations[a]),
                                        name=f"{a}_QuantizeLinear"))
        if b not in self.weights:
            src, transposed = self.source(b)
            self.weights[b] = (self.name(f"{b}_quantized"), self.name(f"{b}_scale"), self.name(f"{b}_zero_point"))
            for name, what in zip(self.weights[b], ("q", "scale", "zero_point")):
                self.plan.derived[name] = (src, transposed, what)
        a_q, a_scale, a_zp = self.activations[a]
        w_q, w_scale, w_zp = self.weights[b]
        base = f"{node.name}_quant" if node.name else ""
        integer = self.name(f"{y}_output_quantized")
        cast = self.name(f"{integer}_cast_output")
        scales_node = f"{base}_scales_mul" if base else f"{a_scale}_{w_scale}_mul"
        scales = self.name(f"{scales_node}:0")
        out += [
            helper.make_node("MatMulInteger", [a_q, w_q, a_zp, w_zp], [integer], name=base),
            helper.make_node("Cast", [integer], [cast], name=f"{integer}_cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [a_scale, w_scale], [scales], name=scales_node),
            helper.make_node("Mul", [cast, scales], [y], name=f"{base}_output_scale_mul" if base else ""),
        ]
        return out


# --- writing the int8 graph ------------------------------------------------------------------------------

def _used(model, nodes) -> set[str]:
    """Tensor names the rewritten graph reads: node inputs (also of subgraphs, which may read the outer
    graph's initializers) and graph outputs."""
    from onnx import AttributeProto

    used = {v.name for v in model.graph.output}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        used.update(node.input)
        for attr in node.attribute:
            graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in graphs:
                stack.extend(sub.node)
                used.update(v.name for v in sub.output)
    return used


def _write_initializers(model, plan: _Plan, reader: _Reader, sink: _Sink) -> list:
    """The int8 graph's initializers, their data appended to ``sink`` one weight at a time.

    Kept fp32 initializers are copied through by byte ranges (inline ones stay inline); each weight behind a
    quantised MatMul (or a Gemm's transposed B) is read once, and what is made of it written before the next
    one is read: int8 data to ``sink``, its per-channel scale and zero point inline in the graph (a few KB
    each, as ``quantize_dynamic`` kept them). Returns the initializer protos (headers pointing into ``sink``).
    """
    from onnx import TensorProto

    used = _used(model, plan.nodes)
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for init in model.graph.initializer:
        if init.name not in used:
            continue  # a weight now read only in its quantised form (quantize_dynamic dropped those too)
        if init.data_location == TensorProto.EXTERNAL:
            reader.copy(init, sink)
        out.append(init)
    groups: dict[tuple[str, bool], list[str]] = {}
    for name, (src, transposed, _) in plan.derived.items():
        if name in used:
            groups.setdefault((src, transposed), []).append(name)
    for (src, transposed), names in groups.items():
        out.extend(_derive(reader.read(inits[src]), transposed, {n: plan.derived[n][2] for n in names}, sink))
    return out


def _derive(weight: np.ndarray, transposed: bool, wanted: dict[str, str], sink: _Sink) -> list:
    """Initializers {name: what} made of one fp32 weight [K, N] (``what``: fp32 / q / scale / zero_point)."""
    from onnx import TensorProto, helper, numpy_helper

    if transposed:  # a Gemm's B [N, K] (transB = 1) as the MatMul's [K, N]
        weight = np.ascontiguousarray(weight.T)
    arrays = {"fp32": weight}
    if set(wanted.values()) - {"fp32"}:
        q, scale = quantize_weight(weight)
        arrays.update(q=q, scale=scale, zero_point=np.zeros(scale.shape, np.int8))
    out = []
    for name, what in wanted.items():
        if what in ("scale", "zero_point"):
            out.append(numpy_helper.from_array(arrays[what], name))
            continue
        init = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arrays[what].dtype),
                           dims=arrays[what].shape)
        sink.append(init, arrays[what])
        out.append(init)
    return out


def _check_opset(model) -> None:
    """DynamicQuantizeLinear needs opset 11 of the default domain (our exports use 20)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise ExportValidationError(f"the graph uses opset {opset}; the int8 recipe needs 11 or later.",
                                    "export with this version of acestep-trt (it writes opset 20).")


def _quantized_model(path: Path, graph: str, target: Path) -> tuple[int, list[str]]:
    """Write the int8 graph of the fp32 graph at ``path`` to ``target`` (+ ``target.data``).

    Returns (MatMuls quantised, nodes kept fp32).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # nodes and initializer headers only
    _check_opset(model)
    keep = excluded_nodes(model, graph)
    plan = _Rewriter(model, keep).run(model.graph.node)
    reader = _Reader(path.parent)
    try:
        with open(target.with_name(target.name + ".data"), "wb") as fh:
            inits = _write_initializers(model, plan, reader, _Sink(fh, path.name + ".data"))
    finally:
        reader.close()
    # the nodes and initializers are replaced in the (weightless) proto: upb keeps the removed messages
    # our lists still hold valid, and extend() copies them back
    del model.graph.node[:]
    model.graph.node.extend(plan.nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    onnx.save_model(model, str(target))
    return plan.quantized, keep


def quantize_int8(path: Path, graph: str) -> dict:
    """Rewrite the fp32 graph at ``path`` (and its ``.data`` file) in place as its int8 recipe.

    Returns ``{"quantized": n, "kept_fp32": [node names]}`` for the log. Written to a temporary directory
    beside ``path`` and moved over the fp32 files only when complete; on any failure nothing of it is left.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.int8-", dir=path.parent) as work:
        target = Path(work) / path.name
        quantized, keep = _quantized_model(path, graph, target)
        data, written = path.with_name(path.name + ".data"), target.with_name(target.name + ".data")
        if written.stat().st_size:
            os.replace(written, data)  # the fp32 graph's reads are done; same directory, so a rename
        else:
            data.unlink(missing_ok=True)  # every weight inline (never at our sizes)
        os.replace(target, path)
    log.info("%s: %d matrix products in int8, those under %s kept fp32", graph, quantized, KEEP_FP32.get(graph, ()))
    return {"quantized": quantized, "kept_fp32": keep}


def quantize_with_ort(path: Path, graph: str) -> None:
    """ONNX Runtime's ``quantize_dynamic`` with the recipe's options, in place: what the recipe used before
    :func:`quantize_int8`, kept as the reference it is compared with (tests/test_int8.py,
    scripts/int8_compare.py). It holds the whole graph three times over (18.8 GiB for the full-size DiT)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    keep = excluded_nodes(onnx.load(str(path), load_external_data=False), graph)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        out = Path(work) / path.name
        quantize_dynamic(path, out, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=keep, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        for suffix in (".data", ""):
            if os.path.exists(f"{out}{suffix}"):
                os.replace(f"{out}{suffix}", f"{path}{suffix}")
