"""TensorRT engines of the audio-to-audio graphs: their profile ranges hold every shape the runtime sends them,
``build`` makes them, and the TensorRT backend runs the tasks on them (fake TensorRT, tests/fake_trt.py).
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


# ------------------------------------------------------------------------------------------ engines (fake TensorRT)
# Built once per module from a copy of the tiny artifacts (which have all four audio graphs) with the fake
# TensorRT (tests/fake_trt.py: engines run their ONNX graphs in ONNX Runtime on the bytes at the bound
# addresses), with a 16-frame VAE window to keep the encoder engine's profile small.

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402

from acestep_trt.runtime import AceStepRuntime  # noqa: E402
from acestep_trt.runtime.errors import InputError  # noqa: E402
from acestep_trt.runtime.specs import AUDIO_GRAPH_NAMES, GRAPH_NAMES  # noqa: E402
from acestep_trt.runtime.tasks import encode_codes  # noqa: E402
from acestep_trt.runtime.trt.builder import build_engines  # noqa: E402
from acestep_trt.runtime.trt.manifest import ENGINE_MANIFEST  # noqa: E402

from . import fake_trt  # noqa: E402
from .conftest import noise  # noqa: E402
from .test_tasks import HOP, LONG, clip  # noqa: E402

AUDIO_REQ = ProfileRequest(min_duration=0.2, opt_duration=0.5, max_duration=1.2, max_batch=1, max_lyric_len=64,
                           vae_window=16)
STEPS = 2


@pytest.fixture(scope="module")
def audio_engines(tiny, tmp_path_factory):
    arts = tmp_path_factory.mktemp("audio_trt") / "artifacts"
    shutil.copytree(tiny.artifacts, arts)
    with pytest.MonkeyPatch.context() as mp:
        trt, _ = fake_trt.install(mp)
        build_engines(arts, request=AUDIO_REQ)
        builds = {n.onnx_path.rsplit("/", 1)[-1]: c for n, c in trt.builds}
    return arts, builds


@pytest.fixture
def fakes(monkeypatch):
    return fake_trt.install(monkeypatch)


def _runtimes(arts):
    ort_rt = AceStepRuntime.load(arts, backend="ort", vae_window=16)
    return ort_rt, AceStepRuntime.load(arts, backend="trt", device="cuda", vae_window=16)


def _runs(trt, graph: str) -> int:
    return sum(1 for c in trt.calls if c[0] == "execute_async_v3" and c[1].endswith(f"/{graph}.onnx"))


def test_build_makes_audio_engines_with_their_profiles(audio_engines, tiny):
    arts, builds = audio_engines
    graphs = json.loads((arts / "engines" / ENGINE_MANIFEST).read_text())["graphs"]
    assert set(graphs) == set(GRAPH_NAMES) | set(AUDIO_GRAPH_NAMES)
    cfg = AceStepRuntime.load(tiny.artifacts).config
    ranges = audio_dim_ranges(cfg, AUDIO_REQ, 7, 5)  # the tiny encoder's receptive field is 7 frames
    for name in AUDIO_GRAPH_NAMES:
        rec = graphs[name]
        assert (arts / "engines" / rec["engine"]).is_file() and rec["onnx"] and rec["onnx_precision"] == "fp32"
        assert rec["profile"]["dims"] == {k: vars(v) for k, v in ranges[name].items()}, name
    enc = graphs["vae_encoder"]["profile"]["inputs"]["audio"]
    assert enc["min"] == [1, 2, HOP] and enc["max"] == [1, 2, (16 + 2 * 9) * HOP + HOP - 1]  # one window
    assert graphs["audio_tokenizer"]["profile"]["inputs"]["latent_patches"]["max"] == [1, 6, 5, 64]  # ceil(30 / 5)
    assert graphs["cover_blend"]["profile"]["inputs"]["strength"] == {"min": [1], "opt": [1], "max": [1]}
    for name in AUDIO_GRAPH_NAMES:  # strongly typed, no TF32 (--precision fp32)
        assert fake_trt.BuilderFlag.TF32 not in builds[f"{name}.onnx"].flags


def test_tokenizer_engine_stays_exact_fp32_under_tf32(tiny, tmp_path, fakes):
    """--precision tf32 lets fp32 matmuls use TF32, except in the audio tokenizer (FSQ rounding)."""
    trt, _ = fakes
    arts = tmp_path / "artifacts"
    shutil.copytree(tiny.artifacts, arts)
    manifest = build_engines(arts, request=AUDIO_REQ, precision="tf32")
    flags = {n.onnx_path.rsplit("/", 1)[-1]: c.flags for n, c in trt.builds}
    assert fake_trt.BuilderFlag.TF32 in flags["vae_encoder.onnx"] and fake_trt.BuilderFlag.TF32 in flags["dit_step.onnx"]
    assert fake_trt.BuilderFlag.TF32 not in flags["audio_tokenizer.onnx"]
    assert manifest.data["graphs"]["audio_tokenizer"]["precision"] == "fp32"
    assert "precision" not in manifest.data["graphs"]["vae_encoder"]


def test_repaint_on_trt_matches_ort(audio_engines, fakes):
    trt, _ = fakes
    ort_rt, trt_rt = _runtimes(audio_engines[0])
    assert trt_rt.runners["vae_encoder"].providers == ["TensorRT"]
    kwargs = dict(prompt="guitar solo", task_type="repaint", src_audio=clip(LONG, 1), repainting_start=0.2,
                  repainting_end=0.6, latents=noise(1, LONG // HOP), num_inference_steps=STEPS, seed=5)
    got, ref = trt_rt(**kwargs), ort_rt(**kwargs)  # posterior sampled from the seed on both
    assert float(np.max(np.abs(got.audios - ref.audios))) <= 1e-5
    assert _runs(trt, "vae_encoder") == 1  # 21 frames fit one window of 16 + 2 x 9 frames
    assert _runs(trt, "dit_step") == STEPS


def test_cover_strength_runs_on_the_device_loop(audio_engines, fakes, monkeypatch):
    """Two DiT evaluations per step and cover_blend on the device; the host loop is never used."""
    trt, cudart = fakes
    ort_rt, trt_rt = _runtimes(audio_engines[0])

    def no_host_loop(*args, **kwargs):
        raise AssertionError("the host loop ran")

    kwargs = dict(prompt="jazz trio", task_type="cover", src_audio=clip(LONG, 4), audio_cover_strength=0.6,
                  latents=noise(1, LONG // HOP), num_inference_steps=STEPS, posterior="mode")
    ref = ort_rt(**kwargs).audios  # ORT host loop (CPU, no device loop)
    monkeypatch.setattr(AceStepRuntime, "denoise_host", no_host_loop)
    dit, loops = trt_rt.runners["dit_step"].wrapped, []
    original = dit.denoise

    def spy(*args, **kw):  # the copies made during the TensorRT loop
        start = len(cudart.calls)
        out = original(*args, **kw)
        loops.append([c[1] for c in cudart.calls[start:] if c[0] == "cudaMemcpyAsync"])
        return out

    monkeypatch.setattr(dit, "denoise", spy)
    got = trt_rt(**kwargs)
    assert "cover strength 0.6" in got.task
    assert float(np.max(np.abs(got.audios - ref))) <= 1e-5
    assert _runs(trt, "dit_step") == 2 * STEPS and _runs(trt, "cover_blend") == STEPS
    assert _runs(trt, "audio_tokenizer") == 1 and _runs(trt, "audio_detokenizer") == 1
    # one upload each of latents, both conditions, context, timesteps, dts, strength; one download; none per step
    assert len(loops) == 1 and loops[0].count("cudaMemcpyHostToDevice") == 7
    assert loops[0].count("cudaMemcpyDeviceToHost") == 1


def test_audio_codes_on_trt_match_ort(audio_engines, fakes):
    """encode-codes (VAE encoder + tokenizer engines) and generation from codes (detokenizer engine)."""
    trt, _ = fakes
    ort_rt, trt_rt = _runtimes(audio_engines[0])
    source = clip(15 * HOP + 77, 6)  # 15 frames: 3 codes
    codes = encode_codes(trt_rt, source)
    assert codes == encode_codes(ort_rt, source) and codes.count("<|audio_code_") == 3
    assert _runs(trt, "audio_tokenizer") == 1
    kwargs = dict(prompt="synth-pop", audio_codes=codes, latents=noise(1, 15), num_inference_steps=STEPS)
    got, ref = trt_rt(**kwargs), ort_rt(**kwargs)
    assert float(np.max(np.abs(got.audios - ref.audios))) <= 1e-5 and _runs(trt, "audio_detokenizer") == 1


@pytest.mark.parametrize("frames, option", [(40, "--max-duration 2"), (4, "--min-duration 0.1")])
def test_source_outside_the_profiles_is_an_input_error(audio_engines, fakes, frames, option):
    trt, _ = fakes
    rt = AceStepRuntime.load(audio_engines[0], backend="trt", device="cuda", vae_window=16)
    with pytest.raises(InputError) as err:
        rt(prompt="rock", task_type="repaint", src_audio=clip(frames * HOP + 5), repainting_start=0.0,
           repainting_end=0.1, num_inference_steps=STEPS, seed=0)
    assert f"latent_len = {frames}" in str(err.value) and option in str(err.value)
    assert not [c for c in trt.calls if c[0] == "execute_async_v3"]  # refused before any engine (or encode) ran


def test_engines_built_before_audio_engines_run_them_in_ort(audio_engines, tmp_path, fakes, caplog):
    """An engine directory without audio engines (an earlier acestep-trt) still serves every task: the audio
    graphs run in ONNX Runtime and cover strength on the host loop, with a message saying to rebuild."""
    from acestep_trt.runtime.backends import resolve_backend
    from acestep_trt.runtime.backends.ort import DeferredGraph, OrtGraph
    from acestep_trt.runtime.backends.ort_snake import SnakeSplitGraph

    trt, _ = fakes
    arts = tmp_path / "artifacts"
    shutil.copytree(audio_engines[0], arts)
    path = arts / "engines" / ENGINE_MANIFEST
    data = json.loads(path.read_text())
    for name in AUDIO_GRAPH_NAMES:  # as `build` wrote engines.json before audio graphs had engines
        (arts / "engines" / data["graphs"].pop(name)["engine"]).unlink()
    path.write_text(json.dumps(data))
    assert resolve_backend("auto", "cuda", arts) == "trt"
    with caplog.at_level(logging.WARNING):
        rt = AceStepRuntime.load(arts, backend="trt", device="cuda", vae_window=16)
    assert "has no TensorRT engines for vae_encoder, audio_tokenizer, audio_detokenizer, cover_blend" in caplog.text
    assert f"acestep-trt build {arts}`" in caplog.text and "cover strength on the host loop" in caplog.text
    ort_runners = (OrtGraph, DeferredGraph, SnakeSplitGraph)  # the VAE encoder on the CPU: split at its Snakes
    assert all(isinstance(rt.runners[n].wrapped, ort_runners) for n in AUDIO_GRAPH_NAMES)  # ORT
    assert rt.runners["dit_step"].providers == ["TensorRT"]
    ort_rt = AceStepRuntime.load(arts, backend="ort", vae_window=16)
    kwargs = dict(prompt="jazz trio", task_type="cover", src_audio=clip(15 * HOP + 3, 2), audio_cover_strength=0.6,
                  latents=noise(1, 15), num_inference_steps=STEPS, posterior="mode")
    got, ref = rt(**kwargs).audios, ort_rt(**kwargs).audios
    assert float(np.max(np.abs(got - ref))) <= 1e-5
    assert _runs(trt, "dit_step") == 2 * STEPS and _runs(trt, "cover_blend") == 0  # host loop, per-step copies
    data["graphs"]["vae_encoder"] = {"engine": "vae_encoder.plan"}  # an audio record that does not verify
    path.write_text(json.dumps(data))
    assert resolve_backend("auto", "cuda", arts) == "ort"  # engines_usable checks the audio engines it lists


def test_exports_without_audio_graphs_build_the_core_engines(tiny, variant, tmp_path, fakes):
    """An export from before the audio graphs (manifest without them) builds and runs its four engines; one
    without the tokenizer pair (``variant``) builds the encoder and cover_blend only."""
    arts = tmp_path / "old"
    shutil.copytree(tiny.artifacts, arts)
    manifest = json.loads((arts / "manifest.json").read_text())
    for name in AUDIO_GRAPH_NAMES:
        onnx = manifest["graphs"].pop(name)["onnx"]
        manifest["files"] = [r for r in manifest["files"] if not r["path"].startswith(onnx)]
    manifest["audio_tokenizer"] = None
    (arts / "manifest.json").write_text(json.dumps(manifest))
    built = build_engines(arts, request=AUDIO_REQ)
    assert set(built.data["graphs"]) == set(GRAPH_NAMES)
    rt = AceStepRuntime.load(arts, backend="trt", device="cuda", vae_window=16)
    assert set(rt.runners) == set(GRAPH_NAMES)
    rt(prompt="piano", audio_duration=0.5, num_inference_steps=STEPS, seed=1)
    other = tmp_path / "variant"
    shutil.copytree(variant.artifacts, other)
    graphs = build_engines(other, request=AUDIO_REQ).data["graphs"]
    assert set(graphs) == set(GRAPH_NAMES) | {"vae_encoder", "cover_blend"}


def test_tokenizer_validation_allows_a_flipped_code_not_a_wrong_engine(tiny):
    """Engine validation: the FSQ code indices may differ in a few codes (a value at a bin edge rounds either way
    on a correct engine) and the quantized states are compared where the codes agree; many flips fail."""
    from acestep_trt.runtime.artifacts import load_artifacts
    from acestep_trt.runtime.backends.ort import checking_graph
    from acestep_trt.runtime.trt.profiles import derive_audio_profiles
    from acestep_trt.runtime.trt.validate import compare_engines

    artifacts = load_artifacts(tiny.artifacts)
    name = "audio_tokenizer"
    spec = artifacts.spec(name)
    req = ProfileRequest(min_duration=0.2, opt_duration=40.0, max_duration=60.0)  # opt: 200 patches
    profile = derive_audio_profiles({name: spec}, artifacts.config, req, 7, 5)[name]
    ort = checking_graph(artifacts.graph_path(name), spec, "fp32")

    class Engine:  # ONNX Runtime's answer with `flips` patches changed, as an engine at a bin edge would give
        def __init__(self, flips):
            self.flips, self.profile = flips, profile

        def run(self, feeds):
            out = {k: v.copy() for k, v in ort.run(feeds).items()}
            out["indices"][0, :self.flips] += 1
            out["quantized"][0, :self.flips] += 1.0
            return out

    for flips, ok in ((1, True), (0, True), (40, False)):
        rows = {r.output: r for r in compare_engines(artifacts, {name: Engine(flips)}, {name: ort}, "fp32")}
        assert rows["quantized"].ok and rows["quantized"].snr_db == float("inf")  # compared where codes agree
        assert rows["indices"].ok is ok and rows["indices"].max_abs == flips / 200, flips


def test_rebuild_hints_for_audio_dims():
    """Out-of-profile audio dims name the build option that widens them: patches -> duration, audio_len -> window."""
    from acestep_trt.runtime.trt.profiles import rebuild_args

    req = ProfileRequest(min_duration=10, opt_duration=60, max_duration=240)
    assert "--max-duration 300" in rebuild_args("ARTS", req, CFG, "audio_tokenizer", "patches", 1500, pool_window=5)
    assert "--vae-window 300" in rebuild_args("ARTS", req, CFG, "vae_encoder", "audio_len", 300 * 1920 - 5)
