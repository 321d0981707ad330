"""Graph contracts as data.

Each graph's tensor names, dtypes and (symbolic) dims are declared once here, from the model config.
The exporter derives ONNX input/output names and dynamic axes from them, the runtime checks its feeds
against them, and the manifest stores them so that engines and server configs can be derived from the
same source. Symbolic dims are strings (``"batch"``, ``"latent_len"``...), fixed dims are ints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError

# Names of the graphs: a public contract, keep them stable.
TEXT_ENCODER = "text_encoder"
CONDITION_ENCODER = "condition_encoder"
DIT_STEP = "dit_step"
VAE_DECODER = "vae_decoder"
GRAPH_NAMES = (TEXT_ENCODER, CONDITION_ENCODER, DIT_STEP, VAE_DECODER)
# Audio-to-audio graphs (runtime/tasks.py). Optional: an artifact directory lists the ones it has in its
# manifest; the audio tokenizer pair exists only when the checkpoint ships ``audio_tokenizer`` and
# ``audio_token_detokenizer``. ``cover_blend`` is a tiny graph for the device-resident cover-strength loop.
VAE_ENCODER = "vae_encoder"
AUDIO_TOKENIZER = "audio_tokenizer"
AUDIO_DETOKENIZER = "audio_detokenizer"
COVER_BLEND = "cover_blend"
AUDIO_GRAPH_NAMES = (VAE_ENCODER, AUDIO_TOKENIZER, AUDIO_DETOKENIZER, COVER_BLEND)

Dim = int | str


@dataclass(frozen=True)
class ModelConfig:
    """Everything the runtime needs to know about a checkpoint's geometry and behaviour."""

    text_hidden: int  # Qwen3 hidden size (1024 real)
    vocab_size: int
    cond_hidden: int  # condition encoder width (2048 real, also on XL)
    dit_hidden: int  # DiT width (2048 real, 2560 XL)
    latent_channels: int  # 64
    context_channels: int  # DiT in_channels - latent channels (128)
    timbre_channels: int  # timbre encoder input width (64)
    patch_size: int  # 2
    sliding_window: int  # 128
    sample_rate: int  # 48000
    hop_length: int  # 1920
    audio_channels: int  # 2
    is_turbo: bool
    silence_frames: int  # length of the shipped silence latent (15000)

    @property
    def latents_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def timbre_frames(self) -> int:
        """Silence-latent frames fed to the timbre encoder: ``ceil(30 * latents_per_second)`` (the pipeline's
        ``timbre_fix_frame``, 750 at 25 frames per second)."""
        return math.ceil(30 * self.latents_per_second)

    def latent_length(self, seconds: float) -> int:
        """Latent frames for a duration, as diffusers: ``ceil(seconds * latents_per_second)``."""
        return math.ceil(seconds * self.latents_per_second)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, NumPy dtype name and dims (int fixed, str symbolic)."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["dims"]))


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``max|a - b| <= atol + rtol * max|reference|``."""

    atol: float
    rtol: float

    def bound(self, ref_scale: float) -> float:
        return self.atol + self.rtol * ref_scale


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance
    doc: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "doc": self.doc,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "tolerance": asdict(self.tolerance),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            tolerance=Tolerance(**data["tolerance"]),
            doc=data.get("doc", ""),
        )

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes, ranks and dims of ``feeds``; return the bound symbolic dims."""
        missing = [t.name for t in self.inputs if t.name not in feeds]
        if missing:
            raise InputError(f"{self.name}: missing inputs {missing}.", "pass every input of the graph spec.")
        bound: dict[str, int] = {}
        for spec in self.inputs:
            arr = feeds[spec.name]
            if arr.dtype != np.dtype(spec.dtype):
                raise InputError(
                    f"{self.name}.{spec.name}: dtype {arr.dtype}, expected {spec.dtype}.",
                    f"cast the array to {spec.dtype}.",
                )
            if arr.ndim != len(spec.dims):
                raise InputError(
                    f"{self.name}.{spec.name}: shape {arr.shape}, expected rank {len(spec.dims)} {spec.dims}.",
                    "pass an array of the documented shape.",
                )
            for axis, (dim, size) in enumerate(zip(spec.dims, arr.shape)):
                expected = dim if isinstance(dim, int) else bound.setdefault(dim, size)
                if size != expected:
                    raise InputError(
                        f"{self.name}.{spec.name}: axis {axis} ({dim}) is {size}, expected {expected}.",
                        "make the shapes of related inputs agree.",
                    )
        return bound


FP32_TOL = Tolerance(atol=1e-4, rtol=1e-4)


