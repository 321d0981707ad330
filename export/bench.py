"""``acestep-trt bench``: this toolkit vs diffusers' ``AceStepPipeline`` in one or more dtypes, side by side.

Every side (ours, and diffusers in each ``--diffusers-dtype``) is loaded once, warmed up, then the sides
run alternately (ours, diffusers fp32, diffusers bf16, ours, ...) on the same prompt and noise, so that
drift in machine load hits all equally. When the sides do not fit in memory together (estimated from
the graph files and the checkpoint's parameter count: the full-size geometry on a 24 GB machine), each
runs in a process of its own, one after the other, and the report says so and gives each process's peak
resident memory. Per run we record per-stage times
(prompt + condition encoding, every DiT step, VAE decode), end-to-end time, and the peak resident memory
above the level before the run (sampled every 5 ms); on CUDA also GPU memory: for diffusers torch's peak
allocation per run, for this toolkit the device memory it holds after its warm-up (``cudaMemGetInfo``
before loading and after, measured before diffusers touches the GPU: weights plus ONNX Runtime's arena,
which keeps its high-water mark; CUDA context excluded on both sides). Reported figures are medians over
runs; ratios are diffusers / ours (so > 1 means we are faster). The audio of both sides is compared
(max difference and SNR, diffusers as the signal).

``task="repaint"`` benchmarks the repaint task on a synthetic source clip of the same duration (window: its
middle third), the VAE encode of the source timed as its own stage; both sides take the posterior's mean
(diffusers' ``sample`` replaced by ``mode``, a randn's difference in cost) so that their audio can be compared.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from acestep_trt.runtime.compare import CASES
from acestep_trt.runtime.precision import json_number, snr_db

log = logging.getLogger(__name__)

STAGES = ("audio_encode", "encode", "dit_step", "decode")
TASKS = ("text2music", "repaint")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


class PeakSampler:
    """Samples this process's RSS in a thread; ``peak`` is the maximum above the starting level."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


def alternate(calls: dict, runs: int) -> tuple[dict, dict[str, list[float]]]:
    """Run every callable of ``calls`` ({label: no-argument callable}) once (warm-up; its output kept), then
    ``runs`` rounds of all of them in turn, so that drift in machine load hits each alike.

    Returns ({label: warm-up output}, {label: [wall seconds per timed run]}). Used by the measurement scripts.
    """
    outputs = {label: call() for label, call in calls.items()}
    walls: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(runs):
        for label, call in calls.items():
            started = time.perf_counter()
            call()
            walls[label].append(time.perf_counter() - started)
    return outputs, walls


@dataclass
class RunRecord:
    total: float
    stages: dict[str, list[float]]
    host_peak: int
    gpu_peak: int | None = None


