"""TensorRT build and backend logic, on CPU, against fake ``tensorrt`` and cuda-bindings modules.

The fakes (tests/fake_trt.py) record the calls and execute "engines" with ONNX Runtime on host memory
behind real pointers, so these tests check the build calls, the profiles, the manifest and its refusals,
and the runtime's buffer/stream plumbing and on-device loop end to end. They do not prove that real
TensorRT builds or runs these graphs: the ``gpu`` tests at the end do that, where TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import shutil
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from acestep_trt.cli import main
from acestep_trt.runtime import AceStepRuntime
from acestep_trt.runtime.artifacts import read_manifest
from acestep_trt.runtime.backends import resolve_backend
from acestep_trt.runtime.errors import ArtifactError, BackendError, InputError
from acestep_trt.runtime.specs import GRAPH_NAMES, ModelConfig, all_specs
from acestep_trt.runtime.specs import AUDIO_GRAPH_NAMES

ENGINE_NAMES = (*GRAPH_NAMES, *AUDIO_GRAPH_NAMES)  # the tiny artifacts have every audio graph: an engine each
from acestep_trt.runtime.trt.builder import build_engines
from acestep_trt.runtime.trt.manifest import ENGINE_MANIFEST, onnx_records
from acestep_trt.runtime.trt.profiles import (ProfileRequest, ShapeRange, derive_profiles,
                                              rebuild_args)

from . import fake_trt
from .conftest import noise

REAL_CFG = ModelConfig(text_hidden=1024, vocab_size=151669, cond_hidden=2048, dit_hidden=2048, latent_channels=64,
                       context_channels=128, timbre_channels=64, patch_size=2, sliding_window=128,
                       sample_rate=48000, hop_length=1920, audio_channels=2, is_turbo=True, silence_frames=15000)
SMALL = ProfileRequest(min_duration=0.5, opt_duration=1.0, max_duration=4.0, max_batch=1, max_text_len=256,
                       max_lyric_len=512, vae_window=256)


@pytest.fixture
def arts(tiny, tmp_path):
    """A private copy of the tiny artifacts (engines go to ARTIFACTS/engines by default)."""
    dst = tmp_path / "artifacts"
    shutil.copytree(tiny.artifacts, dst)
    return dst


@pytest.fixture
def fakes(monkeypatch):
    return fake_trt.install(monkeypatch)


# ---------------------------------------------------------------------------------------------- profiles


def test_shape_range_is_typed_and_validated():
    assert ShapeRange(1, 2, 3).opt == 2 and 2 in ShapeRange(1, 2, 3) and 4 not in ShapeRange(1, 2, 3)
    with pytest.raises(InputError):
        ShapeRange(3, 2, 4)
    with pytest.raises(InputError):
        ProfileRequest(min_duration=30, opt_duration=20, max_duration=60)


def test_profiles_from_specs_real_geometry():
    req = ProfileRequest(min_duration=10, opt_duration=60, max_duration=240, max_batch=4, opt_batch=2)
    prof = derive_profiles(all_specs(REAL_CFG), REAL_CFG, req, receptive_field=16)
    assert set(prof) == set(GRAPH_NAMES)
    dit = prof["dit_step"].inputs
    assert (dit["latents"].min, dit["latents"].opt, dit["latents"].max) == ((1, 250, 64), (2, 1500, 64), (4, 6000, 64))
    assert dit["encoder_hidden_states"].max == (4, 2048 + 1 + 256, 2048)  # cond_len = lyric + 1 + text
    assert dit["timestep"].max == (4,)
    cond = prof["condition_encoder"].inputs
    assert cond["timbre_latents"].min == (1, 750, 64) and cond["timbre_latents"].max == (4, 750, 64)  # ceil(30*25)
    assert cond["lyric_attention_mask"].max == (4, 2048)
    # the VAE sees windows of vae_window + 2 * (receptive field + 2) frames, whatever the duration
    vae = prof["vae_decoder"].inputs["latents"]
    assert vae.max == (4, 64, 256 + 2 * 18) and vae.min == (1, 64, 19)
    assert prof["text_encoder"].inputs["input_ids"].max == (4, 256)


def test_non_turbo_doubles_the_dit_batch_for_guidance():
    base = ModelConfig(**{**REAL_CFG.to_dict(), "is_turbo": False})
    prof = derive_profiles(all_specs(base), base, ProfileRequest(max_batch=3), receptive_field=16)
    assert prof["dit_step"].dims["batch"] == ShapeRange(1, 2, 6)
    assert prof["text_encoder"].dims["batch"] == ShapeRange(1, 1, 3)


def test_profile_check_names_range_and_rebuild_command():
    prof = derive_profiles(all_specs(REAL_CFG), REAL_CFG, ProfileRequest(), 16)["dit_step"]

    def hint(graph, dim, size):
        return rebuild_args("ARTS", ProfileRequest(), REAL_CFG, graph, dim, size)

    prof.check({"batch": 1, "latent_len": 6000, "cond_len": 300}, hint, 25.0)
    with pytest.raises(InputError) as err:
        prof.check({"batch": 1, "latent_len": 7500, "cond_len": 300}, hint, 25.0)
    msg = str(err.value)
    assert "latent_len = 7500 (300.00 s of audio)" in msg and "250..6000" in msg
    assert "acestep-trt build ARTS --min-duration 10 --opt-duration 60 --max-duration 300 --max-batch 1" in msg
    with pytest.raises(InputError, match="--max-batch 2"):
        prof.check({"batch": 2, "latent_len": 500, "cond_len": 300}, hint, 25.0)


# ---------------------------------------------------------------------------------------------- build


def test_build_without_tensorrt_is_one_clear_message(arts, monkeypatch):
    fake_trt.block_tensorrt(monkeypatch)  # as on this machine: only the lean bindings, and they are blocked too
    result = CliRunner().invoke(main, ["build", str(arts)])
    assert result.exit_code == BackendError.exit_code
    assert "TensorRT is not installed" in result.output and "pip install tensorrt-cu13" in result.output
    assert "Traceback" not in result.output and not (arts / "engines").exists()


def test_build_without_gpu_is_one_clear_message(arts, monkeypatch):
    fake_trt.install(monkeypatch, gpus=0)
    result = CliRunner().invoke(main, ["build", str(arts)])
    assert result.exit_code == BackendError.exit_code
    assert "no NVIDIA GPU is available (cudaErrorInsufficientDriver)" in result.output
    assert "nvidia-smi" in result.output and "Traceback" not in result.output


def test_build_records_calls_profiles_and_manifest(arts, fakes):
    trt, _ = fakes
    result = CliRunner().invoke(main, ["build", str(arts), "--min-duration", "0.5", "--opt-duration", "1",
                                       "--max-duration", "4", "--max-batch", "2", "--max-lyric-len", "512"])
    assert result.exit_code == 0, result.output
    # engine vs ONNX Runtime table (the fake engines run the same ONNX graphs, so they agree exactly)
    assert "encoder_attention_mask" in result.output and "FAIL" not in result.output
    # one row per graph output (dit_step, vae_encoder and audio_tokenizer have two); the tokenizer's code indices
    # are compared as the fraction that differs (limit 1%), its quantized states on the patches whose codes agree
    assert result.output.count(" ok") == 12 and "indices" in result.output and "<=1.00e-02" in result.output
    engines = arts / "engines"
    # one strongly typed network per engine, the ONNX graphs parsed from file (external data found)
    assert [c[1] for c in trt.calls if c[0] == "create_network"] == [1 << 1] * len(ENGINE_NAMES)
    assert [c[1] for c in trt.calls if c[0] == "parse_from_file"] == [str(arts / f"{n}.onnx") for n in ENGINE_NAMES]
    # exactly one profile per engine, one set_shape per input with min <= opt <= max
    specs = {n: s for n, s in ((n, json.loads((arts / "manifest.json").read_text())["graphs"][n]["spec"])
                                for n in ENGINE_NAMES)}
    for network, config in trt.builds:
        assert len(config.profiles) == 1 and config.timing_cache is not None
        assert set(config.profiles[0].shapes) == {t.name for t in network.inputs}
        assert fake_trt.BuilderFlag.TF32 not in config.flags  # --precision fp32: exact fp32 kernels
        assert fake_trt.BuilderFlag.VERSION_COMPATIBLE not in config.flags
    dit_shapes = {c[1]: c[2:] for c in trt.calls if c[0] == "set_shape" and c[1] == "context_latents"}
    assert dit_shapes["context_latents"] == ((1, 13, 128), (1, 25, 128), (2, 100, 128))  # ceil(s * 25), batch 2
    set_ids = [c for c in trt.calls if c[0] == "set_shape" and c[1] == "input_ids"][0]
    assert set_ids[2:] == ((1, 1), (1, 128), (2, 256))
    # files: one plan per engine, the timing cache, the manifest
    assert sorted(p.name for p in engines.iterdir()) == sorted([f"{n}.plan" for n in ENGINE_NAMES]
                                                              + ["timing.cache", ENGINE_MANIFEST])
    assert (engines / "timing.cache").read_bytes() == f"fake-timing-cache:{len(ENGINE_NAMES)}".encode()
    manifest = json.loads((engines / ENGINE_MANIFEST).read_text())
    assert manifest["tensorrt_version"] == "10.13.0.35"
    assert manifest["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert manifest["precision"] == "fp32" and manifest["version_compatible"] is False
    assert manifest["request"]["max_batch"] == 2 and manifest["request"]["max_duration"] == 4.0
    art_manifest = read_manifest(arts)
    for name in ENGINE_NAMES:
        rec = manifest["graphs"][name]
        assert rec["onnx"] == onnx_records(art_manifest, name) and rec["onnx"]
        assert rec["onnx_precision"] == "fp32"
        assert set(rec["profile"]["inputs"]) == {t["name"] for t in specs[name]["inputs"]}
    assert manifest["graphs"]["dit_step"]["profile"]["dims"]["latent_len"] == {"min": 13, "opt": 25, "max": 100}


def test_build_warns_about_operators_outside_the_documented_support(arts, fakes, monkeypatch, caplog):
    from acestep_trt.runtime.trt import onnx_support

    monkeypatch.setattr(onnx_support, "unsupported", lambda path: ["CumSum on INT64 (node 'n')"] if
                        path.name == "text_encoder.onnx" else [])
    with caplog.at_level("WARNING"):
        build_engines(arts, request=SMALL)
    assert "text_encoder.onnx: CumSum on INT64 (node 'n')" in caplog.text
    assert caplog.text.count("CumSum") == 1


def test_build_is_idempotent_and_rebuilds_only_what_changed(arts, fakes):
    trt, _ = fakes
    build_engines(arts, request=SMALL)
    first = len(trt.builds)
    build_engines(arts, request=SMALL)
    assert len(trt.builds) == first  # nothing changed: every engine kept
    build_engines(arts, request=ProfileRequest(**{**SMALL.to_dict(), "max_duration": 8.0}))
    rebuilt = sorted(n.onnx_path for n, _ in trt.builds[first:])
    # the engines whose ranges follow the duration: dit_step and vae_decoder (4 s is below one VAE window), cover_blend,
    # and the tokenizer pair (patches); not the VAE encoder (its windows are longer than 8 s at this VAE window)
    changed = ("dit_step", "vae_decoder", "cover_blend", "audio_tokenizer", "audio_detokenizer")
    assert rebuilt == sorted(str(arts / f"{n}.onnx") for n in changed)
    assert trt.calls.count(("create_timing_cache", f"fake-timing-cache:{first}".encode())) == 1  # cache reused
    build_engines(arts, request=ProfileRequest(**{**SMALL.to_dict(), "max_duration": 8.0}), force=True)
    assert len(trt.builds) == first + len(changed) + len(ENGINE_NAMES)


def test_version_compatible_build_sets_flags(arts, fakes):
    trt, _ = fakes
    manifest = build_engines(arts, request=SMALL, version_compatible=True, precision="tf32")
    for network, config in trt.builds:
        assert fake_trt.BuilderFlag.VERSION_COMPATIBLE in config.flags
        assert fake_trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME not in config.flags  # the lean runtime is embedded
        exact = network.onnx_path.endswith("audio_tokenizer.onnx")  # always exact fp32 (FSQ rounding)
        assert (fake_trt.BuilderFlag.TF32 in config.flags) != exact
    assert manifest.data["version_compatible"] is True and manifest.data["precision"] == "tf32"


def test_build_refuses_unknown_precision(arts, fakes):
    with pytest.raises(InputError, match="strongly typed"):
        build_engines(arts, precision="fp16")


def test_timing_cache_option(arts, fakes, tmp_path):
    cache = tmp_path / "shared.cache"
    cache.write_bytes(b"fake-timing-cache:40")
    build_engines(arts, request=SMALL, timing_cache=cache)
    assert cache.read_bytes() == f"fake-timing-cache:{40 + len(ENGINE_NAMES)}".encode()
    assert not (arts / "engines" / "timing.cache").exists()


# ---------------------------------------------------------------------------------------------- refusals


def _load(arts, **kw):
    return AceStepRuntime.load(arts, backend="trt", device="cuda", **kw)


def test_refuses_other_tensorrt_version(arts, monkeypatch):
    fake_trt.install(monkeypatch, version="10.13.0.35")
    build_engines(arts, request=SMALL)
    fake_trt.install(monkeypatch, version="10.14.1.48")
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10\.13\.0\.35; this is TensorRT 10\.14\.1\.48"):
        _load(arts)


def test_version_compatible_engines_run_on_later_tensorrt_and_lean(arts, monkeypatch):
    fake_trt.install(monkeypatch, version="10.13.0.35")
    build_engines(arts, request=SMALL, version_compatible=True)
    trt, _ = fake_trt.install(monkeypatch, version="11.1.0.2")
    assert _load(arts).backend == "trt"
    fake_trt.install(monkeypatch, version="10.14.0.1", lean=True)  # only `tensorrt_lean` installed
    assert _load(arts).backend == "trt"
    fake_trt.install(monkeypatch, version="10.8.0.1")
    with pytest.raises(ArtifactError, match="newer than this TensorRT"):
        _load(arts)


def test_version_compatible_rule_is_nvidias(arts, monkeypatch):
    """Same major and later, or 10 -> 11 / 8 -> 10 (TensorRT 11.4 support matrix); never older, never 10 -> 12."""
    from acestep_trt.runtime.trt.manifest import version_compatible_runs

    assert version_compatible_runs("11.4.0.106", "11.5.0.1") is None
    assert version_compatible_runs("10.13.0.35", "11.4.0.106") is None and version_compatible_runs("8.6.1", "10.0") is None
    assert "newer than this TensorRT 11.4.0" in version_compatible_runs("11.4.1", "11.4.0")
    assert "predates version compatibility" in version_compatible_runs("8.5.3", "8.6.1")
    assert "not on TensorRT 11.4.0" in version_compatible_runs("8.6.1", "11.4.0")
    fake_trt.install(monkeypatch, version="10.13.0.35")
    build_engines(arts, request=SMALL, version_compatible=True)
    fake_trt.install(monkeypatch, version="12.0.0.1")
    with pytest.raises(ArtifactError, match=r"TensorRT 10 on TensorRT 10\.x and 11\.x only, not on TensorRT 12"):
        _load(arts)


def test_tensorrt_found_under_the_wheels_module_names(arts, monkeypatch):
    """The PyPI wheels install `tensorrt_bindings` / `tensorrt_lean_bindings`, not `tensorrt` / `tensorrt_lean`."""
    from acestep_trt.runtime.trt.libs import import_tensorrt, is_lean

    trt, _ = fake_trt.install(monkeypatch, name="tensorrt_bindings")
    assert import_tensorrt() is trt and not is_lean(trt)
    build_engines(arts, request=SMALL)  # builds through tensorrt_bindings
    lean, _ = fake_trt.install(monkeypatch, name="tensorrt_lean_bindings")
    assert import_tensorrt(lean_ok=True) is lean and is_lean(lean)
    with pytest.raises(ArtifactError, match="only the TensorRT lean runtime is installed"):
        _load(arts)  # the lean runtime runs version-compatible engines only
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        import_tensorrt()  # a build needs the full TensorRT
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # PyPI's placeholder package
    with pytest.raises(BackendError, match="tensorrt: no Builder"):
        import_tensorrt()


def test_a_timing_cache_tensorrt_refuses_is_replaced(arts, fakes, tmp_path, caplog):
    """set_timing_cache(cache, ignore_mismatch=False) returns False for another TensorRT/GPU's cache: start anew."""
    trt, _ = fakes
    cache = tmp_path / "other-gpu.cache"
    cache.write_bytes(b"\x00timing cache of another GPU")
    with caplog.at_level("WARNING"):
        build_engines(arts, request=SMALL, timing_cache=cache)
    assert "does not match this TensorRT and GPU" in caplog.text and str(cache) in caplog.text
    assert cache.read_bytes() == f"fake-timing-cache:{len(ENGINE_NAMES)}".encode()  # replaced by the new one
    assert all(config.timing_cache is not None and config.timing_cache.valid for _, config in trt.builds)


