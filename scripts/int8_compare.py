#!/usr/bin/env python
"""Our streaming int8 quantiser against ONNX Runtime's ``quantize_dynamic`` (the recipe's former implementation).

    .venv/bin/python scripts/int8_compare.py /tmp/mid-fp32 [--graphs text_encoder dit_step]

For each quantised graph of an fp32 export: copies the graph twice into a temporary directory, quantises one
copy with ``quantize_dynamic`` (the options the recipe used) and the other with
:func:`acestep_trt.export.quantize.quantize_int8`, then reports (one line per graph):

- whether both graphs hold the same nodes (order aside) and bit-identical initializers (int8 weights, scales,
  zero points);
- the node types ONNX Runtime's CPU session runs for each after its graph optimisations
  (``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``, ...), and whether they agree;
- at an off-trace shape (batch 2, odd lengths, latents beyond the sliding window): max |ours - theirs| of the
  outputs and each one's SNR against the fp32 graph;
- each quantiser's wall time (ours is mostly I/O; theirs builds the graph in memory).

Needs memory for ``quantize_dynamic`` (about three times the graph's weights): fine at mid size, not at
full size (see the README, "Export memory at full size").
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRAPHS = ("text_encoder", "condition_encoder", "dit_step")
# off-trace sizes (the trace uses batch 2, text 7, lyric 9, timbre 10, cond 17, latent 12): odd lengths, latents
# beyond the sliding window of the mid and full geometries (128 patched tokens)
DIMS = {"batch": 2, "text_len": 19, "lyric_len": 41, "timbre_len": 33, "cond_len": 29, "latent_len": 263}


def same_graph(a: Path, b: Path) -> tuple[bool, bool]:
    """(same nodes, order aside: the library sorts them topologically; bit-identical initializers of the same
    names)."""
    import onnx
    from onnx import numpy_helper

    ga, gb = onnx.load(str(a)).graph, onnx.load(str(b)).graph
    def key(graph):
        return sorted((n.op_type, tuple(n.input), tuple(n.output), n.name, n.SerializeToString()) for n in graph.node)

    nodes = key(ga) == key(gb)
    ia = {t.name: numpy_helper.to_array(t) for t in ga.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in gb.initializer}
    inits = ia.keys() == ib.keys() and all(ia[k].dtype == ib[k].dtype and ia[k].shape == ib[k].shape
                                           and ia[k].tobytes() == ib[k].tobytes() for k in ia)
    return nodes, inits


def session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the warning that a saved optimised model is hardware specific
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized.name + ".data")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_ops(path: Path, work: Path) -> collections.Counter:
    """Node types of the session ONNX Runtime builds from ``path`` (after its graph optimisations)."""
    import onnx

    optimized = work / f"optimized-{path.parent.name}-{path.name}"
    session(path, optimized)
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    optimized.unlink()
    optimized.with_name(optimized.name + ".data").unlink(missing_ok=True)
    return ops


def compare(artifacts, graph: str, work: Path) -> dict:
    """The report line of one graph of ``artifacts`` (:class:`acestep_trt.runtime.artifacts.Artifacts`)."""
    from acestep_trt.export.quantize import quantize_int8, quantize_with_ort
    from acestep_trt.export.validate import make_inputs
    from acestep_trt.runtime.precision import snr_db

    paths = {}
    for tag in ("theirs", "ours"):
        (work / tag).mkdir()
        for suffix in ("", ".data"):
            shutil.copy(artifacts.root / f"{graph}.onnx{suffix}", work / tag / f"{graph}.onnx{suffix}")
        paths[tag] = work / tag / f"{graph}.onnx"
    seconds = {}
    for tag, fn in (("theirs", quantize_with_ort), ("ours", quantize_int8)):
        start = time.perf_counter()
        fn(paths[tag], graph)
        seconds[tag] = time.perf_counter() - start
    feeds = make_inputs(artifacts.spec(graph), DIMS, artifacts.config)
    fp32 = session(artifacts.root / f"{graph}.onnx").run(None, feeds)
    outs = {tag: session(path).run(None, feeds) for tag, path in paths.items()}
    floats = [i for i, ref in enumerate(fp32) if ref.dtype == np.float32]
    ops = {tag: run_ops(path, work) for tag, path in paths.items()}
    keep = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "MatMulInteger", "MatMul", "Gemm")
    return {
        "graph": graph, "same_nodes_and_initializers": same_graph(paths["theirs"], paths["ours"]),
        "session_ops_equal": ops["ours"] == ops["theirs"],
        "session_ops": {op: ops["ours"][op] for op in keep if ops["ours"][op]},
        "max_abs_ours_vs_theirs": max(float(np.max(np.abs(outs["ours"][i] - outs["theirs"][i]))) for i in floats),
        "snr_db_vs_fp32": {tag: min(snr_db(outs[tag][i], fp32[i]) for i in floats) for tag in outs},
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path, help="an fp32 export (acestep-trt export MODEL DIR)")
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=GRAPHS)
    args = parser.parse_args(argv)
    import json

    from acestep_trt.runtime.artifacts import load_artifacts

    artifacts = load_artifacts(args.artifacts, verify=False)
    if artifacts.precision(args.graphs[0]) != "fp32":
        parser.error(f"{args.artifacts} is not an fp32 export")
    for graph in args.graphs:
        with tempfile.TemporaryDirectory(prefix="int8-compare-") as work:
            print(json.dumps(compare(artifacts, graph, Path(work))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
