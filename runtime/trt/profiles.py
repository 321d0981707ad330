"""Optimisation profiles as typed data, derived from the graph specs.

A graph spec names its symbolic dims (``batch``, ``text_len``, ``latent_len``...); a
:class:`ProfileRequest` says which durations, batch sizes and prompt lengths the engines must serve.
:func:`derive_profiles` turns both into one :class:`GraphProfile` per graph: a :class:`ShapeRange`
per symbolic dim and a :class:`TensorProfile` (min/opt/max shape) per input. The same objects check a
request at generate time, so a duration or batch outside the engines is a clear error, not a crash.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import InputError
from ..specs import (AUDIO_DETOKENIZER, AUDIO_TOKENIZER, CONDITION_ENCODER, COVER_BLEND, DIT_STEP, TEXT_ENCODER,
                     VAE_DECODER, VAE_ENCODER, GraphSpec, ModelConfig)
from ..vae import DEFAULT_VAE_WINDOW, window_overlap


@dataclass(frozen=True)
class ShapeRange:
    """One dimension's range in an optimisation profile: ``1 <= min <= opt <= max``."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise InputError(f"invalid shape range min={self.min} opt={self.opt} max={self.max}.",
                             "choose ranges with 1 <= min <= opt <= max.")

    @classmethod
    def fixed(cls, size: int) -> "ShapeRange":
        return cls(size, size, size)

    def __contains__(self, size: int) -> bool:
        return self.min <= size <= self.max

    def __str__(self) -> str:
        return f"{self.min}..{self.max} (opt {self.opt})" if self.min != self.max else f"{self.min}..{self.max}"


@dataclass(frozen=True)
class TensorProfile:
    """Min/opt/max shape of one engine input, one :class:`ShapeRange` per axis."""

    name: str
    dims: tuple[ShapeRange, ...]

    @property
    def min(self) -> tuple[int, ...]:
        return tuple(d.min for d in self.dims)

    @property
    def opt(self) -> tuple[int, ...]:
        return tuple(d.opt for d in self.dims)

    @property
    def max(self) -> tuple[int, ...]:
        return tuple(d.max for d in self.dims)

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "TensorProfile":
        return cls(name, tuple(ShapeRange(a, b, c) for a, b, c in zip(data["min"], data["opt"], data["max"])))


@dataclass(frozen=True)
class GraphProfile:
    """One engine's profile: symbolic dim ranges and the per-input shapes derived from them."""

    graph: str
    dims: dict[str, ShapeRange]
    inputs: dict[str, TensorProfile]

    def to_dict(self) -> dict:
        return {"dims": {k: asdict(v) for k, v in self.dims.items()},
                "inputs": {k: v.to_dict() for k, v in self.inputs.items()}}

    @classmethod
    def from_dict(cls, graph: str, data: dict) -> "GraphProfile":
        return cls(graph, {k: ShapeRange(**v) for k, v in data["dims"].items()},
                   {k: TensorProfile.from_dict(k, v) for k, v in data["inputs"].items()})

    def check(self, bound: dict[str, int], rebuild_hint, latents_per_second: float) -> None:
        """Check bound symbolic dims (``GraphSpec.check_feeds``' result) against the ranges.

        ``rebuild_hint(graph, dim, size) -> str`` gives the ``acestep-trt build`` arguments that would fit.
        Raises :class:`InputError` naming the dim, its range and the rebuild command.
        """
        for dim, size in bound.items():
            rng = self.dims.get(dim)
            if rng is None or size in rng:
                continue
            what = {"latent_len": f" ({size / latents_per_second:.2f} s of audio)",
                    "batch": " (prompts per call" + (", x2 for guidance on non-turbo models)"
                                                     if self.graph == DIT_STEP else ")")}.get(dim, "")
            raise InputError(
                f"{self.graph}: {dim} = {size}{what} is outside the TensorRT engine's profile range {rng}.",
                f"rebuild the engines for it: `acestep-trt build {rebuild_hint(self.graph, dim, size)}`, "
                "or use --backend ort.",
            )