def test_lean_runtime_refuses_engines_that_are_not_version_compatible(arts, monkeypatch):
    fake_trt.install(monkeypatch)
    build_engines(arts, request=SMALL)
    fake_trt.install(monkeypatch, lean=True)
    with pytest.raises(ArtifactError, match="--version-compatible"):
        _load(arts)


def test_refuses_other_gpu(arts, monkeypatch):
    fake_trt.install(monkeypatch, capability=(8, 9))
    build_engines(arts, request=SMALL)
    fake_trt.install(monkeypatch, capability=(9, 0))
    with pytest.raises(ArtifactError, match=r"compute capability 8\.9 .*this GPU has compute capability 9\.0"):
        _load(arts)


def test_refuses_engines_from_other_onnx_files(arts, fakes):
    build_engines(arts, request=SMALL)
    path = arts / "engines" / ENGINE_MANIFEST
    data = json.loads(path.read_text())
    data["graphs"]["vae_decoder"]["onnx"][0]["sha256"] = "0" * 64  # as if built from an earlier export
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="vae_decoder engine .* other ONNX files") as err:
        _load(arts)
    assert f"acestep-trt build {arts}" in str(err.value)


def test_refuses_corrupted_or_missing_engines(arts, fakes):
    build_engines(arts, request=SMALL)
    plan = arts / "engines" / "text_encoder.plan"
    data = bytearray(plan.read_bytes())
    data[10] ^= 1
    plan.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its SHA-256"):
        _load(arts)
    plan.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        _load(arts)
    (arts / "engines" / ENGINE_MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no TensorRT engines"):
        _load(arts)


def test_trt_backend_needs_cuda_device_and_tensorrt(arts, monkeypatch):
    with pytest.raises(BackendError, match="GPU only"):
        resolve_backend("trt", "cpu")
    fake_trt.block_tensorrt(monkeypatch)
    with pytest.raises(BackendError, match="TensorRT is not installed.*--backend ort"):
        _load(arts)


# ---------------------------------------------------------------------------------------------- runtime


@pytest.fixture
def built(arts, fakes):
    build_engines(arts, request=SMALL)
    return arts


def test_trt_runtime_matches_ort_with_latents_on_device(built, fakes):
    trt, cudart = fakes
    ort_rt = AceStepRuntime.load(built, backend="ort")
    trt_rt = _load(built)
    assert trt_rt.backend == "trt" and trt_rt.runners["dit_step"].providers == ["TensorRT"]
    latents = noise(1, trt_rt.config.latent_length(1.3))
    kwargs = dict(prompt="soft piano ballad", lyrics="[verse]\nSoft notes", audio_duration=1.3, latents=latents,
                  num_inference_steps=4)
    before = len(cudart.calls)
    got = trt_rt(**kwargs).audios
    ref = ort_rt(**kwargs).audios
    assert got.shape == ref.shape and got.dtype == np.float32
    assert float(np.max(np.abs(got - ref))) <= 1e-5
    calls = cudart.calls[before:]
    dit_runs = [c for c in trt.calls if c[0] == "execute_async_v3" and c[1].endswith("dit_step.onnx")]
    assert len(dit_runs) == 4  # one engine call per step: dit_step carries the Euler update
    # the latents crossed the bus once each way during the loop: uploads of latents/condition/context/
    # timesteps/dts, one download; no per-step copies
    h2d = [c for c in calls if c[:2] == ("cudaMemcpyAsync", "cudaMemcpyHostToDevice")]
    d2h = [c for c in calls if c[:2] == ("cudaMemcpyAsync", "cudaMemcpyDeviceToHost")]
    assert len(h2d) == 1 + 5 + 5 + 1 and len(d2h) == 1 + 2 + 1 + 1  # text enc, cond enc, loop, vae


def test_buffers_are_allocated_once_per_shape(built, fakes):
    _, cudart = fakes
    rt = _load(built)
    latents = noise(1, rt.config.latent_length(1.0))
    kwargs = dict(prompt="jazz", audio_duration=1.0, latents=latents, num_inference_steps=3)
    rt(**kwargs)
    mallocs = cudart.mallocs
    rt(**kwargs)
    assert cudart.mallocs == mallocs  # same shapes: every device buffer is reused
    rt(**{**kwargs, "num_inference_steps": 5})
    assert cudart.mallocs == mallocs + 2  # only the per-step timestep/dt tables are new
    assert cudart.count("cudaFree") == 2  # and the old ones freed


def test_windowed_vae_decode_on_trt_matches_ort(built, fakes):
    ort_rt = AceStepRuntime.load(built, backend="ort", vae_window=16)
    trt_rt = _load(built, vae_window=16)
    latents = noise(1, trt_rt.config.latent_length(3.7))
    kwargs = dict(prompt="ambient synth pad", audio_duration=3.7, latents=latents, num_inference_steps=2)
    got, ref = trt_rt(**kwargs).audios, ort_rt(**kwargs).audios
    assert float(np.max(np.abs(got - ref))) <= 1e-5


def test_duration_or_batch_outside_profile_is_a_clear_error(built, fakes):
    trt, _ = fakes
    rt = _load(built)
    runs_before = len([c for c in trt.calls if c[0] == "execute_async_v3"])
    with pytest.raises(InputError) as err:
        rt(prompt="rock", audio_duration=6.0, num_inference_steps=2, seed=0)
    assert len([c for c in trt.calls if c[0] == "execute_async_v3"]) == runs_before  # refused before any work
    msg = str(err.value)
    assert "latent_len = 150 (6.00 s of audio)" in msg and "13..100" in msg
    assert f"acestep-trt build {built} --min-duration 0.5 --opt-duration 1 --max-duration 6 --max-batch 1" in msg
    with pytest.raises(InputError, match=r"batch = 2 .* range 1\.\.1\. .*--max-batch 2"):
        rt(prompt=["a", "b"], audio_duration=1.0, num_inference_steps=2, seed=0)
    result = CliRunner().invoke(main, ["generate", str(built), "--prompt", "rock", "--duration", "6", "--backend",
                                       "trt", "--device", "cuda", "--out", str(built / "x.wav")])
    assert result.exit_code == InputError.exit_code and "--max-duration 6" in result.output
    assert "Traceback" not in result.output and not (built / "x.wav").exists()


def test_vae_window_larger_than_engine_is_refused(built, fakes):
    with pytest.raises(BackendError, match="vae_window 512 is larger"):
        _load(built, vae_window=512)


def test_auto_picks_trt_when_engines_fit_else_ort(arts, monkeypatch):
    fake_trt.install(monkeypatch)
    assert resolve_backend("auto", "cuda", arts) == "ort"  # no engines yet
    build_engines(arts, request=SMALL)
    assert resolve_backend("auto", "cuda", arts) == "trt"
    assert resolve_backend("auto", "cpu", arts) == "ort"
    assert resolve_backend("auto", "cuda", arts, arts / "elsewhere") == "ort"
    fake_trt.install(monkeypatch, capability=(8, 0))  # engines for another GPU: not usable here
    assert resolve_backend("auto", "cuda", arts) == "ort"
    fake_trt.block_tensorrt(monkeypatch)
    assert resolve_backend("auto", "cuda", arts) == "ort"


def test_engine_dir_option(arts, fakes, tmp_path):
    out = tmp_path / "eng"
    result = CliRunner().invoke(main, ["build", str(arts), "--out", str(out), "--max-duration", "4",
                                       "--min-duration", "0.5", "--opt-duration", "1", "--no-validate"])
    assert result.exit_code == 0, result.output
    assert (out / ENGINE_MANIFEST).is_file() and not (arts / "engines").exists()
    rt = AceStepRuntime.load(arts, backend="auto", device="cuda", engine_dir=out)
    assert rt.backend == "trt"


# ---------------------------------------------------------------------------------------------- real TensorRT


def _real_trt_available() -> bool:
    """The full TensorRT (as `tensorrt` or the wheel's `tensorrt_bindings`) and cuda-bindings."""
    try:
        from cuda.bindings import runtime  # noqa: F401

        from acestep_trt.runtime.trt.libs import import_tensorrt

        import_tensorrt()
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _real_trt_available(), reason="needs TensorRT and cuda-bindings")
def test_real_tensorrt_engines_match_onnx_runtime(tiny, tmp_path):
    """Build real engines from the tiny artifacts and compare end-to-end audio with ONNX Runtime."""
    arts = tmp_path / "artifacts"
    shutil.copytree(tiny.artifacts, arts)
    build_engines(arts, request=SMALL, precision="fp32")
    ort_rt = AceStepRuntime.load(arts, backend="ort")
    trt_rt = AceStepRuntime.load(arts, backend="trt", device="cuda")
    for duration, batch in ((1.3, 1), (3.7, 1)):
        latents = noise(batch, trt_rt.config.latent_length(duration))
        kwargs = dict(prompt="soft piano ballad", lyrics="[verse]\nla la", audio_duration=duration,
                      latents=latents, num_inference_steps=4)
        got, ref = trt_rt(**kwargs).audios, ort_rt(**kwargs).audios
        assert float(np.max(np.abs(got - ref))) <= 1e-3


