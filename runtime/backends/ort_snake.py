"""The VAE graphs on ONNX Runtime's CPU provider with their Snake activations and residual adds outside it.

Why: the Oobleck VAE's 36 Snake activations (``x + inv_beta * sin(alpha * x) ** 2``, folded at export by
``export/graphs/vae_blocks.py``) are five ONNX operators each (Mul, Sin, Mul, Mul, Add). ONNX Runtime runs
``Sin`` as a scalar loop (about 2 ns per element here, one thread whatever the session's setting), and each
of the five, like every residual Add, is a pass over a tensor far larger than the cache: together about half
the CPU decode's time at mid size. A compiled kernel (``_vae_kernels.c``, built by setup.py) computes a Snake
and the residual add before it in one pass with a vectorised ``sin``; without it, NumPy does the same over
cache-sized chunks (2.2-2.8x slower than the kernel, several times faster than ONNX Runtime; README,
Performance: "VAE decode on the CPU").

How: the graph file is split at its Snakes, recognised by their folded pattern (:func:`find_snakes`), and at
its adds of two computed tensors; everything else (the convolutions) runs in ONNX Runtime sessions over the
same nodes, whose initializers are read from the graph's own data file (nothing is written into a graph).
With the compiled kernels, the values between pieces stay in ONNX Runtime's NCHWc layout (channels in blocks
of 16 innermost on AVX-512 CPUs) and every convolution whose channels fit runs as ONNX Runtime's NCHWc
convolution (:func:`plan_layouts`, :class:`BlockedConv`; weights rearranged at load): 1.2-1.8x faster than
its NCHW convolution, without the reorders that its own layout pass wraps around every piece. The audio equals
the whole graph's up to the last bits of ``sin``. Every value between pieces is written into a buffer of the
call (ONNX Runtime's IO binding), recycled as soon as its last reader has run, so a window allocates each
size of tensor once; the pieces run without ONNX Runtime's arena, which would keep one high-water mark per
piece for the life of the process.

Only the CPU provider and fp32 graphs: CUDA and TensorRT run the graph file as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..specs import GraphSpec
from .ort import _import_ort
from .ort_pieces import FLOAT, element_types, memory_initializer, piece_io, piece_model, piece_session

log = logging.getLogger(__name__)


def _native_kernels():
    """The compiled kernels (``_vae_kernels.c``, built by setup.py), or None where they were not built."""
    try:
        from . import _vae_kernels
    except ImportError:  # built without a C compiler: NumPy below
        return None
    return _vae_kernels


# The compiled kernels: the fused Snake (one pass over memory, vectorised sin; 2.2-2.8x NumPy's chunks, used
# where the build vectorised sin) and the upsampling's interleave; None: NumPy. Tests set it to None.
NATIVE = _native_kernels()

# Elements of one channel row processed per pass: 256 KiB of fp32, so that the passes of a Snake over a chunk
# stay in the core's L2 cache (measured: 65536 beat 8192 and whole rows of 0.5 M samples).
SNAKE_CHUNK = 65536


# --------------------------------------------------------------------------- NumPy kernels


def snake(x: np.ndarray, alpha: np.ndarray, inv_beta: np.ndarray, out: np.ndarray, scratch: np.ndarray,
          residual: np.ndarray | None = None, summed: np.ndarray | None = None, block: int = 1) -> None:
    """``out = y + inv_beta * sin(alpha * y) ** 2`` per channel, y [B, C, T] C-contiguous, alpha/inv_beta [C].

    ``y = x``, or with ``residual`` ``y = x + residual``, written to ``summed`` chunk by chunk before the
    Snake reads it (the residual add and the activation in one pass). ``out`` may be ``x`` (or ``summed``).
    The operations and their order are the graph's (``s = sin(alpha * y)``; ``y + inv_beta * (s * s)``), so
    only ``sin``'s last bits differ from ONNX Runtime's. ``scratch``: float32, at least ``SNAKE_CHUNK`` long.

    With :data:`NATIVE`, one fused pass (``_vae_kernels.c``; ``sin`` is glibc's vectorised one, within a few ulp);
    else NumPy over ``SNAKE_CHUNK``-long chunks of each row. ``block`` > 1: x is ONNX Runtime's NCHWc
    [B, C, 1, T] (memory [B, C/block, T, block]); compiled kernels only (:func:`nchwc_block` is 1 without them).
    """
    if NATIVE is not None and (NATIVE.VECTORISED or block > 1):
        NATIVE.snake(x, alpha, inv_beta, out, residual, summed, block)
        return
    if block > 1:
        raise RuntimeError("the NCHWc layout needs the compiled VAE kernels (_vae_kernels)")
    channels, length = x.shape[1], x.shape[2]
    rows, out_rows = x.reshape(-1, length), out.reshape(-1, length)
    if residual is not None:
        add_rows, sum_rows = residual.reshape(-1, length), summed.reshape(-1, length)
    for row in range(rows.shape[0]):
        a, b = alpha[row % channels], inv_beta[row % channels]
        for start in range(0, length, SNAKE_CHUNK):
            stop = start + SNAKE_CHUNK
            y = rows[row, start:stop]
            if residual is not None:
                y = np.add(y, add_rows[row, start:stop], out=sum_rows[row, start:stop])
            s = scratch[:y.shape[0]]
            np.multiply(y, a, out=s)
            np.sin(s, out=s)
            np.multiply(s, s, out=s)
            np.multiply(s, b, out=s)
            np.add(y, s, out=out_rows[row, start:stop])


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Snake:
    """One folded Snake: ``y = x + inv_beta * sin(alpha * x) ** 2`` per channel; alpha, inv_beta [C].

    With ``residual``, the add ``x = a + residual`` that precedes it is folded in: ``x`` is then an output too.
    """

    x: str
    y: str
    alpha: np.ndarray
    inv_beta: np.ndarray
    nodes: frozenset[str] = field(default_factory=frozenset)  # the five ONNX nodes it replaces
    a: str | None = None  # with residual: x = a + residual
    residual: str | None = None
    block: int = 1  # the values' layout: 1 NCHW, else ONNX Runtime's NCHWc with this block (see plan_layouts)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.x,) if self.residual is None else (self.a, self.residual)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.y,) if self.residual is None else (self.x, self.y)

    def shapes(self, shapes):
        return [np.broadcast_shapes(*shapes)] * len(self.outputs)

    def compute(self, ins, outs, scratch) -> None:
        if self.residual is None:
            snake(ins[0], self.alpha, self.inv_beta, outs[0], scratch, block=self.block)
        elif ins[0].shape == ins[1].shape:  # the add in the same chunk loop (Oobleck's residuals)
            snake(ins[0], self.alpha, self.inv_beta, outs[1], scratch, residual=ins[1], summed=outs[0],
                  block=self.block)
        else:  # a broadcasting add (NCHW only, see plan_layouts): first the sum, then the Snake over it
            np.add(ins[0], ins[1], out=outs[0])
            snake(outs[0], self.alpha, self.inv_beta, outs[1], scratch, block=self.block)


@dataclass(frozen=True)
class Add:
    """``y = a + b`` of two computed tensors (the VAE's residual connections), in NumPy."""

    a: str
    b: str
    y: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.a, self.b)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.y,)

    def shapes(self, shapes):
        return [np.broadcast_shapes(*shapes)]

    def compute(self, ins, outs, scratch) -> None:
        np.add(ins[0], ins[1], out=outs[0])


