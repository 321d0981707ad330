"""``acestep-trt export``: checkpoint -> validated artifact directory.

Stages per graph: load the component, wrap it in its adapter, trace with ``torch.onnx.export(dynamo=True)``
(external data, so full-size graphs need no 2 GB protobuf), name the symbolic dims after the spec,
validate in ONNX Runtime against the upstream PyTorch module at off-trace shapes, free the module.
Everything is written into a temporary sibling directory that replaces the target only on success,
so a failed export never leaves a half-written artifact directory or touches an existing one.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from acestep_trt.runtime import artifacts as art
from acestep_trt.runtime import staging as stg
from acestep_trt.runtime.errors import InputError
from acestep_trt.runtime.specs import (
    AUDIO_DETOKENIZER,
    AUDIO_TOKENIZER,
    COVER_BLEND,
    VAE_ENCODER,
    CONDITION_ENCODER,
    DIT_STEP,
    TEXT_ENCODER,
    VAE_DECODER,
    GraphSpec,
    ModelConfig,
    all_specs,
    audio_specs,
)

from . import precision as prec
from . import graph_rewrites
from . import validate as val
from .checkpoint import (inspect_audio_tokenizer, inspect_checkpoint, load_component, memory_geometry,
                         scheduler_config)
from . import children
from .children import run_in_child
from .quantize import quantize_int8

log = logging.getLogger(__name__)

OPSET = 20
DIM_MAX = {"batch": 256, "text_len": 4096, "lyric_len": 8192, "timbre_len": 1 << 16, "cond_len": 1 << 14,
           "latent_len": 1 << 17, "audio_len": 1 << 26, "patches": 1 << 15}
# Graphs traced in one child process (one torch import each); graphs of the same component share a child.
EXPORT_GROUPS = ((TEXT_ENCODER,), (CONDITION_ENCODER, AUDIO_TOKENIZER, AUDIO_DETOKENIZER), (DIT_STEP,),
                 (VAE_DECODER, VAE_ENCODER))
# With parallel tracing (:func:`tracing_plan`): one graph per child, longest trace first (tiny checkpoint).
TRACE_ORDER = (DIT_STEP, VAE_ENCODER, CONDITION_ENCODER, VAE_DECODER, TEXT_ENCODER, AUDIO_TOKENIZER,
               AUDIO_DETOKENIZER)
PARALLEL_MAX_BYTES = 1 << 30  # checkpoints with at most this many bytes of weights trace two graphs at once
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORK_DIR = ".work"  # reference outputs and constants handed from the tracing child to this process


@dataclass
class GraphRecipe:
    """How to export one graph: which component, which adapter, which upstream call to compare with."""

    component: str
    adapter: Callable  # module -> nn.Module whose forward args are the spec's input names
    reference: Callable  # (module, torch feeds) -> {output name: tensor}


def _text_ref(module, feeds):
    return {"text_hidden_states": module(input_ids=feeds["input_ids"]).last_hidden_state}


def _cond_ref(module, feeds):
    import torch

    batch = feeds["timbre_latents"].shape[0]
    states, mask = module(
        text_hidden_states=feeds["text_hidden_states"],
        text_attention_mask=feeds["text_attention_mask"],
        lyric_hidden_states=feeds["lyric_hidden_states"],
        lyric_attention_mask=feeds["lyric_attention_mask"],
        refer_audio_acoustic_hidden_states_packed=feeds["timbre_latents"],
        refer_audio_order_mask=torch.arange(batch),
    )
    return {"encoder_hidden_states": states, "encoder_attention_mask": mask}


def _dit_ref(module, feeds):
    velocity = module(
        hidden_states=feeds["latents"],
        timestep=feeds["timestep"],
        timestep_r=feeds["timestep"],
        encoder_hidden_states=feeds["encoder_hidden_states"],
        context_latents=feeds["context_latents"],
        return_dict=False,
    )[0]
    return {"velocity": velocity, "next_latents": feeds["latents"] + feeds["dt"][:, None, None] * velocity}


def _vae_ref(module, feeds):
    return {"audio": module.decode(feeds["latents"]).sample}


def _vae_encoder_ref(module, feeds):
    posterior = module.encode(feeds["audio"]).latent_dist
    return {"mean": posterior.mean, "std": posterior.std}


def _tokenizer_ref(module, feeds):
    quantized, indices = module(feeds["latent_patches"])
    return {"quantized": quantized, "indices": indices}


def _detokenizer_ref(module, feeds):
    return {"latents": module(feeds["quantized"])}


def _recipes() -> dict[str, GraphRecipe]:
    from .graphs.condition_encoder import ConditionEncoderAdapter
    from .graphs.dit_step import DitStepAdapter
    from .graphs.text_encoder import TextEncoderAdapter
    from .graphs.audio_tokenizer import AudioDetokenizerAdapter, AudioTokenizerAdapter
    from .graphs.vae_decoder import VaeDecoderAdapter
    from .graphs.vae_encoder import VaeEncoderAdapter

    return {
        TEXT_ENCODER: GraphRecipe("text_encoder", TextEncoderAdapter, _text_ref),
        CONDITION_ENCODER: GraphRecipe("condition_encoder", ConditionEncoderAdapter, _cond_ref),
        DIT_STEP: GraphRecipe("transformer", DitStepAdapter, _dit_ref),
        VAE_DECODER: GraphRecipe("vae", VaeDecoderAdapter, _vae_ref),
        VAE_ENCODER: GraphRecipe("vae", VaeEncoderAdapter, _vae_encoder_ref),
        AUDIO_TOKENIZER: GraphRecipe("audio_tokenizer", AudioTokenizerAdapter, _tokenizer_ref),
        AUDIO_DETOKENIZER: GraphRecipe("audio_token_detokenizer", AudioDetokenizerAdapter, _detokenizer_ref),
    }


def export_specs(cfg: ModelConfig, model_dir) -> dict[str, GraphSpec]:
    """Every graph this checkpoint exports: the four core graphs plus the audio-to-audio ones it supports."""
    return {**all_specs(cfg), **audio_specs(cfg, inspect_audio_tokenizer(model_dir))}


@dataclass
class ExportReport:
    out_dir: Path
    precision: prec.PrecisionPlan
    seconds: dict[str, float] = field(default_factory=dict)
    comparisons: list = field(default_factory=list)


def _to_torch(feeds: dict[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def trace_to_onnx(adapter, spec: GraphSpec, cfg: ModelConfig, path: Path) -> None:
    """Export ``adapter`` to ``path`` (+ ``path.data``) with every symbolic dim of ``spec`` dynamic."""
    import torch

    quiet_exporter_logs()
    feeds = _to_torch(val.make_inputs(spec, val.trace_dims(cfg), cfg, seed=1))
    dims: dict[str, object] = {}
    dynamic = tuple(
        {axis: dims.setdefault(d, torch.export.Dim(d, min=1, max=DIM_MAX[d]))
         for axis, d in enumerate(t.dims) if isinstance(d, str)}
        for t in spec.inputs
    )
    with torch.no_grad():
        program = torch.onnx.export(
            adapter,
            tuple(feeds[t.name] for t in spec.inputs),
            dynamo=True,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    graph_rewrites.apply(program.model)  # RMSNorms in the form ONNX Runtime fuses (export/graph_rewrites.py)
    program.save(str(path), external_data=True)
    del program
    name_dims(path, spec)


def quiet_exporter_logs() -> None:
    """torch sets its own log levels; keep its exporter's chatter (e.g. skipped torchvision ops) out."""
    for noisy in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def name_dims(path: Path, spec: GraphSpec) -> None:
    """Rename the exporter's symbolic dims (s0, s1...) after the spec, so the ONNX file states the contract."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        by_name = {t.name: t for t in tensors}
        for value in values:
            for dim, want in zip(value.type.tensor_type.shape.dim, by_name[value.name].dims):
                if isinstance(want, str):
                    dim.ClearField("dim_value")
                    dim.dim_param = want
    onnx.save(model, str(path))


def reference_outputs(module, recipe: GraphRecipe, spec: GraphSpec, cfg: ModelConfig) -> list[tuple]:
    """Upstream PyTorch outputs at each validation binding: [(dims, feeds, {output: array})]."""
    import torch

    cases = []
    for i, dims in enumerate(val.validation_dims(cfg)):
        feeds = val.make_inputs(spec, dims, cfg, seed=10 + i)
        with torch.no_grad():
            ref = {k: v.detach().numpy() for k, v in recipe.reference(module, _to_torch(feeds)).items()}
        cases.append((dims, feeds, ref))
    return cases


def validate_graph(cases: list[tuple], spec: GraphSpec, path: Path, dtype: str = "fp32",
                   min_snr_db: float | None = None):
    """Run the ONNX graph on each case's feeds and compare with the fp32 reference; return comparisons.

    fp32 graphs run on ONNX Runtime's CPU provider (max-abs bound). Reduced-precision graphs run natively
    on CUDA when onnxruntime-gpu sees a GPU, else emulated on the CPU, and must keep ``min_snr_db``
    against fp32. Called after the PyTorch module is freed, so a full-size graph never sits in memory twice.
    """
    from acestep_trt.runtime.backends.ort import checking_graph

    graph = checking_graph(path, spec, dtype)
    rows = []
    for dims, feeds, ref in cases:
        got = graph.run(feeds)
        rows.extend(val.compare(spec, dims, got, ref, min_snr_db))
    return rows


def _prepare_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise InputError(
                f"{out_dir} already exists and is not empty.",
                "choose a new ARTIFACTS_DIR, or pass --overwrite to replace it.",
            )


def export_artifacts(
    model_dir: str | Path,
    out_dir: str | Path,
    validate: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    precision: str = "fp32",
    graph_precision: dict[str, str] | None = None,
    loras: list[tuple[str, float]] | None = None,
) -> ExportReport:
    """Export every graph of ``model_dir`` into ``out_dir``; see the module docstring.

    ``precision`` names a recipe of :mod:`acestep_trt.export.precision` (``fp32``, ``bf16``);
    ``graph_precision`` overrides single graphs, e.g. ``{"text_encoder": "fp16"}``.
    ``loras``: [(LoRA path, scale)] fused into the DiT before tracing (``export/weight_map.fuse_loras``).
    """
    from tqdm.auto import tqdm

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    children.start()  # its imports of torch and diffusers overlap with the checks below
    plan = prec.plan(precision, graph_precision)
    cfg = inspect_checkpoint(model_dir)
    _prepare_target(out_dir, overwrite)
    lock = stg.TargetLock(out_dir, "exporting into").acquire()  # a second export into out_dir is refused
    staging = stg.make_staging(out_dir)  # marked with our pid; stale ones of killed exports are removed
    report = ExportReport(out_dir=out_dir, precision=plan)
    try:
        specs = export_specs(cfg, model_dir)
        extra: dict = {"audio_tokenizer": inspect_audio_tokenizer(model_dir)}
        jobs, workers = tracing_plan(model_dir, specs)
        with tqdm(total=len(jobs) + 1, desc="export", unit="graph", disable=not progress) as bar:
            _export_groups(model_dir, staging, jobs, workers, specs, plan, validate, report, extra, loras or [], bar)
            _export_cover_blend(staging, specs[COVER_BLEND], validate, report)
            bar.set_postfix_str("constants")
            _write_side_files(model_dir, staging, extra)
            shutil.rmtree(staging / WORK_DIR, ignore_errors=True)
            bar.update()
        _write_manifest(model_dir, staging, cfg, specs, report, extra)
        _apply_umask(staging)
        stg.publish(staging, out_dir)  # runtimes holding the old files keep them (runtime/staging.py)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        lock.release()
    return report


def _apply_umask(root: Path) -> None:
    """mkdtemp and safetensors create private (0700/0600) paths; give the result the user's usual modes."""
    for path in [root, *root.rglob("*")]:
        path.chmod(art.default_mode(path.is_dir()))


