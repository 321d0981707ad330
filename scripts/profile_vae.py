#!/usr/bin/env python
"""Per-operator profile of an export's VAE graphs (decoder, encoder) under ONNX Runtime's CPU provider.

    .venv/bin/python scripts/profile_vae.py ARTIFACTS_DIR --duration 10 --threads 2
    .venv/bin/python scripts/profile_vae.py OLD_DIR NEW_DIR --duration 10 --runs 5   # side by side
    .venv/bin/python scripts/profile_vae.py ARTIFACTS_DIR --graph vae_encoder --duration 10

For each export (one or more artifact directories, or .onnx files directly) it prints the wall time of
one graph run (median of ``--runs`` runs after a warm-up; with several exports the runs alternate, A B A
B ..., in one process, so that drift in machine load hits all equally) and, from a second session with
ONNX Runtime's profiler on, the time per operator type summed over the node events of the timed runs,
with its share of the total, the number of nodes per run and the mean time per call. The input is
random: the time of these graphs does not depend on the values (fixed shapes, no data-dependent control).

Session options are ONNX Runtime's defaults with ``--threads`` intra-op threads; ``--variant-options``
(one per export, in order) overrides them, so one export can be compared with itself under other settings
(pass the same directory twice). ``workers=N`` in a variant times the decode as the runtime does on the CPU
(``runtime/vae.py``: N windows at once, each a single-threaded run; ``window=`` its ``vae_window``), and
``--diffusers MODEL_DIR`` adds diffusers' own ``AutoencoderOobleck`` in fp32 and bf16 (torch, ``--threads``
threads) to the alternation, with each side's audio difference to diffusers fp32 (without it, to the first
export), and ``--openvino`` OpenVINO's CPU plugin on the first export's file at f32 and bf16 precision
(``pip install openvino``; not a dependency). ``snake=fused`` in a variant runs the graph as the runtime does
by default on the CPU (``runtime/backends/ort_snake.py``: Snakes and residual adds outside ONNX Runtime, by
the compiled kernels of ``_vae_kernels.c``, between ONNX Runtime pieces), ``snake=numpy`` the same with the Snakes in
NumPy (the runtime's path where the kernel is not built; NCHW layout), ``snake=fused,layout=nchw`` the
compiled kernels with every value NCHW (no NCHWc convolutions); their profile is per step (each piece's
operators, the Snakes, the adds), in thread CPU time:

    .venv/bin/python scripts/profile_vae.py ART ART ART --variant-options workers=2,snake=onnx \
        --variant-options workers=2,snake=numpy --variant-options workers=2,snake=fused \
        --diffusers MODEL_DIR --duration 10 --runs 5

    .venv/bin/python scripts/profile_vae.py OLD_ART NEW_ART --variant-options workers=1 \
        --variant-options workers=2 --diffusers MODEL_DIR --duration 10 --runs 5
    .venv/bin/python scripts/profile_vae.py ART ART --variant-options workers=1 --variant-options workers=2 \
        --openvino --duration 10 --runs 5 --no-profile
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("profile_vae")

_LEVELS = {"disable": 0, "basic": 1, "extended": 2, "all": 99}


def graph_path(source: str, graph: str) -> Path:
    """``source`` is an artifact directory (holding ``<graph>.onnx``) or an ``.onnx`` file."""
    path = Path(source)
    if path.is_dir():
        path = path / f"{graph}.onnx"
    if not path.is_file():
        sys.exit(f"error: {path} does not exist (export with `acestep-trt export`, or pass an .onnx file).")
    return path


def make_feed(session, graph: str, frames: int, hop: int) -> dict[str, np.ndarray]:
    """Random input for ``frames`` latent frames: latents [1, 64, frames] or audio [1, 2, frames * hop]."""
    rng = np.random.default_rng(0)
    inp = session.get_inputs()[0]
    channels = inp.shape[1] if isinstance(inp.shape[1], int) else 64
    length = frames if graph == "vae_decoder" else frames * hop
    scale = 1.0 if graph == "vae_decoder" else 0.3
    return {inp.name: (scale * rng.standard_normal((1, channels, length))).astype(np.float32)}


def session_options(ort, args, settings: dict, profile_dir: str | None):
    """ONNX Runtime's defaults with ``--threads`` intra-op threads (one with ``workers``), then this variant's
    overrides."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1 if int(settings.get("workers", 1)) > 1 else args.threads
    if "opt_level" in settings:
        options.graph_optimization_level = ort.GraphOptimizationLevel(_LEVELS[settings["opt_level"]])
    if "spinning" in settings:
        options.add_session_config_entry("session.intra_op.allow_spinning", settings["spinning"])
    if settings.get("execution_mode") == "parallel":
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = args.threads
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "vae")
    return options


