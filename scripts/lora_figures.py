#!/usr/bin/env python
"""LoRA load/switch time and memory at full-size DiT geometry, ONNX Runtime CPU.

    .venv/bin/python scripts/lora_figures.py /tmp/lora-figures [--rank 64] [--size full]

Only the DiT matters for LoRA, so this exports only ``dit_step`` (random weights, the real turbo geometry of
``scripts/random_checkpoint.py --size full``: hidden 2048, 24 layers) in a child process, with the same tracer
and parameter map as ``acestep-trt export`` (no validation), then in this process opens the graph in ONNX
Runtime and measures, for two random rank-``--rank`` LoRAs on every attention projection (self and cross
attention, q/k/v/out: 192 modules): loading the first, loading the second (parse + switch), switching between
loaded adapters, and changing the scale; resident memory is sampled every 20 ms (``/proc/self/status``), and
the peak during each switch is compared with the size of the targeted weights. Prints a JSON report.
Needs about 7 GiB for the export and ~2x the DiT (6.3 GB fp32) plus the targeted weights while measuring.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger("lora_figures")


def _config(size: str):
    from acestep_trt.export.tiny import TinyConfig

    return {"tiny": TinyConfig, "mid": TinyConfig.mid_size, "full": TinyConfig.full_size}[size]()


def _model_config(cfg):
    from acestep_trt.runtime.specs import ModelConfig

    return ModelConfig(text_hidden=cfg.text_hidden, vocab_size=1000, cond_hidden=cfg.dit_hidden,
                       dit_hidden=cfg.dit_hidden, latent_channels=64, context_channels=128, timbre_channels=64,
                       patch_size=2, sliding_window=cfg.sliding_window, sample_rate=48000, hop_length=1920,
                       audio_channels=2, is_turbo=True, silence_frames=15000)


def export_dit(size: str, out: str, reuse: bool = False) -> dict:
    """Child process: a random DiT of ``size`` geometry -> ``out/dit_step.onnx`` + its parameter map.

    ``reuse``: keep an existing ``dit_step.onnx`` (from an earlier run: same seed, so the same weights) and
    only map it again (exact bytes: a graph of other weights fails the map).
    """
    import warnings

    import torch
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel

    from acestep_trt.export.exporter import trace_to_onnx
    from acestep_trt.export.graphs.dit_step import DitStepAdapter
    from acestep_trt.export.weight_map import build_map
    from acestep_trt.runtime.specs import all_specs

    warnings.simplefilter("ignore")
    cfg = _config(size)
    torch.manual_seed(0)
    dit = AceStepTransformer1DModel(
        hidden_size=cfg.dit_hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.dit_layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        sliding_window=cfg.sliding_window, is_turbo=True, model_version="turbo").eval()
    path = Path(out) / "dit_step.onnx"
    mcfg = _model_config(cfg)
    started = time.perf_counter()
    if not (reuse and path.is_file()):
        trace_to_onnx(DitStepAdapter(dit), all_specs(mcfg)["dit_step"], mcfg, path)
    traced = time.perf_counter() - started
    parameters = build_map(dit, path)
    return {"parameters": parameters, "trace_s": traced, "map_s": time.perf_counter() - started - traced,
            "dit_params": sum(p.numel() for p in dit.parameters())}


class RssSampler:
    """Peak resident memory of this process between start() and stop(), sampled every 20 ms."""

    def __init__(self):
        self.peak, self._run = 0, False

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def __enter__(self):
        self.peak, self._run = self.rss(), True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._run = False
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def random_lora(path: Path, parameters: dict, rank: int, seed: int) -> Path:
    """A diffusers-format LoRA of ``rank`` on every attention projection (to_q/k/v/out.0, self and cross)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, record in parameters.items():
        if ".self_attn." not in name and ".cross_attn." not in name:
            continue
        module = "transformer." + name.removesuffix(".weight")
        out_features, in_features = record["shape"]
        tensors[f"{module}.lora_A.weight"] = (rng.standard_normal((rank, in_features), np.float32) * 0.01)
        tensors[f"{module}.lora_B.weight"] = (rng.standard_normal((out_features, rank), np.float32) * 0.01)
    save_file(tensors, str(path))
    return path