def _real_cuda_available() -> bool:
    try:
        from acestep_trt.runtime.trt.libs import gpu_info

        gpu_info()
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _real_cuda_available(), reason="needs cuda-bindings and a GPU")
def test_real_cuda_buffers_round_trip():
    """The backend's cuda-bindings plumbing on a real GPU (no TensorRT needed): upload, download, free."""
    from acestep_trt.runtime.backends.trt import CudaStream, DeviceBuffer
    from acestep_trt.runtime.trt.libs import import_cudart

    cuda = CudaStream(import_cudart())
    src = np.random.default_rng(0).standard_normal((2, 33, 64)).astype(np.float32)
    buf = DeviceBuffer(cuda, src.shape, src.dtype)
    assert buf.ptr % 256 == 0
    cuda.upload(buf.ptr, src)
    back = np.empty_like(src)
    cuda.download(back, buf.ptr)
    cuda.synchronize()
    buf.free()
    np.testing.assert_array_equal(back, src)


def test_guided_non_turbo_model_on_trt_matches_ort(variant, tmp_path, monkeypatch):
    """Non-turbo: the DiT engine takes 2x the batch (cond + uncond); APG runs on the host each step."""
    trt, _ = fake_trt.install(monkeypatch)
    arts = tmp_path / "artifacts"
    shutil.copytree(variant.artifacts, arts)
    manifest = build_engines(arts, request=ProfileRequest(**{**SMALL.to_dict(), "max_batch": 2}))
    assert manifest.profile("dit_step").dims["batch"] == ShapeRange(1, 2, 4)
    ort_rt, trt_rt = AceStepRuntime.load(arts, backend="ort"), _load(arts)
    latents = noise(2, trt_rt.config.latent_length(1.2))
    kwargs = dict(prompt=["piano", "rock guitar solo"], audio_duration=1.2, latents=latents,
                  num_inference_steps=3, guidance_scale=5.0)
    got, ref = trt_rt(**kwargs).audios, ort_rt(**kwargs).audios
    assert float(np.max(np.abs(got - ref))) <= 1e-5
    dit_runs = [c for c in trt.calls if c[0] == "execute_async_v3" and c[1].endswith("dit_step.onnx")]
    assert len(dit_runs) == 3  # guided: host loop through `run`, both halves in one batch-4 call per step