def op_times(profile_file: str, skip_runs: int) -> tuple[dict[str, float], dict[str, int], int]:
    """({op type: microseconds}, {op type: node events}, timed runs) from an ORT profile, skipping the
    first ``skip_runs`` ``model_run`` windows (the warm-up)."""
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip_runs:]
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in runs):
            continue
        op = e.get("args", {}).get("op_name", "?")
        total[op] += e["dur"]
        count[op] += 1
    return total, count, len(runs)


def overlap_of(source: str, graph: str, default: int = 11) -> int:
    """Window overlap (receptive field + 2) from an artifact directory's manifest, else ``default``."""
    from acestep_trt.runtime.vae import window_overlap

    manifest = Path(source) / "manifest.json"
    if not manifest.is_file():
        return default
    vae = json.loads(manifest.read_text()).get("vae", {})
    key = "receptive_field_frames" if graph == "vae_decoder" else "encoder_receptive_field_frames"
    return window_overlap(int(vae[key])) if key in vae else default


class SplitSession:
    """The runtime's Snake-split graph (``runtime/backends/ort_snake.py``) behind ``InferenceSession.run``'s
    signature, with its spec read from the ONNX file (so that plain .onnx files work too)."""

    def __init__(self, path: Path, threads: int, fused: bool = True, nchwc: bool = True):
        import onnx

        from acestep_trt.runtime.backends.ort_snake import SnakeSplitGraph
        from acestep_trt.runtime.specs import GraphSpec, TensorSpec, Tolerance

        graph = onnx.load(str(path), load_external_data=False).graph

        def specs(values):
            return tuple(TensorSpec(v.name, "float32", tuple(d.dim_param or d.dim_value for d in
                                                             v.type.tensor_type.shape.dim)) for v in values)

        spec = GraphSpec(path.stem, specs(graph.input), specs(graph.output), Tolerance(0.0, 0.0))
        # the NCHWc layout needs the compiled kernels: NumPy Snakes (fused=False) run NCHW
        self.graph = SnakeSplitGraph.open(path, spec, threads, None if fused and nchwc else 1)
        if self.graph is None:
            sys.exit(f"{path}: no folded Snakes to run in NumPy (an export made before the fold?)")
        self.outputs = [o.name for o in spec.outputs]
        self.fused = fused
        self._inputs = [argparse.Namespace(name=t.name, shape=list(t.dims)) for t in spec.inputs]

    def get_inputs(self):  # as InferenceSession's (make_feed reads name and shape)
        return self._inputs

    def run(self, _names, feed):
        out = self.graph.run(feed)
        return [out[name] for name in self.outputs]

    def kernel(self, call):
        """``call`` with this side's Snake kernel: the sides alternate one at a time, so each sets the
        module's kernel around its whole call (not per graph run: windows run on several threads)."""
        from acestep_trt.runtime.backends import ort_snake

        def with_kernel():
            built = ort_snake.NATIVE
            ort_snake.NATIVE = built if self.fused else None
            try:
                return call()
            finally:
                ort_snake.NATIVE = built
        return with_kernel


def timed_call(session, graph: str, feed: dict, settings: dict, overlap: int, hop: int):
    """A no-argument callable: one graph run, or the runtime's windowed decode/encode with ``workers``."""
    from acestep_trt.runtime.vae import decode_windowed, encode_windowed

    workers = int(settings.get("workers", 1))
    (name, value), = feed.items()
    if workers <= 1 and "window" not in settings:
        call = lambda: session.run(None, feed)  # noqa: E731
    elif graph == "vae_decoder":
        call = lambda: decode_windowed(lambda z: session.run(None, {name: z})[0], value, hop,  # noqa: E731
                                       int(settings.get("window", 256)), overlap, workers)
    else:
        call = lambda: encode_windowed(lambda a: tuple(session.run(None, {name: a})), value, hop,  # noqa: E731
                                       int(settings.get("window", 256)), overlap, workers)
    return session.kernel(call) if isinstance(session, SplitSession) else call


