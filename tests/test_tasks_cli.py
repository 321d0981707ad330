"""``generate --task ...`` and ``encode-codes``: audio files in, what was done said, bad input refused cleanly."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from .test_cli_errors import assert_refused, run_cli


def tone(seconds: float, rate: int, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * (220 + 50 * c) * t) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def mono_44k(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "mono.wav"
    sf.write(path, tone(0.3, 44100, 1), 44100)
    return path


def test_repaint_from_a_mono_44k_file(tiny, mono_44k, tmp_path):
    out = tmp_path / "repaint.wav"
    result = run_cli("generate", tiny.artifacts, "--prompt", "piano", "--task", "repaint", "--src-audio", mono_44k,
                     "--repaint-start", "0.1", "--repaint-end", "0.2", "--steps", "2", "--seed", "1", "--out", out)
    assert result.exit_code == 0, result.output
    for needle in ("repaint", "window 0.08-0.20 s", "resampled 44100 -> 48000 Hz", "mono -> stereo"):
        assert needle in result.output, result.output
    audio, rate = sf.read(out)
    assert rate == 48000 and audio.shape == (7 * 1920, 2)  # 0.3 s at 48 kHz -> 7 frames of 1920 samples


def test_encode_codes_then_cover_from_codes(tiny, tmp_path):
    src = tmp_path / "src.flac"
    sf.write(src, tone(0.5, 48000, 2), 48000)
    codes = tmp_path / "codes.txt"
    result = run_cli("encode-codes", tiny.artifacts, src, "--out", codes)
    assert result.exit_code == 0, result.output
    text = codes.read_text().strip()
    assert text.count("<|audio_code_") == 3  # 25 frames -> 5 codes per window of 5 -> ceil(12 / 5)
    out = tmp_path / "cover.wav"
    result = run_cli("generate", tiny.artifacts, "--prompt", "piano", "--audio-codes", f"@{codes}", "--steps", "1",
                     "--out", out)
    assert result.exit_code == 0, result.output
    assert "cover, 3 audio codes" in result.output
    assert sf.info(out).frames == 15 * 1920


def _bad_files(tmp):
    sf.write(tmp / "empty.wav", np.zeros((0, 2), np.float32), 48000)
    nan = tone(0.1, 48000, 2)
    nan[10, 0] = np.nan
    sf.write(tmp / "nan.wav", nan, 48000, subtype="FLOAT")
    sf.write(tmp / "three.wav", tone(0.1, 48000, 3), 48000)
    (tmp / "text.wav").write_text("not audio")
    return tmp


@pytest.mark.parametrize("extra, code, needle", [
    (["--src-audio", "missing.wav", "--task", "repaint"], 2, "does not exist"),
    (["--src-audio", "text.wav", "--task", "repaint"], 2, "cannot read"),
    (["--src-audio", "empty.wav", "--task", "repaint"], 2, "no samples"),
    (["--src-audio", "nan.wav", "--task", "repaint"], 2, "NaN or Inf"),
    (["--reference-audio", "three.wav"], 2, "3 channels"),
    (["--task", "remix"], 2, "unknown task_type"),
    (["--audio-codes", "nothing here"], 2, "<|audio_code_N|>"),
    (["--audio-codes", "@missing.txt"], 2, "does not exist"),
    (["--src-audio", "good.wav", "--task", "repaint", "--repaint-start", "0.3", "--repaint-end", "0.1"], 2,
     "repainting_start < repainting_end"),
])
def test_bad_task_input_refused(tiny, tmp_path, extra, code, needle):
    _bad_files(tmp_path)
    sf.write(tmp_path / "good.wav", tone(0.4, 48000, 2), 48000)
    extra = [str(tmp_path / e) if e.endswith((".wav", ".txt")) and not e.startswith("@") else e for e in extra]
    extra = [f"@{tmp_path / e[1:]}" if e.startswith("@") else e for e in extra]
    out = tmp_path / "out.wav"
    result = run_cli("generate", tiny.artifacts, "--prompt", "piano", "--steps", "1", "--out", out, *extra)
    assert_refused(result, code, needle)
    assert not out.exists()


def test_cover_refused_without_the_tokenizer(variant, tmp_path):
    src = tmp_path / "src.wav"
    sf.write(src, tone(0.3, 48000, 2), 48000)
    out = tmp_path / "out.wav"
    result = run_cli("generate", variant.artifacts, "--prompt", "piano", "--task", "cover", "--src-audio", src,
                     "--steps", "1", "--out", out)
    assert_refused(result, 3, "audio_tokenizer", "audio_token_detokenizer/")
    assert not out.exists()
    result = run_cli("encode-codes", variant.artifacts, src, "--out", tmp_path / "codes.txt")
    assert_refused(result, 3, "audio_tokenizer")
    assert not (tmp_path / "codes.txt").exists()
