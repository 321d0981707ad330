#!/usr/bin/env python3
"""Minimal client of the ``acestep`` Triton model: send a prompt, write a 16-bit WAV.

Needs only ``tritonclient[http,grpc]`` and NumPy (not acestep-trt itself), so it can be copied into any
project. ``acestep-trt triton-client`` does the same with the toolkit's error handling.

    python scripts/triton_client_example.py --url 127.0.0.1:8000 --protocol http \
        --prompt "lo-fi piano, rain" --duration 10 --seed 42 --out song.wav
"""

from __future__ import annotations

import argparse
import sys
import wave

import numpy as np


def make_inputs(module, prompt: str, duration: float, seed: int | None, steps: int | None) -> list:
    """One [1]-shaped tensor per input: BYTES for text, FP32/INT64 for numbers; omitted ones use defaults."""
    values = [("prompt", "BYTES", np.array([prompt.encode("utf-8")], dtype=object)),
              ("audio_duration", "FP32", np.array([duration], dtype=np.float32))]
    if seed is not None:
        values.append(("seed", "INT64", np.array([seed], dtype=np.int64)))
    if steps is not None:
        values.append(("num_inference_steps", "INT64", np.array([steps], dtype=np.int64)))
    tensors = []
    for name, datatype, array in values:
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def write_wav(path: str, audio: np.ndarray, rate: int) -> None:
    """audio float32 [channels, samples] in [-1, 1] -> 16-bit PCM WAV."""
    pcm = (np.clip(audio.T, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(path, "wb") as out:
        out.setnchannels(audio.shape[0])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    from tritonclient.utils import InferenceServerException

    client = module.InferenceServerClient(args.url)
    try:
        result = client.infer("acestep", make_inputs(module, args.prompt, args.duration, args.seed, args.steps))
    except InferenceServerException as exc:
        print(f"error: {exc.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    audio, rate = result.as_numpy("audio"), int(result.as_numpy("sample_rate")[0])
    write_wav(args.out, audio, rate)
    print(f"wrote {args.out}: {audio.shape[1] / rate:g} s, {audio.shape[0]} channels, {rate} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
