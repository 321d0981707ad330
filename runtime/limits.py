"""Request limits and a peak-memory estimate, checked before any work.

One place for what a request may ask, shared by the CLI (``generate``), the Python API
(:class:`~acestep_trt.runtime.AceStepRuntime`) and the Triton orchestrator (which runs the same runtime):

- duration: at most 600 s by default, the range the model was trained on (10 s to 10 min). A longer clip only
  with an explicit ``Limits(max_duration=...)`` / ``generate --max-duration``, which logs a warning;
- batch: at most 8 prompts per call (the official pipeline's limit);
- steps: at most 1000 (the scheduler's ``num_train_timesteps``; more steps only repeat timesteps);
- prompt and lyrics: tokenised and truncated to 256 and 2048 tokens as before (diffusers' defaults); the raw
  text is bounded too, so that a megabyte of text is refused instead of tokenised;
- audio inputs (source / reference audio of the audio-to-audio tasks): ``[channels, samples]`` at the VAE's
  rate, 1 or 2 channels, finite, at most ``max_audio_seconds`` long (:func:`check_audio`);
- memory: an estimate of the request's peak (DiT attention score buffers at the latent length, the VAE
  window, the batch, guidance doubling the DiT batch, the decoded audio) against the memory available on the
  host, and on the GPU when cuda-bindings can ask the driver. Refused with the remedy (shorter clip, smaller
  batch, smaller ``--vae-window``). ``Limits(check_memory=False)`` / ``--no-memory-check`` skips it.

Everything here raises :class:`InputError` (CLI exit code 2) with the remedy in the message.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

MAX_DURATION_S = 600.0  # the model covers 10 s to 10 min (DESIGN.md section 1)
MAX_BATCH = 8  # the official pipeline's batch limit
MAX_STEPS = 1000  # num_train_timesteps of the flow-matching scheduler
MAX_PROMPT_CHARS = 16_384  # ~4 KiB of tokens at worst; the text encoder sees 256 tokens of it
MAX_LYRICS_CHARS = 65_536  # the lyric encoder sees 2048 tokens of it
MAX_TOKEN_LENGTH = {"max_text_length": 4096, "max_lyric_length": 8192}  # the export's dynamic-axis bounds
MAX_META_CHARS = 256  # keyscale, timesignature, vocal_language
MAX_BPM = 1000
MAX_AUDIO_SECONDS = MAX_DURATION_S  # source / reference audio
AUDIO_CHANNELS = (1, 2)

_RAISE = ("generate a shorter clip, or raise the limit explicitly: `generate --max-duration SECONDS` "
          "(Python: AceStepRuntime.load(..., limits=Limits(max_duration=SECONDS)))")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Limits:
    """What one request may ask. The defaults are the model's range; raising ``max_duration`` logs a warning."""

    max_duration: float = MAX_DURATION_S
    max_batch: int = MAX_BATCH
    max_steps: int = MAX_STEPS
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    check_memory: bool = True

    def __post_init__(self):
        for name in ("max_duration", "max_audio_seconds"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise InputError(f"`{name}` must be a positive number of seconds, got {value!r}.",
                                 f"pass e.g. {name}=600.")
        for name in ("max_batch", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}.", f"pass {name} >= 1.")
        if self.max_duration > MAX_DURATION_S:
            log.warning("duration limit raised to %g s: the model was trained on clips of at most %g s, so longer "
                        "ones may lose structure, and memory grows with the square of the length",
                        self.max_duration, MAX_DURATION_S)


DEFAULT_LIMITS = Limits()


# ------------------------------------------------------------------------------------------ arguments


def check_duration(duration, limits: Limits = DEFAULT_LIMITS) -> None:
    """``duration`` (already known positive and finite) must not exceed ``limits.max_duration``."""
    if duration > limits.max_duration:
        raise InputError(f"audio_duration {duration:g} s is longer than the {limits.max_duration:g} s limit "
                         f"(the model covers 10 s to {MAX_DURATION_S / 60:g} min).", _RAISE + ".")


def check_steps(steps, limits: Limits = DEFAULT_LIMITS) -> None:
    if steps > limits.max_steps:
        raise InputError(f"num_inference_steps {steps} is more than {limits.max_steps} (the scheduler has "
                         f"{MAX_STEPS} training timesteps).", "use 8 steps for turbo, 27-60 for base checkpoints.")


def check_batch(batch: int, limits: Limits = DEFAULT_LIMITS) -> None:
    if batch > limits.max_batch:
        raise InputError(f"{batch} prompts in one call; at most {limits.max_batch} are allowed.",
                         f"split the prompts into calls of at most {limits.max_batch}.")


def _check_strings(values, name: str, max_chars: int, allow_none: bool = False) -> None:
    for value in values:
        if value is None and allow_none:
            continue
        if not isinstance(value, str):
            raise InputError(f"`{name}` must be a string, got {type(value).__name__}.", f"pass {name} as text.")
        if len(value) > max_chars:
            raise InputError(f"`{name}` has {len(value)} characters; at most {max_chars} are allowed.",
                             f"shorten {name} (the model reads only its first tokens).")
        if "\x00" in value:
            raise InputError(f"`{name}` contains a NUL character.", f"remove it from {name}.")


def check_texts(prompts, lyrics, languages, bpm=None, keyscale=None, timesignature=None,
                max_text_length=256, max_lyric_length=2048, instruction=None) -> None:
    """Types and sizes of the text inputs (lists already broadcast to the batch) and token lengths."""
    _check_strings(prompts, "prompt", MAX_PROMPT_CHARS)
    _check_strings(lyrics, "lyrics", MAX_LYRICS_CHARS)
    _check_strings(languages, "vocal_language", MAX_META_CHARS)
    _check_strings([keyscale], "keyscale", MAX_META_CHARS, allow_none=True)
    _check_strings([timesignature], "timesignature", MAX_META_CHARS, allow_none=True)
    _check_strings([instruction], "instruction", MAX_PROMPT_CHARS, allow_none=True)
    if bpm is not None and (not isinstance(bpm, (int, np.integer)) or isinstance(bpm, (bool, np.bool_))
                            or not 0 <= bpm <= MAX_BPM):
        raise InputError(f"`bpm` must be an integer from 0 to {MAX_BPM} (0: not stated), got {bpm!r}.",
                         "pass e.g. bpm=120, or leave it out.")
    for name, value in (("max_text_length", max_text_length), ("max_lyric_length", max_lyric_length)):
        if (not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_))
                or not 1 <= value <= MAX_TOKEN_LENGTH[name]):
            raise InputError(f"`{name}` must be an integer from 1 to {MAX_TOKEN_LENGTH[name]}, got {value!r}.",
                             f"use the default ({256 if name == 'max_text_length' else 2048}).")


