"""A graph whose part that depends on one input only is computed once per distinct value of that input.

Why: the condition encoder turns the timbre reference (``timbre_latents`` [B, 750, 64], 30 s of latents)
into one token per item through the timbre encoder's layers, and packs it with the lyric and text states.
Without reference audio (text2music, the common case) that reference is the checkpoint's silence latent,
the same on every call: recomputing its token was most of the condition encoder's time (80 of 90 ms at mid
size on the CPU) and a large part of the prompt-encoding stage. Here the graph file is split in two
ONNX Runtime sessions (``ort_pieces.py``): the nodes that read nothing but ``timbre_latents`` and the
weights, and the rest; the first runs only when ``timbre_latents`` differs from the values it last saw
(compared by content), and its outputs are reused otherwise. Outputs equal the whole graph's.

Only the CPU provider (CUDA and TensorRT run the graph file whole).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..specs import GraphSpec
from .ort_pieces import element_types, piece_io, piece_model, piece_session

log = logging.getLogger(__name__)

MEMO_ENTRIES = 4  # distinct references remembered (each: the part's outputs, about [B, 1, hidden])


def split_by_input(graph, name: str, constants: set[str]) -> tuple[list, list]:
    """(nodes that read only ``name``, the weights and each other; the other nodes), in graph order."""
    only = {name}
    part, rest = [], []
    for node in graph.node:
        reads = [value for value in node.input if value and value not in constants]
        if reads and all(value in only for value in reads):
            only.update(node.output)
            part.append(node)
        else:
            rest.append(node)
    return part, rest


class MemoizedInputGraph:
    """The interface of :class:`~acestep_trt.runtime.backends.ort.OrtGraph` that the runtime uses (``run``),
    over two sessions. Build with :meth:`open` (None when the split would save nothing)."""

    def __init__(self, spec: GraphSpec, memo_input: str, part, rest, part_outputs, rest_inputs):
        self.spec, self.name, self.device = spec, spec.name, "cpu"
        self.providers = ["CPUExecutionProvider"]
        self._memo_input, self._part, self._rest = memo_input, part, rest
        self._part_outputs, self._rest_inputs = part_outputs, rest_inputs
        self._outputs = [o.name for o in spec.outputs]
        self._memo: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.part_runs = 0  # how often the memoised part ran (tests, logs)

    @classmethod
    def open(cls, path: Path, spec: GraphSpec, memo_input: str,
             threads: int | None = None) -> "MemoizedInputGraph | None":
        try:
            import onnx
        except ImportError:
            return None  # the `ort` extra installs it; the whole graph runs then
        model = onnx.load(str(path), load_external_data=False)
        constants = {t.name for t in model.graph.initializer}
        part, rest = split_by_input(model.graph, memo_input, constants)
        if not part or not rest or memo_input not in {i.name for i in model.graph.input}:
            log.debug("%s: nothing depends on %s alone; ONNX Runtime runs the whole graph", spec.name, memo_input)
            return None
        elem = element_types(model)
        graph_outputs = {o.name for o in model.graph.output}
        rest_reads = {value for node in rest for value in node.input} | graph_outputs
        _, part_outputs = piece_io(part, rest_reads, constants)
        rest_inputs, rest_outputs = piece_io(rest, graph_outputs, constants)
        if set(part_outputs) & graph_outputs or set(rest_outputs) != graph_outputs:
            return None  # a graph output made by the part alone: nothing left to save
        fallback = "split_graphs=False"  # no arena, as for the whole graph (backends/ort.py CPU_ARENA_GRAPHS)
        sessions = [piece_session(path, piece_model(model, nodes, ins, outs, elem, label), threads, False, fallback)
                    for nodes, ins, outs, label in ((part, (memo_input,), part_outputs, "part"),
                                                    (rest, rest_inputs, tuple(o.name for o in model.graph.output),
                                                     "rest"))]
        log.debug("%s: %d of %d nodes depend on %s alone and run once per distinct value", spec.name, len(part),
                  len(model.graph.node), memo_input)
        return cls(spec, memo_input, sessions[0], sessions[1], part_outputs, rest_inputs)

    def _part_values(self, value: np.ndarray) -> dict[str, np.ndarray]:
        """The part's outputs for ``value``: remembered, or computed and remembered (last MEMO_ENTRIES)."""
        digest = hashlib.blake2b(np.ascontiguousarray(value).view(np.uint8), digest_size=32).digest()
        key = (value.dtype.str, value.shape, digest)
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        got = dict(zip(self._part_outputs, self._part.run(list(self._part_outputs), {self._memo_input: value})))
        with self._lock:
            self.part_runs += 1
            self._memo[key] = got
            while len(self._memo) > MEMO_ENTRIES:
                self._memo.popitem(last=False)
        return got

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds)
        values = {**feeds, **self._part_values(feeds[self._memo_input])}
        out = self._rest.run(self._outputs, {name: values[name] for name in self._rest_inputs})
        return dict(zip(self._outputs, out))

    def close(self) -> None:
        self._memo.clear()