def test_engine_validation_reports_a_differing_engine(built, fakes, monkeypatch):
    """`build --validate` fails (exit 5) with the table when an engine disagrees with ONNX Runtime."""
    original = fake_trt.Context._compute

    def skewed(self, feeds):
        out = original(self, feeds)
        return {k: (v + np.float32(0.5) if v.dtype == np.float32 else v) for k, v in out.items()}

    monkeypatch.setattr(fake_trt.Context, "_compute", skewed)
    result = CliRunner().invoke(main, ["build", str(built), "--min-duration", "0.5", "--opt-duration", "1",
                                       "--max-duration", "4", "--max-lyric-len", "512"])
    assert result.exit_code == 5, result.output
    assert "FAIL" in result.output and "differ from ONNX Runtime beyond tolerance" in result.output


def test_engine_validation_floors_per_precision():
    """SNR floors like the export's: by the graph's ONNX dtype when reduced, else by the build precision."""
    from acestep_trt.runtime.trt.validate import engine_floor, parse_tolerances

    assert engine_floor("dit_step", "fp32", "fp32", {}) == 60.0 and engine_floor("dit_step", "fp32", "tf32", {}) == 40.0
    assert engine_floor("dit_step", "bf16", "fp32", {}) == 30.0 and engine_floor("vae_decoder", "fp16", "tf32", {}) == 40.0
    overrides = parse_tolerances(["20", "dit_step=25"])
    assert overrides == {"*": 20.0, "dit_step": 25.0}
    assert engine_floor("dit_step", "fp32", "fp32", overrides) == 25.0
    assert engine_floor("vae_decoder", "fp32", "fp32", overrides) == 20.0
    for bad in ("loud", "unet=3", "dit_step=", "nan"):
        with pytest.raises(InputError, match="DB or GRAPH=DB"):
            parse_tolerances([bad])


