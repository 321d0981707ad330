#!/usr/bin/env python
"""One exported graph under ONNX Runtime's CPU provider and under OpenVINO's CPU plugin, side by side.

    .venv/bin/python -m pip install openvino        # not a dependency of this toolkit
    .venv/bin/python scripts/openvino_compare.py MODEL_DIR FP32_ART INT8_ART --graph dit_step \
        --dims latent_len=250,cond_len=300 --runs 7

Issue 12 asks for OpenVINO as a CPU backend only for a graph where it measures better than ONNX Runtime.
For each artifact directory this times the graph in ONNX Runtime (``--threads`` intra-op threads), and in
OpenVINO at f32 and bf16 inference precision (bf16 needs AVX512_BF16 or AMX). The runs alternate in one
process (medians of ``--runs`` after a warm-up), and each output's SNR is taken against ONNX Runtime on the
first directory. Inputs are random at ``--dims`` (the graph's spec; batch 1 unless given), as in export
validation. For the VAE decoder as the runtime runs it on the CPU (parallel windows), use
``scripts/profile_vae.py --openvino``.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def parse_dims(text: str) -> dict[str, int]:
    """``latent_len=250,cond_len=300`` -> {"latent_len": 250, "cond_len": 300}."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


def ort_call(path: str, feeds: dict, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda: session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def openvino_call(core, path: str, feeds: dict, threads: int, precision: str):
    model = core.read_model(path)
    names = [i.get_any_name() for i in model.inputs]
    model.reshape({n: list(feeds[n].shape) for n in names})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                 "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda: request.infer({n: feeds[n] for n in names})[0].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="the checkpoint the exports came from (for the graph's spec)")
    parser.add_argument("exports", nargs="+", help="artifact directories (e.g. the fp32 and int8 exports)")
    parser.add_argument("--graph", default="dit_step")
    parser.add_argument("--dims", default="latent_len=250,cond_len=300", help="symbolic dims of the inputs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    try:
        import openvino as ov
    except ImportError:
        sys.exit("error: OpenVINO is not installed (it is not a dependency of this toolkit). "
                 "Fix: .venv/bin/python -m pip install openvino")
    from acestep_trt.export.bench import alternate
    from acestep_trt.export.checkpoint import inspect_checkpoint
    from acestep_trt.export.exporter import export_specs
    from acestep_trt.export.validate import make_inputs
    from acestep_trt.runtime.precision import snr_db

    cfg = inspect_checkpoint(args.model_dir)
    spec = export_specs(cfg, args.model_dir)[args.graph]
    feeds = make_inputs(spec, {"batch": 1, **parse_dims(args.dims)}, cfg, seed=0)
    core = ov.Core()
    print(f"OpenVINO {ov.__version__}, CPU capabilities {core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}")
    calls = {}
    for i, art in enumerate(args.exports):
        path = f"{art}/{args.graph}.onnx"
        calls[f"{i}:{art} onnxruntime"] = ort_call(path, feeds, args.threads)
        for precision in ("f32", "bf16"):
            calls[f"{i}:{art} openvino {precision}"] = openvino_call(core, path, feeds, args.threads, precision)
    outputs, walls = alternate(calls, args.runs)
    ref = next(iter(outputs.values()))
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    print(f"{args.graph} ({shapes}), {args.threads} threads, median of {args.runs} alternating runs; "
          f"SNR of the first output against the first line's:")
    for label, w in walls.items():
        print(f"  {label}: {statistics.median(w) * 1e3:8.1f} ms  SNR {snr_db(outputs[label], ref):6.1f} dB")


if __name__ == "__main__":
    main()