class _OneToOne:
    """A step that reads value ``x`` and writes value ``y``."""

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.x,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.y,)


@dataclass(frozen=True)
class Upsample(_OneToOne):
    """A 1-D ConvTranspose with stride s (even), kernel 2s and padding s/2, the Oobleck decoder's upsampling,
    as two kernel-2 convolutions over its input, one per half of the output phases, interleaved afterwards.

    Output sample ``q * s + r`` of ConvTranspose sums two taps: ``x[q - 1] w[s + t] + x[q] w[t]`` for the
    phases ``r < s/2`` (``t = r + s/2``), ``x[q] w[s + t] + x[q + 1] w[t]`` for the others (``t = r - s/2``).
    Stacking each half's phases as output channels, phase-major (``(r mod s/2) * Cout + co``), makes them plain
    convolutions ("a": pads [1, 0], "b": pads [0, 1]) with the same multiply-adds as the ConvTranspose; ONNX
    Runtime's ConvTranspose instead writes a [Cout * 2s, T] column buffer and scatters it (col2im): about twice
    the time, and a fresh column buffer of hundreds of MB per run at full size. ``block`` > 1: input, halves
    and output in ONNX Runtime's NCHWc layout [B, C, 1, T] (the two convolutions are NCHWc ones).
    """

    session: object  # the two convolutions: x -> "a", "b" [B, Cout * s/2, T] (NCHWc: [B, Cout * s/2, 1, T])
    x: str
    y: str
    stride: int
    channels: int  # Cout
    block: int = 1

    def halves_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], self.channels * (self.stride // 2), *shape[2:])

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], self.channels, *shape[2:-1], shape[-1] * self.stride)

    def interleave(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        """a, b [B, Cout * s/2, T] (channel ``(r mod s/2) * Cout + co``) -> out [B, Cout, T * s] (sample
        ``q * s + r``); NCHWc with ``block`` > 1 (compiled kernels only)."""
        if NATIVE is not None:  # runs in the cache: NumPy's strided copy takes 1.3-3.7x as long here
            NATIVE.interleave(a, b, out, self.stride, self.block)
            return
        if self.block > 1:
            raise RuntimeError("the NCHWc layout needs the compiled VAE kernels (_vae_kernels)")
        batch, _, length = a.shape
        half = self.stride // 2
        phases = out.reshape(batch, self.channels, length, self.stride)
        phases[..., :half] = a.reshape(batch, half, self.channels, length).transpose(0, 2, 3, 1)
        phases[..., half:] = b.reshape(batch, half, self.channels, length).transpose(0, 2, 3, 1)


def upsample_weights(weight: np.ndarray, bias: np.ndarray | None, stride: int):
    """ConvTranspose weight [Cin, Cout, 2s] (and bias [Cout]) -> the two convolutions' weights
    [s/2 * Cout, Cin, 2] (phase-major) and their shared bias [s/2 * Cout] (see :class:`Upsample`)."""
    cin, cout, _ = weight.shape
    half = stride // 2
    first = np.arange(half) + half  # phases r < s/2 read taps t = r + s/2 (at q) and s + t (at q - 1)
    second = np.arange(half)  # phases r >= s/2 read taps t = r - s/2 (at q + 1) and s + t (at q)

    def conv_weight(taps):  # [Cin, Cout, 2s] -> [s/2 * Cout, Cin, 2]: (earlier tap, later tap) per phase
        pair = np.stack([weight[:, :, stride + taps], weight[:, :, taps]], axis=-1)  # [Cin, Cout, s/2, 2]
        return np.ascontiguousarray(pair.transpose(2, 1, 0, 3), np.float32).reshape(half * cout, cin, 2)

    shared = np.zeros(half * cout, np.float32) if bias is None else np.tile(bias.astype(np.float32), half)
    return conv_weight(first), conv_weight(second), shared


def _upsample_stride(node, dims: dict) -> int | None:
    """The stride of a ConvTranspose that :class:`Upsample` can run (1-D, weight and bias initializers, group
    1, stride s even, kernel 2s, pads s/2 each side, no dilation, output padding or auto pad), else None.
    ``dims``: initializer name -> dims."""
    attrs = {a.name: a for a in node.attribute}
    ints = lambda key, default: list(attrs[key].ints) if key in attrs else default  # noqa: E731
    weight_dims = dims.get(node.input[1]) if len(node.input) > 1 else None
    bias = node.input[2] if len(node.input) > 2 else ""
    if node.op_type != "ConvTranspose" or weight_dims is None or len(weight_dims) != 3 or (bias and bias not in dims):
        return None
    stride = ints("strides", [1])
    if len(stride) != 1 or stride[0] < 2 or stride[0] % 2:
        return None
    s = stride[0]
    plain = (ints("dilations", [1]) == [1] and ints("output_padding", [0]) == [0] and "output_shape" not in attrs
             and (attrs["group"].i if "group" in attrs else 1) == 1
             and (attrs["auto_pad"].s if "auto_pad" in attrs else b"NOTSET") in (b"NOTSET", b""))
    fits = ints("kernel_shape", [weight_dims[2]]) == [2 * s] == [weight_dims[2]] and ints("pads", [0, 0]) == [s // 2] * 2
    return s if plain and fits else None


@dataclass(frozen=True)
class Piece:
    """ONNX nodes between the NumPy steps, run as one ONNX Runtime session."""

    session: object
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ops: tuple[str, ...]  # its nodes' operator types, in order (logs, profiles, tests)
    model: object = None  # its ModelProto without weights, for the output shapes of new input shapes

    def output_shapes(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]] | None:
        """Output shapes for these input shapes by ONNX shape inference (about 0.5 ms), or None if unknown."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for value, shape in zip(model.graph.input, shapes):
            value.type.tensor_type.shape.Clear()
            for dim in shape:
                value.type.tensor_type.shape.dim.add().dim_value = int(dim)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except Exception:  # onnx raises its own types; the piece then tells its shapes by running
            return None
        out = {v.name: v.type.tensor_type.shape for v in inferred.graph.output}
        dims = [[d.dim_value if d.HasField("dim_value") else 0 for d in out[name].dim] for name in self.outputs]
        return None if any(not d or 0 in d for d in dims) else [tuple(d) for d in dims]


# --------------------------------------------------------------------------- ONNX Runtime's NCHWc layout

NCHWC_DOMAIN = "com.microsoft.nchwc"  # ONNX Runtime's CPU operators over the blocked layout


def blocked_filter(weight: np.ndarray, block: int) -> np.ndarray:
    """Conv weight [O, I, k] -> ONNX Runtime's NCHWc filter [O, I, 1, k], memory [O/b, I/b, 1, k, b_in, b_out]
    (the layout its NchwcTransformer writes for a convolution over NCHWc input; :func:`nchwc_block` checks it
    on every load)."""
    out_ch, in_ch, kernel = weight.shape
    blocks = weight.reshape(out_ch // block, block, in_ch // block, block, 1, kernel).transpose(0, 2, 4, 5, 3, 1)
    return np.ascontiguousarray(blocks, np.float32).reshape(out_ch, in_ch, 1, kernel)


def _conv_2d(name: str, x: str, y: str, weight: str, bias: str | None, kernel: int, dilation: int, stride: int,
             pads: tuple[int, int], domain: str = ""):
    """A 1-D convolution as a 2-D one over [B, C, 1, T] (``domain`` NCHWC_DOMAIN: ONNX Runtime's NCHWc one)."""
    from onnx import helper

    return helper.make_node("Conv", [x, weight] + ([bias] if bias else []), [y], name=name, domain=domain,
                            kernel_shape=[1, kernel], dilations=[1, dilation], strides=[1, stride],
                            pads=[0, pads[0], 0, pads[1]], group=1)


@functools.cache
def nchwc_block() -> int:
    """The channel block of ONNX Runtime's NCHWc convolutions on this CPU (16 with AVX-512, 8 with AVX2), or 1
    where its CPU provider has none or their filter layout is not :func:`blocked_filter`'s.

    Asked of ONNX Runtime itself, once per process: its optimiser rewrites a probe convolution into NCHWc and
    saves it, and the saved filter must equal ours for some block.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        ort = _import_ort()
        weight = np.arange(32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)  # distinct values: any reorder shows
        graph = helper.make_graph(
            [_conv_2d("probe", "x", "y", "w", None, 3, 1, 1, (1, 1))], "nchwc_probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 1, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 1, 64])],
            [numpy_helper.from_array(weight.reshape(32, 32, 1, 3), "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # ONNX Runtime warns that a saved NCHWc model is hardware-specific
            options.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            saved = onnx.load(options.optimized_model_filepath)
        convs = [n for n in saved.graph.node if n.domain == NCHWC_DOMAIN and n.op_type == "Conv"]
        if not convs:
            return 1
        stored = numpy_helper.to_array(next(t for t in saved.graph.initializer if t.name == convs[0].input[1]))
        for block in (16, 8):
            if np.array_equal(stored.reshape(-1), blocked_filter(weight, block).reshape(-1)):
                return block
        log.debug("ONNX Runtime's NCHWc filter layout is not the expected one; the VAE's pieces stay NCHW")
    except Exception as exc:  # an ONNX Runtime without NCHWc operators, or no writable temporary directory
        log.debug("no NCHWc probe (%s); the VAE's pieces stay NCHW", exc)
    return 1


@dataclass(frozen=True)
class BlockedConv(_OneToOne):
    """A 1-D convolution (group 1, channels multiples of ``block``) as ONNX Runtime's NCHWc convolution:
    input and output [B, C, 1, T] in the blocked layout, so that no reorder runs around it. Measured here
    (Intel Xeon, AMX; one thread): 1.2-1.8x faster than the NCHW convolution for kernel 7 at 32-256 channels."""

    session: object  # "x" -> "y"
    x: str
    y: str
    channels: int  # Cout
    kernel: int
    dilation: int
    stride: int
    pads: tuple[int, int]

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        span = self.dilation * (self.kernel - 1) + 1
        return (shape[0], self.channels, 1, (shape[3] + sum(self.pads) - span) // self.stride + 1)


@dataclass(frozen=True)
class Reorder(_OneToOne):
    """``y`` = ``x`` in the other layout: NCHW [B, C, T] <-> NCHWc [B, C, 1, T] (compiled kernel)."""

    x: str
    y: str
    block: int
    to_blocked: bool

    def shapes(self, shapes):
        (b, c, *_, t), = shapes
        return [(b, c, 1, t) if self.to_blocked else (b, c, t)]

    def compute(self, ins, outs, scratch) -> None:
        NATIVE.reorder(ins[0], outs[0], self.block, self.to_blocked)


def _blockable_conv(nodes: list, dims: dict, block: int):
    """The one Conv node of a piece that :class:`BlockedConv` can run, else None: 1-D, group 1, weight (and
    bias) initializers, no auto_pad, input and output channels multiples of ``block``."""
    if len(nodes) != 1 or nodes[0].op_type != "Conv" or len(nodes[0].input) < 2:
        return None
    node = nodes[0]
    attrs = {a.name: a for a in node.attribute}
    weight = dims.get(node.input[1])
    bias = node.input[2] if len(node.input) > 2 else ""
    if weight is None or len(weight) != 3 or (bias and bias not in dims):
        return None
    if (attrs["group"].i if "group" in attrs else 1) != 1 or (
            attrs["auto_pad"].s if "auto_pad" in attrs else b"NOTSET") not in (b"NOTSET", b""):
        return None
    return node if weight[0] % block == 0 and weight[1] % block == 0 else None


def _conv_geometry(node, kernel: int) -> tuple[int, int, int, tuple[int, int]]:
    """(kernel, dilation, stride, pads) of a 1-D Conv node; ``kernel``: its weight's, if no attribute says."""
    attrs = {a.name: list(a.ints) for a in node.attribute}
    return (attrs.get("kernel_shape", [kernel])[0], attrs.get("dilations", [1])[0],
            attrs.get("strides", [1])[0], tuple(attrs.get("pads", [0, 0])))


LAYOUT_MARK = "@nchw"  # a Reorder step's copy of value NAME is NAME@nchw (NCHW) or NAME@nchwc16 (NCHWc, block 16)


def _layout_alias(name: str, block: int) -> str:
    return f"{name}{LAYOUT_MARK}c{block}" if block > 1 else f"{name}{LAYOUT_MARK}"


def _unaliased(name: str) -> str:
    """The graph's own name of a value (the value itself, or the value a Reorder step copied)."""
    return name.split(LAYOUT_MARK)[0]


def plan_layouts(steps: list, block: int, dims: dict, outputs: set[str]) -> list:
    """The steps of :func:`plan_steps` with the values between them in ONNX Runtime's NCHWc layout where its
    convolutions can run on it (``block`` > 1; 1 returns ``steps`` as they are).

    A piece that is one plain convolution becomes ``("conv", node, x)`` (a :class:`BlockedConv` over value
    ``x``) and an upsampling with channels multiples of ``block`` ``("upsample", node, stride, block, x)``;
    their outputs are blocked. Snakes and adds run blocked where their values' channels are known (from a
    convolution's weights) to be a multiple of ``block``. Other pieces, and every step that writes a graph
    output, read NCHW. Where a step needs a value in the other layout, a :class:`Reorder` step makes it once,
    under a new name (``x@nchwc16``, ``x@nchw``) that the step reads.
    """
    if block <= 1:
        return [(*s, 1, s[1].input[0]) if isinstance(s, tuple) else s for s in steps]
    layout: dict[str, int] = {}  # value -> its block (absent: NCHW)
    channels: dict[str, int] = {}  # value -> its channels, where a convolution's weights tell
    alias: dict[tuple[str, int], str] = {}
    planned: list = []

    def need(name: str, want: int) -> str:
        if layout.get(name, 1) == want:
            return name
        if (name, want) not in alias:
            alias[name, want] = _layout_alias(name, want)
            planned.append(Reorder(name, alias[name, want], block, to_blocked=want > 1))
            layout[alias[name, want]] = want
        return alias[name, want]

    for step in steps:
        if isinstance(step, list):
            conv = _blockable_conv(step, dims, block)
            if conv is not None and conv.output[0] not in outputs:
                planned.append(("conv", conv, need(conv.input[0], block)))
                layout[conv.output[0]] = block
            else:
                planned.append(_renamed_inputs(step, {n: need(n, 1) for node in step for n in node.input
                                                      if layout.get(n, 1) > 1}))
            if len(step) == 1 and step[0].op_type == "Conv" and step[0].input[1] in dims:
                channels[step[0].output[0]] = dims[step[0].input[1]][0]
        elif isinstance(step, tuple):  # ("upsample", node, stride)
            node, stride = step[1], step[2]
            cin, cout = dims[node.input[1]][:2]
            want = block if cin % block == 0 and cout % block == 0 and node.output[0] not in outputs else 1
            planned.append(("upsample", node, stride, want, need(node.input[0], want)))
            layout[node.output[0]], channels[node.output[0]] = want, cout
        else:  # Snake, Add
            count = {channels.get(name) for name in step.inputs}
            fits = len(count) == 1 and None not in count and count.pop() % block == 0
            want = block if fits and not set(step.outputs) & outputs else 1
            channels.update({name: channels[step.inputs[0]] for name in step.outputs if fits})
            names = {name: need(name, want) for name in step.inputs}
            if isinstance(step, Snake):
                fields = {"x": names[step.x]} if step.residual is None else {"a": names[step.a],
                                                                             "residual": names[step.residual]}
                step = dataclasses.replace(step, block=want, **fields)
            else:
                step = dataclasses.replace(step, a=names[step.a], b=names[step.b])
            planned.append(step)
            layout.update({name: want for name in step.outputs})
    return planned


def _renamed_inputs(nodes: list, names: dict[str, str]) -> list:
    """``nodes`` with the inputs in ``names`` read under their new names (copies; the graph is unchanged)."""
    if not names:
        return nodes
    from onnx import NodeProto

    renamed = []
    for node in nodes:
        copy = NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            copy.input[i] = names.get(name, name)
        renamed.append(copy)
    return renamed


# --------------------------------------------------------------------------- planning


def find_snakes(graph, constant) -> list[Snake]:
    """The folded Snakes of ``graph`` (an ``onnx.GraphProto``): Mul(alpha, x) -> Sin -> Mul(s, s) ->
    Mul(inv_beta, .) -> Add(x, .), with alpha and inv_beta initializers of shape [1, C, 1] and no other use
    of the intermediate values. ``constant(name)`` -> the initializer's array, or None if it is none."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):  # Mul(s, s) is one consumer of s
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_consumer(node, op_type):
        users = consumers.get(node.output[0], [])
        if node.output[0] in outputs or len(users) != 1 or users[0].op_type != op_type:
            return None
        return users[0]

    def split_constant(node):  # Mul(c, v) or Mul(v, c) -> (c's array, v), or None
        for i in (0, 1):
            value = constant(node.input[i])
            if value is not None and constant(node.input[1 - i]) is None:
                return value, node.input[1 - i]
        return None

    snakes = []
    for sin in (n for n in graph.node if n.op_type == "Sin"):
        scale = producer.get(sin.input[0])  # nodes are compared by name: protobuf hands out new wrappers
        if scale is None or scale.op_type != "Mul" or getattr(only_consumer(scale, "Sin"), "name", None) != sin.name:
            continue
        alpha_x = split_constant(scale)
        square = only_consumer(sin, "Mul")
        if alpha_x is None or square is None or list(square.input) != [sin.output[0]] * 2:
            continue
        weight = only_consumer(square, "Mul")
        inv_beta_s = None if weight is None else split_constant(weight)
        add = None if weight is None else only_consumer(weight, "Add")
        if inv_beta_s is None or add is None or sorted(add.input) != sorted([alpha_x[1], weight.output[0]]):
            continue
        (alpha, x), (inv_beta, _) = alpha_x, inv_beta_s
        if alpha.ndim != 3 or alpha.shape != inv_beta.shape or alpha.shape[0] != 1 or alpha.shape[2] != 1:
            continue  # one value per channel of x [B, C, T], as FoldedSnake stores them ([1, C, 1])
        snakes.append(Snake(x, add.output[0], alpha.reshape(-1).astype(np.float32),
                            inv_beta.reshape(-1).astype(np.float32),
                            frozenset(n.name for n in (scale, sin, square, weight, add))))
    return snakes


def plan_steps(graph, snakes: list[Snake], constants: set[str], dims: dict) -> list:
    """The graph as steps in execution order: lists of ONNX nodes (run by ONNX Runtime), :class:`Snake` and
    :class:`Add` (NumPy), and ``("upsample", node, stride)`` for the ConvTransposes :class:`Upsample` runs
    (``dims``: initializer name -> dims); an Add whose sum the next step's Snake reads is folded into that
    Snake.

    ONNX nodes are stored in topological order; a Snake takes the place of its final Add, and the nodes
    between its first Mul and that Add (none depend on it: its intermediate values have no other use) go
    into the run before it.
    """
    by_add = {snake.y: snake for snake in snakes}
    skipped = set().union(*(s.nodes for s in snakes)) if snakes else set()
    steps: list = []

    def emit(step):
        if isinstance(step, list):
            if steps and isinstance(steps[-1], list):
                steps[-1].append(step[0])
                return
        elif isinstance(step, Snake) and steps and isinstance(steps[-1], Add) and steps[-1].y == step.x:
            add = steps.pop()
            step = Snake(step.x, step.y, step.alpha, step.inv_beta, step.nodes, add.a, add.b)
        steps.append(step)

    for node in graph.node:
        if node.name in skipped:
            if node.op_type == "Add" and node.output[0] in by_add:
                emit(by_add[node.output[0]])
        elif node.op_type == "Add" and len(node.input) == 2 and not set(node.input) & constants:
            emit(Add(node.input[0], node.input[1], node.output[0]))
        elif _upsample_stride(node, dims) is not None:
            emit(("upsample", node, _upsample_stride(node, dims)))
        else:
            emit([node])
    return steps


def _initializer(tensor, path: Path) -> np.ndarray:
    """An initializer (TensorProto) of the graph file ``path`` as an array (read straight from the graph's data
    file if stored there)."""
    import onnx
    from onnx import helper, numpy_helper

    name = tensor.name
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    data = (path.parent / info["location"]).resolve()
    if not data.is_relative_to(path.parent.resolve()):
        raise _NotSplittable(f"{name}: its data file is outside the artifacts directory")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims))
    array = np.fromfile(data, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if array.size != count:
        raise _NotSplittable(f"{name}: its data file {data.name} is shorter than the graph says")
    return array.reshape(tuple(tensor.dims))


class _NotSplittable(Exception):
    """The graph cannot be split (a value between steps is not float32): run it whole."""


# --------------------------------------------------------------------------- the graph


class SnakeSplitGraph:
    """A CPU VAE graph run as ONNX Runtime pieces and NumPy steps; the interface of
    :class:`~acestep_trt.runtime.backends.ort.OrtGraph` that the VAE uses (``run``).

    Build with :meth:`open`, which returns None for a graph without folded Snakes (exports made before the
    fold; the caller keeps the whole graph then). ``run`` may be called from several threads at once.
    """

    def __init__(self, path: Path, spec: GraphSpec, model, steps: list, elem, threads: int | None = 1,
                 block: int = 1):
        """``steps``: :func:`plan_layouts`'s, for ``block``."""
        self.spec, self.name, self.device = spec, spec.name, "cpu"
        self.providers = ["CPUExecutionProvider"]
        self._outputs = [o.name for o in spec.outputs]
        self._threads = threads or 1
        self._shapes: dict[tuple, list[tuple[int, ...]]] = {}  # (step, input shapes) -> output shapes
        self._idle: list[_Buffers] = []  # buffers of finished runs, for the next ones
        self._lock = threading.Lock()
        self.block = block  # NCHWc block of the values between pieces (1: NCHW; plan_layouts)
        self._initializers = {t.name: t for t in model.graph.initializer}
        self._steps = []
        later = {o.name for o in model.graph.output}
        elem = functools.partial(lambda types, name: types(_unaliased(name)), elem)  # Reorder steps' copies too
        for step in reversed(steps):  # pieces need to know which of their values later steps read
            if isinstance(step, list):  # checks its own inputs and outputs
                step = self._piece(path, model, step, later, elem)
            else:
                if isinstance(step, tuple) and step[0] == "upsample":  # ("upsample", node, stride, block, x)
                    step = self._upsample(path, model, *step[1:])
                elif isinstance(step, tuple):  # ("conv", node, x)
                    step = self._blocked_conv(path, model, *step[1:])
                if any(elem(name) != FLOAT for name in (*step.inputs, *step.outputs)):
                    raise _NotSplittable(f"a value of {step.outputs[-1]} is not float32")
            later = later | set(step.inputs)
            self._steps.insert(0, step)
        self._uses: dict[str, int] = {name: 1 for name in self._outputs}  # graph outputs are never recycled
        for step in self._steps:
            for name in step.inputs:
                self._uses[name] = self._uses.get(name, 0) + 1

    @classmethod
    def open(cls, path: Path, spec: GraphSpec, threads: int | None = 1,
             block: int | None = None) -> "SnakeSplitGraph | None":
        """Split ``path`` at its folded Snakes, or None when it has none or a value between steps is not
        float32 (ONNX Runtime then runs the whole graph). ``block``: the NCHWc block of the values between
        pieces (:func:`plan_layouts`); None: :func:`nchwc_block` where the compiled kernels are built, else 1
        (NCHW)."""
        try:
            import onnx
        except ImportError:  # the `ort` extra installs it; without it the whole graph runs, slower
            log.warning("%s: the onnx package is missing, so the VAE's Snakes run inside ONNX Runtime (slower); "
                        "pip install 'acestep-trt[ort]'", spec.name)
            return None
        model = onnx.load(str(path), load_external_data=False)
        initializers = {t.name: t for t in model.graph.initializer}

        def constant(name):  # [1, C, 1] tensors: read on their own, the weights stay in the data file
            tensor = initializers.get(name)
            if tensor is None or len(tensor.dims) != 3 or tensor.dims[0] != 1 or tensor.dims[2] != 1:
                return None
            return _initializer(tensor, path)

        snakes = find_snakes(model.graph, constant)
        if not snakes:  # an export made before the Snakes were folded (export/graphs/vae_blocks.py)
            log.debug("%s: no folded Snakes; ONNX Runtime runs the whole graph", spec.name)
            return None
        try:
            dims = {name: list(t.dims) for name, t in initializers.items()}
            if block is None:
                block = nchwc_block() if NATIVE is not None else 1
            steps = plan_layouts(plan_steps(model.graph, snakes, set(initializers), dims), block, dims,
                                 {o.name for o in model.graph.output})
            graph = cls(path, spec, model, steps, element_types(model), threads, block)
        except _NotSplittable as why:
            log.debug("%s: %s; ONNX Runtime runs the whole graph", spec.name, why)
            return None
        log.debug("%s: %d Snakes outside ONNX Runtime, %d ONNX Runtime pieces, %d NCHWc convolutions (block %d)",
                  spec.name, len(snakes), sum(isinstance(s, Piece) for s in graph._steps),
                  sum(isinstance(s, BlockedConv) for s in graph._steps), graph.block)
        return graph

    def _piece(self, path: Path, model, nodes, later: set[str], elem) -> Piece:
        """An ONNX Runtime session over ``nodes`` of ``model``; ``later``: values read after it."""
        inputs, outputs = piece_io(nodes, later, set(self._initializers))
        if any(elem(name) != FLOAT for name in (*inputs, *outputs)):
            raise _NotSplittable(f"a value between pieces of {path.name} is not float32")
        piece = piece_model(model, nodes, inputs, outputs, elem)
        # no arena: 37 pieces would each keep their own high-water mark for the life of the process
        session = piece_session(path, piece, self._threads, arena=False, fallback="split_graphs=False")
        return Piece(session, inputs, outputs, tuple(node.op_type for node in nodes), piece)

    def _upsample(self, path: Path, model, node, stride: int, block: int, x: str) -> Upsample:
        """The two convolutions of an :class:`Upsample` in one session, weights rearranged from the node's
        (``block`` > 1: NCHWc convolutions over the blocked value ``x``)."""
        from onnx import helper

        weight = self._weight(path, node.input[1])
        bias = self._weight(path, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        a, b, shared = upsample_weights(weight, bias, stride)
        if block > 1:
            nodes = [_conv_2d(half, "x", half, f"w{half}", "bias", 2, 1, 1, pads, NCHWC_DOMAIN)
                     for half, pads in (("a", (1, 0)), ("b", (0, 1)))]
            a, b = blocked_filter(a, block), blocked_filter(b, block)
        else:
            nodes = [helper.make_node("Conv", ["x", "wa", "bias"], ["a"], pads=[1, 0]),
                     helper.make_node("Conv", ["x", "wb", "bias"], ["b"], pads=[0, 1])]
        session = self._weights_session(path, model, nodes, f"{node.name}_polyphase", ("a", "b"),
                                        {"wa": a, "wb": b, "bias": shared})
        return Upsample(session, x, node.output[0], stride, weight.shape[1], block)

    def _blocked_conv(self, path: Path, model, node, x: str) -> BlockedConv:
        """One 1-D convolution of the graph as an NCHWc convolution of ONNX Runtime over blocked ``x``."""
        weight = self._weight(path, node.input[1])
        kernel, dilation, stride, pads = _conv_geometry(node, weight.shape[2])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        weights = {"w": blocked_filter(weight, self.block)}
        if bias:
            weights["bias"] = np.ascontiguousarray(self._weight(path, bias), np.float32)
        conv = _conv_2d(node.name or "conv", "x", "y", "w", "bias" if bias else None, kernel, dilation, stride,
                        pads, NCHWC_DOMAIN)
        session = self._weights_session(path, model, [conv], f"{node.name}_nchwc", ("y",), weights)
        return BlockedConv(session, x, node.output[0], weight.shape[0], kernel, dilation, stride, pads)

    def _weight(self, path: Path, name: str) -> np.ndarray:
        return _initializer(self._initializers[name], path)

    def _weights_session(self, path: Path, model, nodes: list, name: str, outputs: tuple[str, ...],
                         weights: dict[str, np.ndarray]):
        """A session over ``nodes`` (input "x") whose weights are rearranged arrays, handed to ONNX Runtime from
        memory (not serialised into the piece; ``memory_initializer``)."""
        from onnx import TensorProto, helper

        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                                  [memory_initializer(n, a) for n, a in weights.items()])
        domains = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(NCHWC_DOMAIN, 1)] if self.block > 1 else [])
        piece = helper.make_model(graph, opset_imports=domains, ir_version=model.ir_version)
        return piece_session(path, piece, self._threads, arena=False, fallback="split_graphs=False",
                             initializers=weights)

    # ------------------------------------------------------------------ running

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the steps in order. Each value's buffer is recycled once its last reader has run; a NumPy step
        writes over an input that no later step reads."""
        self.spec.check_feeds(feeds)
        values = {t.name: np.ascontiguousarray(feeds[t.name]) for t in self.spec.inputs}
        uses = dict(self._uses)
        with self._lock:  # one set of buffers per run in flight (windows decoded at once)
            buffers = self._idle.pop() if self._idle else _Buffers()
        try:
            return self._run_steps(values, uses, buffers)
        finally:
            buffers.reset()
            with self._lock:
                self._idle.append(buffers)

    def _run_steps(self, values: dict, uses: dict, buffers: "_Buffers") -> dict[str, np.ndarray]:
        for index, step in enumerate(self._steps):
            ins = [values[name] for name in step.inputs]
            if isinstance(step, Piece):
                produced = self._run_piece(index, step, ins, buffers)
            elif isinstance(step, Upsample):
                produced = {step.y: self._run_upsample(step, ins[0], buffers)}
            elif isinstance(step, BlockedConv):
                produced = {step.y: self._run_blocked_conv(step, ins[0], buffers)}
            else:
                outs = self._numpy_outputs(step, ins, uses, buffers)
                step.compute(ins, outs, buffers.scratch)
                produced = dict(zip(step.outputs, outs))
            for name in step.inputs:
                uses[name] -= 1
                if uses[name] == 0:
                    dead = values.pop(name)
                    if all(dead is not new for new in produced.values()):
                        buffers.give(dead)
            values.update(produced)
        return {name: values[name] for name in self._outputs}

    def _numpy_outputs(self, step, ins: list[np.ndarray], uses: dict, buffers: "_Buffers") -> list[np.ndarray]:
        """Output buffers of a NumPy step: an input that no later step reads (same shape, this call's), else
        a recycled or new buffer (graph outputs: new)."""
        shapes = step.shapes([a.shape for a in ins])
        reusable = [a for name, a in zip(step.inputs, ins) if uses[name] == 1 and buffers.owns(a)]
        outs = []
        for name, shape in zip(step.outputs, shapes):
            same = next((a for a in reusable if a.shape == shape), None)
            if same is not None and name not in self._outputs:
                reusable.remove(same)
                outs.append(same)
            else:
                outs.append(np.empty(shape, np.float32) if name in self._outputs else buffers.take(shape))
        return outs

    def _run_upsample(self, step: Upsample, x: np.ndarray, buffers: "_Buffers") -> np.ndarray:
        """x [B, Cin, T] -> [B, Cout, T * s]: both convolutions into buffers, then their phases interleaved."""
        halves = [buffers.take(step.halves_shape(x.shape)) for _ in range(2)]
        binding = step.session.io_binding()
        binding.bind_cpu_input("x", x)
        for name, out in zip(("a", "b"), halves):
            binding.bind_output(name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        step.session.run_with_iobinding(binding)
        shape = step.output_shape(x.shape)
        out = np.empty(shape, np.float32) if step.y in self._outputs else buffers.take(shape)
        step.interleave(*halves, out)
        for half in halves:
            buffers.give(half)
        return out

    def _run_blocked_conv(self, step: BlockedConv, x: np.ndarray, buffers: "_Buffers") -> np.ndarray:
        """x [B, Cin, 1, T] -> [B, Cout, 1, T'] (NCHWc), written into a buffer."""
        out = buffers.take(step.output_shape(x.shape))
        binding = step.session.io_binding()
        binding.bind_cpu_input("x", x)
        binding.bind_output("y", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        step.session.run_with_iobinding(binding)
        return out

    def _run_piece(self, index: int, piece: Piece, ins: list[np.ndarray], buffers: "_Buffers") -> dict:
        """Run one piece; its outputs are written into ``buffers`` (graph outputs into fresh arrays)."""
        key = (index, tuple(a.shape for a in ins))
        if key not in self._shapes:  # new input shapes: shape inference says the outputs'
            self._shapes[key] = piece.output_shapes([a.shape for a in ins])
        shapes = self._shapes[key]
        if shapes is None:  # shape inference could not tell: ONNX Runtime allocates, then the arrays are copied
            got = piece.session.run(list(piece.outputs), dict(zip(piece.inputs, ins)))
            self._shapes[key] = [a.shape for a in got]
            return {name: buffers.adopt(np.array(a)) for name, a in zip(piece.outputs, got)}
        binding = piece.session.io_binding()
        for name, array in zip(piece.inputs, ins):
            binding.bind_cpu_input(name, array)
        produced = {}
        for name, shape in zip(piece.outputs, shapes):
            out = np.empty(shape, np.float32) if name in self._outputs else buffers.take(shape)
            binding.bind_output(name, "cpu", 0, np.float32, list(shape), out.ctypes.data)
            produced[name] = out
        piece.session.run_with_iobinding(binding)
        return produced

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers kept between runs (at most the largest window's working set per window
        decoded at once)."""
        with self._lock:
            return sum(b.nbytes for b in self._idle)

    def release_buffers(self) -> None:
        """Drop the buffers kept between runs (the next run allocates again)."""
        with self._lock:
            self._idle.clear()

    def close(self) -> None:
        self.release_buffers()
        self._steps = []


class _Buffers:
    """float32 buffers for the values of one run, carved from flat arrays that outlive the run.

    ``take(shape)`` returns a view of the smallest free flat array that holds it (or of a new one), ``give``
    frees the view's flat array for the rest of the run, ``reset`` (the run is over) frees them all. The flat
    arrays are kept for the graph's next runs, so a decode does not fault in fresh pages for every window
    (about 12% of the decode's time at full size); they hold at most the largest window's working set, whatever
    the clip lengths (a shorter window's values fit in the same arrays). Graph outputs and inputs are never
    taken from here.
    """

    def __init__(self):
        self.scratch = np.empty(SNAKE_CHUNK, np.float32)  # the Snake's chunk
        self._free: list[np.ndarray] = []  # flat float32 arrays not holding a value now
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(view) -> (view, its flat array)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._free) + sum(flat.nbytes for _, flat in self._held.values())

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        fits = [i for i, a in enumerate(self._free) if a.size >= size]
        if fits:
            flat = self._free.pop(min(fits, key=lambda i: self._free[i].size))
        else:
            flat = np.empty(size, np.float32)
        view = flat[:size].reshape(shape)
        self._held[id(view)] = (view, flat)
        return view

    def adopt(self, array: np.ndarray) -> np.ndarray:
        """Hand ``array`` (C-contiguous float32) over to the buffers, like one they made."""
        self._held[id(array)] = (array, array.reshape(-1))
        return array

    def owns(self, array: np.ndarray) -> bool:
        return id(array) in self._held

    def give(self, array: np.ndarray) -> None:
        held = self._held.pop(id(array), None)
        if held is not None:
            self._free.append(held[1])

    def reset(self) -> None:
        self._free.extend(flat for _, flat in self._held.values())
        self._held.clear()
