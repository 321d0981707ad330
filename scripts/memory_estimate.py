#!/usr/bin/env python
"""Measure the request memory estimate (runtime/limits.py) against the real peak, one process per case.

    .venv/bin/python scripts/memory_estimate.py ARTIFACTS_DIR --durations 10 60 240 --batches 1 2

Each case runs in a fresh interpreter: load the runtime, note the resident set (RSS), generate with one step
(the peak of one step is the peak of every step) while a thread samples RSS every 2 ms, and report the peak
RSS growth over the loaded runtime next to the estimate's host bytes. ``ratio`` = measured / estimated:
below 1 the estimate is on the safe side (it refuses a little early), above 1 it would let through requests
that do not fit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np


def _case(artifacts: str, duration: float, batch: int, guidance: float, task: str) -> dict:
    import time

    from acestep_trt.export.bench import PeakSampler  # torch-free: RSS sampled in a thread
    from acestep_trt.runtime import AceStepRuntime
    from acestep_trt.runtime import limits as lim

    rt = AceStepRuntime.load(artifacts, limits=lim.Limits(max_duration=max(duration, 600), check_memory=False))
    guided = guidance > 1.0 and not rt.config.is_turbo
    extra, samples = {}, 0
    if task == "repaint":  # a source of the clip's length (noise), repainted in its first second
        samples = int(duration * rt.sample_rate)
        source = np.random.default_rng(0).uniform(-0.5, 0.5, (2, samples)).astype(np.float32)
        extra = {"task_type": "repaint", "src_audio": source, "repainting_start": 0.0, "repainting_end": 1.0,
                 "posterior": "mode"}
    estimate = lim.estimate_memory(
        rt.config, lim.Geometry.from_manifest(rt.artifacts.manifest), batch, rt.config.latent_length(duration),
        guided, rt.vae_window, rt.artifacts.vae_receptive_field + 2, 256 + 2048 + 1, encode_samples=samples,
        encoder_overlap=rt.artifacts.vae_encoder_receptive_field + 2)
    with PeakSampler(interval=0.002) as sampler:
        started = time.perf_counter()
        rt(prompt=["a piano"] * batch, audio_duration=duration, num_inference_steps=1, guidance_scale=guidance,
           seed=0, show_progress=False, **extra)
        seconds = time.perf_counter() - started
    return {"task": task, "duration": duration, "batch": batch, "guided": guided, "seconds": round(seconds, 2),
            "measured_mib": round(sampler.peak / 2**20, 1), "estimate_mib": round(estimate.host / 2**20, 1),
            "dit_mib": round(estimate.dit / 2**20, 1), "vae_mib": round(estimate.vae / 2**20, 1),
            "audio_mib": round((estimate.audio + estimate.source) / 2**20, 1),
            "encoder_mib": round(estimate.encoder / 2**20, 1),
            "ratio": round(sampler.peak / estimate.host, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts")
    parser.add_argument("--durations", type=float, nargs="+", default=[10, 60, 240])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--guidance", type=float, default=7.0, help="(used by non-turbo checkpoints only)")
    parser.add_argument("--task", choices=["text2music", "repaint"], default="text2music",
                        help="repaint: a source of the clip's length is VAE-encoded first (the encoder's term)")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_case(args.artifacts, args.durations[0], args.batches[0], args.guidance, args.task)))
        return
    print(f"{'task':>10} {'duration':>8} {'batch':>5} {'guided':>6} {'measured MiB':>12} {'estimate MiB':>12} "
          f"{'ratio':>6} {'DiT':>8} {'VAE':>8} {'encoder':>8} {'audio':>8} {'s':>6}")
    for batch in args.batches:
        for duration in args.durations:
            out = subprocess.run([sys.executable, __file__, args.artifacts, "--case", "--durations", str(duration),
                                  "--batches", str(batch), "--guidance", str(args.guidance),
                                  "--task", args.task],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{row['task']:>10} {row['duration']:>8g} {row['batch']:>5} {str(row['guided']):>6} "
                  f"{row['measured_mib']:>12} {row['estimate_mib']:>12} {row['ratio']:>6} {row['dit_mib']:>8} "
                  f"{row['vae_mib']:>8} {row['encoder_mib']:>8} {row['audio_mib']:>8} {row['seconds']:>6}", flush=True)


if __name__ == "__main__":
    main()
