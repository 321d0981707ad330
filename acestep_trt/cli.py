"""``acestep-trt`` command line. Errors become one line on stderr and a non-zero exit code, no traceback.

Heavy imports (torch for export, onnxruntime for generate) happen inside the commands, so that
``generate`` never imports torch and ``--help`` is instant.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from acestep_trt.runtime.errors import AceStepError, InputError

log = logging.getLogger("acestep_trt")


class _Group(click.Group):
    """Maps :class:`AceStepError` to its exit code with the message only."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AceStepError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGHUP (runtime/staging.py): cleanup has run
            click.echo(f"interrupted{f' ({err})' if str(err) else ''}; nothing partial was left behind", err=True)
            sys.exit(128 + getattr(err, "signum", 2))
        except MemoryError:
            click.echo("error: out of memory. Fix: generate a shorter clip or fewer prompts, or use a smaller "
                       "--vae-window.", err=True)
            sys.exit(6)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "httpx", "urllib3", "diffusers", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="acestep-trt")
def main(verbose: bool) -> None:
    """Export ACE-Step 1.5 to ONNX and generate music without PyTorch."""
    from acestep_trt.runtime.staging import install_signal_handlers

    _setup_logging(verbose)
    install_signal_handlers()  # SIGTERM/SIGHUP clean up like Ctrl-C


@main.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("artifacts_dir", type=click.Path(path_type=Path))
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Compare every graph with PyTorch in ONNX Runtime at off-trace shapes.")
@click.option("--overwrite", is_flag=True, help="Replace ARTIFACTS_DIR if it exists.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
              help="Recipe: fp32 everywhere; bf16 encoders and DiT (fp32 islands) with an fp32 VAE, for the GPU; "
                   "or int8 matrix products in the encoders and DiT with an fp32 VAE, for the CPU.")
@click.option("--graph-precision", "graph_precision", multiple=True, metavar="GRAPH=DTYPE",
              help="Override one graph's dtype (fp32, bf16, fp16, int8), e.g. text_encoder=fp16. Repeatable.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="Fuse a LoRA into the DiT (fixed deployments, e.g. Triton). Repeatable; recorded in the manifest.")
def export_cmd(model_dir: Path, artifacts_dir: Path, validate: bool, overwrite: bool, precision: str,
               graph_precision: tuple[str, ...], loras: tuple[str, ...] = ()) -> None:
    """Export MODEL_DIR (a diffusers AceStepPipeline checkpoint) to ARTIFACTS_DIR."""
    from acestep_trt.export.checkpoint import inspect_checkpoint
    from acestep_trt.export.precision import parse_overrides, plan

    overrides = parse_overrides(graph_precision)
    plan(precision, overrides)  # refuse a bad recipe before importing torch
    inspect_checkpoint(model_dir)  # refuse a wrong directory before importing torch
    fused = _lora_options(loras)
    report = _export(model_dir, artifacts_dir, validate, overwrite, precision, overrides, fused)
    if report.comparisons:
        from acestep_trt.export.validate import TABLE_HEADER

        click.echo(TABLE_HEADER)
        for row in report.comparisons:
            click.echo(row.row())
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    click.echo(f"artifacts written to {artifacts_dir} ({stages})")


def _lora_options(items: tuple[str, ...]) -> list[tuple[str, float]]:
    """``--lora PATH[:SCALE]`` values -> [(path, scale)]; a missing path is refused before any work."""
    from acestep_trt.runtime.errors import InputError
    from acestep_trt.runtime.lora import parse_lora_option

    out = [parse_lora_option(item) for item in items]
    for path, _ in out:
        if not Path(path).exists():
            raise InputError(f"--lora {path}: no such file or directory.", "pass a LoRA file or directory.")
    return out


def _export(model_dir: Path, artifacts_dir: Path, validate: bool, overwrite: bool, precision: str = "fp32",
            overrides: dict[str, str] | None = None, loras: list | None = None):
    import warnings

    from acestep_trt.export.exporter import export_artifacts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_artifacts(model_dir, artifacts_dir, validate=validate, overwrite=overwrite,
                                precision=precision, graph_precision=overrides, loras=loras)


def _read_lyrics(lyrics: str | None, lyrics_file: Path | None) -> str:
    if lyrics is not None and lyrics_file is not None:
        raise InputError("both --lyrics and --lyrics-file were given.", "pass only one of them.")
    if lyrics_file is None:
        return lyrics or ""
    try:
        return lyrics_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read lyrics file {lyrics_file} ({exc.__class__.__name__}).",
                         "pass an existing UTF-8 text file to --lyrics-file.") from None


