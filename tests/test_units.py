"""Unit parity of the runtime's pieces with their diffusers/transformers counterparts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acestep_trt.runtime import scheduler as sched
from acestep_trt.runtime.prompt import format_prompt
from acestep_trt.runtime.specs import GRAPH_NAMES
from acestep_trt.runtime.tokenizer import TextTokenizer
from acestep_trt.runtime.vae import decode_windowed, normalize_peak, window_overlap


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 9, 50])
@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 1.7])
def test_schedule_matches_pipeline_and_scheduler(tiny, steps, shift):
    pipe = tiny.pipe
    ref = pipe._get_timestep_schedule(num_inference_steps=steps, shift=shift, dtype=torch.float32)
    got = sched.timestep_schedule(steps, shift)
    np.testing.assert_array_equal(got, ref.numpy())
    pipe.scheduler.set_timesteps(sigmas=ref.tolist())
    ts, sigmas = sched.scheduler_sigmas(got, dict(pipe.scheduler.config))
    np.testing.assert_array_equal(ts, pipe.scheduler.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, pipe.scheduler.sigmas.numpy())


def test_scheduler_config_with_its_own_shift_is_mirrored():
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=2.5)
    schedule = sched.timestep_schedule(8, 3.0)
    reference.set_timesteps(sigmas=schedule.tolist())
    ts, sigmas = sched.scheduler_sigmas(schedule, dict(reference.config))
    np.testing.assert_array_equal(sigmas, reference.sigmas.numpy())
    np.testing.assert_array_equal(ts, reference.timesteps.numpy())


def test_unsupported_scheduler_options_are_refused():
    from acestep_trt.runtime.errors import ArtifactError

    with pytest.raises(ArtifactError, match="use_karras_sigmas"):
        sched.check_scheduler_config({"use_karras_sigmas": True})


def test_euler_step_matches_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    schedule = sched.timestep_schedule(4, 3.0)
    ref.set_timesteps(sigmas=schedule.tolist())
    _, sigmas = sched.scheduler_sigmas(schedule, dict(ref.config))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 64)).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        expected = ref.step(torch.from_numpy(v), t, torch.from_numpy(x), return_dict=False)[0].numpy()
        x = sched.euler_step(x, v, sigmas[i], sigmas[i + 1])
        np.testing.assert_array_equal(x, expected)


def test_apg_matches_diffusers_normalized_guidance():
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    rng = np.random.default_rng(1)
    ref_buffer, buffer = MomentumBuffer(momentum=-0.75), sched.MomentumBuffer(-0.75)
    for _ in range(4):
        cond = rng.standard_normal((2, 11, 64)).astype(np.float32)
        uncond = rng.standard_normal((2, 11, 64)).astype(np.float32)
        expected = normalized_guidance(torch.from_numpy(cond), torch.from_numpy(uncond), 4.0, ref_buffer, eta=0.0,
                                       norm_threshold=2.5, use_original_formulation=True, norm_dim=(1,)).numpy()
        got = sched.apg(cond, uncond, 4.0, buffer)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_linspace_is_torch_bit_exact():
    for steps in range(1, 70):
        np.testing.assert_array_equal(sched.linspace_f32(1.0, 0.0, steps),
                                      torch.linspace(1.0, 0.0, steps, dtype=torch.float32).numpy())


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenizer_matches_transformers(tiny, tmp_path, side):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny.checkpoint / "tokenizer")
    hf.padding_side = side
    hf.save_pretrained(tmp_path)
    ours = TextTokenizer(tmp_path)
    assert ours.padding_side == side
    texts = [format_prompt("piano", "春のうた", "ja", 12.5, bpm=90)[0], "short", "<|endoftext|> x " * 30, "é"]
    for max_length in (4, 17, 256):
        ref = hf(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="np")
        got = ours(texts, max_length)
        np.testing.assert_array_equal(got.input_ids, ref["input_ids"])
        np.testing.assert_array_equal(got.attention_mask, ref["attention_mask"].astype(bool))


def test_prompt_format_matches_pipeline(tiny):
    pipe = tiny.pipe
    cases = [dict(), dict(bpm=120, keyscale="C major", timesignature="4"), dict(bpm=0, keyscale=" ", timesignature="")]
    for meta in cases:
        for duration in (10.0, 12.9, 600):
            expected = pipe._format_prompt("rock", "[verse]\nhi", "en", duration, "Do it", **meta)
            assert format_prompt("rock", "[verse]\nhi", "en", duration, "Do it", **meta) == expected


def test_windowed_decode_equals_whole_decode_for_every_split(runtime):
    runner = runtime.runners["vae_decoder"]
    decode = lambda z: runner.run({"latents": z})["audio"]  # noqa: E731
    overlap = window_overlap(runtime.artifacts.vae_receptive_field)
    for frames in (1, 17, 40, 63):
        latents = np.random.default_rng(frames).standard_normal((2, 64, frames)).astype(np.float32)
        whole = decode(latents)
        for window in (1, 5, 16):
            windowed = decode_windowed(decode, latents, 1920, window, overlap)
            assert windowed.shape == whole.shape
            assert np.max(np.abs(windowed - whole)) < 1e-5, (frames, window)


def test_windowed_decode_with_too_little_overlap_differs(runtime):
    """The overlap is what makes windows exact: without it the seams show (guards the test above)."""
    runner = runtime.runners["vae_decoder"]
    decode = lambda z: runner.run({"latents": z})["audio"]  # noqa: E731
    latents = np.random.default_rng(0).standard_normal((1, 64, 40)).astype(np.float32)
    assert np.max(np.abs(decode_windowed(decode, latents, 1920, 8, 0) - decode(latents))) > 1e-3


def test_normalize_peak_matches_pipeline_postprocessing():
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal((3, 2, 1000)) * np.array([0.1, 1.0, 5.0])[:, None, None]).astype(np.float32)
    ref = torch.from_numpy(audio.copy())
    peak = ref.abs().amax(dim=[1, 2], keepdim=True)
    if torch.any(peak > 1.0):
        ref = ref / peak.clamp(min=1.0)
    ref = ref * (10.0 ** (-1.0 / 20.0) / ref.abs().amax(dim=[1, 2], keepdim=True).clamp(min=1e-6))
    np.testing.assert_allclose(normalize_peak(audio), ref.numpy(), rtol=1e-6, atol=1e-7)


def test_onnx_graphs_state_the_contract(tiny):
    """Input/output names, dtypes and symbolic dim names in the ONNX files are those of the specs."""
    import onnx

    from acestep_trt.runtime.artifacts import load_artifacts

    art = load_artifacts(tiny.artifacts)
    elem = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64, "bool": onnx.TensorProto.BOOL}
    for name in GRAPH_NAMES:
        model = onnx.load(str(art.graph_path(name)), load_external_data=False)
        spec = art.specs[name]
        for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
            assert [v.name for v in values] == [t.name for t in tensors]
            for value, tensor in zip(values, tensors):
                assert value.type.tensor_type.elem_type == elem[tensor.dtype]
                dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                assert dims == list(tensor.dims)


def test_manifest_records_every_file_with_hash(tiny):
    import json

    manifest = json.loads((tiny.artifacts / "manifest.json").read_text())
    listed = {rec["path"] for rec in manifest["files"]}
    on_disk = {p.relative_to(tiny.artifacts).as_posix() for p in tiny.artifacts.rglob("*")
               if p.is_file() and p.name not in ("manifest.json", ".verified.json")}
    assert listed == on_disk
    assert all(len(rec["sha256"]) == 64 for rec in manifest["files"])
    assert all(r["ok"] for r in manifest["validation"]) and len(manifest["validation"]) >= 8


def test_runtime_input_errors(runtime):
    from acestep_trt.runtime import InputError

    bad_calls = [
        dict(prompt=None), dict(prompt=[]), dict(prompt=["ok", ""]), dict(prompt="x", audio_duration=float("nan")),
        dict(prompt="x", num_inference_steps=2.5), dict(prompt="x", shift=float("inf")),
        dict(prompt=["a", "b"], lyrics=["only one"]), dict(prompt="x", task_type="remix"),
        dict(prompt="x", latents=np.zeros((1, 3, 64), np.float32)), dict(prompt="x", seed="abc"),
        dict(prompt=["a", "b"], seed=[1]), dict(prompt="x", guidance_scale=-1),
        dict(prompt="x", seed=-1), dict(prompt=["a", "b"], seed=[1, -2]), dict(prompt=["a", "b"], seed=-3),
    ]
    for kwargs in bad_calls:
        with pytest.raises(InputError):
            runtime(audio_duration=kwargs.pop("audio_duration", 0.5), **kwargs)


def test_cuda_without_gpu_is_a_clear_error(tiny):
    import onnxruntime as ort

    from acestep_trt.runtime import AceStepRuntime, BackendError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.raises(BackendError, match="--device cpu"):
        AceStepRuntime.load(tiny.artifacts, device="cuda")


def test_a_verified_copy_is_not_hashed_again(tiny, tmp_path, monkeypatch):
    import shutil

    from acestep_trt.runtime import artifacts

    copy = tmp_path / "art"
    shutil.copytree(tiny.artifacts, copy)  # keeps mtimes and the cache export seeded

    def no_hashing(path, *args, **kwargs):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(artifacts, "sha256_file", no_hashing)
    artifacts.load_artifacts(copy)


def test_export_seeds_the_verification_cache(tiny, tmp_path):
    """Export records what it hashed, so the first load does not hash again; a changed file is still caught."""
    import json
    import shutil

    from acestep_trt.runtime.artifacts import load_artifacts
    from acestep_trt.runtime.errors import ArtifactError

    manifest = json.loads((tiny.artifacts / "manifest.json").read_text())
    cache = json.loads((tiny.artifacts / ".verified.json").read_text())
    assert set(cache) >= {rec["path"] for rec in manifest["files"]}
    copy = tmp_path / "art"
    shutil.copytree(tiny.artifacts, copy)  # copy2 keeps mtimes: the seeded cache still applies
    load_artifacts(copy)
    path = copy / "dit_step.onnx"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime: hashed again, refused
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_artifacts(copy)