def tracing_plan(model_dir: Path, specs: dict) -> tuple[list[tuple[str, ...]], int]:
    """The graphs each tracing child traces, and how many children run at once.

    Tracing is single-threaded Python (torch.export, decompositions, onnxscript's optimiser), so on two or
    more cores a checkpoint of at most :data:`PARALLEL_MAX_BYTES` of weights traces one graph per child, two
    children at once, longest first (:data:`TRACE_ORDER`): each child then peaks at a few hundred MB.
    Larger checkpoints trace one group of graphs that share a component (:data:`EXPORT_GROUPS`) per
    child, one child at a time, validating in between: the full-size DiT's child alone peaks near 7 GiB.
    """
    weights = sum(p.stat().st_size for p in Path(model_dir).rglob("*.safetensors"))
    if children.cores() >= 2 and weights <= PARALLEL_MAX_BYTES:
        return [(name,) for name in TRACE_ORDER if name in specs], 2
    return [tuple(n for n in group if n in specs) for group in EXPORT_GROUPS], 1


def _export_groups(model_dir, staging, jobs, workers, specs, plan, validate, report, extra, loras, bar) -> None:
    """Trace each job's graphs in a child process (:func:`children.run_jobs`), then validate them here.

    torch's ONNX exporter keeps references to the traced module's parameters after export (module-level
    state reached through closures), so tracing in this process would keep every graph's fp32 weights
    alive next to the validation session: 17 GiB peak for the full-size DiT, too much for an XL model
    on a 24 GB machine. A child (forked from a server that has imported torch and diffusers:
    :mod:`acestep_trt.export.children`) returns its memory when it exits. Validation happens here once
    the child is gone; with one worker the next child starts only after it.
    """
    (staging / WORK_DIR).mkdir(exist_ok=True)
    dtypes = {name: _graph_dtype(plan, name) for name in specs}
    work = [(f"tracing {', '.join(names)}", _trace_group_in_child,
             (str(model_dir), str(staging), names, validate, {n: prec.trace_dtype(dtypes[n]) for n in names},
              list(loras))) for names in jobs]
    started: dict[int, float] = {}

    def on_start(index: int) -> None:
        log.info("exporting %s", ", ".join(jobs[index]))
        started[index] = time.perf_counter()

    rows: dict[str, list] = {}
    with closing(children.run_jobs(work, workers, on_start)) as finished:
        for index, results in finished:
            bar.set_postfix_str("+".join(jobs[index]))
            rows.update(_finish_group(staging, jobs[index], results, specs, plan, dtypes, validate, extra))
            report.seconds["+".join(jobs[index])] = time.perf_counter() - started[index]
            bar.update()
    for name in specs:  # the manifest lists comparisons in graph order, whichever child finished first
        report.comparisons.extend(rows.get(name, []))


