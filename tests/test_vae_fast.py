"""The VAE's CPU speed work: folded Snake activations in the exported graphs, parallel windows in the runtime.

Audio parity with diffusers through these paths is covered by test_parity.py / test_tasks.py (the runtime
fixture decodes and encodes with parallel windows on the CPU); here: the pieces, exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from acestep_trt.export.graphs.vae_blocks import FoldedSnake, fold_snakes
from acestep_trt.runtime.specs import VAE_DECODER, VAE_ENCODER
from acestep_trt.runtime.vae import (
    MIN_CORE_OVERLAPS,
    cpu_workers, decode_windowed, encode_windowed, window_cores, window_overlap,
)


@pytest.mark.parametrize("logscale", [True, False])
def test_folded_snake_is_bitwise_diffusers_snake(logscale):
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    torch.manual_seed(0)
    snake = Snake1d(24, logscale=logscale)
    with torch.no_grad():  # trained-like spread of alpha / beta (zeros at init would hide the folding)
        snake.alpha.copy_(torch.randn_like(snake.alpha) * (1.0 if logscale else 3.0))
        snake.beta.copy_(torch.randn_like(snake.beta) * (1.0 if logscale else 3.0))
    x = torch.randn(3, 24, 517) * 4
    with torch.no_grad():
        assert torch.equal(FoldedSnake(snake)(x), snake(x))


def test_fold_snakes_replaces_every_snake_of_the_vae(tiny):
    from diffusers import AutoencoderOobleck
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    vae = AutoencoderOobleck.from_pretrained(tiny.checkpoint / "vae").eval()
    count = sum(isinstance(m, Snake1d) for m in vae.decoder.modules())
    from acestep_trt.export.graphs.vae_decoder import stripped_decoder

    folded = stripped_decoder(vae)
    assert not any(isinstance(m, Snake1d) for m in folded.modules())
    assert sum(isinstance(m, FoldedSnake) for m in folded.modules()) == count > 0
    assert fold_snakes(folded) == 0  # idempotent: nothing left to fold
    latents = torch.randn(2, vae.decoder.conv1.in_channels, 13)
    with torch.no_grad():
        assert torch.equal(folded(latents), vae.decoder(latents))  # weight norm removal is exact here too


@pytest.mark.parametrize("name", [VAE_DECODER, VAE_ENCODER])
def test_exported_vae_graphs_have_the_folded_snake(tiny, name):
    """Per activation one Sin and no Pow, Exp, Reciprocal or Reshape (diffusers' forward traced as is has all)."""
    graph = onnx.load(str(tiny.artifacts / f"{name}.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Sin") > 0
    assert not {"Pow", "Exp", "Reciprocal", "Reshape"} & set(ops), sorted(set(ops))


@pytest.mark.parametrize("frames", [1, 2, 7, 40, 88, 131, 250, 251, 750, 2500])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_window_cores_cover_the_clip(frames, workers):
    window, overlap = 256, 11
    cores = window_cores(frames, window, overlap, workers)
    assert cores[0][0] == 0 and cores[-1][1] == frames
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))  # contiguous, no gap, no overlap
    assert all(end > start for start, end in cores)
    # fewer workers where a core would be shorter than MIN_CORE_OVERLAPS overlaps (mostly overlap work)
    used = min(workers, frames // (MIN_CORE_OVERLAPS * overlap))
    if used <= 1:  # unchanged: whole clip when it fits one window with its overlaps, else window-sized cores
        assert cores == ([(0, frames)] if frames <= window + 2 * overlap else
                         [(s, min(s + window, frames)) for s in range(0, frames, window)])
    else:
        sizes = [end - start for start, end in cores]
        assert max(sizes) <= -(-window // used)  # the windows in flight together hold about one window
        assert len(cores) >= used  # every worker used has a window


def test_cpu_workers():
    assert cpu_workers(3) == 3
    assert cpu_workers(None) >= 1


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_windowed_decode_equals_whole_decode(runtime, workers):
    runner = runtime.runners[VAE_DECODER]
    decode = lambda z: runner.run({"latents": z})["audio"]  # noqa: E731
    overlap = window_overlap(runtime.artifacts.vae_receptive_field)
    for frames in (2, 41, 140):  # 140: two or three windows at once (overlap 11)
        latents = np.random.default_rng(frames).standard_normal((2, 64, frames)).astype(np.float32)
        whole = decode(latents)
        for window in (8, 64):
            got = decode_windowed(decode, latents, 1920, window, overlap, workers)
            assert got.shape == whole.shape
            assert np.max(np.abs(got - whole)) < 1e-5, (frames, window, workers)


def test_parallel_windowed_encode_equals_serial(runtime):
    runner = runtime.runners[VAE_ENCODER]

    def encode(chunk):
        out = runner.run({"audio": chunk})
        return out["mean"], out["std"]

    overlap = window_overlap(runtime.artifacts.vae_encoder_receptive_field)
    audio = 0.3 * np.random.default_rng(0).standard_normal((1, 2, 110 * 1920 + 77)).astype(np.float32)
    serial = encode_windowed(encode, audio, 1920, 16, overlap)
    for workers in (2, 3):
        assert len(window_cores(110, 16, overlap, workers)) > 1  # really in parallel windows
        mean, std = encode_windowed(encode, audio, 1920, 16, overlap, workers)
        assert np.max(np.abs(mean - serial[0])) < 1e-5 and np.max(np.abs(std - serial[1])) < 1e-5


def test_cpu_runtime_runs_vae_windows_in_parallel(tiny):
    """On the CPU the VAE sessions are single-threaded and ``threads`` windows run at once; other graphs keep
    ``threads`` intra-op threads."""
    from acestep_trt.runtime import AceStepRuntime

    rt = AceStepRuntime.load(tiny.artifacts, threads=2)
    assert rt.vae_workers == {VAE_DECODER: 2, VAE_ENCODER: 2}
    assert rt.runners[VAE_DECODER]._threads == 1 and rt.runners["dit_step"]._threads == 2