@dataclass
class SideResult:
    name: str
    runs: list[RunRecord] = field(default_factory=list)
    load_seconds: float = 0.0
    load_rss: int = 0
    gpu_held: int | None = None  # device memory held after warm-up (ours, see the module docstring)

    def median(self, stage: str | None = None) -> float:
        if stage is None:
            return statistics.median(r.total for r in self.runs)
        return statistics.median(sum(r.stages.get(stage, [0.0])) for r in self.runs)

    def median_step(self) -> float:
        return statistics.median(statistics.median(r.stages["dit_step"]) for r in self.runs)

    def summary(self, audio_seconds: float) -> dict:
        gpu = [r.gpu_peak for r in self.runs if r.gpu_peak is not None]
        total = self.median()
        return {
            "name": self.name,
            "runs": len(self.runs),
            "end_to_end_s": total,
            "real_time_factor": total / audio_seconds,
            "audio_encode_s": self.median("audio_encode"),
            "encode_s": self.median("encode"),
            "dit_step_s": self.median_step(),
            "dit_total_s": self.median("dit_step"),
            "decode_s": self.median("decode"),
            "host_peak_mb": statistics.median(r.host_peak for r in self.runs) / 2**20,
            "gpu_peak_mb": statistics.median(gpu) / 2**20 if gpu else _mb(self.gpu_held),
            "load_s": self.load_seconds,
            "load_rss_mb": self.load_rss / 2**20,
        }


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def device_memory_used() -> int | None:
    """Bytes in use on CUDA device 0 (``cudaMemGetInfo``: total - free), or None without cuda-bindings/GPU."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, free, total = cudart.cudaMemGetInfo()
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    return int(total) - int(free)


class _StageTimer:
    """Accumulates wall time per stage; ``sync`` makes GPU work finish before a clock is read."""

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)
        self.stages: dict[str, list[float]] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.stages.setdefault(stage, []).append(seconds)


# --------------------------------------------------------------------------- ours


class OursSide:
    """Times the runtime by wrapping each graph runner's ``run``."""

    STAGE_OF = {"text_encoder": "encode", "condition_encoder": "encode", "dit_step": "dit_step",
                "vae_decoder": "decode", "cover_blend": "dit_step"}  # other audio graphs: "audio_encode"
    # Stages timed by the runtime's wall clock (AceStepOutput.timings) instead of the sum of graph runs: the CPU
    # VAE runs several windows at once (runtime/vae.py), so the sum of their run times exceeds the stage's time.
    WALL_STAGES = ("decode", "audio_encode")

    def __init__(self, artifacts: Path, backend: str, device: str):
        from acestep_trt.runtime import AceStepRuntime

        started, rss = time.perf_counter(), rss_bytes()
        self.rt = AceStepRuntime.load(artifacts, backend=backend, device=device)
        self.load_seconds, self.load_rss = time.perf_counter() - started, rss_bytes() - rss
        self.precision = self.rt.artifacts.manifest.get("precision", {"recipe": "fp32"})
        self.timer = _StageTimer()
        for name, runner in self.rt.runners.items():
            runner.run = self._timed(runner.run, self.STAGE_OF.get(name, "audio_encode"))
        self.sample_rate = self.rt.sample_rate

    def _timed(self, run, stage):
        def wrapper(feeds):
            started = time.perf_counter()
            out = run(feeds)
            self.timer.add(stage, time.perf_counter() - started)
            return out

        return wrapper

    def __call__(self, prompt, lyrics, duration, latents, steps, shift, **task) -> np.ndarray:
        if task:
            task["posterior"] = "mode"
        out = self.rt(prompt=prompt, lyrics=lyrics, audio_duration=duration, latents=latents,
                      num_inference_steps=steps, shift=shift, guidance_scale=1.0, show_progress=False, **task)
        for stage in self.WALL_STAGES:  # windows run concurrently on the CPU: their run times overlap
            if stage in self.timer.stages and stage in out.timings:
                self.timer.stages[stage] = [out.timings[stage]]
        return out.audios


# --------------------------------------------------------------------------- diffusers