def _finish_group(staging, names, results, specs, plan, dtypes, validate, extra) -> dict[str, list]:
    """Quantise (int8), collect the constants of, and validate the graphs one child traced: {graph: rows}."""
    rows = {}
    for name, result in zip(names, results):
        # in a child of its own, like tracing: a crash or an out-of-memory kill there is a BackendError naming
        # the step, and nothing it allocated stays in this process (it holds about one weight at a time)
        if dtypes[name] == "int8":
            run_in_child(f"quantising {name}", quantize_int8, staging / f"{name}.onnx", name)
            result["scalars"].pop("dit_parameters", None)  # it names fp32 initializers the quantiser replaced
        extra.update(result["scalars"])
        extra.update({key: np.load(path, mmap_mode="r") for key, path in result["arrays"].items()})  # read when written
        if validate:
            with open(result["cases"], "rb") as fh:
                cases = pickle.load(fh)
            snr = plan.min_snr_db(name) if name in plan.graphs else None
            rows[name] = validate_graph(cases, specs[name], staging / f"{name}.onnx", dtypes[name], snr)
            for row in rows[name]:
                log.info("%s", row.row())
            val.raise_on_failure(rows[name])
    return rows


def _graph_dtype(plan: prec.PrecisionPlan, name: str) -> str:
    """The precision plan covers the four core graphs; the audio-to-audio graphs are always fp32."""
    return plan.graphs.get(name, "fp32")