def step_times(split: SplitSession, feed: dict, runs: int) -> tuple[dict[str, float], dict[str, int]]:
    """Thread CPU seconds per step kind of the split graph over ``runs`` runs after a warm-up: pieces by
    their operators, the upsamplings (two convolutions and the interleave), ``Snake``, ``Snake+residual`` (the
    add folded in) and ``Add``; and calls per kind."""
    import time

    from acestep_trt.runtime.backends import ort_snake

    graph, total, count = split.graph, collections.Counter(), collections.Counter()
    run_piece, computes = graph._run_piece, {cls: cls.compute for cls in (ort_snake.Snake, ort_snake.Add,
                                                                          ort_snake.Reorder)}

    def timed(label, call, *args):
        started = time.thread_time()
        out = call(*args)
        total[label] += time.thread_time() - started
        count[label] += 1
        return out

    graph._run_piece = lambda i, piece, ins, buffers: timed("+".join(piece.ops), run_piece, i, piece, ins, buffers)
    run_upsample = graph._run_upsample
    graph._run_upsample = lambda step, x, buffers: timed("Upsample (2 Conv)", run_upsample, step, x, buffers)
    run_blocked = graph._run_blocked_conv
    graph._run_blocked_conv = lambda step, x, buffers: timed("Conv (NCHWc)", run_blocked, step, x, buffers)
    for cls, compute in computes.items():
        cls.compute = (lambda self, ins, outs, scratch, compute=compute, name=cls.__name__:
                       timed(name + ("+residual" if getattr(self, "residual", None) else ""), compute, self, ins,
                             outs, scratch))
    try:
        split.kernel(lambda: split.run(None, feed))()
        total.clear(), count.clear()
        for _ in range(runs):
            split.kernel(lambda: split.run(None, feed))()
    finally:
        del graph._run_piece, graph._run_upsample, graph._run_blocked_conv
        for cls, compute in computes.items():
            cls.compute = compute
    return total, count


def diffusers_calls(model_dir: str, graph: str, feed: dict, threads: int) -> dict:
    """{label: callable} for diffusers' AutoencoderOobleck decode/encode in fp32 and bf16 on the CPU."""
    import torch
    from diffusers import AutoencoderOobleck

    torch.set_num_threads(threads)
    value = torch.from_numpy(next(iter(feed.values())))
    calls = {}
    for label, dtype in (("diffusers fp32", torch.float32), ("diffusers bf16", torch.bfloat16)):
        vae = AutoencoderOobleck.from_pretrained(Path(model_dir) / "vae", torch_dtype=dtype).eval()

        def call(vae=vae, dtype=dtype):
            with torch.no_grad():
                if graph == "vae_decoder":
                    return vae.decode(value.to(dtype)).sample.float().numpy()
                return vae.encode(value.to(dtype)).latent_dist.mean.float().numpy()
        calls[label] = call
    return calls


def openvino_calls(path: Path, graph: str, feed: dict, threads: int) -> dict:
    """{label: callable} for OpenVINO's CPU plugin on the same ONNX file, at f32 and at bf16 inference precision
    (bf16 needs AVX512_BF16 or AMX; elsewhere OpenVINO runs f32 and says so in its capabilities)."""
    try:
        import openvino as ov
    except ImportError:
        sys.exit("error: --openvino needs OpenVINO, which is not a dependency of this toolkit. "
                 "Fix: .venv/bin/python -m pip install openvino")
    core = ov.Core()
    log.info("OpenVINO %s, CPU capabilities %s", ov.__version__, core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    model = core.read_model(str(path))
    (_, value), = feed.items()
    model.reshape({model.inputs[0].get_any_name(): list(value.shape)})
    calls = {}
    for precision in ("f32", "bf16"):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        calls[f"openvino {precision}"] = lambda request=request: request.infer({0: value})[0].copy()
    return calls


def print_steps(label: str, total: dict, count: dict, runs: int, top: int) -> None:
    whole = sum(total.values()) or 1.0
    print(f"\n{label}: per step of one whole-clip run, thread CPU time over {runs} runs (per run):")
    print(f"  {'step':<22}{'ms/run':>9}{'share':>8}{'steps':>7}{'ms/call':>9}")
    for step, seconds in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {step:<22}{seconds / runs * 1e3:9.1f}{100 * seconds / whole:7.1f}%{count[step] / runs:7.0f}"
              f"{seconds / count[step] * 1e3:9.2f}")
    print(f"  {'all steps':<22}{whole / runs * 1e3:9.1f}")


