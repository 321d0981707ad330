"""The six tasks of ``AceStepPipeline`` (diffusers 0.42.1, pipeline_ace_step.py) as data and small functions.

What a task changes is four things, each computed here and fed to the same denoising loop:

- the instruction in the prompt template (``TASK_INSTRUCTIONS``, ``_get_task_instruction``);
- the source latents in the DiT context (silence, the VAE-encoded ``src_audio``, its audio-tokenizer
  round trip for ``cover``, or latents decoded from ``audio_codes``; ``prepare_src_latents``);
- the chunk mask next to them (1 = generate, 0 = keep the source; ``_build_chunk_mask``);
- an extra condition: ``audio_cover_strength < 1`` on ``cover`` encodes a second condition with the
  text2music instruction and blends the two velocities every step.

``reference_audio`` replaces the silence latent as the timbre reference (``prepare_reference_audio_latents``).

Posterior sampling: diffusers draws ``latent_dist.sample()`` from torch's global generator, which no seed of the
call reaches. Here the VAE posterior is ``mean + std * noise`` with ``noise`` drawn by NumPy's PCG64 from
``SeedSequence([seed, stream])``, ``stream`` 1 for ``src_audio`` and 2 for ``reference_audio``, where ``seed`` is
the call's (first) seed, or fresh entropy when the call has none. ``posterior="mode"`` takes the mean instead
(the way to compare with diffusers: replace its ``sample`` with ``mode``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np

from . import limits as lim
from .errors import ArtifactError, InputError
from .prompt import TEXT2MUSIC_INSTRUCTION
from .specs import AUDIO_DETOKENIZER, AUDIO_TOKENIZER, VAE_ENCODER, AudioTokenizerConfig

log = logging.getLogger(__name__)

TASK_TYPES = ("text2music", "repaint", "cover", "extract", "lego", "complete")
TASK_INSTRUCTIONS = {  # diffusers' TASK_INSTRUCTIONS (from the ACE-Step constants)
    "text2music": TEXT2MUSIC_INSTRUCTION,
    "repaint": "Repaint the mask area based on the given conditions:",
    "cover": "Generate audio semantic tokens based on the given conditions:",
    "extract": "Extract the {TRACK_NAME} track from the audio:",
    "extract_default": "Extract the track from the audio:",
    "lego": "Generate the {TRACK_NAME} track based on the audio context:",
    "lego_default": "Generate the track based on the audio context:",
    "complete": "Complete the input track with {TRACK_CLASSES}:",
    "complete_default": "Complete the input track:",
}
MASKED_TASKS = ("repaint", "lego")  # a repaint window in the chunk mask when there is source audio
SOURCE_STREAM, REFERENCE_STREAM = 1, 2  # SeedSequence([seed, stream]) of the posterior noise
POSTERIORS = ("sample", "mode")
REFERENCE_SECONDS, SEGMENT_SECONDS = 30, 10
_CODE = re.compile(r"<\|audio_code_(\d+)\|>")
_REEXPORT_WITH_TOKENIZER = (
    "export a checkpoint that includes audio_tokenizer/ and audio_token_detokenizer/ "
    "(`acestep-trt export MODEL_DIR ARTIFACTS_DIR --overwrite`), or use a task that does not need them."
)


# ------------------------------------------------------------------------------------------ arguments


def check_task_type(task_type) -> str:
    if task_type not in TASK_TYPES:
        raise InputError(f"unknown task_type {task_type!r}.", f"use one of {', '.join(TASK_TYPES)}.")
    return task_type


def task_instruction(task_type: str, track_name: str | None = None, complete_track_classes=None) -> str:
    """Mirrors ``AceStepPipeline._get_task_instruction``: track names and classes upper-cased."""
    if task_type in ("extract", "lego"):
        if track_name:
            return TASK_INSTRUCTIONS[task_type].format(TRACK_NAME=track_name.upper())
        return TASK_INSTRUCTIONS[f"{task_type}_default"]
    if task_type == "complete":
        if complete_track_classes:
            classes = " | ".join(t.upper() for t in complete_track_classes)
            return TASK_INSTRUCTIONS["complete"].format(TRACK_CLASSES=classes)
        return TASK_INSTRUCTIONS["complete_default"]
    return TASK_INSTRUCTIONS.get(task_type, TEXT2MUSIC_INSTRUCTION)


def check_audio(name: str, audio, channels: int, sample_rate: int, limits: lim.Limits = lim.DEFAULT_LIMITS) -> np.ndarray:
    """A ``[channels, samples]`` float array at the model rate -> float32 ``[channels, samples]``.

    Checked by :func:`acestep_trt.runtime.limits.check_audio` (layout, channels, length limit, finite);
    mono (``[1, samples]``) is then duplicated to every channel of the model.
    """
    arr = lim.check_audio(audio, name, sample_rate, limits)
    if arr.shape[0] > channels:
        raise InputError(f"`{name}` has {arr.shape[0]} channels; the model takes at most {channels}.",
                         "mix the audio down to stereo or mono first.")
    if arr.shape[0] < channels:
        arr = np.repeat(arr[:1], channels, axis=0)  # mono -> every channel
    return np.ascontiguousarray(arr)


def check_repaint(task_type: str, start, end) -> None:
    """Mirrors ``check_inputs``: repaint needs start < end unless end is -1/None (to the end of the clip)."""
    for value, name in ((start, "repainting_start"), (end, "repainting_end")):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise InputError(f"`{name}` must be a finite number of seconds or None, got {value!r}.",
                             f"pass {name} in seconds (repainting_end=-1 or None: to the end).")
    if task_type == "repaint" and start is not None and end is not None and end > 0 and start >= end:
        raise InputError(f"repaint needs repainting_start < repainting_end (got {start} / {end}).",
                         "choose a window with start < end, or repainting_end=-1 to repaint to the end.")


def check_cover_strength(strength) -> float:
    if not (isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0.0 <= strength <= 1.0):
        raise InputError(f"`audio_cover_strength` must be in [0, 1], got {strength!r}.",
                         "pass 1.0 for a full cover, lower values for more of the prompt's style.")
    return float(strength)


def check_posterior(posterior) -> str:
    if posterior not in POSTERIORS:
        raise InputError(f"`posterior` must be one of {POSTERIORS}, got {posterior!r}.",
                         "use 'sample' (as diffusers) or 'mode' (the posterior mean).")
    return posterior


# ------------------------------------------------------------------------------------------ audio codes


def has_audio_codes(audio_codes) -> bool:
    """Mirrors the pipeline's check: a non-blank string or a list holding one."""
    if audio_codes is None:
        return False
    if isinstance(audio_codes, str):
        return bool(audio_codes.strip())
    if isinstance(audio_codes, (list, tuple)) and all(isinstance(c, str) for c in audio_codes):
        return any(c.strip() for c in audio_codes)
    raise InputError("`audio_codes` must be a string or a list of strings.",
                     "pass codes like '<|audio_code_12|><|audio_code_7|>' (one string per prompt, or one for all).")