class DiffusersSide:
    """Times ``AceStepPipeline`` with forward hooks on its networks (synchronised on CUDA)."""

    def __init__(self, model_dir: Path, device: str, dtype: str):
        import torch
        from diffusers import AceStepPipeline

        from .checkpoint import _quiet_libraries

        _quiet_libraries()
        self.torch = torch
        self.device = device
        started, rss = time.perf_counter(), rss_bytes()
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.pipe = AceStepPipeline.from_pretrained(model_dir, torch_dtype=torch_dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds, self.load_rss = time.perf_counter() - started, rss_bytes() - rss
        sync = torch.cuda.synchronize if device == "cuda" else None
        self.timer = _StageTimer(sync)
        self._hook(self.pipe.text_encoder, "encode")
        self._hook(self.pipe.condition_encoder, "encode")
        self._hook(self.pipe.transformer, "dit_step")
        self._hook(self.pipe.vae.encoder, "audio_encode")
        self._wrap_decode()
        self.sample_rate = self.pipe.sample_rate

    def _hook(self, module, stage):
        timer = self.timer

        def pre(_module, _args):
            timer.sync()
            module._bench_started = time.perf_counter()

        def post(_module, _args, _out):
            timer.sync()
            timer.add(stage, time.perf_counter() - module._bench_started)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def _wrap_decode(self):
        vae, timer, decode = self.pipe.vae, self.timer, self.pipe.vae.decode

        def timed(*args, **kwargs):
            timer.sync()
            started = time.perf_counter()
            out = decode(*args, **kwargs)
            timer.sync()
            timer.add("decode", time.perf_counter() - started)
            return out

        vae.decode = timed

    def __call__(self, prompt, lyrics, duration, latents, steps, shift, **task) -> np.ndarray:
        from diffusers.models.autoencoders.autoencoder_oobleck import OobleckDiagonalGaussianDistribution as Dist

        torch = self.torch
        noise = torch.from_numpy(latents).to(self.device, self.pipe.transformer.dtype)
        if "src_audio" in task:
            task["src_audio"] = torch.from_numpy(task["src_audio"]).to(self.device, self.pipe.vae.dtype)
        sample, Dist.sample = Dist.sample, lambda self, generator=None: self.mode()  # see the module docstring
        try:
            with torch.no_grad():
                return self.pipe(prompt=prompt, lyrics=lyrics, audio_duration=duration, latents=noise,
                                 num_inference_steps=steps, shift=shift, guidance_scale=1.0, output_type="np",
                                 **task).audios
        finally:
            Dist.sample = sample


# --------------------------------------------------------------------------- driver


@dataclass
class BenchConfig:
    duration: float = 10.0
    steps: int = 8
    shift: float = 3.0
    batch: int = 1
    runs: int = 3
    warmup: int = 1
    device: str = "cpu"
    backend: str = "ort"
    diffusers_dtypes: tuple[str, ...] = ("fp32",)
    separate: bool | None = None  # None: separate processes only when the pipelines do not fit together
    prompt: str = CASES[0][0]
    lyrics: str = CASES[0][1]
    task: str = "text2music"  # or "repaint" (see the module docstring)


def task_arguments(cfg: BenchConfig, frames: int, hop: int, sample_rate: int) -> dict:
    """The task's keyword arguments for both sides: none for text2music; for repaint a source clip of
    ``frames * hop`` samples (two tones and a little noise) and its middle third as the window."""
    if cfg.task == "text2music":
        return {}
    samples = frames * hop
    t = np.arange(samples) / sample_rate
    tones = 0.3 * np.stack([np.sin(2 * np.pi * 220.0 * t), np.sin(2 * np.pi * 330.0 * t)])
    src = (tones + 0.02 * np.random.default_rng(1).standard_normal(tones.shape)).astype(np.float32)
    seconds = samples / sample_rate
    return {"task_type": "repaint", "src_audio": src, "repainting_start": seconds / 3,
            "repainting_end": 2 * seconds / 3}


def default_diffusers_dtypes(device: str) -> tuple[str, ...]:
    """What a user of diffusers would pick: on the CPU fp32 and bf16 (torch uses AVX-512 BF16/AMX), on CUDA bf16."""
    return ("fp32", "bf16") if device == "cpu" else ("bf16",)


def _gpu_peak_reset(side) -> None:
    if isinstance(side, DiffusersSide) and side.device == "cuda":
        side.torch.cuda.reset_peak_memory_stats()


def _gpu_peak(side) -> int | None:
    if isinstance(side, DiffusersSide) and side.device == "cuda":
        return int(side.torch.cuda.max_memory_allocated())
    return None


def _one_run(side, cfg: BenchConfig, latents: np.ndarray, task: dict | None = None) -> tuple[RunRecord, np.ndarray]:
    side.timer.stages = {}
    prompts, lyrics = [cfg.prompt] * cfg.batch, [cfg.lyrics] * cfg.batch
    _gpu_peak_reset(side)
    with PeakSampler() as mem:
        started = time.perf_counter()
        audio = side(prompts, lyrics, cfg.duration, latents, cfg.steps, cfg.shift, **dict(task or {}))
        total = time.perf_counter() - started
    return RunRecord(total, dict(side.timer.stages), mem.peak, _gpu_peak(side)), audio


def _inputs(cfg: BenchConfig, artifacts: Path) -> tuple[np.ndarray, dict]:
    """What every side starts from: the noise ``[batch, frames, 64]`` and the task's arguments."""
    from acestep_trt.runtime.artifacts import read_manifest
    from acestep_trt.runtime.specs import ModelConfig

    config = ModelConfig.from_dict(read_manifest(artifacts)["model"])
    frames = config.latent_length(cfg.duration)
    latents = np.random.default_rng(0).standard_normal((cfg.batch, frames, 64)).astype(np.float32)
    return latents, task_arguments(cfg, frames, config.hop_length, config.sample_rate)


def _process_peak_rss() -> int:
    """This process's peak resident memory since it started (``ru_maxrss``, KiB on Linux), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _open_side(key: str, model_dir: Path, artifacts: Path, cfg: BenchConfig):
    """``"ours"`` or a diffusers dtype (``"fp32"``, ``"bf16"``, ``"fp16"``) -> the loaded side."""
    if key == "ours":
        return OursSide(artifacts, cfg.backend, cfg.device)
    return DiffusersSide(model_dir, cfg.device, key)


def _side_in_child(key: str, model_dir: str, artifacts: str, cfg: BenchConfig) -> tuple[SideResult, np.ndarray, int]:
    """Child process of the separate-process mode: load one side, warm up, time ``cfg.runs`` runs."""
    import warnings

    warnings.simplefilter("ignore")
    side = _open_side(key, Path(model_dir), Path(artifacts), cfg)
    latents, task = _inputs(cfg, Path(artifacts))
    result = SideResult(_side_name(key), load_seconds=side.load_seconds, load_rss=side.load_rss)
    for _ in range(cfg.warmup):
        _one_run(side, cfg, latents, task)
    audio = None
    for _ in range(cfg.runs):
        record, audio = _one_run(side, cfg, latents, task)
        result.runs.append(record)
    return result, audio, _process_peak_rss()


def _side_name(key: str) -> str:
    return "acestep-trt" if key == "ours" else f"diffusers {key}"


_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _checkpoint_parameters(model_dir: Path) -> int:
    """Number of weights in ``model_dir``'s safetensors files (read from their headers, nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).rglob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as fh:
            total += sum(int(np.prod(fh.get_slice(name).get_shape())) for name in fh.keys())
    return total


def memory_plan(model_dir: Path, artifacts: Path, dtypes: tuple[str, ...]) -> tuple[bool, str]:
    """Whether all pipelines fit in this machine's available memory at once: ``(fits, reason)``.

    Estimate: our graph files plus the checkpoint's weights in each diffusers dtype, times 1.3 for
    activations and allocator slack (a full-size fp32 generation measured 14.4 GB for 12 GB of graphs).
    """
    parameters = _checkpoint_parameters(model_dir)
    ours = sum(p.stat().st_size for p in Path(artifacts).glob("*.onnx*"))
    need = 1.3 * (ours + sum(parameters * _DTYPE_BYTES[d] for d in dtypes))
    available = _available_memory()
    if available is None:
        return True, ""
    return need <= available, f"all sides together need about {need / 1e9:.1f} GB, {available / 1e9:.1f} GB available"


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def run_bench(model_dir: Path, artifacts: Path, cfg: BenchConfig, progress: bool = True) -> dict:
    """Time ours against diffusers in each of ``cfg.diffusers_dtypes``; return the report dict.

    In one process (the default when everything fits): load every side, warm up, then alternate
    ``cfg.runs`` rounds. Otherwise each side runs in a process of its own, one after the other (no
    alternation; each process's peak resident memory is reported).
    """
    fits, reason = memory_plan(model_dir, artifacts, cfg.diffusers_dtypes)
    separate = (not fits) if cfg.separate is None else cfg.separate
    keys = ("ours", *cfg.diffusers_dtypes)
    if separate:
        results, audio, peaks = _run_separate(keys, model_dir, artifacts, cfg, progress)
    else:
        results, audio = _run_together(keys, model_dir, artifacts, cfg, progress)
        peaks = {}
    from acestep_trt.runtime.artifacts import read_manifest

    manifest = read_manifest(artifacts)
    mode = {"separate_processes": separate, "reason": reason,
            "process_peak_mb": {_side_name(k): v / 2**20 for k, v in peaks.items()}}
    return _report(cfg, results, audio, manifest.get("precision", {"recipe": "fp32"}), mode)


def _run_separate(keys, model_dir, artifacts, cfg, progress):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from .children import stop_workers

    results, audio, peaks = {}, {}, {}
    for key in tqdm(keys, desc="bench (one process per side)", unit="side", disable=not progress):
        child = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            results[key], audio[key], peaks[key] = child.submit(
                _side_in_child, key, str(model_dir), str(artifacts), cfg).result()
        except BaseException:  # Ctrl-C, SIGTERM: stop the side now instead of waiting for its runs to end
            stop_workers(child)
            child.shutdown(wait=True, cancel_futures=True)
            raise
        child.shutdown(wait=True)
    return results, audio, peaks


def _run_together(keys, model_dir, artifacts, cfg, progress):
    from tqdm.auto import tqdm

    gpu_base = device_memory_used() if cfg.device == "cuda" else None  # before any graph is on the GPU
    sides = {"ours": OursSide(artifacts, cfg.backend, cfg.device)}
    latents, task = _inputs(cfg, artifacts)
    results = {key: SideResult(_side_name(key)) for key in keys}
    for _ in range(max(cfg.warmup, 1 if gpu_base is not None else 0)):
        _one_run(sides["ours"], cfg, latents, task)
    if gpu_base is not None:
        used = device_memory_used()
        results["ours"].gpu_held = None if used is None else used - gpu_base
    for key in keys[1:]:
        sides[key] = _open_side(key, model_dir, artifacts, cfg)
        for _ in range(cfg.warmup):
            _one_run(sides[key], cfg, latents, task)
    for key, side in sides.items():
        results[key].load_seconds, results[key].load_rss = side.load_seconds, side.load_rss
    audio = {}
    for _ in tqdm(range(cfg.runs), desc="bench", unit="round", disable=not progress):
        for key, side in sides.items():
            record, audio[key] = _one_run(side, cfg, latents, task)
            results[key].runs.append(record)
    return results, audio


def _report(cfg: BenchConfig, results: dict[str, SideResult], audio: dict, precision: dict, mode: dict) -> dict:
    ours = results["ours"].summary(cfg.duration)
    report = {"config": {**cfg.__dict__, "diffusers_dtypes": list(cfg.diffusers_dtypes)}, "hardware": hardware(),
              "mode": mode, "precision": precision, "ours": ours, "diffusers": {}, "speedup": {}, "audio": {}}
    for dtype in cfg.diffusers_dtypes:
        theirs = report["diffusers"][dtype] = results[dtype].summary(cfg.duration)
        report["speedup"][dtype] = {k: theirs[k] / ours[k] for k in ("end_to_end_s", "audio_encode_s", "encode_s",
                                                                     "dit_step_s", "decode_s") if ours[k] and theirs[k]}
        diff = float(np.max(np.abs(audio["ours"].astype(np.float64) - audio[dtype])))
        report["audio"][dtype] = {"max_abs_diff": diff, "snr_db": json_number(snr_db(audio["ours"], audio[dtype]))}
    return report


# CPU features that decide which kernels ONNX Runtime (MLAS int8: VNNI, AMX-INT8) and torch (oneDNN bf16:
# AVX-512 BF16, AMX-BF16) pick, so that a figure says what it was measured with (README, Performance).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str) -> dict:
    """``/proc/cpuinfo``'s text -> {"cpu": model name, "cpu_flags": the :data:`CPU_FLAGS` it has} (first CPU)."""
    fields = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info = {"cpu_flags": [flag for flag in CPU_FLAGS if flag in set(fields.get("flags", "").split())]}
    if fields.get("model name"):
        info["cpu"] = fields["model name"]
    return info


def hardware() -> dict:
    import os
    import platform

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    try:
        with open("/proc/cpuinfo") as fh:
            info.update(cpu_info(fh.read()))
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def format_report(report: dict) -> str:
    """A plain-text table of the medians, with diffusers / ours ratios per diffusers dtype."""
    o, cfg, dtypes = report["ours"], report["config"], report["config"]["diffusers_dtypes"]
    rows = [
        ("end to end (s)", "end_to_end_s", "{:.3f}"), ("real-time factor", "real_time_factor", "{:.4f}"),
        ("VAE encode of the source (s)", "audio_encode_s", "{:.3f}"),
        ("encode (s)", "encode_s", "{:.4f}"), ("DiT step, median (s)", "dit_step_s", "{:.4f}"),
        ("DiT, all steps (s)", "dit_total_s", "{:.3f}"), ("VAE decode (s)", "decode_s", "{:.3f}"),
        ("host peak during run (MB)", "host_peak_mb", "{:.0f}"), ("GPU peak (MB)", "gpu_peak_mb", "{:.0f}"),
        ("load time (s)", "load_s", "{:.2f}"), ("RSS after load (MB)", "load_rss_mb", "{:.0f}"),
    ]
    fmt = lambda f, v: "n/a" if v is None else f.format(v)  # noqa: E731
    mode = report["mode"]
    how = (f"one process per side, one after the other ({mode['reason'] or 'asked for'})"
           if mode["separate_processes"] else f"{o['runs']} alternating rounds in one process")
    recipe = report["precision"].get("recipe", "fp32")
    lines = [
        f"{cfg['task']}, {cfg['duration']:g} s clip, batch {cfg['batch']}, {cfg['steps']} steps, "
        f"device {cfg['device']}, ours {cfg['backend']} {recipe}, {how}, {cfg['runs']} timed runs after "
        f"{cfg['warmup']} warm-up",
        f"hardware: {json.dumps(report['hardware'])}",
        f"{'':<28}{'acestep-trt ' + recipe:>18}" + "".join(f"{'diffusers ' + d:>16}{'ratio':>8}" for d in dtypes),
    ]
    for label, key, f in rows:
        if key == "audio_encode_s" and cfg["task"] == "text2music":
            continue  # no source audio to encode
        line = f"{label:<28}{fmt(f, o[key]):>18}"
        for dtype in dtypes:
            ratio = report["speedup"][dtype].get(key)
            line += f"{fmt(f, report['diffusers'][dtype][key]):>16}{'' if ratio is None else f'{ratio:.2f}x':>8}"
        lines.append(line)
    if mode["process_peak_mb"]:
        peaks = ", ".join(f"{name} {mb:.0f}" for name, mb in mode["process_peak_mb"].items())
        lines.append(f"process peak RSS (MB, load included): {peaks}")
    for dtype in dtypes:
        audio = report["audio"][dtype]
        snr = audio["snr_db"]
        snr_text = f"{snr:.1f} dB" if isinstance(snr, float) else snr
        lines.append(f"audio, ours against diffusers {dtype}: max |difference| {audio['max_abs_diff']:.2e}, "
                     f"SNR {snr_text}")
    lines.append("ratio = diffusers time / ours (above 1: ours is faster)")
    return "\n".join(lines)
