"""End-to-end parity: runtime ``audios`` vs diffusers ``AceStepPipeline(..., output_type="np").audios``.

Same noise latents for both, max abs error within 1e-4, at shapes other than the traced ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from acestep_trt.runtime import AceStepRuntime
from acestep_trt.runtime.vae import window_overlap

from .conftest import has_ort_cuda, noise, reference_audio

ATOL = 1e-4


def _compare(model, rt, prompts, lyrics, duration, seed=0, **kwargs):
    batch = len(prompts) if isinstance(prompts, list) else 1
    latents = noise(batch, rt.config.latent_length(duration), seed)
    ref = reference_audio(model, latents, prompt=prompts, lyrics=lyrics, audio_duration=duration, **kwargs)
    got = rt(prompt=prompts, lyrics=lyrics, audio_duration=duration, latents=latents, **kwargs).audios
    assert got.shape == ref.shape
    assert got.dtype == np.float32
    err = float(np.max(np.abs(got - ref)))
    assert err <= ATOL, f"max abs error {err:.3e} > {ATOL}"
    return got


def test_batch1_with_lyrics(tiny, runtime):
    _compare(tiny, runtime, "soft piano ballad", "[verse]\nSoft notes in the morning light", 1.0)


def test_batch2_different_lengths(tiny, runtime):
    prompts = ["piano", "a much longer prompt about an epic rock guitar solo with drums and bass"]
    lyrics = ["[chorus]\nMusic fills the air tonight, la la la la", ""]
    _compare(tiny, runtime, prompts, lyrics, 1.2)


def test_odd_latent_length_beyond_sliding_window(tiny, runtime):
    # 1.3 s -> 33 frames (odd) -> 17 patched tokens, beyond the window of 8
    frames = runtime.config.latent_length(1.3)
    assert frames % 2 == 1 and frames // runtime.config.patch_size > runtime.config.sliding_window
    _compare(tiny, runtime, ["jazz trio", "lo-fi hip hop beat"], ["la", "[verse]\nHola mundo"], 1.3)


def test_long_clip_decoded_in_windows_matches_whole_decode(tiny):
    # a window of 16 frames forces windowed VAE decoding; diffusers decodes the whole clip at once
    rt = AceStepRuntime.load(tiny.artifacts, vae_window=16)
    assert rt.config.latent_length(3.7) > 16 + 2 * window_overlap(rt.artifacts.vae_receptive_field)
    _compare(tiny, rt, "ambient synth pad", "", 3.7)


def test_vae_decoder_in_nchwc_layout_matches_diffusers(wide):
    """The CPU runtime's decoder with its values in ONNX Runtime's NCHWc layout between pieces (channels
    multiples of the block): batch 2, an odd length, several windows decoded at once."""
    from acestep_trt.runtime.backends import ort_snake

    rt = AceStepRuntime.load(wide.artifacts, vae_window=16, threads=2)
    decoder = rt.runners["vae_decoder"]
    if ort_snake.NATIVE is not None and ort_snake.nchwc_block() > 1:
        assert decoder.block == ort_snake.nchwc_block()
        assert sum(isinstance(s, ort_snake.BlockedConv) for s in decoder._steps) > 10
    frames = rt.config.latent_length(2.1)
    assert frames % 2 == 1 and frames > 16 + 2 * window_overlap(rt.artifacts.vae_receptive_field)
    _compare(wide, rt, ["ambient synth pad", "drum and bass"], ["", "[verse]\nla la"], 2.1)


def test_metadata(tiny, runtime):
    _compare(tiny, runtime, "upbeat electronic dance track", "", 1.0, bpm=128, keyscale="A minor",
             timesignature="3")


def test_non_english_lyrics_and_language(tiny, runtime):
    prompts = ["japanese pop", "chinese ballad"]
    lyrics = ["春のうた 桜が咲いて 風が吹く", "你好世界 让我们一起唱歌"]
    _compare(tiny, runtime, prompts, lyrics, 1.0, vocal_language=["ja", "zh"])


def test_custom_steps_shift_and_instruction(tiny, runtime):
    _compare(tiny, runtime, "rock", "[verse]\nhello", 0.9, num_inference_steps=5, shift=2.0,
             instruction="Generate the track based on the audio context")


def test_truncation_of_long_prompts(tiny, runtime):
    long_prompt = "piano " * 400  # more than 256 tokens
    _compare(tiny, runtime, long_prompt, "", 0.8, max_text_length=256)


def test_right_padding_narrow_encoder_and_apg_guidance(variant):
    rt = AceStepRuntime.load(variant.artifacts)
    assert rt.tokenizer.padding_side == "right"
    assert rt.config.cond_hidden < rt.config.dit_hidden and not rt.config.is_turbo
    prompts = ["violin solo", "a long prompt describing orchestral strings, brass and timpani"]
    lyrics = ["[verse]\nBonjour tout le monde", "[verse]\nla"]
    _compare(variant, rt, prompts, lyrics, 1.3, guidance_scale=5.0)
    _compare(variant, rt, prompts, lyrics, 1.3, guidance_scale=1.0)
    _compare(variant, rt, "strings", "", 1.0, guidance_scale=4.0, cfg_interval_start=0.2, cfg_interval_end=0.7)


@pytest.mark.parametrize("batch", [1, 2])
def test_seeded_noise_is_reproducible(runtime, batch):
    prompts = ["piano"] * batch
    a = runtime(prompt=prompts, audio_duration=0.5, seed=[7, 8][:batch])
    b = runtime(prompt=prompts, audio_duration=0.5, seed=[7, 8][:batch])
    np.testing.assert_array_equal(a.audios, b.audios)
    assert a.seeds == [7, 8][:batch]
    c = runtime(prompt=prompts, audio_duration=0.5, seed=9)
    assert not np.array_equal(a.audios, c.audios)
    assert np.all(np.isfinite(c.audios)) and np.max(np.abs(c.audios)) == pytest.approx(10 ** (-1 / 20), rel=1e-5)


def test_latent_output_matches_diffusers_latents(tiny, runtime):
    import torch

    latents = noise(1, runtime.config.latent_length(0.6))
    with torch.no_grad():
        ref = tiny.pipe(prompt="drums", audio_duration=0.6, latents=torch.from_numpy(latents.copy()),
                        output_type="latent").audios.numpy()
    got = runtime(prompt="drums", audio_duration=0.6, latents=latents, output_type="latent").audios
    assert np.max(np.abs(got - ref)) <= ATOL


@pytest.mark.parametrize("batch", [1, 2])
def test_device_loop_with_io_binding_matches_diffusers(tiny, batch):
    """The IO-binding loop (CUDA's path) run on CPU buffers: same audio as diffusers."""
    rt = AceStepRuntime.load(tiny.artifacts, device_loop=True)
    assert rt.device_loop
    prompts = ["piano", "rock guitar and drums"][:batch]
    _compare(tiny, rt, prompts if batch > 1 else prompts[0], ["la la", ""][:batch] if batch > 1 else "la", 1.3)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_runtime_matches_diffusers(tiny, batch):
    """ONNX Runtime CUDA with the device-resident loop (runs only where a GPU and onnxruntime-gpu exist)."""
    if not has_ort_cuda():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    rt = AceStepRuntime.load(tiny.artifacts, device="cuda")
    assert rt.device_loop and all(r.providers[0] == "CUDAExecutionProvider" for r in rt.runners.values())
    prompts = ["piano", "rock guitar and drums"][:batch]
    _compare(tiny, rt, prompts, ["la la", ""][:batch], 3.7)