def _read_latents(path: Path | None):
    import numpy as np

    if path is None:
        return None
    if not path.is_file():
        raise InputError(f"latents file {path} does not exist.", "pass an existing .npy file to --latents.")
    try:
        latents = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path} as a .npy array ({exc}).",
                         "save the noise with numpy.save as float32 [1, T, 64] or [T, 64].") from None
    return latents[None] if latents.ndim == 2 else latents


@main.command("generate")
@click.argument("artifacts_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Description of the music.")
@click.option("--lyrics", default=None, help="Lyrics text ([verse], [chorus] tags allowed).")
@click.option("--lyrics-file", type=click.Path(path_type=Path), default=None, help="Read the lyrics from a file.")
@click.option("--duration", type=float, default=None,
              help="Seconds of audio [default: 30; with --src-audio or --audio-codes, their length].")
@click.option("--steps", type=int, default=8, show_default=True, help="Denoising steps (turbo: 8).")
@click.option("--shift", type=float, default=3.0, show_default=True, help="Timestep schedule shift.")
@click.option("--guidance-scale", type=float, default=7.0, show_default=True,
              help="APG guidance for non-turbo checkpoints (ignored on turbo).")
@click.option("--seed", type=int, default=None, help="Noise seed (NumPy PCG64); random if omitted.")
@click.option("--latents", "latents_file", type=click.Path(path_type=Path), default=None,
              help="Initial noise as .npy [1, T, 64] (overrides --seed).")