def _export_cover_blend(staging: Path, spec: GraphSpec, validate: bool, report: ExportReport) -> None:
    """Write ``cover_blend`` (no weights, no tracing) and check it against its NumPy reference."""
    from .graphs.cover_blend import reference, write_cover_blend

    path = staging / f"{COVER_BLEND}.onnx"
    write_cover_blend(spec, path, OPSET)
    if validate:
        cases = []
        for i, dims in enumerate([{"batch": 1, "latent_len": 9}, {"batch": 3, "latent_len": 31}]):
            rng = np.random.default_rng(i)
            shape = (dims["batch"], dims["latent_len"], spec.inputs[0].dims[-1])
            feeds = {"cover_latents": rng.standard_normal(shape).astype(np.float32),
                     "text2music_latents": rng.standard_normal(shape).astype(np.float32),
                     "strength": np.array([0.6], np.float32)}
            cases.append((dims, feeds, reference(feeds)))
        rows = validate_graph(cases, spec, path)
        report.comparisons.extend(rows)
        val.raise_on_failure(rows)


def _trace_group_in_child(model_dir: str, staging: str, names: tuple, validate: bool, dtypes: dict,
                          loras=()) -> list:
    """Child process: :func:`_trace_in_child` for each graph of a group, loading each component once."""
    modules: dict = {}
    return [_trace_in_child(model_dir, staging, name, validate, dtypes[name], modules, loras)
            for name in names]


