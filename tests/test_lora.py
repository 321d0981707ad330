"""LoRA at generate time: runtime vs diffusers' ``load_lora_weights`` / ``set_adapters`` / ``attention_kwargs``.

LoRAs are made here with peft on the tiny DiT (random A and B), saved in the diffusers format
(``AceStepPipeline.save_lora_weights``) and in the official trainer's PEFT-directory format. Audio must match
diffusers within 1e-4 (odd latent length beyond the sliding window); artifact files must stay unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from acestep_trt.runtime import AceStepRuntime
from acestep_trt.runtime.errors import ArtifactError, InputError
from acestep_trt.runtime.lora import read_base

from .conftest import noise, reference_audio

ATOL = 1e-4
DURATION = 0.84  # 21 frames: odd, 11 patched tokens beyond the tiny window of 8
PROMPT = dict(prompt="soft piano ballad", lyrics="[verse]\nSoft notes")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(pipe, rank: int, seed: int, targets=ATTENTION, alpha: int | None = None) -> dict:
    """A random peft LoRA on ``pipe.transformer``: {diffusers parameter key: tensor}, adapter removed again."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="made")
    state = {k: v.detach().clone() * 4.0 for k, v in get_peft_model_state_dict(pipe.transformer, adapter_name="made").items()}
    pipe.transformer.delete_adapters("made")
    return state, config


def save_diffusers(pipe, state, out: Path, config=None) -> Path:
    """``AceStepPipeline.save_lora_weights``; with ``config`` the peft metadata (alpha) goes into the header."""
    pipe.save_lora_weights(out, transformer_lora_layers=state,
                           transformer_lora_adapter_metadata=config.to_dict() if config else None)
    return out


def save_peft_dir(state, out: Path, rank: int, alpha: int) -> Path:
    """The official trainer's layout: adapter_config.json + adapter_model.safetensors with q_proj... keys."""
    from safetensors.torch import save_file

    def original(key):
        for new, old in ((".to_q.", ".q_proj."), (".to_k.", ".k_proj."), (".to_v.", ".v_proj."),
                         (".to_out.0.", ".o_proj.")):
            key = key.replace(new, old)
        return "base_model.model." + key

    out.mkdir(parents=True)
    save_file({original(k): v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]}))
    return out


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".verified.json"}


def ours(rt, latents, **kwargs):
    return rt(audio_duration=DURATION, latents=latents, **PROMPT, **kwargs).audios


def theirs(model, latents, **kwargs):
    return reference_audio(model, latents, audio_duration=DURATION, **PROMPT, **kwargs)


def close(got, ref):
    err = float(np.max(np.abs(got - ref)))
    assert err <= ATOL, f"max abs error {err:.3e} > {ATOL}"


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    """Two LoRAs on the tiny DiT: ``a`` diffusers format with alpha 2r in its metadata (scale 2); ``b`` a PEFT
    directory with alpha 2r that diffusers ignores (scale 1), on the attention and the MLP."""
    root = tmp_path_factory.mktemp("loras")
    state_a, config_a = make_lora(tiny.pipe, 4, seed=1, alpha=8)
    state_b, _ = make_lora(tiny.pipe, 8, seed=2, targets=ATTENTION + ["gate_proj", "down_proj"])
    return {"a": save_diffusers(tiny.pipe, state_a, root / "a", config_a),
            "b": save_peft_dir(state_b, root / "b", 8, 16), "root": root}


def test_runtime_matches_diffusers_lora(tiny, loras):
    before = hashes(tiny.artifacts)
    rt = AceStepRuntime.load(tiny.artifacts)
    latents = noise(1, rt.config.latent_length(DURATION), seed=3)
    plain = ours(rt, latents)
    pipe = tiny.pipe
    try:
        assert rt.load_lora_weights(loras["a"], adapter_name="a") == "a"
        pipe.load_lora_weights(str(loras["a"]), adapter_name="a")
        lora_a = ours(rt, latents)
        assert np.max(np.abs(lora_a - plain)) > 1e-2  # the adapter changes the audio
        close(lora_a, theirs(tiny, latents))
        close(ours(rt, latents, attention_kwargs={"scale": 0.4}), theirs(tiny, latents, attention_kwargs={"scale": 0.4}))

        rt.load_lora_weights(loras["b"], adapter_name="b")  # the PEFT directory of the official trainer
        pipe.load_lora_weights(str(loras["b"]), adapter_name="b")
        close(ours(rt, latents), theirs(tiny, latents))
        rt.set_adapters(["a", "b"], [0.7, -0.5])
        pipe.set_adapters(["a", "b"], [0.7, -0.5])
        close(ours(rt, latents, attention_kwargs={"scale": 1.5}),
              theirs(tiny, latents, attention_kwargs={"scale": 1.5}))
        close(ours(rt, latents), theirs(tiny, latents))
    finally:
        pipe.unload_lora_weights()
    rt.unload_lora_weights()
    np.testing.assert_array_equal(ours(rt, latents), plain)
    assert hashes(tiny.artifacts) == before