def parse_variant(text: str) -> dict:
    """``opt_level=all,spinning=0,execution_mode=parallel,workers=2,window=256`` -> dict."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", help="artifact directories or .onnx files (several: side by side)")
    parser.add_argument("--graph", choices=["vae_decoder", "vae_encoder"], default="vae_decoder")
    parser.add_argument("--duration", type=float, default=10.0, help="clip length in seconds (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per export (default 3)")
    parser.add_argument("--hop", type=int, default=1920, help="audio samples per latent frame (default 1920)")
    parser.add_argument("--rate", type=int, default=48000, help="audio sample rate (default 48000)")
    parser.add_argument("--variant-options", action="append", default=[],
                        help="per export, in order: overrides such as opt_level=all,spinning=0,"
                             "execution_mode=parallel, workers=2 (the runtime's parallel windows), window=256, "
                             "snake=fused (the runtime's Snake-split graph, compiled kernels, NCHWc layout where "
                             "ONNX Runtime has it; layout=nchw keeps NCHW), snake=numpy (NumPy Snakes, NCHW)")
    parser.add_argument("--diffusers", metavar="MODEL_DIR", help="also time diffusers' VAE (fp32, bf16) from MODEL_DIR")
    parser.add_argument("--openvino", action="store_true",
                        help="also time OpenVINO's CPU plugin (f32, bf16) on the first export's graph "
                             "(needs `pip install openvino`)")
    parser.add_argument("--no-profile", action="store_true", help="wall times only, no per-operator profile")
    parser.add_argument("--top", type=int, default=12, help="op types shown per export (default 12)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import onnxruntime as ort

    from acestep_trt.export.bench import alternate
    from acestep_trt.runtime.precision import snr_db

    frames = max(1, round(args.duration * args.rate / args.hop))
    variants = [parse_variant(v) for v in args.variant_options] + [{}] * len(args.exports)
    labels = [f"{i}:{e}" + (f" [{args.variant_options[i]}]" if i < len(args.variant_options) else "")
              for i, e in enumerate(args.exports)]
    paths = [graph_path(e, args.graph) for e in args.exports]
    sessions = [SplitSession(p, 1 if int(v.get("workers", 1)) > 1 else args.threads, v["snake"] == "fused",
                             v.get("layout", "nchwc") == "nchwc")
                if v.get("snake") in ("numpy", "fused")
                else ort.InferenceSession(str(p), session_options(ort, args, v, None),
                                          providers=["CPUExecutionProvider"])
                for p, v in zip(paths, variants)]
    feeds = [make_feed(s, args.graph, frames, args.hop) for s in sessions]
    calls = {label: timed_call(s, args.graph, f, v, overlap_of(e, args.graph), args.hop)
             for label, s, f, v, e in zip(labels, sessions, feeds, variants, args.exports)}
    if args.diffusers:
        calls.update(diffusers_calls(args.diffusers, args.graph, feeds[0], args.threads))
    if args.openvino:
        calls.update(openvino_calls(paths[0], args.graph, feeds[0], args.threads))
    outputs, walls = alternate(calls, args.runs)  # warm-up (each side's output), then alternating runs
    splits = {label: (s, f) for label, s, f in zip(labels, sessions, feeds) if isinstance(s, SplitSession)}
    del sessions
    print(f"{args.graph}, {args.duration:g} s clip ({frames} latent frames), {args.threads} threads, "
          f"median of {args.runs} alternating runs:")
    ref_label = "diffusers fp32" if "diffusers fp32" in outputs else labels[0]
    ref = outputs[ref_label]
    ref = np.asarray(ref[0] if isinstance(ref, (list, tuple)) else ref, np.float64)
    for label, w in walls.items():
        line = f"  {label}: {statistics.median(w):.3f} s  (runs: {', '.join(f'{x:.3f}' for x in w)})"
        out = outputs[label]
        out = out[0] if isinstance(out, (list, tuple)) else out
        if label != ref_label and np.shape(out) == np.shape(ref):
            err = np.max(np.abs(np.asarray(out, np.float64) - ref))
            line += f"  max |diff| to {ref_label} {err:.2e}, SNR {snr_db(out, ref):.1f} dB"
        print(line)
    if args.no_profile:
        return
    with tempfile.TemporaryDirectory(prefix="profile-vae-") as work:
        for label, path, variant, feed in zip(labels, paths, variants, feeds):
            if label in splits:
                print_steps(label, *step_times(*splits[label], args.runs), args.runs, args.top)
                continue
            opts = session_options(ort, args, variant, work)
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for _ in range(1 + args.runs):
                session.run(None, feed)
            total, count, runs = op_times(session.end_profiling(), skip_runs=1)
            whole = sum(total.values()) or 1.0
            print(f"\n{label}: per op type, summed over {runs} profiled runs (per run):")
            print(f"  {'op type':<22}{'ms/run':>9}{'share':>8}{'nodes':>7}{'ms/call':>9}")
            for op, us in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
                calls = count[op] / runs
                print(f"  {op:<22}{us / runs / 1e3:9.1f}{100 * us / whole:7.1f}%{calls:7.0f}"
                      f"{us / count[op] / 1e3:9.2f}")
            print(f"  {'all nodes':<22}{whole / runs / 1e3:9.1f}")


if __name__ == "__main__":
    main()
