"""Bad input through the CLI: one clear message with the remedy, non-zero exit, no traceback, no output file."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from acestep_trt.cli import main


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_refused(result, code: int, *needles: str):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and lines[-1].startswith("error: "), result.output  # progress may come before
    for needle in needles:
        assert needle in result.output, result.output
    assert "Fix:" in result.output


def generate(artifacts, out, *extra):
    return run_cli("generate", artifacts, "--prompt", "piano", "--duration", "0.5", "--out", out, *extra)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--duration", "0"), "audio_duration"),
        (("--duration", "-3"), "audio_duration"),
        (("--duration", "nan"), "audio_duration"),
        (("--duration", "inf"), "audio_duration"),
        (("--steps", "0"), "num_inference_steps"),
        (("--steps", "-2"), "num_inference_steps"),
        (("--shift", "0"), "shift"),
        (("--shift", "nan"), "shift"),
        (("--shift", "-1"), "shift"),
        (("--seed", "-1"), "seed"),
    ],
)
def test_bad_numbers_are_refused(tiny, tmp_path, extra, needle):
    out = tmp_path / "x.wav"
    assert_refused(generate(tiny.artifacts, out, *extra), 2, needle)
    assert not out.exists()


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(tiny, tmp_path, prompt):
    out = tmp_path / "x.wav"
    result = run_cli("generate", tiny.artifacts, "--prompt", prompt, "--out", out)
    assert_refused(result, 2, "prompt")
    assert not out.exists()


def test_missing_latents_file(tiny, tmp_path):
    out = tmp_path / "x.wav"
    assert_refused(generate(tiny.artifacts, out, "--latents", tmp_path / "nope.npy"), 2, "nope.npy")
    assert not out.exists()


def test_latents_of_wrong_shape(tiny, tmp_path):
    out, lat = tmp_path / "x.wav", tmp_path / "lat.npy"
    np.save(lat, np.zeros((1, 5, 64), np.float32))
    assert_refused(generate(tiny.artifacts, out, "--latents", lat), 2, "shape")
    assert not out.exists()


def test_latents_file_reproduces_runtime(tiny, runtime, tmp_path):
    import soundfile as sf

    lat = np.random.default_rng(3).standard_normal((1, runtime.config.latent_length(0.5), 64)).astype(np.float32)
    np.save(tmp_path / "lat.npy", lat)
    out = tmp_path / "x.flac"
    result = generate(tiny.artifacts, out, "--latents", tmp_path / "lat.npy")
    assert result.exit_code == 0, result.output
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask  # the mode any new file gets, not mkstemp's 0600
    audio, rate = sf.read(out, dtype="float32")
    expected = runtime(prompt="piano", audio_duration=0.5, latents=lat).audios[0].T
    assert rate == 48000 and audio.shape == expected.shape
    assert np.max(np.abs(audio - expected)) < 2 / 32768  # 16-bit quantisation


def test_missing_artifacts_dir(tmp_path):
    out = tmp_path / "x.wav"
    assert_refused(generate(tmp_path / "missing", out), 3, "does not exist")
    assert not out.exists()


def test_directory_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(generate(tmp_path / "empty", tmp_path / "x.wav"), 3, "manifest.json")


@pytest.fixture
def artifacts_copy(tiny, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny.artifacts, dst)
    (dst / ".verified.json").unlink(missing_ok=True)
    return dst


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_onnx", "truncate_data", "delete_graph", "bad_manifest",
                                    "flip_constants", "old_format"])
def test_corrupted_artifacts_are_refused(artifacts_copy, tmp_path, damage):
    art = artifacts_copy
    if damage == "flip_onnx":
        _flip_byte(art / "dit_step.onnx", 100)
    elif damage == "truncate_data":
        path = art / "vae_decoder.onnx.data"
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "delete_graph":
        (art / "text_encoder.onnx").unlink()
    elif damage == "bad_manifest":
        (art / "manifest.json").write_text("{not json")
    elif damage == "flip_constants":
        _flip_byte(art / "constants.safetensors", 2000)
    elif damage == "old_format":
        manifest = json.loads((art / "manifest.json").read_text())
        manifest["format_version"] = 0
        (art / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "x.wav"
    assert_refused(generate(art, out), 3, "acestep-trt export")
    assert not out.exists()


def test_existing_output_is_not_overwritten(tiny, tmp_path):
    out = tmp_path / "x.wav"
    out.write_bytes(b"precious")
    assert_refused(generate(tiny.artifacts, out), 2, "--overwrite")
    assert out.read_bytes() == b"precious"
    assert generate(tiny.artifacts, out, "--overwrite", "--seed", "1").exit_code == 0
    assert out.read_bytes() != b"precious"


def test_unknown_output_format(tiny, tmp_path):
    assert_refused(generate(tiny.artifacts, tmp_path / "x.mp3"), 2, ".wav")


def test_export_of_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notackpt").mkdir()
    (tmp_path / "notackpt" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for model_dir in (tmp_path / "notackpt", tmp_path / "absent"):
        result = run_cli("export", model_dir, tmp_path / "out")
        assert_refused(result, 4, str(model_dir))
        assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_target(tiny, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert_refused(run_cli("export", tiny.checkpoint, target), 2, "--overwrite")
    assert (target / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing_behind(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny.checkpoint, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    result = run_cli("export", broken, tmp_path / "out")
    assert_refused(result, 4, "transformer")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no staging directory left


def test_export_beyond_tolerance_exits_5_and_writes_nothing(tiny, tmp_path, monkeypatch):
    from acestep_trt.runtime.specs import Tolerance

    monkeypatch.setattr(Tolerance, "bound", lambda self, scale: -1.0)  # every fp32 comparison now fails
    result = run_cli("export", tiny.checkpoint, tmp_path / "out")
    assert_refused(result, 5, "differs from PyTorch")  # the first graph validated: small ones trace in parallel
    assert any(f"error: {name}." in result.output for name in ("text_encoder", "condition_encoder", "dit_step",
                                                               "vae_decoder", "vae_encoder")), result.output
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_artifacts_of_another_version_are_refused(artifacts_copy, tmp_path):
    manifest = json.loads((artifacts_copy / "manifest.json").read_text())
    spec = manifest["graphs"]["dit_step"]["spec"]
    spec["inputs"] = [t for t in spec["inputs"] if t["name"] != "dt"]
    spec["outputs"] = [t for t in spec["outputs"] if t["name"] != "next_latents"]
    (artifacts_copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "x.wav"
    assert_refused(generate(artifacts_copy, out), 3, "another acestep-trt version", "missing dt, next_latents")
    assert not out.exists()


def test_real_process_exit_code_and_stderr(tiny, tmp_path):
    out = tmp_path / "x.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "acestep_trt.cli", "generate", str(tiny.artifacts), "--prompt", "p",
         "--duration", "-1", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert not out.exists()


def test_demo_runs_end_to_end_and_keeps_an_existing_out_dir(tmp_path):
    """The README's first command: tiny checkpoint -> export -> a clip, each stage timed; a second run into the
    same directory without --overwrite is refused and leaves the first run's files as they were."""
    import soundfile as sf

    out = tmp_path / "demo"
    result = run_cli("demo", "--out-dir", out, "--duration", "2")
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out / "demo.wav", always_2d=True)
    assert rate == 48000 and audio.shape == (96000, 2) and np.abs(audio).max() > 0
    for stage in ("build tiny checkpoint", "export + validate", "generate (load + run)", "total"):
        assert stage in result.output, result.output
    assert (out / "artifacts" / "manifest.json").is_file()
    before = (out / "demo.wav").read_bytes()
    assert_refused(run_cli("demo", "--out-dir", out, "--duration", "2"), 2, "already exists", "--overwrite")
    assert (out / "demo.wav").read_bytes() == before