def normalize_audio_codes(audio_codes, batch: int) -> list[str]:
    """Mirrors ``_normalize_audio_codes``: one string per item, the last repeated to fill the batch."""
    if isinstance(audio_codes, str):
        return [audio_codes] * batch
    codes = list(audio_codes[:batch])
    while len(codes) < batch:
        codes.append(codes[-1] if codes else "")
    return codes


def parse_audio_codes(text: str, codebook_size: int) -> list[int]:
    """Mirrors ``_parse_audio_code_string``: every ``<|audio_code_N|>``, clamped to the codebook."""
    return [max(0, min(int(v), codebook_size - 1)) for v in _CODE.findall(text or "")]


def format_audio_codes(indices) -> str:
    """Code indices [N] -> ``<|audio_code_N|>...``, the form in which codes travel between songs and tools."""
    return "".join(f"<|audio_code_{int(i)}|>" for i in indices)


def code_indices(audio_codes, batch: int, tok: AudioTokenizerConfig) -> np.ndarray:
    """Code strings -> indices [B, L, num_quantizers] int64 (zero-padded to the longest; first quantizer only)."""
    parsed = [parse_audio_codes(c, tok.codebook_size) for c in normalize_audio_codes(audio_codes, batch)]
    length = max((len(p) for p in parsed), default=0)
    if length == 0:
        raise InputError("`audio_codes` did not contain any `<|audio_code_N|>` tokens.",
                         "pass codes written by `acestep-trt encode-codes` (tokens like <|audio_code_123|>).")
    indices = np.zeros((batch, length, tok.num_quantizers), np.int64)
    for b, ids in enumerate(parsed):
        indices[b, :len(ids), 0] = ids
    return indices