def text_encoder_spec(cfg: ModelConfig) -> GraphSpec:
    """Qwen3 text encoder, called like diffusers: ids only, no attention mask."""
    return GraphSpec(
        name=TEXT_ENCODER,
        doc="input_ids [B, S] -> last hidden state [B, S, text_hidden]; no attention mask (as diffusers).",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "text_len")),),
        outputs=(TensorSpec("text_hidden_states", "float32", ("batch", "text_len", cfg.text_hidden)),),
        tolerance=FP32_TOL,
    )


def condition_encoder_spec(cfg: ModelConfig) -> GraphSpec:
    """Text projector + lyric encoder + timbre encoder + sequence packing (one reference per item)."""
    return GraphSpec(
        name=CONDITION_ENCODER,
        doc="text/lyric states + masks + timbre latents -> packed cross-attention states + mask; "
        "cond_len = lyric_len + 1 + text_len.",
        inputs=(
            TensorSpec("text_hidden_states", "float32", ("batch", "text_len", cfg.text_hidden)),
            TensorSpec("text_attention_mask", "bool", ("batch", "text_len")),
            TensorSpec("lyric_hidden_states", "float32", ("batch", "lyric_len", cfg.text_hidden)),
            TensorSpec("lyric_attention_mask", "bool", ("batch", "lyric_len")),
            TensorSpec("timbre_latents", "float32", ("batch", "timbre_len", cfg.timbre_channels)),
        ),
        outputs=(
            TensorSpec("encoder_hidden_states", "float32", ("batch", "cond_len", cfg.cond_hidden)),
            TensorSpec("encoder_attention_mask", "bool", ("batch", "cond_len")),
        ),
        tolerance=FP32_TOL,
    )


def dit_step_spec(cfg: ModelConfig) -> GraphSpec:
    """One DiT evaluation plus the Euler update, so a denoising loop can stay on the device.

    velocity = DiT(latents, t) with timestep_r = t (as diffusers); next_latents = latents + dt * velocity
    (``FlowMatchEulerDiscreteScheduler.step`` with dt = sigma_next - sigma).
    """
    return GraphSpec(
        name=DIT_STEP,
        doc="latents [B, T, 64], t [B], condition [B, C, cond_hidden], context [B, T, 128], dt [B] -> "
        "velocity [B, T, 64], next_latents = latents + dt * velocity [B, T, 64].",
        inputs=(
            TensorSpec("latents", "float32", ("batch", "latent_len", cfg.latent_channels)),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "cond_len", cfg.cond_hidden)),
            TensorSpec("context_latents", "float32", ("batch", "latent_len", cfg.context_channels)),
            TensorSpec("dt", "float32", ("batch",)),
        ),
        outputs=(
            TensorSpec("velocity", "float32", ("batch", "latent_len", cfg.latent_channels)),
            TensorSpec("next_latents", "float32", ("batch", "latent_len", cfg.latent_channels)),
        ),
        tolerance=FP32_TOL,
    )


def vae_decoder_spec(cfg: ModelConfig) -> GraphSpec:
    """Oobleck decoder: latents [B, 64, T] -> audio [B, 2, T * hop]."""
    return GraphSpec(
        name=VAE_DECODER,
        doc=f"latents [B, {cfg.latent_channels}, T] -> audio [B, {cfg.audio_channels}, T*{cfg.hop_length}].",
        inputs=(TensorSpec("latents", "float32", ("batch", cfg.latent_channels, "latent_len")),),
        outputs=(TensorSpec("audio", "float32", ("batch", cfg.audio_channels, "audio_len")),),
        tolerance=FP32_TOL,
    )


@dataclass(frozen=True)
class AudioTokenizerConfig:
    """Geometry of the optional 5 Hz audio tokenizer / detokenizer pair (manifest ``audio_tokenizer``)."""

    hidden: int  # tokenizer / detokenizer width (2048 real; also the FSQ ``dim``)
    pool_window: int  # 25 Hz latent frames per 5 Hz code (5)
    levels: tuple[int, ...]  # FSQ levels ([8, 8, 8, 5, 5, 5]: codebook 64000)
    num_quantizers: int  # residual FSQ depth (1)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def to_dict(self) -> dict:
        return {**asdict(self), "levels": list(self.levels)}

    @classmethod
    def from_dict(cls, data: dict) -> "AudioTokenizerConfig":
        return cls(int(data["hidden"]), int(data["pool_window"]), tuple(int(v) for v in data["levels"]),
                   int(data["num_quantizers"]))