@dataclass(frozen=True)
class ProfileRequest:
    """What the engines must serve: durations in seconds, batch (prompts per call), token lengths.

    Defaults cover the runtime's defaults: text truncated at 256 tokens, lyrics at 2048.
    """

    min_duration: float = 10.0
    opt_duration: float = 60.0
    max_duration: float = 240.0
    max_batch: int = 1
    opt_batch: int = 1
    max_text_len: int = 256
    opt_text_len: int = 128
    max_lyric_len: int = 2048
    opt_lyric_len: int = 512
    vae_window: int = DEFAULT_VAE_WINDOW

    def __post_init__(self):
        if not (0 < self.min_duration <= self.opt_duration <= self.max_duration):
            raise InputError(
                f"durations must satisfy 0 < min <= opt <= max, got {self.min_duration}, {self.opt_duration}, "
                f"{self.max_duration}.", "pass e.g. --min-duration 10 --opt-duration 60 --max-duration 240.")
        if not (1 <= self.opt_batch <= self.max_batch):
            raise InputError(f"batch sizes must satisfy 1 <= opt <= max, got {self.opt_batch}, {self.max_batch}.",
                             "pass --max-batch N with N >= 1.")
        for hi, what in ((self.max_text_len, "text"), (self.max_lyric_len, "lyric")):
            if hi < 1:
                raise InputError(f"maximum {what} length must be >= 1, got {hi}.", f"pass a positive {what} length.")
        if self.vae_window < 1:
            raise InputError(f"vae_window must be >= 1, got {self.vae_window}.", "pass --vae-window 256.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileRequest":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def cli_args(self) -> str:
        """The ``acestep-trt build`` options that reproduce this request."""
        return (f"--min-duration {self.min_duration:g} --opt-duration {self.opt_duration:g} "
                f"--max-duration {self.max_duration:g} --max-batch {self.max_batch}")


def _range(lo: int, opt: int, hi: int) -> ShapeRange:
    """A range with opt clamped into [lo, hi] (an opt above a small max is not an error)."""
    return ShapeRange(lo, min(max(opt, lo), hi), hi)


def dim_ranges(cfg: ModelConfig, req: ProfileRequest, receptive_field: int) -> dict[str, dict[str, ShapeRange]]:
    """Symbolic dim -> range, per graph. See the module docstring for the reasoning of each dim.

    - latent_len: ``ceil(seconds * 25)`` for the DiT; the VAE sees windows of ``vae_window + 2*overlap``
      frames at most (runtime/vae.py ``decode_windowed``; overlap = receptive field + 2 as pipeline.decode),
      and a last window as short as ``overlap + 1`` frames, so its range does not grow with the duration.
    - dit batch: doubled for non-turbo checkpoints (classifier-free guidance runs cond + uncond at once).
    - cond_len = lyric_len + 1 + text_len (the packed condition sequence).
    """
    frames = ShapeRange(cfg.latent_length(req.min_duration), cfg.latent_length(req.opt_duration),
                        cfg.latent_length(req.max_duration))
    overlap = window_overlap(receptive_field)
    window = req.vae_window + 2 * overlap
    vae_frames = _range(min(overlap + 1, frames.min), frames.opt, min(window, frames.max))
    batch = ShapeRange(1, req.opt_batch, req.max_batch)
    cfg_factor = 1 if cfg.is_turbo else 2
    dit_batch = ShapeRange(1, req.opt_batch * cfg_factor, req.max_batch * cfg_factor)
    text = _range(1, req.opt_text_len, req.max_text_len)
    lyric = _range(1, req.opt_lyric_len, req.max_lyric_len)
    cond = ShapeRange(lyric.min + 1 + text.min, lyric.opt + 1 + text.opt, lyric.max + 1 + text.max)
    timbre = ShapeRange.fixed(cfg.timbre_frames)
    return {
        TEXT_ENCODER: {"batch": batch, "text_len": text},
        CONDITION_ENCODER: {"batch": batch, "text_len": text, "lyric_len": lyric, "timbre_len": timbre},
        DIT_STEP: {"batch": dit_batch, "latent_len": frames, "cond_len": cond},
        VAE_DECODER: {"batch": batch, "latent_len": vae_frames},
    }


def graph_profile(spec: GraphSpec, dims: dict[str, ShapeRange]) -> GraphProfile:
    """One :class:`TensorProfile` per input of ``spec``: fixed dims as fixed ranges, symbolic from ``dims``."""
    inputs = {}
    for tensor in spec.inputs:
        axes = []
        for dim in tensor.dims:
            if isinstance(dim, int):
                axes.append(ShapeRange.fixed(dim))
            elif dim in dims:
                axes.append(dims[dim])
            else:
                raise InputError(f"{spec.name}.{tensor.name}: no profile range for dim {dim!r}.",
                                 "this is a bug in the profile derivation; report it.")
        inputs[tensor.name] = TensorProfile(tensor.name, tuple(axes))
    used = {d for t in spec.inputs for d in t.dims if isinstance(d, str)}
    return GraphProfile(spec.name, {k: v for k, v in dims.items() if k in used}, inputs)


def derive_profiles(specs: dict[str, GraphSpec], cfg: ModelConfig, req: ProfileRequest,
                    receptive_field: int) -> dict[str, GraphProfile]:
    """Graph name -> :class:`GraphProfile` for the four graphs."""
    ranges = dim_ranges(cfg, req, receptive_field)
    return {name: graph_profile(spec, ranges[name]) for name, spec in specs.items()}


def rebuild_args(artifacts_dir: str, req: ProfileRequest, cfg: ModelConfig, graph: str, dim: str, size: int,
                 out: str | None = None, pool_window: int | None = None) -> str:
    """``acestep-trt build`` arguments for ``req`` widened so that ``dim = size`` fits ``graph``.

    Audio graphs: ``patches`` (5 Hz codes) count as ``size * pool_window`` latent frames; the VAE encoder's
    ``audio_len`` is a window, set by ``--vae-window``.
    """
    changes: dict = {}
    lps = cfg.latents_per_second
    if dim == "patches" and pool_window:
        dim, size = "latent_len", size * pool_window
    if dim == "audio_len" and graph == VAE_ENCODER:
        changes["vae_window"] = max(req.vae_window, -(-size // cfg.hop_length))
    elif dim == "latent_len" and graph == VAE_DECODER:
        changes["vae_window"] = max(req.vae_window, size)
    elif dim == "latent_len":
        seconds = size / lps
        if seconds > req.max_duration:
            changes["max_duration"] = math.ceil(seconds)
        else:
            changes["min_duration"] = max(math.floor(seconds * 10) / 10, 0.1)
            changes["opt_duration"] = max(req.opt_duration, changes["min_duration"])
    elif dim == "batch":
        factor = 2 if (graph == DIT_STEP and not cfg.is_turbo) else 1
        changes["max_batch"] = max(req.max_batch, math.ceil(size / factor))
    elif dim in ("text_len", "cond_len"):
        changes["max_text_len"] = max(req.max_text_len, size)
    if dim in ("lyric_len", "cond_len"):
        changes["max_lyric_len"] = max(req.max_lyric_len, size)
    new = ProfileRequest(**{**req.to_dict(), **changes})
    args = [str(artifacts_dir), new.cli_args()]
    if new.max_text_len != 256:
        args.append(f"--max-text-len {new.max_text_len}")
    if new.max_lyric_len != 2048:
        args.append(f"--max-lyric-len {new.max_lyric_len}")
    if new.vae_window != DEFAULT_VAE_WINDOW:
        args.append(f"--vae-window {new.vae_window}")
    if out:
        args.append(f"--out {out}")
    return " ".join(args)


def audio_dim_ranges(cfg: ModelConfig, req: ProfileRequest, encoder_receptive_field: int,
                     pool_window: int | None) -> dict[str, dict[str, ShapeRange]]:
    """Symbolic dim -> range for the audio-to-audio graphs (runtime/tasks.py), derived from the duration profile.

    - vae_encoder: batch 1 (a source or reference clip is encoded once and broadcast); audio_len from one
      latent frame up to a window of ``vae_window + 2 * overlap`` frames plus the trailing partial frame
      (``encode_windowed``; a 30 s reference is windowed too), and no longer than the longest clip.
    - audio_tokenizer: batch 1 (cover tokenises the one source); patches = ceil(frames / pool window).
    - audio_detokenizer: the prompt batch (codes may differ per prompt); patches as the tokenizer's.
    - cover_blend: the prompt batch and the DiT's latent lengths.
    ``build`` derives the audio engines' profiles from these (:func:`derive_audio_profiles`).
    """
    frames = ShapeRange(cfg.latent_length(req.min_duration), cfg.latent_length(req.opt_duration),
                        cfg.latent_length(req.max_duration))
    window = req.vae_window + 2 * window_overlap(encoder_receptive_field)
    hop = cfg.hop_length
    reference = cfg.timbre_frames  # a reference is always 30 s
    longest = min(max(frames.max, reference), window)
    audio = _range(hop, min(frames.opt, window) * hop, longest * hop + hop - 1)
    batch = ShapeRange(1, req.opt_batch, req.max_batch)
    ranges = {"vae_encoder": {"batch": ShapeRange.fixed(1), "audio_len": audio},
              "cover_blend": {"batch": batch, "latent_len": frames}}
    if pool_window:
        patches = ShapeRange(1, -(-frames.opt // pool_window), -(-frames.max // pool_window))
        ranges["audio_tokenizer"] = {"batch": ShapeRange.fixed(1), "patches": patches}
        ranges["audio_detokenizer"] = {"batch": batch, "patches": patches}
    return ranges


def derive_audio_profiles(specs: dict[str, GraphSpec], cfg: ModelConfig, req: ProfileRequest,
                          encoder_receptive_field: int, pool_window: int | None) -> dict[str, GraphProfile]:
    """Graph name -> :class:`GraphProfile` for the audio-to-audio graphs in ``specs`` (the ones exported)."""
    ranges = audio_dim_ranges(cfg, req, encoder_receptive_field, pool_window)
    return {name: graph_profile(spec, ranges[name]) for name, spec in specs.items()}


def call_dims(graph: str, batch: int, dit_batch: int, frames: int, pool_window: int | None) -> dict[str, int]:
    """The symbolic dims a call binds on ``graph`` that are known before any work (checked against the engines'
    profiles first, so a call that does not fit fails before anything runs).

    ``batch``: prompts; ``dit_batch``: the DiT's batch per evaluation (x2 with guidance); ``frames``: latent frames.
    The VAE encoder and the tokenizer run on the one source clip (batch 1) in windows of the engine's VAE
    window, so nothing about them depends on the call; the detokenizer sees the prompt batch (codes) or 1.
    """
    patches = -(-frames // pool_window) if pool_window else None
    dims = {DIT_STEP: {"batch": dit_batch, "latent_len": frames},
            COVER_BLEND: {"batch": batch, "latent_len": frames},
            VAE_ENCODER: {},
            AUDIO_TOKENIZER: {"patches": patches} if patches else {},
            AUDIO_DETOKENIZER: {"batch": batch, **({"patches": patches} if patches else {})}}
    return dims.get(graph, {"batch": batch})
