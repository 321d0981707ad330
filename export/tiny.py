"""Tiny random-weight ACE-Step 1.5 checkpoints in the real diffusers layout.

Used by ``acestep-trt demo`` and by the tests: no weights can be downloaded here, so we build
``AceStepPipeline(...).save_pretrained(dir)`` from random modules whose shape-relevant values stay real
(patch 2, 192 DiT input channels, 64 latent channels, the 48 kHz hop-1920 VAE ratios, alternating
sliding-window / full attention with a window shorter than test sequences) and a byte-level BPE
tokenizer trained on the fly with ``tokenizers``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"

# Text the tiny tokenizer is trained on: the prompt template, metadata and a few scripts, so that
# prompts, metas and non-English lyrics tokenise into a realistic mix of merges and raw bytes.
_CORPUS = [
    "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n# Caption\n",
    "# Metas\n- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 30 seconds\n",
    "# Languages\nen\n\n# Lyric\n[verse]\nSoft notes in the morning light\n[chorus]\nMusic fills the air",
    "A beautiful piano piece with soft melodies, upbeat electronic dance track, lo-fi hip hop beat",
    "Epic rock guitar solo with drums and bass, ambient synth pad, jazz trio with saxophone",
    "春のうた 桜が咲いて 風が吹く 夜空に星が光る", "你好世界 音乐 让我们一起唱歌", "안녕하세요 노래",
    "Hola mundo, la música suena en la noche", "Bonjour tout le monde, chantons ensemble",
]


@dataclass
class TinyConfig:
    """Geometry of a tiny checkpoint. Defaults keep every graph fast on two CPU cores."""

    dit_hidden: int = 64
    dit_layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128
    sliding_window: int = 8
    encoder_hidden: int | None = None  # condition-encoder width; None = dit_hidden (XL: narrower)
    lyric_layers: int = 2
    timbre_layers: int = 2
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_head_dim: int | None = None  # None = text_hidden // text_heads
    text_intermediate: int | None = None  # None = 2 * text_hidden
    text_vocab: int | None = None  # embedding rows; None = the trained tokenizer's size
    vocab_size: int = 400
    vae_channels: int = 4
    vae_multiples: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 2])
    # The encoder's base width is its output width, posterior mean + scale: 2 x 64 latent channels, as real.
    vae_encoder_channels: int = 128
    audio_tokenizer: bool = True  # include the optional audio_tokenizer / audio_token_detokenizer pair
    tokenizer_layers: int = 2
    padding_side: str = "left"  # Qwen3-Embedding pads on the left
    is_turbo: bool = True
    seed: int = 0

    @classmethod
    def full_size(cls, **overrides) -> "TinyConfig":
        """The real turbo geometry (DiT 2048 x 24 layers, Qwen3-0.6B text encoder, 128-channel VAE)."""
        base = dict(dit_hidden=2048, dit_layers=24, heads=16, kv_heads=8, head_dim=128, intermediate=6144,
                    sliding_window=128, lyric_layers=8, timbre_layers=4, text_hidden=1024, text_layers=28,
                    text_heads=16, text_kv_heads=8, text_head_dim=128, text_intermediate=3072,
                    text_vocab=151669, vae_channels=128, vae_multiples=[1, 2, 4, 8, 16])
        return cls(**{**base, **overrides})

    @classmethod
    def mid_size(cls, **overrides) -> "TinyConfig":
        """A CPU-friendly middle: every network a few times smaller than full size, real window and VAE ratios."""
        base = dict(dit_hidden=512, dit_layers=8, heads=8, kv_heads=4, head_dim=64, intermediate=1536,
                    sliding_window=128, lyric_layers=2, timbre_layers=2, text_hidden=256, text_layers=4,
                    text_heads=4, text_kv_heads=2, text_head_dim=64, text_intermediate=768,
                    vae_channels=32, vae_multiples=[1, 2, 4, 8, 16])
        return cls(**{**base, **overrides})


def train_tokenizer(vocab_size: int, padding_side: str):
    """Train a byte-level BPE tokenizer with ``<|endoftext|>`` as pad/special token.

    Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        padding_side=padding_side,
        model_max_length=32768,
    )