def _trace_in_child(model_dir: str, staging: str, name: str, validate: bool, dtype: str,
                    modules: dict | None = None, loras=()) -> dict:
    """Child process: load one component, trace it in ``dtype``, save fp32 reference outputs and constants.

    References and constants come from the fp32 module, before it is cast for a reduced-precision trace.

    Returns {"cases": pickle path or None, "arrays": {constant: .npy path}, "scalars": {name: value}}.
    """
    import warnings

    warnings.simplefilter("ignore")
    staging_path, work = Path(staging), Path(staging) / WORK_DIR
    cfg = inspect_checkpoint(model_dir)
    recipe, spec = _recipes()[name], export_specs(cfg, model_dir)[name]
    modules = {} if modules is None else modules
    if recipe.component not in modules:
        modules[recipe.component] = load_component(model_dir, recipe.component)
    module = modules[recipe.component]
    result: dict = {"cases": None, "arrays": {}, "scalars": {}}
    if name == DIT_STEP and loras:  # fused before the references, so validation compares like with like
        from .weight_map import fuse_loras

        result["scalars"]["fused_lora"] = fuse_loras(module, loras)
    if validate:
        result["cases"] = str(work / f"{name}.cases.pkl")
        with open(result["cases"], "wb") as fh:
            pickle.dump(reference_outputs(module, recipe, spec, cfg), fh, protocol=pickle.HIGHEST_PROTOCOL)
    extra: dict = {}
    _collect_constants(name, module, cfg, extra)
    trace_to_onnx(prec.prepare(name, recipe.adapter(module), dtype), spec, cfg, staging_path / f"{name}.onnx")
    if name == DIT_STEP:  # LoRA at generate time needs each weight's initializer (prepare cast it in place)
        from .weight_map import build_map

        result["scalars"]["dit_parameters"] = build_map(module, staging_path / f"{name}.onnx")
    for key, value in extra.items():
        if isinstance(value, np.ndarray):
            result["arrays"][key] = str(work / f"{key}.npy")
            np.save(result["arrays"][key], value)
        else:
            result["scalars"][key] = value
    return result