def test_engine_validation_tolerance_override_and_nan(built, fakes, monkeypatch):
    """A slightly different engine (80 dB) passes the fp32 floor (60 dB), fails --validate-tolerance 90;
    NaN fails even at --validate-tolerance 0; a malformed value is refused before building."""
    original = fake_trt.Context._compute
    poison = {}

    def skewed(self, feeds):
        out = original(self, feeds)
        out = {k: (v * np.float32(1 + 1e-4) if v.dtype == np.float32 else v) for k, v in out.items()}
        if poison and "velocity" in out:
            out["velocity"].flat[0] = np.nan
        return out

    monkeypatch.setattr(fake_trt.Context, "_compute", skewed)
    args = ["build", str(built), "--min-duration", "0.5", "--opt-duration", "1", "--max-duration", "4",
            "--max-lyric-len", "512"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert ">=60 dB" in result.output and "not calibrated" in result.output and "FAIL" not in result.output
    result = CliRunner().invoke(main, [*args, "--validate-tolerance", "90"])
    assert result.exit_code == 5 and "FAIL" in result.output and "limit >=90 dB" in result.output
    poison["on"] = True
    result = CliRunner().invoke(main, [*args, "--validate-tolerance", "0"])
    assert result.exit_code == 5 and "dit_step.velocity" in result.output and "SNR nan dB" in result.output
    builds = len(fakes[0].builds)
    result = CliRunner().invoke(main, [*args, "--force", "--validate-tolerance", "dit=3"])
    assert result.exit_code == InputError.exit_code and len(fakes[0].builds) == builds


def test_close_releases_device_memory(built, fakes):
    _, cudart = fakes
    with _load(built) as rt:
        rt(prompt="rock", audio_duration=1.0, num_inference_steps=2, seed=0)
        allocated = sum(1 for c in cudart.calls if c[0] == "cudaMalloc")
    freed = sum(1 for c in cudart.calls if c[0] == "cudaFree")
    assert allocated > 0 and freed == allocated