def fsq_lookup(indices: np.ndarray, tok: AudioTokenizerConfig, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Mirrors ``_AceStepResidualFSQ.get_output_from_indices`` in float32: indices [B, L, Q] -> states [B, L, H]."""
    levels = np.asarray(tok.levels, np.int64)
    basis = np.cumprod([1, *tok.levels[:-1]]).astype(np.int64)
    step = (np.float32(2.0) / (levels.astype(np.float32) - np.float32(1.0))).astype(np.float32)
    codes = np.zeros(indices.shape[:2] + (len(levels),), np.float32)
    for q in range(tok.num_quantizers):
        level_index = (indices[..., q, None] // basis) % levels
        code = level_index.astype(np.float32) * step - np.float32(1.0)
        codes = codes + code * (levels.astype(np.float32) ** np.float32(-q))
    return (codes @ weight.T.astype(np.float32) + bias.astype(np.float32)).astype(np.float32)


# ------------------------------------------------------------------------------------------ masks and lengths


def resolve_duration(audio_duration, src: np.ndarray | None, codes_frames: int | None, config) -> float:
    """diffusers' duration rules: a missing or non-positive duration comes from the codes, else the source
    audio; without either, None means 60 s (and anything else is checked by ``check_arguments``).
    A given duration stays in the prompt's metadata even when the source or codes set the length."""
    number = isinstance(audio_duration, (int, float)) and not isinstance(audio_duration, bool)
    if audio_duration is None or (number and audio_duration <= 0):
        if codes_frames:
            return codes_frames / config.latents_per_second
        if src is not None:
            return src.shape[-1] / config.sample_rate
    return 60.0 if audio_duration is None else audio_duration


def latent_frames(duration: float, src: np.ndarray | None, codes_frames: int | None, config) -> int:
    """Latent length: the codes' (count x pool window), else the source's (samples // hop), else the duration's."""
    if codes_frames:
        return codes_frames
    if src is not None:
        return src.shape[-1] // config.hop_length
    return config.latent_length(duration)


def repaint_window(start, end, frames: int, latents_per_second: float) -> tuple[int, int]:
    """Mirrors ``_build_chunk_mask``: seconds -> [start, end) latent frames, clamped to the clip, never empty."""
    first = int((start or 0.0) * latents_per_second)
    last = int(end * latents_per_second) if end is not None and end > 0 else frames
    first = max(0, min(first, frames - 1))
    return first, max(first + 1, min(last, frames))


def chunk_mask(task_type: str, frames: int, batch: int, channels: int, start, end, latents_per_second: float,
               has_src: bool) -> np.ndarray:
    """[B, T, channels] float32: 1 inside the repaint window (generate), 0 outside (keep the source);
    ones everywhere unless the task is repaint or lego with source audio."""
    mask = np.ones((batch, frames, channels), np.float32)
    if task_type in MASKED_TASKS and has_src:
        first, last = repaint_window(start, end, frames, latents_per_second)
        mask[:] = 0.0
        mask[:, first:last, :] = 1.0
    return mask


def reference_clip(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mirrors ``prepare_reference_audio_latents``' audio side: repeat to at least 30 s, then the front,
    middle and back 10 s. [C, S] -> [C, <= 30 s] (exactly 30 s whenever the repeated clip is that long)."""
    target = REFERENCE_SECONDS * sample_rate
    if audio.shape[-1] < target:
        audio = np.tile(audio, (1, math.ceil(target / audio.shape[-1])))
    segment, total = SEGMENT_SECONDS * sample_rate, audio.shape[-1]
    middle, back = total // 3, max(total - segment, 0)
    return np.ascontiguousarray(np.concatenate(
        [audio[:, :segment], audio[:, middle:middle + segment], audio[:, back:back + segment]], axis=-1))


def encoded_samples(task: "TaskInputs", sample_rate: int) -> int:
    """Samples of the longest clip a call VAE-encodes: the source, or the (at most 30 s) reference clip; 0 for none.

    (The memory check sizes the VAE encoder's windows from it before any work.)"""
    lengths = [0]
    if task.src is not None:
        lengths.append(task.src.shape[-1])
    if task.reference is not None:
        lengths.append(REFERENCE_SECONDS * sample_rate)  # reference_clip: always 30 s
    return max(lengths)


def posterior_noise(seed: int | None, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise for a posterior sample; see the module docstring for the stream."""
    entropy = [int(seed), stream] if seed is not None else None
    return np.random.default_rng(np.random.SeedSequence(entropy)).standard_normal(shape, dtype=np.float32)


# ------------------------------------------------------------------------------------------ plans


@dataclass
class TaskInputs:
    """A call's task arguments, checked and resolved before any graph runs."""

    task_type: str
    instruction: str
    src: np.ndarray | None  # [2, S] float32
    reference: np.ndarray | None  # [2, S] float32
    codes: np.ndarray | None  # [B, L, Q] int64 code indices
    audio_duration: float
    frames: int
    start: float | None
    end: float | None
    cover_strength: float
    posterior: str

    @property
    def blend(self) -> bool:
        """Two conditions per step: cover with audio_cover_strength < 1."""
        return self.task_type == "cover" and self.cover_strength < 1.0


def audio_graphs(task: TaskInputs) -> tuple[str, ...]:
    """The audio-side graphs ``task`` runs (those a runtime opens at their first use): the VAE encoder for
    source or reference audio, and of the audio tokenizer graphs the detokenizer for audio codes, both for a
    cover of source audio (:func:`source_latents`)."""
    encoder = (VAE_ENCODER,) if task.src is not None or task.reference is not None else ()
    if task.codes is not None:
        return encoder + (AUDIO_DETOKENIZER,)
    if task.src is not None and task.task_type == "cover":
        return encoder + (AUDIO_TOKENIZER, AUDIO_DETOKENIZER)
    return encoder


def require_graphs(artifacts, names: tuple[str, ...], why: str) -> None:
    """Refuse a task whose graphs this artifact directory lacks, naming them."""
    missing = [n for n in names if not artifacts.has_graph(n)]
    if missing:
        remedy = (_REEXPORT_WITH_TOKENIZER if AUDIO_TOKENIZER in missing or AUDIO_DETOKENIZER in missing
                  else "re-run `acestep-trt export MODEL_DIR ARTIFACTS_DIR --overwrite` with this toolkit version.")
        raise ArtifactError(f"{why} needs the {', '.join(missing)} graph(s), which {artifacts.root} does not have.",
                            remedy)


def resolve_task(artifacts, batch: int, task_type="text2music", instruction=None, track_name=None,
                 complete_track_classes=None, src_audio=None, reference_audio=None, audio_codes=None,
                 repainting_start=None, repainting_end=None, audio_cover_strength=1.0, audio_duration=None,
                 posterior="sample", limits: lim.Limits = lim.DEFAULT_LIMITS) -> TaskInputs:
    """Check every task argument and work out the task, instruction, duration and latent length."""
    config = artifacts.config
    task_type = check_task_type(task_type)
    strength = check_cover_strength(audio_cover_strength)
    check_posterior(posterior)
    channels = config.audio_channels
    rate = config.sample_rate
    src = check_audio("src_audio", src_audio, channels, rate, limits) if src_audio is not None else None
    ref = check_audio("reference_audio", reference_audio, channels, rate, limits) if reference_audio is not None else None
    if src is not None and src.shape[-1] < config.hop_length:  # diffusers would build a 0-frame context
        raise InputError(f"`src_audio` has {src.shape[-1]} samples, fewer than one latent frame "
                         f"({config.hop_length}).",
                         f"pass at least {config.hop_length / config.sample_rate * 1000:g} ms of source audio.")
    if src is not None or ref is not None:
        require_graphs(artifacts, (VAE_ENCODER,), "source or reference audio")
    codes = None
    if has_audio_codes(audio_codes):
        require_graphs(artifacts, (AUDIO_DETOKENIZER,), "audio_codes")
        codes = code_indices(audio_codes, batch, artifacts.audio_tokenizer)
        task_type = "cover" if task_type == "text2music" else task_type  # as the pipeline
    if task_type == "cover" and src is not None and codes is None:
        require_graphs(artifacts, (AUDIO_TOKENIZER, AUDIO_DETOKENIZER), "cover with src_audio")
    check_repaint(task_type, repainting_start, repainting_end)
    if task_type != "text2music" and src is None and codes is None:
        log.warning("task_type %r without src_audio or audio_codes runs on the silence latent (as diffusers)",
                    task_type)
    codes_frames = codes.shape[1] * artifacts.audio_tokenizer.pool_window if codes is not None else None
    duration = resolve_duration(audio_duration, src, codes_frames, config)
    valid = isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0
    frames = latent_frames(duration, src, codes_frames, config) if valid else 0  # else check_arguments refuses
    if instruction is None:
        instruction = task_instruction(task_type, track_name, complete_track_classes)
    return TaskInputs(task_type, instruction, src, ref, codes, duration, frames, repainting_start, repainting_end,
                      strength, posterior)


def source_latents(rt, task: TaskInputs, batch: int, seed: int | None) -> np.ndarray:
    """Mirrors ``prepare_src_latents`` plus the repaint substitution: the DiT context's source half [B, T, 64]."""
    if task.codes is not None:
        tok = rt.artifacts.audio_tokenizer
        states = fsq_lookup(task.codes, tok, rt.constants["fsq_project_out_weight"],
                            rt.constants["fsq_project_out_bias"])
        return rt.runners[AUDIO_DETOKENIZER].run({"quantized": states})["latents"]
    if task.src is None:
        return rt.silence_latents(task.frames, batch)
    latents = rt.encode_audio(task.src[None], task.posterior, seed, SOURCE_STREAM)  # [1, T, 64]
    if task.task_type == "cover":
        latents = cover_round_trip(rt, latents)
    latents = np.ascontiguousarray(np.broadcast_to(latents, (batch,) + latents.shape[1:]))
    if task.task_type == "repaint":
        mask = chunk_mask(task.task_type, task.frames, batch, 1, task.start, task.end,
                          rt.config.latents_per_second, True)
        latents = np.where(mask > 0.5, rt.silence_latents(task.frames, batch), latents).astype(np.float32)
    return latents


def cover_round_trip(rt, latents: np.ndarray) -> np.ndarray:
    """Mirrors ``AceStepAudioTokenizer.tokenize`` (silence padding to the pool window) + detokenizer, cropped.

    latents [B, T, 64] -> [B, T, 64].
    """
    quantized = tokenize(rt, latents)["quantized"]
    latents_out = rt.runners[AUDIO_DETOKENIZER].run({"quantized": quantized})["latents"]
    return np.ascontiguousarray(latents_out[:, :latents.shape[1]])


def tokenize(rt, latents: np.ndarray) -> dict[str, np.ndarray]:
    """Mirrors ``AceStepAudioTokenizer.tokenize``: pad [B, T, 64] with the silence latent to a whole number of
    pool windows, cut into patches, run the tokenizer -> {"quantized" [B, P, H], "indices" [B, P, Q]}."""
    batch, frames, channels = latents.shape
    pool = rt.artifacts.audio_tokenizer.pool_window
    pad = (-frames) % pool
    if pad:
        silence = np.broadcast_to(rt.constants["silence_latent"][:, :pad, :], (batch, pad, channels))
        latents = np.concatenate([latents, silence], axis=1)
    patches = np.ascontiguousarray(latents.reshape(batch, -1, pool, channels), dtype=np.float32)
    return rt.runners[AUDIO_TOKENIZER].run({"latent_patches": patches})


def encode_codes(rt, audio: np.ndarray, posterior: str = "mode", seed: int | None = None) -> str:
    """Source audio [2, S] -> its 5 Hz code string: VAE encode, silence padding to the pool window, tokenizer,
    first quantizer's indices (what ``audio_codes`` reads back)."""
    require_graphs(rt.artifacts, (VAE_ENCODER, AUDIO_TOKENIZER), "encoding audio codes")
    audio = check_audio("audio", audio, rt.config.audio_channels, rt.config.sample_rate, rt.limits)
    latents = rt.encode_audio(audio[None], check_posterior(posterior), seed, SOURCE_STREAM)  # [1, T, 64]
    return format_audio_codes(tokenize(rt, latents)["indices"][0, :, 0])


def timbre_latents(rt, task: TaskInputs, batch: int, seed: int | None) -> np.ndarray | None:
    """The timbre reference [B, T_ref, 64] from ``reference_audio``, or None for the silence latent."""
    if task.reference is None:
        return None
    latents = rt.encode_audio(reference_clip(task.reference, rt.sample_rate)[None], task.posterior, seed,
                              REFERENCE_STREAM)
    return np.ascontiguousarray(np.broadcast_to(latents, (batch,) + latents.shape[1:]))


def describe(task: TaskInputs, config) -> str:
    """One line saying what the task did with its inputs (for the CLI's output line)."""
    parts = [task.task_type]
    if task.src is not None:
        parts.append(f"source {task.src.shape[-1] / config.sample_rate:.2f} s")
    if task.codes is not None:
        parts.append(f"{task.codes.shape[1]} audio codes")
    if task.task_type in MASKED_TASKS and task.src is not None:
        first, last = repaint_window(task.start, task.end, task.frames, config.latents_per_second)
        lps = config.latents_per_second
        parts.append(f"window {first / lps:.2f}-{last / lps:.2f} s")
    if task.blend:
        parts.append(f"cover strength {task.cover_strength:g}")
    if task.reference is not None:
        parts.append(f"reference {task.reference.shape[-1] / config.sample_rate:.2f} s")
    return ", ".join(parts)