def vae_encoder_spec(cfg: ModelConfig) -> GraphSpec:
    """Oobleck encoder + posterior parameters: audio [B, 2, S] -> mean, std [B, 64, floor(S / hop)].

    ``std = softplus(scale) + 1e-4`` as ``OobleckDiagonalGaussianDistribution``; the runtime samples
    ``mean + std * noise`` (or takes the mean for ``posterior="mode"``).
    """
    return GraphSpec(
        name=VAE_ENCODER,
        doc=f"audio [B, {cfg.audio_channels}, S] -> posterior mean, std [B, {cfg.latent_channels}, "
        f"floor(S/{cfg.hop_length})].",
        inputs=(TensorSpec("audio", "float32", ("batch", cfg.audio_channels, "audio_len")),),
        outputs=(
            TensorSpec("mean", "float32", ("batch", cfg.latent_channels, "latent_len")),
            TensorSpec("std", "float32", ("batch", cfg.latent_channels, "latent_len")),
        ),
        tolerance=FP32_TOL,
    )


def audio_tokenizer_spec(cfg: ModelConfig, tok: AudioTokenizerConfig) -> GraphSpec:
    """``AceStepAudioTokenizer.forward``: 25 Hz latents in pool-window patches -> quantized states + code indices.

    The silence padding to a whole number of patches (``tokenize``) is done by the runtime.
    """
    return GraphSpec(
        name=AUDIO_TOKENIZER,
        doc=f"latent patches [B, P, {tok.pool_window}, {cfg.latent_channels}] -> quantized [B, P, {tok.hidden}], "
        f"indices [B, P, {tok.num_quantizers}] (int64).",
        inputs=(TensorSpec("latent_patches", "float32", ("batch", "patches", tok.pool_window, cfg.latent_channels)),),
        outputs=(
            TensorSpec("quantized", "float32", ("batch", "patches", tok.hidden)),
            TensorSpec("indices", "int64", ("batch", "patches", tok.num_quantizers)),
        ),
        tolerance=FP32_TOL,
    )


def audio_detokenizer_spec(cfg: ModelConfig, tok: AudioTokenizerConfig) -> GraphSpec:
    """``AceStepAudioTokenDetokenizer.forward``: 5 Hz quantized states -> 25 Hz latents."""
    return GraphSpec(
        name=AUDIO_DETOKENIZER,
        doc=f"quantized [B, P, {tok.hidden}] -> latents [B, P*{tok.pool_window}, {cfg.latent_channels}].",
        inputs=(TensorSpec("quantized", "float32", ("batch", "patches", tok.hidden)),),
        outputs=(TensorSpec("latents", "float32", ("batch", "latent_len", cfg.latent_channels)),),
        tolerance=FP32_TOL,
    )


def cover_blend_spec(cfg: ModelConfig) -> GraphSpec:
    """Cover strength on the device: ``s * cover + (1 - s) * text2music`` of two ``dit_step`` next_latents.

    Both come from the same latents x (next = x + dt * v), so the blend is x + dt * (s * v_cover +
    (1 - s) * v_text2music): diffusers' blend of the velocities. The two conditions differ in length (their
    instructions tokenise differently) and the DiT does not mask cross-attention padding, so they cannot
    share one batch: two DiT evaluations per step, as diffusers.
    """
    latents = ("batch", "latent_len", cfg.latent_channels)
    return GraphSpec(
        name=COVER_BLEND,
        doc="cover_latents, text2music_latents [B, T, 64], strength [1] -> latents = s * cover + (1 - s) * text2music.",
        inputs=(
            TensorSpec("cover_latents", "float32", latents),
            TensorSpec("text2music_latents", "float32", latents),
            TensorSpec("strength", "float32", (1,)),
        ),
        outputs=(TensorSpec("latents", "float32", latents),),
        tolerance=FP32_TOL,
    )


def audio_specs(cfg: ModelConfig, tok: AudioTokenizerConfig | None) -> dict[str, GraphSpec]:
    """Specs of the audio-to-audio graphs; the tokenizer pair only when ``tok`` (the checkpoint has it)."""
    specs = {VAE_ENCODER: vae_encoder_spec(cfg), COVER_BLEND: cover_blend_spec(cfg)}
    if tok is not None:
        specs[AUDIO_TOKENIZER] = audio_tokenizer_spec(cfg, tok)
        specs[AUDIO_DETOKENIZER] = audio_detokenizer_spec(cfg, tok)
    return specs


SPEC_BUILDERS = {
    TEXT_ENCODER: text_encoder_spec,
    CONDITION_ENCODER: condition_encoder_spec,
    DIT_STEP: dit_step_spec,
    VAE_DECODER: vae_decoder_spec,
}


def all_specs(cfg: ModelConfig) -> dict[str, GraphSpec]:
    return {name: build(cfg) for name, build in SPEC_BUILDERS.items()}
