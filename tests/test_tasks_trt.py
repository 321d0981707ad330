"""TensorRT profile ranges of the audio-to-audio graphs hold every shape the runtime sends them.

(No engines are built for these graphs yet: ``build`` does not use these ranges; see README.)
"""

from __future__ import annotations

import numpy as np
import pytest

from acestep_trt.runtime.specs import AudioTokenizerConfig, ModelConfig, audio_specs
from acestep_trt.runtime.trt.profiles import ProfileRequest, audio_dim_ranges, graph_profile
from acestep_trt.runtime.vae import encode_windowed, window_overlap

CFG = ModelConfig(text_hidden=32, vocab_size=400, cond_hidden=64, dit_hidden=64, latent_channels=64,
                  context_channels=128, timbre_channels=64, patch_size=2, sliding_window=8, sample_rate=48000,
                  hop_length=1920, audio_channels=2, is_turbo=True, silence_frames=15000)
TOK = AudioTokenizerConfig(hidden=64, pool_window=5, levels=(8, 8, 8, 5, 5, 5), num_quantizers=1)
RF = 7


def _encoded_lengths(samples: int, window: int) -> list[int]:
    seen = []

    def encode(chunk):
        seen.append(chunk.shape[-1])
        frames = chunk.shape[-1] // CFG.hop_length
        return np.zeros((1, 64, frames), np.float32), np.zeros((1, 64, frames), np.float32)

    encode_windowed(encode, np.zeros((1, 2, samples), np.float32), CFG.hop_length, window, window_overlap(RF))
    return seen


@pytest.mark.parametrize("seconds", [0.04, 10.0, 30.0, 91.7, 240.0])
def test_encoder_profile_holds_every_window(seconds):
    req = ProfileRequest(min_duration=10, opt_duration=60, max_duration=240)
    ranges = audio_dim_ranges(CFG, req, RF, TOK.pool_window)
    audio = ranges["vae_encoder"]["audio_len"]
    for length in _encoded_lengths(int(seconds * 48000) + 1919, req.vae_window):
        assert length in audio, (length, audio)


def test_profiles_cover_every_audio_graph_input():
    req = ProfileRequest(max_duration=120, max_batch=2)
    ranges = audio_dim_ranges(CFG, req, RF, TOK.pool_window)
    specs = audio_specs(CFG, TOK)
    profiles = {name: graph_profile(spec, ranges[name]) for name, spec in specs.items()}
    assert set(profiles) == {"vae_encoder", "cover_blend", "audio_tokenizer", "audio_detokenizer"}
    patches = ranges["audio_detokenizer"]["patches"]
    assert patches.max == -(-CFG.latent_length(120) // 5) and ranges["audio_detokenizer"]["batch"].max == 2
    assert "audio_tokenizer" not in audio_dim_ranges(CFG, req, RF, None)  # no tokenizer pair, no profile
