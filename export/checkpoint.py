"""Reading a diffusers-format ACE-Step 1.5 checkpoint (what ``AceStepPipeline.save_pretrained`` writes).

``inspect_checkpoint`` only reads JSON, so a wrong directory is refused before torch is imported.
Components are loaded one at a time so that a full-size export never holds every network at once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from acestep_trt.runtime.errors import CheckpointError
from acestep_trt.runtime.specs import AudioTokenizerConfig, ModelConfig


REQUIRED = {
    "text_encoder": "config.json",
    "tokenizer": "tokenizer.json",
    "transformer": "config.json",
    "condition_encoder": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent} is not an ACE-Step 1.5 checkpoint: {path.name} is missing.",
            "point to a directory written by AceStepPipeline.save_pretrained (it holds model_index.json).",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).", "re-download or re-save the checkpoint.") from None


def inspect_checkpoint(model_dir: str | Path) -> ModelConfig:
    """Validate the layout of ``model_dir`` and return its :class:`ModelConfig` (no torch needed)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory.", "pass the checkpoint directory.")
    index = _read_json(model_dir / "model_index.json")
    if index.get("_class_name") != "AceStepPipeline":
        raise CheckpointError(
            f"{model_dir} holds a {index.get('_class_name')!r} pipeline, not AceStepPipeline.",
            "export an ACE-Step 1.5 checkpoint in diffusers format.",
        )
    for sub, fname in REQUIRED.items():
        if not (model_dir / sub / fname).is_file():
            raise CheckpointError(
                f"{model_dir} has no {sub}/{fname}.", "re-save the pipeline with AceStepPipeline.save_pretrained."
            )
    text = _read_json(model_dir / "text_encoder" / "config.json")
    dit = _read_json(model_dir / "transformer" / "config.json")
    cond = _read_json(model_dir / "condition_encoder" / "config.json")
    vae = _read_json(model_dir / "vae" / "config.json")
    latent = int(dit.get("audio_acoustic_hidden_dim", 64))
    return ModelConfig(
        text_hidden=int(text["hidden_size"]),
        vocab_size=int(text["vocab_size"]),
        cond_hidden=int(cond.get("hidden_size", 2048)),
        dit_hidden=int(dit.get("hidden_size", 2048)),
        latent_channels=latent,
        context_channels=int(dit.get("in_channels", 192)) - latent,
        timbre_channels=int(cond.get("timbre_hidden_dim", 64)),
        patch_size=int(dit.get("patch_size", 2)),
        sliding_window=int(dit.get("sliding_window", 128)),
        sample_rate=int(vae.get("sampling_rate", 48000)),
        hop_length=int(math.prod(vae.get("downsampling_ratios", [2, 4, 4, 6, 10]))),
        audio_channels=int(vae.get("audio_channels", 2)),
        is_turbo=bool(dit.get("is_turbo", False) or dit.get("model_version") == "turbo"),
        silence_frames=15000,
    )


def memory_geometry(model_dir: str | Path) -> dict:
    """The sizes the runtime's peak-memory estimate needs (runtime/limits.py), from the component configs.

    ``ModelConfig`` holds what the graphs' interfaces need; attention heads and VAE widths only matter for
    how much memory a request takes, so they live in the manifest's ``geometry`` record.
    """
    model_dir = Path(model_dir)
    dit = _read_json(model_dir / "transformer" / "config.json")
    vae = _read_json(model_dir / "vae" / "config.json")
    return {
        "dit_heads": int(dit.get("num_attention_heads", 16)),
        "dit_layers": int(dit.get("num_hidden_layers", 24)),
        "dit_intermediate": int(dit.get("intermediate_size", 6144)),
        "vae_decoder_channels": int(vae.get("decoder_channels", 128)),
        "vae_encoder_channels": int(vae.get("encoder_hidden_size", 128)),
        "vae_channel_multiples": [int(m) for m in vae.get("channel_multiples", [1, 2, 4, 8, 16])],
        "vae_downsampling_ratios": [int(r) for r in vae.get("downsampling_ratios", [2, 4, 4, 6, 10])],
    }


AUDIO_TOKENIZER_DIRS = ("audio_tokenizer", "audio_token_detokenizer")  # AceStepPipeline._optional_components


def inspect_audio_tokenizer(model_dir: str | Path) -> AudioTokenizerConfig | None:
    """The optional audio tokenizer pair's geometry, or None when the checkpoint has not both of them."""
    model_dir = Path(model_dir)
    if not all((model_dir / sub / "config.json").is_file() for sub in AUDIO_TOKENIZER_DIRS):
        return None
    tok = _read_json(model_dir / "audio_tokenizer" / "config.json")
    detok = _read_json(model_dir / "audio_token_detokenizer" / "config.json")
    pool = int(tok.get("pool_window_size", 5))
    if int(detok.get("pool_window_size", 5)) != pool or int(tok.get("fsq_dim", 2048)) != int(detok["hidden_size"]):
        raise CheckpointError(
            f"{model_dir}: audio_tokenizer and audio_token_detokenizer do not fit together (pool window or width).",
            "re-save the pipeline with a matching tokenizer/detokenizer pair.",
        )
    return AudioTokenizerConfig(
        hidden=int(detok.get("hidden_size", 2048)),
        pool_window=pool,
        levels=tuple(int(v) for v in (tok.get("fsq_input_levels") or [8, 8, 8, 5, 5, 5])),
        num_quantizers=int(tok.get("fsq_input_num_quantizers", 1)),
    )


def scheduler_config(model_dir: str | Path) -> dict:
    """The checkpoint's scheduler config (the runtime mirrors shift and num_train_timesteps)."""
    return _read_json(Path(model_dir) / "scheduler" / "scheduler_config.json")


def load_component(model_dir: str | Path, name: str):
    """Load one network in float32, eval mode. ``name`` is a pipeline component name."""
    import torch

    _quiet_libraries()
    model_dir = Path(model_dir)
    sub = model_dir / name
    try:
        if name == "text_encoder":
            from transformers import AutoModel

            module = AutoModel.from_pretrained(sub, dtype=torch.float32)
        elif name == "transformer":
            from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel

            module = AceStepTransformer1DModel.from_pretrained(sub, torch_dtype=torch.float32)
        elif name == "condition_encoder":
            from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder

            module = AceStepConditionEncoder.from_pretrained(sub, torch_dtype=torch.float32)
        elif name == "audio_tokenizer":
            from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenizer

            module = AceStepAudioTokenizer.from_pretrained(sub, torch_dtype=torch.float32)
        elif name == "audio_token_detokenizer":
            from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenDetokenizer

            module = AceStepAudioTokenDetokenizer.from_pretrained(sub, torch_dtype=torch.float32)
        elif name == "vae":
            from diffusers import AutoencoderOobleck

            module = AutoencoderOobleck.from_pretrained(sub, torch_dtype=torch.float32)
        else:  # pragma: no cover - programming error
            raise KeyError(name)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"could not load {name} from {sub}: {str(exc).splitlines()[0]}",
            "check that the checkpoint's weights are complete (re-download or re-save it).",
        ) from None
    return module.eval()


def _quiet_libraries() -> None:
    """diffusers and transformers set their own log levels and progress bars; keep the CLI output ours."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