def measure(work: Path, parameters: dict, size: str, rank: int) -> dict:
    from acestep_trt.runtime.backends.ort import OrtGraph
    from acestep_trt.runtime.lora import LoraController
    from acestep_trt.runtime.specs import all_specs

    cfg = _model_config(_config(size))
    spec = all_specs(cfg)["dit_step"]
    lora_a = random_lora(work / "a.safetensors", parameters, rank, 1)
    lora_b = random_lora(work / "b.safetensors", parameters, rank, 2)
    report: dict = {}
    started = time.perf_counter()
    graph = OrtGraph(work / "dit_step.onnx", spec)
    report["session_s"] = time.perf_counter() - started
    report["rss_session_gb"] = RssSampler.rss() / 1e9
    feeds = _feeds(cfg, 250)  # 10 s of latents
    plain = graph.run(feeds)["velocity"]
    started = time.perf_counter()
    graph.run(feeds)
    report["dit_step_s_plain"] = round(time.perf_counter() - started, 2)  # 10 s clip, one step
    controller = LoraController(work, work / "dit_step.onnx", {"graphs": {"dit_step": {"parameters": parameters}}},
                                graph)
    steps = [("load_first", lambda: controller.load(lora_a, "a")),
             ("load_second", lambda: controller.load(lora_b, "b")),
             ("switch_loaded", lambda: controller.set_adapters("a")),
             ("mix_two", lambda: controller.set_adapters(["a", "b"], [0.5, 0.5])),
             ("scale_change", lambda: controller.sync(0.5))]
    for name, action in steps:
        before = RssSampler.rss()
        with RssSampler() as sampler:
            started = time.perf_counter()
            action()
            seconds = time.perf_counter() - started
        report[name] = {"seconds": round(seconds, 2), "rss_before_gb": round(before / 1e9, 3),
                        "peak_gb": round(sampler.peak / 1e9, 3), "growth_bytes": sampler.peak - before}
        log.info("%s: %s", name, report[name])
    targeted = controller.state.targeted_bytes()
    report["targeted_weights_gb"] = round(targeted / 1e9, 3)
    report["targeted_modules"] = len(controller.state.touched())
    for name, _ in steps:
        report[name]["growth_over_targeted"] = round(report[name]["growth_bytes"] / targeted, 2)
    with_lora = graph.run(feeds)["velocity"]
    started = time.perf_counter()  # the two parts of a switch, separately
    values = controller.state.merged(0.8)
    report["merge_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    graph.set_weights(values)
    report["session_with_overrides_s"] = round(time.perf_counter() - started, 2)
    del values
    controller.applied = None  # the runner now holds another mix than the controller's
    controller.sync(0.5)
    report["load_average"] = [round(x, 1) for x in os.getloadavg()]  # other processes share these 2 cores
    started = time.perf_counter()
    graph.run(feeds)
    report["dit_step_s_with_lora"] = round(time.perf_counter() - started, 2)
    report["velocity_changed_max_abs"] = float(np.max(np.abs(with_lora - plain)))
    controller.unload()
    report["unload_equals_plain"] = bool(np.array_equal(graph.run(feeds)["velocity"], plain))
    return report


def _feeds(cfg, frames: int) -> dict:
    rng = np.random.default_rng(0)
    return {"latents": rng.standard_normal((1, frames, 64), np.float32),
            "timestep": np.array([0.5], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 300, cfg.cond_hidden), np.float32),
            "context_latents": rng.standard_normal((1, frames, 128), np.float32),
            "dt": np.array([-0.125], np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir")
    parser.add_argument("--size", choices=["tiny", "mid", "full"], default="full")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--reuse", action="store_true", help="keep WORK_DIR/dit_step.onnx from an earlier run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        exported = child.submit(export_dit, args.size, str(work), args.reuse).result()
    log.info("exported dit_step (%d parameters) in %.1f s", exported["dit_params"], time.perf_counter() - started)
    report = {"size": args.size, "rank": args.rank, "dit_params": exported["dit_params"],
              "export_trace_s": round(exported["trace_s"], 1), "export_map_s": round(exported["map_s"], 1),
              **measure(work, exported["parameters"], args.size, args.rank)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
