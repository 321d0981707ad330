#!/usr/bin/env python
"""Reference point for `acestep-trt compare`: diffusers' own AceStepPipeline in a reduced dtype against fp32.

Same prompts, noise (NumPy PCG64 seed 0), duration, steps and post-processing as `compare`, so its SNR
figures sit beside ours:

    .venv/bin/python scripts/diffusers_precision.py MODEL_DIR --dtype bf16 --duration 10
"""

import argparse
import gc
import json
import logging
import warnings

import numpy as np

from acestep_trt.runtime.compare import CASES
from acestep_trt.runtime.precision import snr_db
from acestep_trt.runtime.vae import normalize_peak

log = logging.getLogger("diffusers_precision")


def generate(model_dir: str, dtype, duration: float, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(latents [1, T, 64], audio [1, 2, S]) per case, with the pipeline loaded in ``dtype``."""
    import torch
    from diffusers import AceStepPipeline

    from acestep_trt.export.checkpoint import inspect_checkpoint

    pipe = AceStepPipeline.from_pretrained(model_dir, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    frames = inspect_checkpoint(model_dir).latent_length(duration)
    outputs = []
    for prompt, lyrics in CASES:
        noise = np.random.default_rng(0).standard_normal((1, frames, 64), dtype=np.float32)
        with torch.no_grad():
            latents = torch.as_tensor(pipe(prompt=prompt, lyrics=lyrics, audio_duration=duration,
                                           latents=torch.from_numpy(noise).to(dtype), num_inference_steps=steps,
                                           shift=3.0, output_type="latent").audios)
            audio = pipe.vae.decode(latents.transpose(1, 2).to(dtype)).sample.float().numpy()
        outputs.append((latents.float().numpy(), normalize_peak(audio)))
    del pipe
    gc.collect()
    return outputs


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("ignore")
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ref = generate(args.model_dir, torch.float32, args.duration, args.steps)
    got = generate(args.model_dir, low, args.duration, args.steps)
    rows = [{"prompt": prompt, "latents_snr_db": snr_db(g[0], r[0]), "audio_snr_db": snr_db(g[1], r[1]),
             "finite": bool(np.isfinite(g[1]).all())} for (prompt, _), r, g in zip(CASES, ref, got)]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
