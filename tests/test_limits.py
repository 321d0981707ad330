"""Request limits (runtime/limits.py) and backend failures (runtime/failures.py), in the API and the CLI."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail, Fail, RuntimeException

from acestep_trt.cli import main
from acestep_trt.runtime import AceStepRuntime
from acestep_trt.runtime import limits as lim
from acestep_trt.runtime.errors import BackendError, InputError

from .conftest import noise
from .test_cli_errors import assert_refused

OOM = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node. "
       "Name:'node_MatMul_12' Status Message: Failed to allocate memory for requested buffer of size 25165824000000")


# ------------------------------------------------------------------------------------------ limits


def test_over_long_request_is_refused_at_once_in_the_api(runtime):
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"100000 s is longer than the 600 s limit.*--max-duration"):
        runtime(prompt="piano", audio_duration=100000)
    assert time.perf_counter() - started < 0.5


def test_over_long_request_is_refused_at_once_in_the_cli(tiny, tmp_path):
    out = tmp_path / "a.wav"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "acestep_trt.cli", "generate", str(tiny.artifacts), "--prompt", "x",
                           "--duration", "100000", "--out", str(out)], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2 and proc.stderr.startswith("error: audio_duration 100000 s")
    assert "Traceback" not in proc.stderr and not out.exists() and not list(tmp_path.iterdir())
    assert elapsed < 3.0, elapsed  # interpreter start + imports; no artifact is loaded


def test_raised_duration_limit_warns_and_then_checks_memory(runtime, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="acestep_trt.runtime.limits"):
        raised = lim.Limits(max_duration=100000)
    assert "trained on clips of at most 600 s" in caplog.text
    monkeypatch.setattr(runtime, "limits", raised)
    monkeypatch.setattr(runtime, "_memory_proven", None, raising=False)
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"needs about .* GiB of memory.*a shorter clip \(now 100000 s\)"):
        runtime(prompt="piano", audio_duration=100000)  # the 25 TB request of the issue, refused before work
    assert time.perf_counter() - started < 0.5


def test_limit_values_are_validated():
    for bad in (dict(max_duration=0), dict(max_duration=float("nan")), dict(max_batch=0), dict(max_steps=1.5)):
        with pytest.raises(InputError):
            lim.Limits(**bad)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(prompt=["a"] * 9), "at most 8"),
    (dict(num_inference_steps=1001), "more than 1000"),
    (dict(prompt="x" * (lim.MAX_PROMPT_CHARS + 1)), "characters"),
    (dict(lyrics="la " * 30000), "characters"),
    (dict(bpm=-3), "bpm"),
    (dict(bpm=120.5), "bpm"),
    (dict(keyscale=5), "keyscale"),
    (dict(vocal_language=["en", 3]), "vocal_language"),
    (dict(max_text_length=0), "max_text_length"),
    (dict(max_lyric_length=10**6), "max_lyric_length"),
    (dict(prompt="a\x00b"), "NUL"),
    (dict(cfg_interval_start="0"), "cfg_interval"),
])
def test_api_limits(runtime, kwargs, needle):
    args = {"prompt": "piano", "audio_duration": 0.5, **kwargs}
    with pytest.raises(InputError, match=needle):
        runtime(**args)


def test_memory_estimate_grows_as_the_specs_say(runtime):
    cfg, geo = runtime.config, lim.Geometry.from_manifest(runtime.artifacts.manifest)
    assert geo.dit_heads == 4 and geo.vae_decoder_channels == 4  # the tiny checkpoint's own, from the manifest

    def est(seconds, batch=1, guided=False, window=256):
        return lim.estimate_memory(cfg, geo, batch, cfg.latent_length(seconds), guided, window, 18, 2305)

    long, longer = est(600), est(1200)
    assert 3.5 < (longer.dit / long.dit) < 4.1  # attention scores: quadratic in the length
    assert est(60, guided=True).dit == est(60, batch=2).dit  # guidance doubles the DiT batch
    assert est(60, batch=2).audio == 2 * est(60).audio
    assert est(600, window=64).vae < est(600).vae  # a smaller VAE window needs less
    assert est(600).detail["tokens"] == 7500 and est(600).detail["vae_windows"] == 59


def test_memory_estimate_counts_the_vae_encoder(runtime, monkeypatch):
    cfg, geo = runtime.config, lim.Geometry.from_manifest(runtime.artifacts.manifest)
    assert geo.vae_encoder_channels == 128  # the tiny checkpoint's encoder_hidden_size, from the manifest
    rate, overlap = cfg.sample_rate, runtime.artifacts.vae_encoder_receptive_field + 2

    def est(seconds, source_seconds):
        return lim.estimate_memory(cfg, geo, 1, cfg.latent_length(seconds), False, 256, 18, 2305,
                                   encode_samples=int(source_seconds * rate), encoder_overlap=overlap)

    plain, short, long = est(60, 0), est(60, 10), est(60, 60)
    assert plain.encoder == plain.source == 0 and short.encoder > 0
    assert long.detail["encoder_windows"] == 6 and short.detail["encoder_windows"] == 1
    assert plain.host < short.host < long.host
    # the largest encoder level is the first block's 128 channels at the audio rate, 4 bytes each
    assert lim.vae_encoder_level_elements(geo, rate) == 128 * rate

    # with memory for a 10 s text2music call only, a 10 s repaint (its source encode) is refused before any
    # work, and the text2music call passes
    monkeypatch.setattr(runtime, "_memory_proven", None, raising=False)
    text_only = lim.estimate_memory(cfg, geo, 1, cfg.latent_length(10), False, runtime.vae_window,
                                    runtime.artifacts.vae_receptive_field + 2, 2305,
                                    vae_workers=runtime.vae_workers["vae_decoder"])
    monkeypatch.setattr(lim, "available_host_bytes", lambda: int(text_only.host * 1.2))
    calls = []

    class Recording:  # the VAE encoder must not run for a refused request
        def run(self, feeds):
            calls.append(feeds)
            raise AssertionError("the encoder ran")

    monkeypatch.setitem(runtime.runners, "vae_encoder", Recording())
    with pytest.raises(InputError, match=r"needs about .* GiB of memory.*smaller --vae-window"):
        runtime(prompt="piano", task_type="repaint", src_audio=np.zeros((2, 10 * rate), np.float32),
                repainting_start=0.0, repainting_end=1.0)
    assert calls == []
    assert np.isfinite(runtime(prompt="piano", audio_duration=10.0, seed=0, num_inference_steps=1).audios).all()


def test_memory_refusal_names_the_remedies(runtime, monkeypatch):
    monkeypatch.setattr(lim, "available_host_bytes", lambda: 1 << 20)  # 1 MiB free
    monkeypatch.setattr(runtime, "_memory_proven", None, raising=False)
    with pytest.raises(InputError, match=r"needs about .* but only 0.0 GiB is available.*fewer prompts.*shorter clip"):
        runtime(prompt=["a", "b"], audio_duration=0.5)
    monkeypatch.setattr(runtime, "limits", lim.Limits(check_memory=False))
    assert np.isfinite(runtime(prompt="a", audio_duration=0.5, seed=0).audios).all()


def test_device_memory_is_checked_on_cuda(runtime, monkeypatch):
    monkeypatch.setattr(lim, "available_device_bytes", lambda: 1 << 20)
    monkeypatch.setattr(runtime, "_memory_proven", None, raising=False)
    monkeypatch.setattr(runtime, "device", "cuda")
    with pytest.raises(InputError, match="of GPU memory"):
        lim.check_call(runtime, 1, 60.0, False)


def test_vae_window_remedy_when_the_vae_dominates(runtime, monkeypatch):
    monkeypatch.setattr(lim, "available_host_bytes", lambda: 1 << 20)
    monkeypatch.setattr(runtime, "_memory_proven", None, raising=False)
    with pytest.raises(InputError, match="smaller --vae-window"):
        lim.check_call(runtime, 1, 10.0, False)  # tiny DiT, 10 s: the VAE window is the largest term


def test_check_audio():
    rate = 48000
    stereo = np.zeros((2, 4800), np.float64)
    assert lim.check_audio(stereo, "src_audio", rate).dtype == np.float32
    assert lim.check_audio(np.zeros((1, 100), np.float32), "src_audio", rate).shape == (1, 100)
    cases = [
        (np.zeros(100, np.float32), r"\[channels, samples\]"),
        (np.zeros((2, 100), np.int16), "float array"),
        (np.zeros((4800, 2)), "transpose"),
        (np.zeros((3, 10)), "3 channels"),
        (np.zeros((2, 0)), "empty"),
        (np.full((2, 10), np.nan), "NaN"),
        (np.zeros((2, rate * 601), np.float32), "at most 600 s"),
        ("audio.wav", "numeric array"),
        ([[0.0, 1.0], [0.0]], "numeric array"),
        (np.zeros((1, 2, 3)), "numeric array"),
    ]
    for value, needle in cases:
        with pytest.raises(InputError, match=needle):
            lim.check_audio(value, "src_audio", rate)
    raised = lim.Limits(max_audio_seconds=700)
    assert lim.check_audio(np.zeros((2, rate * 601)), "x", rate, raised).shape[1] == rate * 601


def test_memory_estimate_is_checked_once_per_size(runtime, monkeypatch):
    """ORT's arena keeps a passed request's memory: the same size is not refused later for it."""
    monkeypatch.setattr(runtime, "_memory_proven", None, raising=False)
    first = lim.check_call(runtime, 1, 0.5, False)
    monkeypatch.setattr(lim, "available_host_bytes", lambda: 1)
    assert lim.check_call(runtime, 1, 0.5, False) == first
    with pytest.raises(InputError):
        lim.check_call(runtime, 1, 1.0, False)


# -------------------------------------------------------------------------------- backend failures


class FailingSession:
    """Wraps an ``InferenceSession``: the next ``failures`` runs raise ``exc`` (ONNX Runtime's real types)."""

    def __init__(self, session, exc, failures=1):
        self._session, self.exc, self.failures = session, exc, failures

    def _maybe_fail(self):
        if self.failures:
            self.failures -= 1
            raise self.exc

    def run(self, *args, **kwargs):
        self._maybe_fail()
        return self._session.run(*args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        self._maybe_fail()
        return self._session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def fresh(tiny):
    return AceStepRuntime.load(tiny.artifacts)


@pytest.mark.parametrize("graph, exc, needle", [
    ("dit_step", RuntimeException(OOM), "dit_step ran out of memory"),
    ("vae_decoder", Fail("CUDA failure 2: out of memory ; GPU=0"), "vae_decoder ran out of memory"),
    ("text_encoder", EPFail("CUDA error cudaErrorLaunchFailure: unspecified launch failure"),
     "text_encoder failed in the backend"),
    ("condition_encoder", MemoryError(), "condition_encoder ran out of memory"),
])
def test_backend_failure_is_one_error_and_the_runtime_stays_usable(fresh, graph, exc, needle):
    lat = noise(1, fresh.config.latent_length(0.5))
    expected = fresh(prompt="piano", audio_duration=0.5, latents=lat).audios
    restore = _fail_inside(fresh.runners[graph].wrapped, exc)
    with pytest.raises(BackendError, match=needle) as info:
        fresh(prompt="piano", audio_duration=0.5, latents=lat)
    assert "Fix:" in str(info.value) and info.value.__cause__ is None
    restore()
    np.testing.assert_array_equal(fresh(prompt="piano", audio_duration=0.5, latents=lat).audios, expected)


def _fail_inside(runner, exc):
    """Make one ONNX Runtime session of ``runner`` fail with ``exc``: a whole graph's, a split VAE's first piece
    (ort_snake.py) or the condition encoder's second part (ort_memo.py). Returns the undo."""
    import dataclasses

    from acestep_trt.runtime.backends.ort_memo import MemoizedInputGraph
    from acestep_trt.runtime.backends.ort_snake import Piece, SnakeSplitGraph

    if isinstance(runner, SnakeSplitGraph):
        index = next(i for i, step in enumerate(runner._steps) if isinstance(step, Piece))
        piece = runner._steps[index]
        runner._steps[index] = dataclasses.replace(piece, session=FailingSession(piece.session, exc))
        return lambda: runner._steps.__setitem__(index, piece)
    name = "_rest" if isinstance(runner, MemoizedInputGraph) else "session"
    session = getattr(runner, name)
    setattr(runner, name, FailingSession(session, exc))
    return lambda: setattr(runner, name, session)


def test_failure_inside_the_device_loop(tiny):
    rt = AceStepRuntime.load(tiny.artifacts, device_loop=True)
    lat = noise(1, rt.config.latent_length(0.5))
    expected = rt(prompt="piano", audio_duration=0.5, latents=lat).audios
    runner = rt.runners["dit_step"].wrapped
    runner.session = FailingSession(runner.session, RuntimeException(OOM))
    with pytest.raises(BackendError, match="dit_step ran out of memory"):
        rt(prompt="piano", audio_duration=0.5, latents=lat)
    np.testing.assert_array_equal(rt(prompt="piano", audio_duration=0.5, latents=lat).audios, expected)


def test_host_memory_error_is_a_backend_error(fresh, monkeypatch):
    monkeypatch.setattr(fresh, "silence_latents", lambda *a: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(BackendError, match="host memory"):
        fresh(prompt="piano", audio_duration=0.5)


def test_programming_errors_are_not_disguised(fresh):
    runner = fresh.runners["dit_step"].wrapped
    runner.session = FailingSession(runner.session, TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        fresh(prompt="piano", audio_duration=0.5)


def test_cli_backend_failure_exit_6_no_output(tiny, tmp_path, monkeypatch):
    from acestep_trt.runtime.backends.ort_snake import SnakeSplitGraph

    def run(self, feeds):  # the CPU runtime's VAE decoder (split at its Snakes) runs out of memory
        raise RuntimeException(OOM)

    monkeypatch.setattr(SnakeSplitGraph, "run", run)
    out = tmp_path / "x.wav"
    result = CliRunner().invoke(main, ["generate", str(tiny.artifacts), "--prompt", "p", "--duration", "0.5",
                                       "--out", str(out)])
    assert_refused(result, 6, "vae_decoder ran out of memory", "--vae-window")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tensorrt_enqueue_failure(tiny, tmp_path, monkeypatch):
    from acestep_trt.runtime.trt.builder import build_engines
    from acestep_trt.runtime.trt.profiles import ProfileRequest

    from . import fake_trt

    fake_trt.install(monkeypatch)
    arts = tmp_path / "artifacts"
    shutil.copytree(tiny.artifacts, arts)
    build_engines(arts, request=ProfileRequest(min_duration=0.5, opt_duration=1.0, max_duration=4.0, max_batch=1,
                                               max_text_len=256, max_lyric_len=512, vae_window=256))
    rt = AceStepRuntime.load(arts, backend="trt", device="cuda")
    lat = noise(1, rt.config.latent_length(1.0))
    expected = rt(prompt="piano", audio_duration=1.0, latents=lat).audios
    real = fake_trt.Context.execute_async_v3
    calls = {"n": 0}

    def flaky(self, stream):
        calls["n"] += 1
        return False if calls["n"] == 3 else real(self, stream)

    monkeypatch.setattr(fake_trt.Context, "execute_async_v3", flaky)
    with pytest.raises(BackendError, match="TensorRT failed to run"):
        rt(prompt="piano", audio_duration=1.0, latents=lat)
    np.testing.assert_allclose(rt(prompt="piano", audio_duration=1.0, latents=lat).audios, expected, atol=1e-6)


# ------------------------------------------------------------------------------- the CLI's bad inputs

LONG_PROMPT = "x" * (lim.MAX_PROMPT_CHARS + 1)


@pytest.mark.parametrize("extra, code, needle", [
    (("--duration", "0"), 2, "audio_duration"),
    (("--duration", "-3"), 2, "audio_duration"),
    (("--duration", "nan"), 2, "audio_duration"),
    (("--duration", "inf"), 2, "audio_duration"),
    (("--duration", "601"), 2, "600 s limit"),
    (("--duration", "100000"), 2, "--max-duration"),
    (("--duration", "700", "--max-duration", "650"), 2, "650 s limit"),
    (("--max-duration", "0"), 2, "max_duration"),
    (("--max-duration", "nan"), 2, "max_duration"),
    (("--steps", "0"), 2, "num_inference_steps"),
    (("--steps", "1001"), 2, "more than 1000"),
    (("--shift", "0"), 2, "shift"),
    (("--shift", "-1"), 2, "shift"),
    (("--guidance-scale", "-1"), 2, "guidance_scale"),
    (("--guidance-scale", "nan"), 2, "guidance_scale"),
    (("--seed", "-1"), 2, "seed"),
    (("--bpm", "-5"), 2, "bpm"),
    (("--bpm", "5000"), 2, "bpm"),
    (("--prompt", ""), 2, "prompt"),
    (("--prompt", LONG_PROMPT), 2, "characters"),
    (("--lyrics", "la " * 25000), 2, "lyrics"),
    (("--keyscale", "C" * 300), 2, "keyscale"),
    (("--language", "e" * 300), 2, "vocal_language"),
    (("--lyrics-file", "{tmp}/missing.txt"), 2, "missing.txt"),
    (("--lyrics", "a", "--lyrics-file", "{tmp}/l.txt"), 2, "only one"),
    (("--latents", "{tmp}/missing.npy"), 2, "missing.npy"),
    (("--latents", "{tmp}/garbage.npy"), 2, ".npy array"),
    (("--latents", "{tmp}/short.npy"), 2, "shape"),
    (("--vae-window", "0"), 2, "vae_window"),
    (("--out", "{tmp}/song.mp3"), 2, ".wav"),
    (("--out", "{tmp}/nodir/song.wav"), 2, "does not exist"),
    (("--out", "{tmp}/existing.wav"), 2, "--overwrite"),
    (("--out", "{tmp}/locked.wav"), 2, "another acestep-trt process"),
    (("--device", "cuda", "--backend", "ort"), 6, "cuda"),
    (("--backend", "trt"), 6, "GPU only"),
])
def test_cli_bad_inputs(tiny, tmp_path, extra, code, needle):
    """Each bad input: its exit code, one `error:` line with `Fix:`, no traceback, and no new file anywhere."""
    from acestep_trt.runtime.staging import TargetLock

    (tmp_path / "l.txt").write_text("la")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "short.npy", np.zeros((1, 3, 64), np.float32))
    (tmp_path / "existing.wav").write_bytes(b"precious")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["generate", str(tiny.artifacts), "--prompt", "piano", "--duration", "0.5",
            "--out", str(tmp_path / "song.wav")] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    with TargetLock(tmp_path / "locked.wav", "writing"):  # another generate writing locked.wav
        result = CliRunner().invoke(main, args)
        assert_refused(result, code, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "existing.wav").read_bytes() == b"precious"


def test_cli_memory_refusal(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(lim, "available_host_bytes", lambda: 1 << 20)
    out = tmp_path / "x.wav"
    result = CliRunner().invoke(main, ["generate", str(tiny.artifacts), "--prompt", "p", "--duration", "30",
                                       "--out", str(out)])
    assert_refused(result, 2, "needs about", "--vae-window", "--no-memory-check")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    ok = CliRunner().invoke(main, ["generate", str(tiny.artifacts), "--prompt", "p", "--duration", "0.5",
                                   "--no-memory-check", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