@click.option("--language", default="en", show_default=True, help="Vocal language code of the lyrics.")
@click.option("--bpm", type=int, default=None, help="Beats per minute.")
@click.option("--keyscale", default=None, help='Key, e.g. "C major".')
@click.option("--timesignature", default=None, help='Time signature, e.g. "4".')
@click.option("--backend", type=click.Choice(["auto", "ort", "trt"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--engines", "engine_dir", type=click.Path(path_type=Path), default=None,
              help="TensorRT engine directory (default ARTIFACTS_DIR/engines).")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True, help="Output .wav or .flac.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--emulate-precision", is_flag=True,
              help="Run bf16/fp16 graphs on the CPU as fp32 arithmetic rounded to their dtype (slow; for checks).")
@click.option("--max-duration", type=float, default=None,
              help="Allow clips longer than 600 s, up to this many seconds (the model's range ends at 600 s).")
@click.option("--no-memory-check", is_flag=True, help="Skip the peak-memory estimate (runtime/limits.py).")
@click.option("--vae-window", type=int, default=256, show_default=True,
              help="Latent frames per VAE decoding window (smaller: less memory, a little slower).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="Apply a LoRA adapter at weight SCALE (default 1). Repeatable: adapters mix as set_adapters.")
@click.option("--task", "task_type", default="text2music", show_default=True,
              help="text2music, repaint, cover, extract, lego or complete.")
@click.option("--src-audio", type=click.Path(path_type=Path), default=None,
              help="Source audio (WAV/FLAC/OGG) for repaint, cover, extract, lego, complete.")
@click.option("--reference-audio", type=click.Path(path_type=Path), default=None,
              help="Reference recording for the timbre (any task).")
@click.option("--audio-codes", default=None, metavar="TEXT|@FILE",
              help="5 Hz audio codes (<|audio_code_N|> tokens, e.g. from encode-codes), inline or @FILE.")
@click.option("--repaint-start", type=float, default=None, help="Repaint/lego window start, seconds.")
@click.option("--repaint-end", type=float, default=None, help="Repaint/lego window end, seconds (-1: to the end).")
@click.option("--cover-strength", type=float, default=1.0, show_default=True,
              help="Cover: below 1 blends in the text2music condition every step (two DiT evaluations).")
@click.option("--track-name", default=None, help="Track for extract/lego, e.g. vocals.")
@click.option("--complete-classes", default=None, metavar="A,B", help="Track classes for complete, e.g. bass,drums.")
@click.pass_context
def generate_cmd(ctx, artifacts_dir, prompt, lyrics, lyrics_file, duration, steps, shift, guidance_scale, seed,
                 latents_file, language, bpm, keyscale, timesignature, backend, device, engine_dir, out_path,
                 overwrite, emulate_precision, max_duration, no_memory_check, vae_window, task_type, src_audio,
                 reference_audio, audio_codes, repaint_start, repaint_end, cover_strength, track_name,
                 complete_classes, loras=()):
    """Generate music from ARTIFACTS_DIR and write it to --out."""
    from acestep_trt.runtime import AceStepRuntime
    from acestep_trt.runtime.audio import check_output_path, write_audio
    from acestep_trt.runtime.limits import Limits
    from acestep_trt.runtime.pipeline import check_arguments, check_prompts
    from acestep_trt.runtime.staging import TargetLock
    from acestep_trt.runtime.tasks import check_task_type

    check_output_path(out_path, overwrite)
    ctx.call_on_close(TargetLock(out_path, "writing").acquire().release)  # a second generate to --out is refused
    limits = Limits(max_duration=600.0 if max_duration is None else max_duration, check_memory=not no_memory_check)
    lyrics_text = _read_lyrics(lyrics, lyrics_file)
    latents = _read_latents(latents_file)
    check_prompts(prompt)
    check_task_type(task_type)
    task_args = _task_arguments(artifacts_dir, src_audio, reference_audio, audio_codes, complete_classes)
    if duration is None and src_audio is None and task_args["audio_codes"] is None:
        duration = 30.0
    # runtime/limits.py, before loading; None: the source's length, checked by the runtime
    check_arguments(30.0 if duration is None else duration, steps, shift, guidance_scale, limits=limits)
    adapters = _lora_options(loras)
    started = time.perf_counter()
    rt = AceStepRuntime.load(artifacts_dir, backend=backend, device=device, engine_dir=engine_dir,
                             emulate_precision=emulate_precision, limits=limits, vae_window=vae_window)
    if adapters:  # each adapter under its own name, then mixed with the given weights (diffusers' set_adapters)
        names = [rt.load_lora_weights(path, adapter_name=f"lora{i}") for i, (path, _) in enumerate(adapters)]
        rt.set_adapters(names, [scale for _, scale in adapters])
    load_s = time.perf_counter() - started
    notes = task_args.pop("notes")
    out = rt(prompt=prompt, lyrics=lyrics_text, audio_duration=duration, vocal_language=language,
             num_inference_steps=steps, guidance_scale=guidance_scale, shift=shift, seed=seed, latents=latents,
             bpm=bpm, keyscale=keyscale, timesignature=timesignature, show_progress=None, task_type=task_type,
             repainting_start=repaint_start, repainting_end=repaint_end, audio_cover_strength=cover_strength,
             track_name=track_name, **task_args)
    write_audio(out_path, out.audios[0], out.sample_rate, overwrite)
    times = ", ".join(f"{k} {v:.2f}s" for k, v in {"load": load_s, **out.timings}.items())
    seed_note = f", seed {out.seeds[0]}" if out.seeds else ""
    seconds = out.audios.shape[-1] / out.sample_rate
    task_note = "" if out.task == "text2music" else f"; {out.task}" + "".join(f"; {n}" for n in notes)
    click.echo(f"wrote {out_path} ({seconds:g} s at {out.sample_rate} Hz{seed_note}{task_note}; {times})")


def _task_arguments(artifacts_dir, src_audio, reference_audio, audio_codes, complete_classes) -> dict:
    """Read the task's files before any graph loads: audio at the model's rate, codes text, class list."""
    from acestep_trt.runtime.artifacts import read_manifest
    from acestep_trt.runtime.audio_input import read_audio, read_codes

    args = {"src_audio": None, "reference_audio": None, "audio_codes": read_codes(audio_codes),
            "complete_track_classes": [c.strip() for c in complete_classes.split(",") if c.strip()]
            if complete_classes else None, "notes": []}
    if src_audio is not None or reference_audio is not None:
        model = read_manifest(artifacts_dir)["model"]
        for key, path, option in (("src_audio", src_audio, "--src-audio"),
                                  ("reference_audio", reference_audio, "--reference-audio")):
            if path is not None:
                read = read_audio(path, int(model["sample_rate"]), int(model["audio_channels"]), option)
                args[key] = read.audio
                args["notes"].append(f"{option[2:]} {read.note}")
    return args


@main.command("encode-codes")
@click.argument("artifacts_dir", type=click.Path(path_type=Path))
@click.argument("audio", type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True, help="Text file for the codes.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def encode_codes_cmd(artifacts_dir, audio, out_path, overwrite, device):
    """Turn AUDIO into 5 Hz audio codes (<|audio_code_N|> tokens), the form --audio-codes reads.

    The VAE posterior's mean is tokenised, so the same file always gives the same codes.
    """
    from acestep_trt.runtime import AceStepRuntime
    from acestep_trt.runtime.artifacts import read_manifest
    from acestep_trt.runtime.audio_input import read_audio, write_codes
    from acestep_trt.runtime.tasks import encode_codes

    if out_path.exists() and not overwrite:
        raise InputError(f"{out_path} already exists.", "choose another --out, or pass --overwrite to replace it.")
    if not out_path.parent.is_dir():
        raise InputError(f"directory {out_path.parent} does not exist.", "create it first or choose another --out.")
    model = read_manifest(artifacts_dir)["model"]
    read = read_audio(audio, int(model["sample_rate"]), int(model["audio_channels"]), "AUDIO")
    rt = AceStepRuntime.load(artifacts_dir, backend="ort", device=device)
    codes = encode_codes(rt, read.audio)
    write_codes(out_path, codes)
    click.echo(f"wrote {out_path} ({codes.count('<|audio_code_')} codes from {read.note})")


@main.command("bench")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("artifacts_dir", type=click.Path(path_type=Path))
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds of audio per run.")
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True, help="Timed runs per side (alternating).")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--diffusers-dtype", "diffusers_dtypes", type=click.Choice(["fp32", "bf16", "fp16"]), multiple=True,
              help="Precision of a diffusers side; repeatable. Default: fp32 and bf16 on cpu, bf16 on cuda.")
@click.option("--torch-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, hidden=True,
              help="Old name of --diffusers-dtype (one dtype).")
@click.option("--separate-processes/--same-process", "separate", default=None,
              help="Run each side in a process of its own, one after the other (default: only when the sides "
                   "do not fit in memory together).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report.")
@click.option("--task", type=click.Choice(["text2music", "repaint"]), default="text2music", show_default=True,
              help="repaint: a synthetic source clip of --duration, VAE encode timed as its own stage.")
def bench_cmd(model_dir, artifacts_dir, duration, steps, batch, runs, warmup, device, backend, diffusers_dtypes,
              torch_dtype, separate, json_out, task):
    """Time this toolkit against diffusers' AceStepPipeline on MODEL_DIR, side by side."""
    import json
    import warnings

    from acestep_trt.export.bench import BenchConfig, default_diffusers_dtypes, format_report, run_bench
    from acestep_trt.export.checkpoint import inspect_checkpoint
    from acestep_trt.runtime.artifacts import read_manifest
    from acestep_trt.runtime.pipeline import check_arguments

    inspect_checkpoint(model_dir)
    read_manifest(artifacts_dir)
    check_arguments(duration, steps)
    for name, value in (("--batch", batch), ("--runs", runs)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}.", f"pass {name} 1 or more.")
    dtypes = tuple(dict.fromkeys(diffusers_dtypes + ((torch_dtype,) if torch_dtype else ())))
    cfg = BenchConfig(duration=duration, steps=steps, batch=batch, runs=runs, warmup=max(warmup, 0),
                      device=device, backend=backend, separate=separate, task=task,
                      diffusers_dtypes=dtypes or default_diffusers_dtypes(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_bench(model_dir, artifacts_dir, cfg)
    click.echo(format_report(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


@main.command("compare")
@click.argument("reference_dir", type=click.Path(path_type=Path))
@click.argument("candidate_dir", type=click.Path(path_type=Path))
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds of audio per case.")
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--seeds", type=int, default=1, show_default=True, help="Noise seeds per prompt (3 prompts).")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu emulates bf16/fp16 graphs in fp32 arithmetic; cuda runs them natively.")
@click.option("--min-audio-snr-db", type=float, default=None,
              help="Exit with code 5 if any case's audio SNR is below this (for CI).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report.")
def compare_cmd(reference_dir, candidate_dir, duration, steps, seeds, backend, device, min_audio_snr_db, json_out):
    """Audio and latent SNR of CANDIDATE_DIR against REFERENCE_DIR (e.g. a bf16 export against fp32)."""
    import json

    from acestep_trt.runtime.compare import compare_artifacts, format_report
    from acestep_trt.runtime.errors import ExportValidationError
    from acestep_trt.runtime.pipeline import check_arguments

    check_arguments(duration, steps)
    if seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {seeds}.", "pass --seeds 1 or more.")
    report = compare_artifacts(reference_dir, candidate_dir, duration, steps, seeds, backend, device)
    click.echo(format_report(report))
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    if not report.all_finite:
        raise ExportValidationError(f"{candidate_dir} produced NaN or Inf.", "export it with --precision fp32.")
    if min_audio_snr_db is not None and report.min_audio_snr_db < min_audio_snr_db:
        raise ExportValidationError(
            f"audio SNR {report.min_audio_snr_db:.1f} dB is below --min-audio-snr-db {min_audio_snr_db:g}.",
            "use a higher-precision export (--precision fp32, or fp32 overrides for the weakest graph).")


@main.command("build")
@click.argument("artifacts_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Engine directory (default ARTIFACTS_DIR/engines).")
@click.option("--min-duration", type=float, default=10.0, show_default=True, help="Shortest clip, seconds.")
@click.option("--opt-duration", type=float, default=60.0, show_default=True, help="Clip length tuned for.")
@click.option("--max-duration", type=float, default=240.0, show_default=True, help="Longest clip, seconds.")
@click.option("--max-batch", type=int, default=1, show_default=True,
              help="Prompts per call (the DiT engine takes twice this on non-turbo models, for guidance).")
@click.option("--max-text-len", type=int, default=256, show_default=True, help="Prompt tokens (runtime max 256).")
@click.option("--max-lyric-len", type=int, default=2048, show_default=True, help="Lyric tokens (runtime max 2048).")
@click.option("--vae-window", type=int, default=256, show_default=True,
              help="Latent frames per VAE window (the runtime's vae_window).")
@click.option("--precision", type=click.Choice(["fp32", "tf32"]), default="fp32", show_default=True,
              help="fp32 graphs: exact fp32 or TF32 matmuls. Reduced precision comes from the ONNX graph.")
@click.option("--version-compatible", is_flag=True,
              help="Engines that later TensorRT releases and the lean runtime (tensorrt-lean) can run.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file to read and update (default OUT/timing.cache).")
@click.option("--workspace-gib", type=float, default=None, help="Builder workspace limit, GiB.")
@click.option("--force", is_flag=True, help="Rebuild every engine even if it is up to date.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Compare every engine with ONNX Runtime (CPU) at the profile's opt shapes.")
@click.option("--refit", is_flag=True, help="Make the DiT engine refittable, for LoRA adapters at generate time.")
@click.option("--validate-tolerance", "validate_tolerance", multiple=True, metavar="DB|GRAPH=DB",
              help="Minimum engine-vs-ONNX Runtime SNR in dB, replacing the per-precision floors (fp32 60, tf32 40, "
                   "bf16 30, fp16 40; fp32/tf32 uncalibrated) for every graph or one. Repeatable.")
def build_cmd(artifacts_dir, out_dir, min_duration, opt_duration, max_duration, max_batch, max_text_len,
              max_lyric_len, vae_window, precision, version_compatible, timing_cache, workspace_gib, force,
              validate, validate_tolerance, refit=False):
    """Build TensorRT engines for ARTIFACTS_DIR (needs TensorRT and an NVIDIA GPU)."""
    from acestep_trt.runtime.trt.builder import build_engines
    from acestep_trt.runtime.trt.profiles import ProfileRequest
    from acestep_trt.runtime.trt.validate import parse_tolerances

    overrides = parse_tolerances(validate_tolerance)  # a bad value fails before anything is built

    request = ProfileRequest(min_duration=min_duration, opt_duration=opt_duration, max_duration=max_duration,
                             max_batch=max_batch, max_text_len=max_text_len,
                             max_lyric_len=max_lyric_len, vae_window=vae_window)
    started = time.perf_counter()
    manifest = build_engines(artifacts_dir, out_dir, request, precision, version_compatible, timing_cache,
                             workspace_gib, force, refit=refit)
    click.echo(f"engines written to {manifest.root} (TensorRT {manifest.tensorrt_version}, compute capability "
               f"{manifest.compute_capability}, {time.perf_counter() - started:.1f} s)")
    for name, record in manifest.data["graphs"].items():
        ranges = ", ".join(f"{dim} {r['min']}..{r['max']}" for dim, r in record["profile"]["dims"].items())
        click.echo(f"  {name:<18} {record['bytes'] / 2**20:8.1f} MiB  {ranges}")
    if validate:
        _validate_engines(artifacts_dir, manifest, overrides)


def _validate_engines(artifacts_dir: Path, manifest, overrides: dict[str, float]) -> None:
    """Engine vs ONNX Runtime per graph; raises ExportValidationError (exit 5) beyond tolerance.

    fp32 graphs run on ONNX Runtime's CPU provider; reduced-precision graphs natively on CUDA when
    onnxruntime-gpu is present, else emulated on the CPU.
    """
    from acestep_trt.runtime.artifacts import load_artifacts
    from acestep_trt.runtime.backends.ort import checking_graph
    from acestep_trt.runtime.backends.trt import load_engines
    from acestep_trt.runtime.trt import validate as tv

    artifacts = load_artifacts(artifacts_dir)
    trt_runners = load_engines(artifacts, manifest.root, manifest.request.vae_window, full_hash=False)  # just built
    ort_runners = {name: checking_graph(artifacts.graph_path(name), artifacts.spec(name), artifacts.precision(name))
                   for name in trt_runners}  # the core graphs and the audio-to-audio graphs built
    precisions = {n: r["precision"] for n, r in manifest.data["graphs"].items() if "precision" in r}
    rows = tv.compare_engines(artifacts, trt_runners, ort_runners, manifest.data["precision"], overrides,
                              precisions)
    click.echo(tv.TABLE_HEADER)
    for row in rows:
        click.echo(row.row())
    if not overrides:
        click.echo("(SNR floors per precision; the fp32/tf32 ones are not calibrated on real TensorRT yet, see "
                   "docs/tensorrt.md; --validate-tolerance replaces them)")
    tv.raise_on_failure(rows)


@main.command("demo")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("acestep-demo"), show_default=True)
@click.option("--duration", type=float, default=10.0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out-dir if it exists.")
def demo_cmd(out_dir: Path, duration: float, overwrite: bool) -> None:
    """Tiny random checkpoint -> export -> generate a clip on CPU, timing each stage."""
    from acestep_trt.export.tiny import save_tiny_checkpoint
    from acestep_trt.runtime import AceStepRuntime
    from acestep_trt.runtime.audio import write_audio
    from acestep_trt.runtime.pipeline import check_arguments

    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir} already exists and is not empty.", "pass --overwrite or another --out-dir.")
    check_arguments(duration)
    out_dir.mkdir(parents=True, exist_ok=True)
    from acestep_trt.export import children

    # the export's fork server imports torch and diffusers (several seconds on one core) while this process
    # builds the checkpoint on the other; the export then finds it warm
    children.start()
    stages: dict[str, float] = {}
    demo_started = started = time.perf_counter()
    checkpoint = save_tiny_checkpoint(out_dir / "checkpoint")
    stages["build tiny checkpoint"] = time.perf_counter() - started
    started = time.perf_counter()
    _export(checkpoint, out_dir / "artifacts", validate=True, overwrite=True)
    stages["export + validate"] = time.perf_counter() - started
    started = time.perf_counter()
    rt = AceStepRuntime.load(out_dir / "artifacts", backend="ort", device="cpu")
    out = rt(prompt="upbeat electronic dance track with piano", lyrics="[verse]\nSoft notes in the morning light",
             audio_duration=duration, guidance_scale=1.0, seed=42, bpm=120, keyscale="C major", timesignature="4",
             show_progress=None)
    stages["generate (load + run)"] = time.perf_counter() - started
    wav = write_audio(out_dir / "demo.wav", out.audios[0], out.sample_rate, overwrite=True)
    click.echo(f"checkpoint: {checkpoint}")
    click.echo(f"artifacts:  {out_dir / 'artifacts'}")
    click.echo(f"audio:      {wav} ({duration:g} s, {out.sample_rate} Hz, {out.audios.shape[1]} channels)")
    stages["total"] = time.perf_counter() - demo_started
    for name, seconds in stages.items():
        click.echo(f"  {name:<24} {seconds:7.2f} s")


@main.command("triton")
@click.argument("artifacts_dir", type=click.Path(path_type=Path))
@click.argument("repository_dir", type=click.Path(path_type=Path))
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="TensorRT engine directory (<graph>.plan): graph models become tensorrt_plan.")
@click.option("--instances", type=int, default=1, show_default=True, help="Instances of every model.")
@click.option("--max-batch", type=int, default=None,
              help="max_batch_size of the graph models (the DiT gets twice that for guided checkpoints). Default 8, "
                   "or with --engines the batch the engines were built for (engines.json); more is refused.")
@click.option("--python-onnx-shim", is_flag=True,
              help="Also write python-backend stand-ins of the ONNX models (configs/python_onnx.pbtxt) for "
                   "servers without the onnxruntime backend; see docs/triton.md.")
@click.option("--request-timeout", type=float, default=900.0, show_default=True,
              help="Seconds a request may run in the orchestrator before it is stopped (0: no limit).")
@click.option("--overwrite", is_flag=True, help="Replace REPOSITORY_DIR if it exists.")
def triton_cmd(artifacts_dir, repository_dir, engines, instances, max_batch, python_onnx_shim, request_timeout,
               overwrite):
    """Write a Triton model repository for ARTIFACTS_DIR to REPOSITORY_DIR."""
    from acestep_trt.runtime.triton.repository import RepositoryOptions, write_repository

    options = RepositoryOptions(engines=engines, instances=instances, max_batch=max_batch,
                                python_onnx_shim=python_onnx_shim, request_timeout=request_timeout)
    write_repository(artifacts_dir, repository_dir, options, overwrite=overwrite)
    kind = "tensorrt_plan" if engines else "onnxruntime_onnx"
    click.echo(f"wrote {repository_dir}: acestep (python, BLS) + 4 graph models ({kind})")


@main.command("triton-client")
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="host:port of the HTTP or gRPC endpoint.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("--model", default="acestep", show_default=True, help="Orchestrator model name.")
@click.option("--prompt", required=True, help="Description of the music.")
@click.option("--lyrics", default=None, help="Lyrics text.")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds of audio.")
@click.option("--steps", type=int, default=None, help="Denoising steps (server default: 8).")
@click.option("--shift", type=float, default=None, help="Timestep schedule shift (server default: 3.0).")
@click.option("--seed", type=int, default=None, help="Noise seed; random if omitted.")
@click.option("--language", default=None, help="Vocal language code.")
@click.option("--bpm", type=int, default=None)
@click.option("--keyscale", default=None)
@click.option("--timesignature", default=None)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait for the audio.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True, help="Output .wav or .flac.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def triton_client_cmd(url, protocol, model, prompt, lyrics, duration, steps, shift, seed, language, bpm, keyscale,
                      timesignature, timeout, out_path, overwrite):
    """Send a prompt to a Triton server running the acestep model and write the audio to --out."""
    from acestep_trt.runtime.audio import check_output_path, write_audio
    from acestep_trt.runtime.triton.client import request_audio

    check_output_path(out_path, overwrite)
    started = time.perf_counter()
    audio, rate = request_audio(url, protocol, model=model, timeout=timeout, prompt=prompt, lyrics=lyrics,
                                audio_duration=duration, num_inference_steps=steps, shift=shift, seed=seed,
                                vocal_language=language, bpm=bpm, keyscale=keyscale, timesignature=timesignature)
    write_audio(out_path, audio, rate, overwrite)
    click.echo(f"wrote {out_path} ({audio.shape[-1] / rate:g} s at {rate} Hz via {protocol}; "
               f"{time.perf_counter() - started:.2f}s)")


@main.command("triton-serve")
@click.argument("repository_dir", type=click.Path(path_type=Path))
@click.option("--python", "python_exe", type=click.Path(path_type=Path), default=Path(".venv-triton/bin/python"),
              show_default=True, help="Python of the environment with nvidia-pytriton and numpy<2.")
@click.option("--model-config-name", default=None, help="e.g. python_onnx, to serve the ONNX shims.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Server log and backends copy.")
def triton_serve_cmd(repository_dir, python_exe, model_config_name, workdir):
    """Run nvidia-pytriton's tritonserver on 127.0.0.1 for REPOSITORY_DIR until interrupted (development)."""
    import signal
    import tempfile

    from acestep_trt.runtime.triton.server import LocalTritonServer

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on SIGTERM as on Ctrl-C
    workdir = workdir or Path(tempfile.mkdtemp(prefix="acestep-triton-"))
    server = LocalTritonServer(repository_dir.resolve(), python_exe.absolute(), workdir, model_config_name)
    with server:
        click.echo(f"Triton ready: http {server.http_url}, grpc {server.grpc_url} (log {server.log_path})")
        while server.alive():
            time.sleep(1)
        click.echo(f"tritonserver exited:\n{server.log_tail(2000)}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