def test_apg_guided_path_of_base_checkpoint(variant, tmp_path):
    state, config = make_lora(variant.pipe, 4, seed=5, alpha=4)
    path = save_diffusers(variant.pipe, state, tmp_path / "v")
    rt = AceStepRuntime.load(variant.artifacts)
    latents = noise(1, rt.config.latent_length(DURATION), seed=4)
    plain = ours(rt, latents, guidance_scale=5.0)
    try:
        rt.load_lora_weights(path)
        variant.pipe.load_lora_weights(str(path))
        close(ours(rt, latents, guidance_scale=5.0, attention_kwargs={"scale": 0.8}),
              theirs(variant, latents, guidance_scale=5.0, attention_kwargs={"scale": 0.8}))
    finally:
        variant.pipe.unload_lora_weights()
    rt.unload_lora_weights()
    np.testing.assert_array_equal(ours(rt, latents, guidance_scale=5.0), plain)


def test_parameter_map_is_complete_and_exact(tiny):
    """Every Linear weight of the DiT maps to an initializer holding exactly its bytes (both layouts occur)."""
    import torch

    rt = AceStepRuntime.load(tiny.artifacts)
    parameters = rt.artifacts.manifest["graphs"]["dit_step"]["parameters"]
    linears = {f"{n}.weight": m.weight for n, m in tiny.pipe.transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert set(parameters) == set(linears)
    assert {r["transposed"] for r in parameters.values()} == {True, False}
    assert len({r["initializer"] for r in parameters.values()}) == len(parameters)
    for name, weight in linears.items():
        record = parameters[name]
        stored = read_base(rt.artifacts.root, rt.artifacts.graph_path("dit_step"), record)
        want = weight.detach().numpy()
        np.testing.assert_array_equal(stored.T if record["transposed"] else stored, want)


def test_bf16_export_maps_bf16_initializers(reduced, loras):
    """bf16 DiT: the map holds bf16 records; a LoRA merges in fp32 and rounds to bf16 (emulated on the CPU)."""
    import torch

    rt = AceStepRuntime.load(reduced.artifacts, emulate_precision=True)
    parameters = rt.artifacts.manifest["graphs"]["dit_step"]["parameters"]
    record = parameters["layers.1.cross_attn.to_v.weight"]
    assert record["dtype"] == "bf16"
    stored = read_base(rt.artifacts.root, rt.artifacts.graph_path("dit_step"), record)
    weight = dict(reduced.pipe.transformer.named_parameters())["layers.1.cross_attn.to_v.weight"]
    want = weight.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(stored.T if record["transposed"] else stored, want)
    latents = noise(1, rt.config.latent_length(DURATION), seed=3)
    plain = ours(rt, latents, output_type="latent")
    rt.load_lora_weights(loras["a"])
    assert np.max(np.abs(ours(rt, latents, output_type="latent") - plain)) > 1e-2
    rt.unload_lora_weights()
    np.testing.assert_array_equal(ours(rt, latents, output_type="latent"), plain)


# ------------------------------------------------------------------ bad input


def _write(path: Path, tensors: dict) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


def _pair(module: str, rank: int, n_in: int, n_out: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"transformer.{module}.lora_A.weight": rng.standard_normal((rank, n_in)) * 0.1,
            f"transformer.{module}.lora_B.weight": rng.standard_normal((n_out, rank)) * 0.1}


def test_bad_loras_are_refused_and_change_nothing(tiny, loras, tmp_path):
    rt = AceStepRuntime.load(tiny.artifacts)
    rt.load_lora_weights(loras["a"], adapter_name="good")
    latents = noise(1, rt.config.latent_length(DURATION), seed=3)
    expected = ours(rt, latents, output_type="latent")
    nan = _pair("layers.0.self_attn.to_q", 4, 64, 64)
    nan["transformer.layers.0.self_attn.to_q.lora_B.weight"][1, 2] = np.nan
    bad = {
        "not a safetensors file": ((tmp_path / "x.safetensors"), b"this is not a LoRA"),
        "match no DiT module": _write(tmp_path / "keys.safetensors", {
            **_pair("layers.99.self_attn.to_q", 4, 64, 64), **_pair("text_encoder.layers.0.q_proj", 4, 64, 64)}),
        "trained for another model size": _write(tmp_path / "width.safetensors",
                                                 _pair("layers.0.self_attn.to_q", 4, 96, 64)),
        "not a rank-r product": _write(tmp_path / "rank.safetensors", {
            "transformer.layers.0.self_attn.to_k.lora_A.weight": np.zeros((4, 64)),
            "transformer.layers.0.self_attn.to_k.lora_B.weight": np.zeros((32, 3))}),
        "NaN or Inf": _write(tmp_path / "nan.safetensors", nan),
        "already loaded": loras["a"],
    }
    bad["not a safetensors file"][0].write_bytes(bad["not a safetensors file"][1])
    bad["not a safetensors file"] = bad["not a safetensors file"][0]
    for message, path in bad.items():
        name = "good" if message == "already loaded" else None
        with pytest.raises(InputError, match=message) as info:
            rt.load_lora_weights(path, adapter_name=name)
        if message == "match no DiT module":
            assert "layers.99.self_attn.to_q" in str(info.value)
    with pytest.raises(InputError, match="not loaded"):
        rt.set_adapters(["good", "missing"])
    with pytest.raises(InputError, match="scale"):
        rt(audio_duration=DURATION, latents=latents, attention_kwargs={"scale": float("nan")}, **PROMPT)
    np.testing.assert_array_equal(ours(rt, latents, output_type="latent"), expected)
    assert list(rt._lora_controller.state.adapters) == ["good"]


def test_switching_reads_only_targeted_weights_once(tiny, loras, monkeypatch):
    """Base values of targeted weights are read once, by byte range; scale and adapter switches read nothing."""
    from acestep_trt.runtime import lora as lora_mod

    reads = []
    real = lora_mod.read_base
    monkeypatch.setattr(lora_mod, "read_base", lambda *a: reads.append(a[2]["initializer"]) or real(*a))
    rt = AceStepRuntime.load(tiny.artifacts)
    sessions = {name: getattr(runner.wrapped, "session", None) for name, runner in rt.runners.items()}
    rt.load_lora_weights(loras["a"], adapter_name="a")
    assert len(reads) == len(rt._lora_controller.state.adapters["a"].layers) == 32  # 4 layers x 2 attn x 4
    changed = [name for name, runner in rt.runners.items()
               if getattr(runner.wrapped, "session", None) is not sessions[name]]  # split runners have none
    assert changed == ["dit_step"]  # only the DiT session is created again
    rt.load_lora_weights(loras["b"], adapter_name="b")
    assert len(reads) == len(set(reads)) == 32 + 8  # b adds the MLP's gate and down projections
    latents = noise(1, rt.config.latent_length(DURATION), seed=3)
    for scale in (0.5, 1.0, 2.0):
        ours(rt, latents, output_type="latent", attention_kwargs={"scale": scale})
    rt.set_adapters("a", 0.3)
    assert len(reads) == 40


def test_older_artifacts_without_map_are_refused(tiny, tmp_path, loras):
    copy = tmp_path / "old"
    shutil.copytree(tiny.artifacts, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["graphs"]["dit_step"]["parameters"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    rt = AceStepRuntime.load(copy)
    with pytest.raises(ArtifactError, match="re-run `acestep-trt export"):
        rt.load_lora_weights(loras["a"])


def test_comfyui_single_file_and_trainer_alpha_note(tiny, loras, tmp_path):
    """ComfyUI files (``diffusion_model.``, lora_down/up, ``.alpha``: refused by diffusers 0.42.1) load with
    ComfyUI's rule, scale alpha / r; a PEFT directory whose alpha differs from r gets a note (diffusers: scale 1)."""
    from acestep_trt.runtime.lora import parse_adapter, read_safetensors

    rt = AceStepRuntime.load(tiny.artifacts)
    parameters = rt.artifacts.manifest["graphs"]["dit_step"]["parameters"]
    peft = parse_adapter(loras["b"], parameters, "b")
    assert any("lora_alpha=16" in note and "adapter weight 2" in note for note in peft.notes)
    assert {layer.scale for layer in peft.layers.values()} == {1.0}
    tensors, _ = read_safetensors(loras["b"] / "adapter_model.safetensors")
    comfy = {}
    for key, value in tensors.items():
        key = key.replace("base_model.model.", "diffusion_model.")
        comfy[key.replace("lora_A", "lora_down").replace("lora_B", "lora_up")] = value
        if "lora_A" in key:
            comfy[key.replace(".lora_A.weight", ".alpha")] = np.array(4.0, np.float32)  # r = 8: scale 0.5
    layers = parse_adapter(_write(tmp_path / "comfy.safetensors", comfy), parameters, "c").layers
    assert layers.keys() == peft.layers.keys()
    for name, layer in layers.items():
        np.testing.assert_array_equal(layer.A, peft.layers[name].A)
        assert layer.scale == 0.5


def test_generate_cli_mixes_loras_like_set_adapters(tiny, loras, tmp_path):
    from click.testing import CliRunner

    import soundfile as sf

    from acestep_trt.cli import main

    latents = noise(1, 21, seed=3)
    np.save(tmp_path / "z.npy", latents)
    args = ["generate", str(tiny.artifacts), "--prompt", PROMPT["prompt"], "--lyrics", PROMPT["lyrics"],
            "--duration", str(DURATION), "--latents", str(tmp_path / "z.npy")]
    out = tmp_path / "mix.wav"
    result = CliRunner().invoke(main, [*args, "--lora", f"{loras['a']}:0.5", "--lora", str(loras["b"]),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    rt = AceStepRuntime.load(tiny.artifacts)
    rt.load_lora_weights(loras["a"], "x")
    rt.load_lora_weights(loras["b"], "y")
    rt.set_adapters(["x", "y"], [0.5, 1.0])
    want = ours(rt, latents)[0]
    got = sf.read(out, dtype="float32")[0].T
    assert float(np.max(np.abs(got - want))) <= 1.0 / 32767 + 1e-6  # 16-bit WAV
    bad = CliRunner().invoke(main, [*args, "--lora", str(tmp_path / "missing.safetensors"),
                                    "--out", str(tmp_path / "bad.wav")])
    assert bad.exit_code == 2 and "no such file" in bad.output and not (tmp_path / "bad.wav").exists()
    (tmp_path / "junk.safetensors").write_text("junk")
    bad = CliRunner().invoke(main, [*args, "--lora", str(tmp_path / "junk.safetensors"),
                                    "--out", str(tmp_path / "bad.wav")])
    assert bad.exit_code == 2 and "not a safetensors file" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad.wav").exists()


def test_export_fuses_loras_into_the_graphs(tiny, loras, tmp_path):
    """``export --lora``: the fused DiT equals the plain export with the same adapters loaded at run time."""
    from click.testing import CliRunner

    from acestep_trt.cli import main

    out = tmp_path / "fused"
    result = CliRunner().invoke(main, ["export", str(tiny.checkpoint), str(out), "--no-validate",
                                       "--lora", f"{loras['a']}:0.5", "--lora", str(loras["b"])])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    fused = manifest["graphs"]["dit_step"]["fused_lora"]
    assert [(Path(r["path"]).name, r["scale"], r["weights"]) for r in fused] == [("a", 0.5, 32), ("b", 1.0, 40)]
    assert manifest["graphs"]["dit_step"]["parameters"].keys() == json.loads(
        (tiny.artifacts / "manifest.json").read_text())["graphs"]["dit_step"]["parameters"].keys()
    latents = noise(1, 21, seed=3)
    rt = AceStepRuntime.load(tiny.artifacts)
    rt.load_lora_weights(loras["a"], "a")
    rt.load_lora_weights(loras["b"], "b")
    rt.set_adapters(["a", "b"], [0.5, 1.0])
    close(ours(AceStepRuntime.load(out), latents), ours(rt, latents))