def build_pipeline(cfg: TinyConfig | None = None):
    """Build a random-weight ``AceStepPipeline`` with ``cfg``'s geometry (float32, eval mode)."""
    import torch
    from diffusers import AceStepPipeline, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder
    from transformers import Qwen3Config, Qwen3Model

    cfg = cfg or TinyConfig()
    torch.manual_seed(cfg.seed)
    tokenizer = train_tokenizer(cfg.vocab_size, cfg.padding_side)
    enc_hidden = cfg.encoder_hidden or cfg.dit_hidden
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=cfg.text_vocab or len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_intermediate or cfg.text_hidden * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads,
            head_dim=cfg.text_head_dim or cfg.text_hidden // cfg.text_heads,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = AceStepTransformer1DModel(
        hidden_size=cfg.dit_hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.dit_layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        sliding_window=cfg.sliding_window,
        encoder_hidden_size=cfg.encoder_hidden,
        is_turbo=cfg.is_turbo,
        model_version="turbo" if cfg.is_turbo else "base",
    )
    condition_encoder = AceStepConditionEncoder(
        hidden_size=enc_hidden,
        intermediate_size=cfg.intermediate,
        text_hidden_dim=cfg.text_hidden,
        num_lyric_encoder_hidden_layers=cfg.lyric_layers,
        num_timbre_encoder_hidden_layers=cfg.timbre_layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        sliding_window=cfg.sliding_window,
    )
    with torch.no_grad():  # a real checkpoint ships VAE-encoded silence, never zeros
        condition_encoder.silence_latent.normal_(0.0, 0.5)
    vae = AutoencoderOobleck(
        encoder_hidden_size=cfg.vae_encoder_channels,
        downsampling_ratios=[2, 4, 4, 6, 10],
        channel_multiples=list(cfg.vae_multiples),
        decoder_channels=cfg.vae_channels,
        decoder_input_channels=64,
        audio_channels=2,
        sampling_rate=48000,
    )
    _randomize_snake(vae)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    audio_modules = _audio_tokenizer_pair(cfg, enc_hidden) if cfg.audio_tokenizer else {}
    pipe = AceStepPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        condition_encoder=condition_encoder,
        scheduler=scheduler,
        **audio_modules,
    )
    for module in (vae, text_encoder, transformer, condition_encoder, *audio_modules.values()):
        module.eval()
    return pipe


def _audio_tokenizer_pair(cfg: TinyConfig, hidden: int) -> dict:
    """The optional 5 Hz audio tokenizer and detokenizer (real pool window 5 and FSQ levels), as the
    pipeline registers them (``audio_tokenizer``, ``audio_token_detokenizer``)."""
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenDetokenizer, AceStepAudioTokenizer

    shared = dict(hidden_size=hidden, intermediate_size=cfg.intermediate, audio_acoustic_hidden_dim=64,
                  pool_window_size=5, num_attention_pooler_hidden_layers=cfg.tokenizer_layers,
                  num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                  sliding_window=cfg.sliding_window)
    return {"audio_tokenizer": AceStepAudioTokenizer(fsq_dim=hidden, **shared),
            "audio_token_detokenizer": AceStepAudioTokenDetokenizer(**shared)}


def _randomize_snake(vae) -> None:
    """Give Snake activations non-trivial alpha/beta (their zero init hides precision issues)."""
    import torch

    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith(".alpha") or name.endswith(".beta"):
                param.uniform_(-0.5, 0.5)


def save_tiny_checkpoint(out_dir: str | Path, cfg: TinyConfig | None = None) -> Path:
    """Write a random checkpoint (tiny by default) with ``save_pretrained`` and return its directory."""
    out_dir = Path(out_dir)
    pipe = build_pipeline(cfg)
    pipe.save_pretrained(out_dir)
    log.info("random checkpoint written to %s", out_dir)
    return out_dir
