"""``AceStepRuntime``: text-to-music from an artifact directory, without PyTorch.

The call mirrors ``AceStepPipeline.__call__`` (same keyword names and meaning) for all six tasks:
format and tokenise, text encoder, lyric embedding lookup, condition encoder with the silence latent (or the
encoded ``reference_audio``) as timbre reference, flow-matching Euler loop over ``dit_step`` (APG guidance on
non-turbo checkpoints; two conditions blended for ``audio_cover_strength < 1``), windowed VAE decode, -1 dBFS
peak normalisation. What each task changes (instruction, source latents, chunk mask, extra condition) lives
in :mod:`acestep_trt.runtime.tasks`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import limits as lim
from . import scheduler as sched
from . import tasks as task_lib
from .artifacts import Artifacts, load_artifacts
from .backends import GraphRunner, resolve_backend
from .errors import InputError
from .failures import guard_call, guard_runners
from .lora import lora_scale
from .prompt import TEXT2MUSIC_INSTRUCTION, format_prompt
from .specs import (AUDIO_DETOKENIZER, AUDIO_TOKENIZER, COVER_BLEND, CONDITION_ENCODER, DIT_STEP, GRAPH_NAMES,
                    TEXT_ENCODER, VAE_DECODER, VAE_ENCODER)
from .tokenizer import TextTokenizer
from .trt.profiles import call_dims
from .vae import DEFAULT_VAE_WINDOW, cpu_workers, decode_windowed, encode_windowed, normalize_peak, window_overlap

log = logging.getLogger(__name__)


@dataclass
class AceStepOutput:
    """``audios`` [B, channels, samples] float32 (or latents [B, T, 64] for ``output_type="latent"``)."""

    audios: np.ndarray
    sample_rate: int
    seeds: list[int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    task: str = "text2music"  # what the task did with its inputs (runtime.tasks.describe)


def _as_list(value, batch: int, name: str) -> list:
    """Broadcast a str (or None) to ``batch`` items, or check a list's length."""
    if value is None or isinstance(value, str):
        return [value] * batch
    if isinstance(value, (list, tuple)) and len(value) == batch:
        return list(value)
    raise InputError(f"`{name}` must be a string or a list of {batch} strings.", f"pass one {name} per prompt.")


def _audio_seed(seed, seeds: list[int] | None) -> int | None:
    """The seed of the posterior noise: the call's (first) seed; None (fresh entropy) when it has none."""
    if seeds:
        return seeds[0]
    if isinstance(seed, (list, tuple)):
        return int(seed[0]) if seed else None
    return int(seed) if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else None


def _ort_has_cuda() -> bool:
    from .backends.ort import cuda_available

    return cuda_available()