def _collect_constants(name: str, module, cfg: ModelConfig, extra: dict) -> None:
    """Keep the tensors the runtime needs from the module before it is freed."""
    if name == TEXT_ENCODER:
        from .graphs.text_encoder import lyric_embedding_table

        extra["lyric_embedding"] = lyric_embedding_table(module).numpy()
    elif name == CONDITION_ENCODER:
        from .graphs.condition_encoder import constants

        extra.update({k: v.numpy() for k, v in constants(module).items()})
    elif name == VAE_DECODER:
        from .graphs.vae_decoder import receptive_field

        extra["vae_receptive_field"] = receptive_field(module, cfg.hop_length)
    elif name == VAE_ENCODER:
        from .graphs.vae_encoder import encoder_receptive_field

        extra["vae_encoder_receptive_field"] = encoder_receptive_field(module, cfg.hop_length)
    elif name == AUDIO_TOKENIZER:
        from .graphs.audio_tokenizer import fsq_constants

        extra.update(fsq_constants(module))


def _write_side_files(model_dir: Path, staging: Path, extra: dict) -> None:
    from safetensors.numpy import save_file

    names = [*art.CONSTANT_NAMES, *(k for k in art.OPTIONAL_CONSTANT_NAMES if k in extra)]
    save_file({k: np.ascontiguousarray(extra[k]) for k in names}, str(staging / art.CONSTANTS))
    tok_dir = staging / art.TOKENIZER_DIR
    tok_dir.mkdir()
    for fname in TOKENIZER_FILES:
        src = model_dir / "tokenizer" / fname
        if src.is_file():
            shutil.copy2(src, tok_dir / fname)


def _write_manifest(model_dir, staging, cfg, specs, report, extra) -> None:
    import acestep_trt

    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != stg.STAGING_MARKER)
    graphs = {}
    for name, spec in specs.items():
        graphs[name] = {"onnx": f"{name}.onnx", "opset": OPSET, "precision": _graph_dtype(report.precision, name),
                        "spec": spec.to_dict()}
    if "dit_parameters" in extra:  # export/weight_map.py; none for an int8 DiT (LoRA fused at export only)
        graphs[DIT_STEP]["parameters"] = extra["dit_parameters"]
    graphs[DIT_STEP]["fused_lora"] = extra.get("fused_lora", [])
    tok = extra.get("audio_tokenizer")
    manifest = {
        "format_version": art.FORMAT_VERSION,
        "toolkit_version": acestep_trt.__version__,
        "created_unix": int(time.time()),
        "source": {"model_dir": str(model_dir.resolve())},
        "model": cfg.to_dict(),
        "scheduler": scheduler_config(model_dir),
        "vae": {"receptive_field_frames": int(extra["vae_receptive_field"]),
                "encoder_receptive_field_frames": int(extra["vae_encoder_receptive_field"])},
        "audio_tokenizer": tok.to_dict() if tok is not None else None,
        "geometry": memory_geometry(model_dir),  # for the runtime's peak-memory estimate (runtime/limits.py)
        "precision": report.precision.to_dict(),
        "graphs": graphs,
        "validation": [r.to_dict() for r in report.comparisons],
        "files": [art.file_record(staging, p) for p in files],
    }
    (staging / art.MANIFEST).write_text(json.dumps(manifest, indent=2))
    art.remember_verified(staging, manifest["files"])  # renaming keeps mtimes: the first load skips hashing