def check_audio(array, name: str, sample_rate: int, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """An audio input (``src_audio``, ``reference_audio``) -> float32 ``[channels, samples]``, or InputError.

    Takes a float array ``[channels, samples]`` with 1 or 2 channels at ``sample_rate`` (the VAE's rate;
    diffusers takes the same layout), finite, non-empty and at most ``limits.max_audio_seconds`` long.
    Integer PCM is refused rather than guessed at (its scale is not [-1, 1]).
    """
    try:
        audio = np.asarray(array)
    except Exception:  # noqa: BLE001  ragged lists and the like
        audio = None
    if audio is None or audio.dtype.kind not in "fiu" or audio.ndim != 2:
        raise InputError(f"`{name}` must be a numeric array [channels, samples], got "
                         f"{getattr(audio, 'shape', type(array).__name__)}.",
                         f"pass {name} as a float array [2, samples] at {sample_rate} Hz (mono: [1, samples]).")
    if audio.dtype.kind != "f":
        raise InputError(f"`{name}` must be a float array (samples in [-1, 1]), got {audio.dtype}.",
                         "convert integer PCM first, e.g. soundfile.read(path, dtype='float32').")
    channels, samples = audio.shape
    if channels not in AUDIO_CHANNELS:
        hint = " (it looks like [samples, channels]: transpose it)" if samples in AUDIO_CHANNELS else ""
        raise InputError(f"`{name}` has {channels} channels{hint}; 1 or 2 are supported.",
                         f"pass {name} as [channels, samples] with mono or stereo audio.")
    if samples == 0:
        raise InputError(f"`{name}` is empty (0 samples).", f"pass at least one sample of {name}.")
    seconds = samples / sample_rate
    if seconds > limits.max_audio_seconds:
        raise InputError(f"`{name}` is {seconds:g} s long; at most {limits.max_audio_seconds:g} s are allowed.",
                         f"trim {name}, or raise Limits(max_audio_seconds=...).")
    audio = audio.astype(np.float32)
    if not np.all(np.isfinite(audio)):
        raise InputError(f"`{name}` contains NaN or Inf samples.", f"pass finite samples in [-1, 1] for {name}.")
    return audio


# --------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Geometry:
    """Sizes the estimate needs beyond :class:`ModelConfig` (the manifest's ``geometry`` record).

    Exports made before that record existed get the real checkpoint's values (an overestimate for smaller ones).
    """

    dit_heads: int = 16
    dit_layers: int = 24
    dit_intermediate: int = 6144
    vae_decoder_channels: int = 128
    vae_encoder_channels: int = 128  # encoder_hidden_size (exports before this field: the real value)
    vae_channel_multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    vae_downsampling_ratios: tuple[int, ...] = (2, 4, 4, 6, 10)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Geometry":
        data = manifest.get("geometry") or {}
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# Coefficients measured with scripts/memory_estimate.py and per-stage probes on the mid checkpoint (ONNX Runtime
# CPU, fp32; README "Limits and failure behaviour" has the table). The DiT holds about three score-sized buffers
# of one layer at a time (scores, masked scores, softmax). The VAE decoder holds about six activations of its
# largest full-rate level per window; ONNX Runtime's CPU arena and the allocator keep part of each further
# window's buffers, so the peak grows by about 1.6 level-sized buffers per window, up to about 5 windows (then
# the arena reuses its blocks: 12 windows measured the same as 6). Each graph keeps its own arena, so the
# stages add up instead of taking turns. The CPU's split VAE (runtime/backends/ort_snake.py) keeps about six
# level-sized buffers per window in flight plus its smaller levels' and the upsampling halves': seven here
# (measured 1.08x / 1.13x of the estimate with six at 10 s, batch 1 / 2).
# Decoded audio exists as the windowed output, its peak-normalised copy and the caller's copy.
DIT_SCORE_COPIES = 3.0
DIT_ACTIVATION_COPIES = 4.0
VAE_WINDOW_COPIES = 7.0
VAE_GROWTH_PER_WINDOW = 1.6
VAE_GROWTH_WINDOWS = 5
AUDIO_COPIES = 3.0
# The VAE encoder (source and reference audio of the audio-to-audio tasks) holds about ENCODER_WINDOW_COPIES
# activations of its largest full-rate level per window; its arena stays allocated through the later stages.
# The input audio exists as the caller's array, the checked float32 copy and the window being encoded.
ENCODER_WINDOW_COPIES = 6.0
ENCODER_GROWTH_PER_WINDOW = 1.6
SOURCE_COPIES = 2.0
BASE_BYTES = 64 << 20  # tokenizer, text and condition encoders, small host arrays
# Measured peaks were 0.69x to 1.05x of the estimate (tiny and mid checkpoints, 10 s to 240 s, batch 1 and 4):
# a request is refused when the estimate times this margin exceeds what is free.
SAFETY_MARGIN = 1.15
FLOAT_BYTES = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a request adds at its peak, per stage; ``host`` and ``device`` are what must be free."""

    dit: int
    vae: int
    audio: int
    on_device: bool = False
    detail: dict = field(default_factory=dict)
    encoder: int = 0  # VAE encoder of source / reference audio (0 for text2music)
    source: int = 0  # the input audio's host copies
    weights: int = 0  # graphs this call opens first (the audio tokenizer pair: backends/ort.py, DeferredGraph)

    @property
    def host(self) -> int:
        return (BASE_BYTES + self.audio + self.source + self.weights
                + (0 if self.on_device else self.dit + self.vae + self.encoder))

    @property
    def device(self) -> int:
        return self.dit + self.vae + self.encoder if self.on_device else 0


def vae_level_elements(geometry: Geometry, frames: int, latent_channels: int) -> int:
    """Channels x length of the Oobleck decoder's largest activation for ``frames`` latent frames (batch 1).

    Mirrors ``OobleckDecoder.__init__``: multiples ``[1] + channel_multiples``; conv1 widens to
    ``channels * multiples[-1]`` at the latent rate; block ``i`` upsamples by ``ratios[::-1][i]`` and narrows
    to ``channels * multiples[n - i - 1]``. Only a level's input and output (and its residual units' temporaries)
    are alive at once, so the peak follows the largest level, not their sum.
    """
    width = geometry.vae_decoder_channels
    multiples = [1] + list(geometry.vae_channel_multiples)
    ratios = list(geometry.vae_downsampling_ratios)[::-1]
    length, largest = frames, frames * max(latent_channels, width * multiples[-1])
    for i, ratio in enumerate(ratios):
        length *= ratio
        largest = max(largest, length * width * multiples[len(ratios) - i - 1])
    return largest


def vae_encoder_level_elements(geometry: Geometry, samples: int) -> int:
    """Channels x length of the Oobleck encoder's largest activation for ``samples`` of audio (batch 1).

    Mirrors ``OobleckEncoder.__init__``: conv1 widens to ``hidden`` at the audio rate; block ``i`` runs its
    residual units at ``hidden * multiples[i]`` and downsamples by ``ratios[i]`` to ``hidden * multiples[i + 1]``.
    """
    width = geometry.vae_encoder_channels
    multiples = [1] + list(geometry.vae_channel_multiples)
    length, largest = samples, 0
    for i, ratio in enumerate(geometry.vae_downsampling_ratios):
        largest = max(largest, length * width * multiples[i])
        length = -(-length // ratio)
        largest = max(largest, length * width * multiples[i + 1])
    return largest


def windows_in_flight(frames: int, vae_window: int, overlap: int, workers: int = 1) -> tuple[int, int]:
    """(latent frames decoded or encoded at once, number of windows) for a clip of ``frames``, windowed as
    :func:`acestep_trt.runtime.vae.window_cores` splits it: the whole clip when it is one window, else the
    ``workers`` windows in flight, each core with its overlaps."""
    from .vae import window_cores

    cores = window_cores(frames, vae_window, overlap, workers)
    if len(cores) == 1:
        return frames, 1
    return sum(min(frames, end - start + 2 * overlap) for start, end in cores[:max(1, workers)]), len(cores)


def encoder_memory(config, geometry: Geometry, samples: int, vae_window: int, overlap: int,
                   workers: int = 1) -> tuple[int, int, int]:
    """(encoder bytes, source bytes, windows) for VAE-encoding one clip of ``samples`` (batch 1), windowed as
    :func:`acestep_trt.runtime.vae.encode_windowed` does (:func:`~acestep_trt.runtime.vae.window_cores`):
    the audio of the windows in flight at once, each core with its overlaps."""
    if samples <= 0:
        return 0, 0, 0
    frames = samples // config.hop_length
    in_flight, windows = windows_in_flight(frames, vae_window, overlap, workers)
    window = samples if windows == 1 else config.hop_length * in_flight
    level = vae_encoder_level_elements(geometry, window) * FLOAT_BYTES
    encoder = int(level * (ENCODER_WINDOW_COPIES + ENCODER_GROWTH_PER_WINDOW * min(windows - 1, VAE_GROWTH_WINDOWS)))
    source = int(SOURCE_COPIES * config.audio_channels * samples * FLOAT_BYTES + config.audio_channels * window
                 * FLOAT_BYTES)
    return encoder, source, windows


def estimate_memory(config, geometry: Geometry, batch: int, frames: int, guided: bool, vae_window: int,
                    vae_overlap: int, cond_len: int, on_device: bool = False, vae_workers: int = 1,
                    encode_samples: int = 0, encoder_overlap: int = 0, encoder_workers: int = 1) -> MemoryEstimate:
    """Peak bytes of one call beyond the loaded weights.

    DiT (per step, one layer at a time): self-attention scores ``[B', H, L, L]`` with ``L = ceil(T / patch)``,
    cross-attention scores ``[B', H, L, cond_len]``, hidden and MLP activations ``[B', L, hidden + mlp]``;
    ``B'`` doubles with guidance (conditional and unconditional halves in one batch). VAE: windows of
    ``vae_window + 2 * overlap`` frames (or the whole clip when shorter; with ``vae_workers`` > 1 the windows
    decoded at once, each with its overlaps) at the decoder's largest level, plus the
    per-window growth measured for ONNX Runtime's arena. Audio: ``[B, channels, T * hop]`` float32.
    ``encode_samples``: the longest clip the VAE encoder sees (source, or the 30 s reference), 0 for none
    (:func:`encoder_memory`).
    """
    dit_batch = batch * (2 if guided else 1)
    tokens = -(-frames // config.patch_size)
    heads = geometry.dit_heads
    scores = dit_batch * heads * tokens * max(tokens, cond_len) * FLOAT_BYTES
    hidden = dit_batch * tokens * (config.dit_hidden + geometry.dit_intermediate) * FLOAT_BYTES
    dit = int(DIT_SCORE_COPIES * scores + DIT_ACTIVATION_COPIES * hidden)
    window, windows = windows_in_flight(frames, vae_window, vae_overlap, vae_workers)
    level = batch * vae_level_elements(geometry, window, config.latent_channels) * FLOAT_BYTES
    vae = int(level * (VAE_WINDOW_COPIES + VAE_GROWTH_PER_WINDOW * min(windows - 1, VAE_GROWTH_WINDOWS)))
    audio = int(AUDIO_COPIES * batch * config.audio_channels * frames * config.hop_length * FLOAT_BYTES)
    encoder, source, encoded_windows = encoder_memory(config, geometry, encode_samples, vae_window, encoder_overlap,
                                                      encoder_workers)
    detail = {"dit_batch": dit_batch, "tokens": tokens, "score_bytes": scores, "vae_window_frames": window,
              "vae_windows": windows, "encoder_windows": encoded_windows}
    return MemoryEstimate(dit, vae, audio, on_device, detail, encoder, source)


def available_host_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (what can be allocated without swapping), else free pages; None if unknown.

    A cgroup memory limit (containers) lower than that counts too.
    """
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return min(available, _cgroup_headroom() or available)


def _cgroup_headroom() -> int | None:
    """cgroup v2 ``memory.max - memory.current`` of this process's cgroup, or None without a limit."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            path = fh.readline().strip().split(":", 2)[-1]
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        with open(os.path.join(base, "memory.max"), encoding="ascii") as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current"), encoding="ascii") as fh:
            return max(int(limit) - int(fh.read().strip()), 0)
    except (OSError, ValueError, IndexError):
        return None


def available_device_bytes() -> int | None:
    """Free memory of the current CUDA device through cuda-bindings (``cudaMemGetInfo``), or None."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError:
            return None
    try:
        err, free, _total = cudart.cudaMemGetInfo()
    except Exception:  # noqa: BLE001  no driver, no device
        return None
    return int(free) if int(err) == 0 else None


def _gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


def check_memory(estimate: MemoryEstimate, batch: int, duration: float, vae_window: int) -> None:
    """Refuse a request whose estimated peak exceeds the free host (or device) memory."""
    remedies = []
    if batch > 1:
        remedies.append(f"fewer prompts per call (now {batch})")
    remedies.append(f"a shorter clip (now {duration:g} s)")
    if max(estimate.vae, estimate.encoder) > estimate.dit:
        remedies.append(f"a smaller --vae-window (now {vae_window} frames; Python: AceStepRuntime.load(vae_window=))")
    fix = "ask for " + ", or ".join(remedies) + "; Limits(check_memory=False) / --no-memory-check skips this check."
    host = available_host_bytes()
    if host is not None and estimate.host * SAFETY_MARGIN > host:
        raise InputError(f"this request needs about {_gib(estimate.host)} of memory at its peak (DiT "
                         f"{_gib(estimate.dit)}, VAE {_gib(estimate.vae + estimate.encoder)}, audio "
                         f"{_gib(estimate.audio + estimate.source)}), but only "
                         f"{_gib(host)} is available.", fix)
    if estimate.on_device:
        device = available_device_bytes()
        if device is not None and estimate.device * SAFETY_MARGIN > device:
            raise InputError(f"this request needs about {_gib(estimate.device)} of GPU memory at its peak, but "
                             f"only {_gib(device)} is free on the GPU.", fix)


def check_call(runtime, batch: int, duration: float, guided: bool, max_text_length: int = 256,
               max_lyric_length: int = 2048, encode_samples: int = 0, open_bytes: int = 0) -> MemoryEstimate | None:
    """What :class:`AceStepRuntime.__call__` checks before its first graph call, after the arguments
    (``check_arguments``: duration and steps limits; :func:`check_texts`): batch, duration and peak memory
    under ``runtime.limits``. Returns the memory estimate (None when ``check_memory`` is off).
    ``encode_samples``: the longest clip the call VAE-encodes (source or reference audio), 0 for none.
    ``open_bytes``: weights of graphs the call opens first (their sessions are created at first use; counted
    on the host, where ONNX Runtime reads them).

    An estimate no larger than one this runtime already passed is not checked again: ONNX Runtime's arena
    keeps that memory for reuse, so it no longer shows as available.
    """
    from .vae import window_overlap

    limits = getattr(runtime, "limits", None) or DEFAULT_LIMITS
    check_batch(batch, limits)
    check_duration(duration, limits)
    if not limits.check_memory:
        return None
    config = runtime.config
    frames = config.latent_length(duration)
    estimate = estimate_memory(
        config, Geometry.from_manifest(runtime.artifacts.manifest), batch, frames, guided, runtime.vae_window,
        window_overlap(runtime.artifacts.vae_receptive_field), max_text_length + max_lyric_length + 1,
        on_device=runtime.device == "cuda", vae_workers=getattr(runtime, "vae_workers", {}).get("vae_decoder", 1),
        encode_samples=encode_samples,
        encoder_overlap=window_overlap(getattr(runtime.artifacts, "vae_encoder_receptive_field", 0) or 0),
        encoder_workers=getattr(runtime, "vae_workers", {}).get("vae_encoder", 1))
    estimate = dataclasses.replace(estimate, weights=int(open_bytes))
    proven = getattr(runtime, "_memory_proven", None)
    if proven is not None and estimate.host <= proven.host and estimate.device <= proven.device:
        return estimate
    check_memory(estimate, batch, duration, runtime.vae_window)
    runtime._memory_proven = estimate
    return estimate