def _finite_positive(value, name: str, kind=float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (kind is int and int(value) != value):
        what = "a positive integer" if kind is int else "a positive finite number"
        raise InputError(f"`{name}` must be {what}, got {value!r}.", f"pass {name} as {what}.")


def check_prompts(prompt) -> list[str]:
    """A non-empty string or list of non-empty strings -> list of prompts."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("`prompt` must be a non-empty string or a non-empty list of strings.",
                         "describe the music, e.g. prompt='lo-fi piano, rain'.")
    if any(not p.strip() for p in prompts):
        raise InputError("`prompt` is empty.", "describe the music, e.g. prompt='lo-fi piano, rain'.")
    return list(prompts)


def check_arguments(duration, steps=8, shift=3.0, guidance=1.0, task_type="text2music", output_type="np",
                    cfg_start=0.0, cfg_end=1.0, timesteps=None, limits: lim.Limits = lim.DEFAULT_LIMITS) -> None:
    """Validate generation arguments before any work; raises :class:`InputError` with the remedy."""
    _finite_positive(duration, "audio_duration")
    _finite_positive(steps, "num_inference_steps", int)
    lim.check_duration(duration, limits)  # runtime/limits.py: the model's range, raised only explicitly
    lim.check_steps(steps, limits)
    _finite_positive(shift, "shift")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise InputError(f"`guidance_scale` must be a finite number >= 0, got {guidance!r}.",
                         "use 1.0 to disable guidance.")
    task_lib.check_task_type(task_type)
    if output_type not in ("np", "latent"):
        raise InputError(f"output_type {output_type!r} is not supported.", "use 'np' or 'latent'.")
    if not all(lim._is_number(v) for v in (cfg_start, cfg_end)) or not (0.0 <= cfg_start <= cfg_end <= 1.0):
        raise InputError("cfg_interval_start/end must satisfy 0 <= start <= end <= 1.", "fix the interval.")
    if timesteps is not None:
        arr = np.asarray(timesteps, dtype=np.float64)
        if arr.ndim != 1 or not arr.size or not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
            raise InputError("`timesteps` must be a non-empty list of values in [0, 1].",
                             "pass a decreasing schedule such as [1.0, 0.75, 0.5, 0.25].")


# ONNX Runtime graphs opened at their first use (backends/ort.py, DeferredGraph): only cover of source audio
# and audio codes run the tokenizer pair (0.8 GiB at full size), only source and reference audio the VAE
# encoder (0.34 GB; on the CPU its NCHWc weights are rearranged into memory at load, ort_snake.py)
DEFERRED_GRAPHS = (AUDIO_TOKENIZER, AUDIO_DETOKENIZER, VAE_ENCODER)


def _graph_threads(name: str, device: str, threads: int | None) -> int | None:
    """ONNX Runtime intra-op threads for ``name``: one for the VAE graphs on the CPU, which run that many
    windows at once instead (runtime/vae.py ``cpu_workers``), ``threads`` (None: ONNX Runtime's default) else."""
    return 1 if device == "cpu" and name in (VAE_DECODER, VAE_ENCODER) else threads


# Graphs the CPU runtime runs split (runtime/backends/ort_snake.py, ort_memo.py; README Performance): the VAE
# with its Snakes in NumPy, and the condition encoder with its timbre part computed once per distinct reference.
SPLIT_VAE_GRAPHS = (VAE_DECODER, VAE_ENCODER)
MEMOIZED_INPUTS = {CONDITION_ENCODER: "timbre_latents"}


def _open_ort_graph(artifacts: Artifacts, name: str, spec, device: str, threads: int | None, emulate: bool,
                    split: bool):
    """``name`` on ONNX Runtime; on the CPU with ``split``, the graphs above as their split runners (the whole
    graph where a split does not apply: reduced precision, an export without folded Snakes)."""
    from .backends.ort import OrtGraph

    path, precision = artifacts.graph_path(name), artifacts.precision(name)
    graph_threads = _graph_threads(name, device, threads)
    if split and device == "cpu" and precision in ("fp32", "int8"):
        runner = None
        if name in SPLIT_VAE_GRAPHS and precision == "fp32":
            from .backends.ort_snake import SnakeSplitGraph

            runner = SnakeSplitGraph.open(path, spec, graph_threads)
        elif name in MEMOIZED_INPUTS:
            from .backends.ort_memo import MemoizedInputGraph

            runner = MemoizedInputGraph.open(path, spec, MEMOIZED_INPUTS[name], graph_threads)
        if runner is not None:
            return runner
    return OrtGraph(path, spec, device, graph_threads, precision, emulate)


class AceStepRuntime:
    """Loaded graphs + constants + tokenizer of one artifact directory. Use :meth:`load`."""

    def __init__(self, artifacts: Artifacts, runners: dict[str, GraphRunner], backend: str, device: str,
                 vae_window: int, device_loop: bool | None = None, limits: lim.Limits | None = None):
        self.artifacts = artifacts
        self.limits = limits or lim.DEFAULT_LIMITS  # runtime/limits.py; replace to raise them
        self.device_loop = device == "cuda" if device_loop is None else bool(device_loop)
        self.config = artifacts.config
        self.runners = guard_runners(runners, device)  # backend exceptions -> BackendError (runtime/failures.py)
        self.backend = backend
        self.device = device
        self.vae_window = vae_window
        self.vae_workers = {VAE_DECODER: 1, VAE_ENCODER: 1}  # windows run at once (runtime/vae.py cpu_workers)
        self.tokenizer = TextTokenizer(artifacts.tokenizer_dir)
        self.constants = artifacts.load_constants()
        sched.check_scheduler_config(artifacts.scheduler)

    @classmethod
    def load(
        cls,
        artifacts_dir: str | Path,
        backend: str = "auto",
        device: str = "cpu",
        verify: bool = True,
        vae_window: int = DEFAULT_VAE_WINDOW,
        threads: int | None = None,
        device_loop: bool | None = None,
        engine_dir: str | Path | None = None,
        emulate_precision: bool = False,
        limits: lim.Limits | None = None,
        split_graphs: bool = True,
    ) -> "AceStepRuntime":
        """Verify ``artifacts_dir`` and open every graph on ``backend``/``device``.

        ``device_loop`` keeps latents in device buffers across the denoising steps (IO binding);
        default: on for CUDA, off for CPU (where it works too, and is tested).
        ``engine_dir``: TensorRT engines (``acestep-trt build``), default ``ARTIFACTS_DIR/engines``.
        ``emulate_precision``: run reduced-precision (bf16/fp16) graphs on the CPU as fp32 arithmetic
        rounded to their dtype, to check their numerics without a GPU (refused otherwise; slower than fp32).
        ``limits``: request limits (:class:`~acestep_trt.runtime.limits.Limits`; default: the model's range).
        ``threads``: ONNX Runtime intra-op threads per graph (default: its own); on the CPU the VAE graphs
        instead run that many windows at once (default: the cores this process may use), each single-threaded.
        ``split_graphs``: on the CPU, run the VAE graphs with their Snake activations in NumPy between ONNX
        Runtime pieces, and the condition encoder's timbre part once per distinct reference (README,
        Performance: about a quarter faster decode, most of the prompt encoding saved without reference audio);
        False runs every graph file whole. The audio differs in the last bits of ``sin`` only.
        """
        from .backends.ort import DeferredGraph, check_device

        kind = resolve_backend(backend, device, artifacts_dir, engine_dir)
        if kind == "ort":
            check_device(device)
        _finite_positive(vae_window, "vae_window", int)
        artifacts = load_artifacts(artifacts_dir, verify=verify)
        if kind == "trt":  # TensorRT engines (runtime/backends/trt.py)
            from .backends.trt import load_engines

            runners = load_engines(artifacts, engine_dir, int(vae_window))
            audio_device = device if device == "cpu" or _ort_has_cuda() else "cpu"
        else:
            runners = {name: _open_ort_graph(artifacts, name, artifacts.specs[name], device, threads,
                                             emulate_precision, split_graphs)
                       for name in GRAPH_NAMES}
            audio_device = device
        for name in artifacts.audio_graphs:  # ONNX Runtime unless an engine runs it (older engine dirs: logged)
            if name in runners:
                continue
            spec = artifacts.audio_specs[name]
            open_graph = functools.partial(_open_ort_graph, artifacts, name, spec, audio_device, threads,
                                           emulate_precision, split_graphs)
            runners[name] = (DeferredGraph(spec, open_graph, artifacts.check_unchanged,
                                           artifacts.graph_bytes(name))
                             if name in DEFERRED_GRAPHS else open_graph())
        runtime = cls(artifacts, runners, kind, device, int(vae_window), device_loop, limits)
        for name, where in ((VAE_DECODER, device if kind == "ort" else "gpu"), (VAE_ENCODER, audio_device)):
            if where == "cpu":
                runtime.vae_workers[name] = cpu_workers(threads)
        artifacts.check_unchanged()  # every file opened is the one verified (no re-export in between)
        return runtime

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    # ------------------------------------------------------------------ LoRA (diffusers' names; runtime/lora.py)

    def _lora(self):
        if getattr(self, "_lora_controller", None) is None:
            from .lora import LoraController

            self._lora_controller = LoraController(self.artifacts.root, self.artifacts.graph_path(DIT_STEP),
                                                   self.artifacts.manifest, self.runners[DIT_STEP])
        return self._lora_controller

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> str:
        """Load a LoRA (diffusers file, PEFT directory or ComfyUI file) into the DiT; returns its adapter name."""
        return self._lora().load(path, adapter_name)

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Activate loaded adapters with weights (diffusers' ``set_adapters``)."""
        self._lora().set_adapters(adapter_names, adapter_weights)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the DiT runs its exported weights again."""
        if getattr(self, "_lora_controller", None) is not None:
            self._lora_controller.unload()

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts, lyrics, languages, audio_duration, instruction, bpm, keyscale, timesignature,
                      max_text_length=256, max_lyric_length=2048):
        """Mirrors ``AceStepPipeline.encode_prompt``: text states via the text encoder, lyric states via lookup.

        Returns text_hidden [B, S_t, D], text_mask [B, S_t], lyric_hidden [B, S_l, D], lyric_mask [B, S_l].
        """
        pairs = [
            format_prompt(p, l, lang, audio_duration, instruction, bpm, keyscale, timesignature)
            for p, l, lang in zip(prompts, lyrics, languages)
        ]
        text = self.tokenizer([t for t, _ in pairs], max_text_length)
        lyric = self.tokenizer([ly for _, ly in pairs], max_lyric_length)
        text_hidden = self.runners[TEXT_ENCODER].run({"input_ids": text.input_ids})["text_hidden_states"]
        lyric_hidden = np.take(self.constants["lyric_embedding"], lyric.input_ids, axis=0)
        return text_hidden, text.attention_mask, lyric_hidden, lyric.attention_mask

    def silence_latents(self, frames: int, batch: int) -> np.ndarray:
        """Silence latent tiled/cropped to ``frames`` (``prepare_src_latents``). [B, frames, 64]."""
        silence = self.constants["silence_latent"]  # [1, L, 64]
        reps = -(-frames // silence.shape[1])
        tiled = np.tile(silence, (1, reps, 1))[:, :frames, :]
        return np.ascontiguousarray(np.broadcast_to(tiled, (batch,) + tiled.shape[1:]), dtype=np.float32)

    def encode_condition(self, text_hidden, text_mask, lyric_hidden, lyric_mask, timbre=None) -> np.ndarray:
        """Condition encoder with ``timbre`` [B, T_ref, 64] (default: the silence latent) as timbre reference.

        -> [B, C, cond_hidden].
        """
        batch = text_hidden.shape[0]
        timbre = self.silence_latents(self.config.timbre_frames, batch) if timbre is None else timbre
        out = self.runners[CONDITION_ENCODER].run({
            "text_hidden_states": text_hidden.astype(np.float32),
            "text_attention_mask": text_mask,
            "lyric_hidden_states": lyric_hidden.astype(np.float32),
            "lyric_attention_mask": lyric_mask,
            "timbre_latents": timbre,
        })
        return out["encoder_hidden_states"]

    def encode_audio(self, audio: np.ndarray, posterior: str = "sample", seed: int | None = None,
                     stream: int = task_lib.SOURCE_STREAM, window: int | None = None) -> np.ndarray:
        """audio [B, 2, S] -> latents [B, S // hop, 64]: the VAE posterior, encoded in overlapping windows.

        ``posterior="sample"``: ``mean + std * noise`` (noise from ``SeedSequence([seed, stream])``, see
        :mod:`acestep_trt.runtime.tasks`); ``"mode"``: the mean. ``window``: core frames per encoded window
        (default: the decoder's ``vae_window``).
        """
        runner = self.runners[VAE_ENCODER]

        def encode(chunk):
            out = runner.run({"audio": chunk})
            return out["mean"], out["std"]

        overlap = window_overlap(self.artifacts.vae_encoder_receptive_field)
        mean, std = encode_windowed(encode, np.ascontiguousarray(audio, dtype=np.float32), self.config.hop_length,
                                    window or self.vae_window, overlap, self.vae_workers[VAE_ENCODER])
        latents = mean if posterior == "mode" else mean + std * task_lib.posterior_noise(seed, stream, mean.shape)
        return np.ascontiguousarray(latents.transpose(0, 2, 1), dtype=np.float32)

    def dit_step(self, latents, t, dt, condition, context) -> dict[str, np.ndarray]:
        """One ``dit_step`` on the host: {"velocity", "next_latents"}, each [B, T, 64]."""
        batch = latents.shape[0]
        feeds = {"latents": latents, "timestep": np.full((batch,), t, np.float32),
                 "encoder_hidden_states": condition, "context_latents": context,
                 "dt": np.full((batch,), dt, np.float32)}
        return self.runners[DIT_STEP].run(feeds)

    def denoise_host(self, x, ts, sigmas, condition, context, guidance=None, progress=None,
                     blend=None) -> np.ndarray:
        """Euler loop with host arrays; ``guidance`` = (scale, null condition, interval) enables APG;
        ``blend`` = (audio_cover_strength, text2music condition) blends a second velocity every step.

        The text2music condition has its own length, so it runs as a second DiT evaluation (as diffusers).
        """
        batch = x.shape[0]
        buffer = sched.MomentumBuffer(-0.75)
        if guidance:  # the conditional and unconditional halves, built once for every guided step
            scale, null, _ = guidance
            both_condition, both_context = np.concatenate([condition, null]), np.concatenate([context, context])
        for i in range(len(ts)):
            t, dt = np.float32(ts[i]), np.float32(sigmas[i + 1] - sigmas[i])
            guided = bool(guidance) and guidance[2][0] <= 1.0 - float(t) <= guidance[2][1]
            if guided or blend:
                if guided:
                    both = self.dit_step(np.concatenate([x, x]), t, dt, both_condition, both_context)["velocity"]
                    v = sched.apg(both[:batch], both[batch:], scale - 1.0, buffer)
                else:
                    v = self.dit_step(x, t, dt, condition, context)["velocity"]
                if blend:  # diffusers: strength * cover velocity + (1 - strength) * text2music velocity
                    v = blend[0] * v + (1.0 - blend[0]) * self.dit_step(x, t, dt, blend[1], context)["velocity"]
                x = sched.euler_step(x, v, sigmas[i], sigmas[i + 1])
            else:
                x = self.dit_step(x, t, dt, condition, context)["next_latents"]
            if progress:
                progress.update()
        return x

    def denoise_device(self, x, ts, sigmas, condition, context, progress=None, blend=None) -> np.ndarray:
        """Euler loop with IO binding: latents, condition and context stay on the device for every step.

        Two preallocated latent buffers alternate as input and output; only the final latents
        (64 floats per frame) are copied back, for windowed VAE decoding. ``blend`` = (strength, text2music
        condition): the DiT runs on the doubled batch and ``cover_blend`` mixes the halves on the device.
        """
        if blend:
            return self._denoise_device_blend(x, ts, sigmas, condition, context, blend, progress)
        runner = self.runners[DIT_STEP]
        batch = x.shape[0]
        fixed = {"encoder_hidden_states": runner.to_device(condition), "context_latents": runner.to_device(context)}
        steps = [
            {"timestep": runner.to_device(np.full((batch,), ts[i], np.float32)),
             "dt": runner.to_device(np.full((batch,), sigmas[i + 1] - sigmas[i], np.float32))}
            for i in range(len(ts))
        ]
        buffers = [runner.to_device(x), runner.empty(x.shape)]
        velocity = runner.empty(x.shape)
        for i, step in enumerate(steps):
            current, following = buffers[i % 2], buffers[(i + 1) % 2]
            runner.run_bound({"latents": current, **fixed, **step},
                             {"velocity": velocity, "next_latents": following})
            if progress:
                progress.update()
        return buffers[len(steps) % 2].numpy()

    def _denoise_device_blend(self, x, ts, sigmas, condition, context, blend, progress=None) -> np.ndarray:
        """:meth:`denoise_device` for cover strength: per step ``dit_step`` with the cover and with the
        text2music condition from the same latents, then ``cover_blend`` mixes the two next_latents on the device."""
        runner, mixer = self.runners[DIT_STEP], self.runners[COVER_BLEND]
        batch = x.shape[0]
        conditions = (runner.to_device(condition), runner.to_device(blend[1]))
        context_dev = runner.to_device(context)
        strength = mixer.to_device(np.array([blend[0]], np.float32))
        current, cover, plain = runner.to_device(x), runner.empty(x.shape), runner.empty(x.shape)
        velocity = runner.empty(x.shape)
        for i in range(len(ts)):
            step = {"timestep": runner.to_device(np.full((batch,), ts[i], np.float32)),
                    "dt": runner.to_device(np.full((batch,), sigmas[i + 1] - sigmas[i], np.float32)),
                    "context_latents": context_dev, "latents": current}
            for cond, out in zip(conditions, (cover, plain)):
                runner.run_bound({**step, "encoder_hidden_states": cond}, {"velocity": velocity, "next_latents": out})
            mixer.run_bound({"cover_latents": cover, "text2music_latents": plain, "strength": strength},
                            {"latents": current})
            if progress:
                progress.update()
        return current.numpy()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [B, T, 64] -> audio [B, 2, T * hop], decoded in overlapping windows."""
        runner = self.runners[VAE_DECODER]
        return decode_windowed(
            lambda z: runner.run({"latents": z})["audio"],
            np.ascontiguousarray(latents.transpose(0, 2, 1)),
            self.config.hop_length,
            self.vae_window,
            window_overlap(self.artifacts.vae_receptive_field),
            self.vae_workers[VAE_DECODER],
        )

    # ------------------------------------------------------------------ call

    @guard_call
    def __call__(
        self,
        prompt: str | Sequence[str] = None,
        lyrics: str | Sequence[str] = "",
        audio_duration: float | None = 60.0,
        vocal_language: str | Sequence[str] = "en",
        num_inference_steps: int = 8,
        guidance_scale: float = 7.0,
        shift: float = 3.0,
        seed: int | Sequence[int] | None = None,
        latents: np.ndarray | None = None,
        output_type: str = "np",
        instruction: str | None = None,
        max_text_length: int = 256,
        max_lyric_length: int = 2048,
        bpm: int | None = None,
        keyscale: str | None = None,
        timesignature: str | None = None,
        task_type: str = "text2music",
        cfg_interval_start: float = 0.0,
        cfg_interval_end: float = 1.0,
        timesteps: Sequence[float] | None = None,
        show_progress: bool | None = None,
        attention_kwargs: dict | None = None,
        track_name: str | None = None,
        complete_track_classes: Sequence[str] | None = None,
        src_audio: np.ndarray | None = None,
        reference_audio: np.ndarray | None = None,
        audio_codes: str | Sequence[str] | None = None,
        repainting_start: float | None = None,
        repainting_end: float | None = None,
        audio_cover_strength: float = 1.0,
        posterior: str = "sample",
    ) -> AceStepOutput:
        """Generate audio; see ``AceStepPipeline.__call__`` for the meaning of each argument.

        ``seed`` replaces diffusers' torch ``generator``: noise is drawn with NumPy's PCG64
        (``np.random.default_rng(seed).standard_normal``), one generator per item when a list is given.
        It does not reproduce torch's random stream; pass ``latents`` [B, T, 64] for bit-compatible noise.
        ``attention_kwargs={"scale": s}`` scales the loaded LoRA adapters for this call, as in diffusers.

        ``src_audio`` / ``reference_audio``: float32 ``[channels, samples]`` at :attr:`sample_rate` (mono is
        duplicated). ``posterior``: ``"sample"`` (as diffusers; NumPy noise from the seed, see
        :mod:`acestep_trt.runtime.tasks`) or ``"mode"`` (the posterior mean). ``output.task`` says what the
        task did with its inputs.
        """
        from tqdm.auto import tqdm

        prompts = check_prompts(prompt)
        batch = len(prompts)
        lyrics_list = _as_list(lyrics if lyrics is not None else "", batch, "lyrics")
        languages = _as_list(vocal_language, batch, "vocal_language")
        task = task_lib.resolve_task(
            self.artifacts, batch, task_type, instruction, track_name, complete_track_classes, src_audio,
            reference_audio, audio_codes, repainting_start, repainting_end, audio_cover_strength, audio_duration,
            posterior, self.limits)
        audio_duration, frames = task.audio_duration, task.frames
        check_arguments(audio_duration, num_inference_steps, shift, guidance_scale, task.task_type, output_type,
                        cfg_interval_start, cfg_interval_end, timesteps, self.limits)
        lim.check_texts(prompts, lyrics_list, languages, bpm, keyscale, timesignature, max_text_length,
                        max_lyric_length, instruction)
        lim.check_call(self, batch, audio_duration, guidance_scale > 1.0 and not self.config.is_turbo,
                       max_text_length, max_lyric_length,  # batch, duration and peak memory before any work
                       task_lib.encoded_samples(task, self.sample_rate),  # + weights of graphs opened at first use:
                       sum(getattr(self.runners[n], "pending_bytes", 0) for n in task_lib.audio_graphs(task)))
        scale = lora_scale(attention_kwargs)  # the LoRA scale of this call (diffusers' apply_lora_scale)
        noise, seeds = self._initial_latents(latents, seed, batch, frames)  # refuse bad latents before any work
        guided = guidance_scale > 1.0 and not self.config.is_turbo
        self._check_engine_limits(batch, batch * (2 if guided else 1), frames)
        audio_seed = _audio_seed(seed, seeds)
        timings: dict[str, float] = {}
        if getattr(self, "_lora_controller", None) is not None:
            self._lora_controller.sync(scale)

        started = time.perf_counter()
        timbre = task_lib.timbre_latents(self, task, batch, audio_seed)  # reference audio, or None: silence
        source = task_lib.source_latents(self, task, batch, audio_seed)  # [B, T, 64]
        timings["audio_encode"] = time.perf_counter() - started
        started = time.perf_counter()
        condition = self._condition(prompts, lyrics_list, languages, audio_duration, task.instruction, bpm, keyscale,
                                    timesignature, max_text_length, max_lyric_length, timbre)
        blend = None
        if task.blend:  # a second condition with the text2music instruction, blended every step
            blend = (task.cover_strength, self._condition(
                prompts, lyrics_list, languages, audio_duration, TEXT2MUSIC_INSTRUCTION, bpm, keyscale,
                timesignature, max_text_length, max_lyric_length, timbre))
        timings["encode"] = time.perf_counter() - started

        mask = task_lib.chunk_mask(task.task_type, frames, batch, self.config.latent_channels, task.start, task.end,
                                   self.config.latents_per_second, task.src is not None)
        context = np.concatenate([source, mask], axis=-1).astype(np.float32)  # [B, T, 128]: source + chunk mask

        guidance = None
        if guidance_scale > 1.0 and not self.config.is_turbo:
            null = np.broadcast_to(self.constants["null_condition_emb"], condition.shape).astype(np.float32)
            guidance = (guidance_scale, null, (cfg_interval_start, cfg_interval_end))
        elif guidance_scale > 1.0:
            log.debug("guidance_scale %s is ignored for turbo (guidance-distilled) checkpoints", guidance_scale)

        schedule = sched.timestep_schedule(num_inference_steps, shift, timesteps)
        ts, sigmas = sched.scheduler_sigmas(schedule, self.artifacts.scheduler)
        started = time.perf_counter()
        disable = None if show_progress is None else not show_progress  # None: only on a terminal
        engine_loop = getattr(self.runners[DIT_STEP], "denoise", None)  # TensorRT: whole loop on the GPU
        engine_blends = getattr(self.runners[DIT_STEP], "mixer", None) is not None  # a cover_blend engine
        with tqdm(total=len(ts), desc="denoise", unit="step", disable=disable, leave=False) as bar:
            if guidance is None and engine_loop is not None and (blend is None or engine_blends):
                x = engine_loop(noise, condition, context, ts, sigmas, blend)
                bar.update(len(ts))
            elif guidance is None and self.device_loop and engine_loop is None and (
                    blend is None or COVER_BLEND in self.runners):  # engines without cover_blend: host loop
                x = self.denoise_device(noise, ts, sigmas, condition, context, bar, blend)
            else:  # APG guidance mixes the two halves on the host every step
                x = self.denoise_host(noise, ts, sigmas, condition, context, guidance, bar, blend)
        timings["denoise"] = time.perf_counter() - started

        summary = task_lib.describe(task, self.config)
        if output_type == "latent":
            return AceStepOutput(x, self.sample_rate, seeds, timings, summary)
        started = time.perf_counter()
        audio = normalize_peak(self.decode(x))
        timings["decode"] = time.perf_counter() - started
        return AceStepOutput(audio, self.sample_rate, seeds, timings, summary)

    def _condition(self, prompts, lyrics, languages, duration, instruction, bpm, keyscale, timesignature,
                   max_text_length, max_lyric_length, timbre) -> np.ndarray:
        """Prompt encoding + condition encoder for one instruction. -> [B, C, cond_hidden]."""
        text_h, text_m, lyric_h, lyric_m = self.encode_prompt(
            prompts, lyrics, languages, duration, instruction, bpm, keyscale, timesignature,
            max_text_length, max_lyric_length,
        )
        return self.encode_condition(text_h, text_m, lyric_h, lyric_m, timbre)

    def _check_engine_limits(self, batch: int, dit_batch: int, frames: int) -> None:
        """Refuse a batch or duration outside fixed-shape engines (TensorRT profiles) before any work.

        ``dit_batch``: the DiT's batch per evaluation (APG doubles it).
        """
        tok = self.artifacts.audio_tokenizer
        for name, runner in self.runners.items():
            check = getattr(runner, "check_dims", None)
            if check is not None:
                check(call_dims(name, batch, dit_batch, frames, tok.pool_window if tok else None))

    def close(self) -> None:
        """Release the runners' resources now (TensorRT device memory); ONNX Runtime sessions need nothing."""
        for runner in self.runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "AceStepRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _initial_latents(self, latents, seed, batch: int, frames: int):
        """Caller latents [B, T, 64] (checked) or seeded Gaussian noise; returns (latents, seeds)."""
        shape = (batch, frames, self.config.latent_channels)
        if latents is not None:
            latents = np.asarray(latents)
            if latents.shape != shape:
                raise InputError(
                    f"`latents` has shape {latents.shape}, expected {shape} for {batch} prompt(s) of {frames} frames "
                    f"(ceil(audio_duration * {self.config.latents_per_second:g})).",
                    "pass latents of that shape or change audio_duration to match them.",
                )
            if not np.all(np.isfinite(latents)):
                raise InputError("`latents` contains NaN or Inf.", "pass finite noise.")
            return latents.astype(np.float32), None
        if seed is None:
            seeds = [int(s) for s in np.random.SeedSequence().generate_state(batch)]
        elif isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise InputError(f"{len(seed)} seeds for {batch} prompts.", "pass one seed per prompt, or one int.")
            seeds = [int(s) for s in seed]
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            seeds = [int(seed)] if batch == 1 else None
        else:
            raise InputError(f"`seed` must be an int or a list of ints, got {seed!r}.", "pass e.g. seed=42.")
        if any(s < 0 for s in (seeds or [int(seed)])):  # NumPy's SeedSequence takes no negative entropy
            raise InputError(f"`seed` must be >= 0, got {seed!r}.", "pass a non-negative seed, e.g. seed=42.")
        if seeds is None:  # one int for a batch: one stream, like a single torch generator
            noise = np.random.default_rng(int(seed)).standard_normal(shape, dtype=np.float32)
            return noise, [int(seed)]
        noise = np.stack([np.random.default_rng(s).standard_normal(shape[1:], dtype=np.float32) for s in seeds])
        return noise, seeds
