"""``acestep-trt build``: one TensorRT engine per graph, through the TensorRT Python API.

Per graph: a strongly typed network parsed from the artifact's ONNX file (``parse_from_file``, so the
external ``.onnx.data`` weights are found), one optimisation profile with a min/opt/max shape for every
input (derived in :mod:`.profiles`), a shared timing cache, and ``build_serialized_network``. Precision
comes from the ONNX graph: TensorRT 11 has no FP16/BF16 builder flags, networks are strongly typed.
``precision`` only chooses whether fp32 matmuls/convolutions may use TF32 (``tf32``) or not (``fp32``).

``dit_step`` carries the scheduler's Euler update (``next_latents``), so the runtime keeps the latents
on the GPU for the whole denoising loop with no extra engine.

The audio-to-audio graphs the export has (``vae_encoder``, ``cover_blend``, and the optional
``audio_tokenizer`` / ``audio_detokenizer``) get engines too, with profiles from ``audio_dim_ranges``; an older
export without them builds the four core engines as before. ``audio_tokenizer`` is always built without TF32
(:data:`EXACT_FP32`): its FSQ rounds a projection with ``floor``, and TF32's 10-bit mantissa in that matmul
would move values across bin edges (other codes), where exact fp32 only differs in the last bits.

Builds are idempotent: an engine whose inputs (TensorRT version, GPU, flags, profiles, ONNX hashes) are
unchanged and whose file still verifies is kept, not rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

from ..artifacts import Artifacts, load_artifacts, read_manifest, sha256_file
from ..errors import ArtifactError, BackendError, InputError
from ..specs import AUDIO_TOKENIZER, DIT_STEP, GRAPH_NAMES, GraphSpec
from .libs import GpuInfo, gpu_info, import_tensorrt
from .manifest import (ENGINE_FORMAT_VERSION, ENGINE_MANIFEST, TIMING_CACHE, EngineManifest, default_engine_dir,
                       onnx_records, read_engine_manifest)
from .profiles import GraphProfile, ProfileRequest, derive_audio_profiles, derive_profiles

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32")
EXACT_FP32 = (AUDIO_TOKENIZER,)  # built without TF32 whatever --precision says (FSQ rounding; module docstring)


def _locked(build):
    """One build per engine directory at a time (runtime/staging.py's TargetLock); leftover ``*.tmp`` files of a
    killed build are removed first. Engine files themselves are written whole and renamed (``_write_atomic``)."""

    @functools.wraps(build)
    def locked(artifacts_dir, out_dir=None, *args, **kwargs):
        from ..staging import TargetLock, process_alive

        out = Path(out_dir) if out_dir is not None else default_engine_dir(artifacts_dir)
        if not Path(artifacts_dir).is_dir():
            return build(artifacts_dir, out_dir, *args, **kwargs)  # the usual "does not exist" error, no lock file
        with TargetLock(out, "building engines into"):
            for tmp in out.glob("*.tmp") if out.is_dir() else ():
                pid = tmp.name.rsplit(".", 2)[-2]
                if not pid.isdigit() or not process_alive(int(pid)):
                    tmp.unlink(missing_ok=True)
            return build(artifacts_dir, out_dir, *args, **kwargs)

    return locked


@_locked
def build_engines(
    artifacts_dir: str | Path,
    out_dir: str | Path | None = None,
    request: ProfileRequest | None = None,
    precision: str = "fp32",
    version_compatible: bool = False,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    force: bool = False,
    refit: bool = False,
) -> EngineManifest:
    """Build (or keep, when up to date) every engine for ``artifacts_dir`` into ``out_dir``.

    ``refit`` builds the ``dit_step`` engine refittable (``BuilderFlag.REFIT``), so LoRA adapters can replace
    its weights in place (``runtime/lora.py``); recorded as ``"refit": true`` in its engines.json record.

    Raises :class:`BackendError` without TensorRT or a GPU, :class:`ArtifactError` for unusable ONNX files.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}.", f"use one of {', '.join(PRECISIONS)}; reduced "
                         "precision comes from the ONNX graph (TensorRT 11 networks are strongly typed).")
    _refuse_cpu_recipe(read_manifest(artifacts_dir))  # a wrong path or an int8 export fails first, and fast
    trt = import_tensorrt()  # then, without TensorRT, say what to install
    gpu = gpu_info()  # second: without a GPU, say so
    artifacts = load_artifacts(artifacts_dir)
    request = request or ProfileRequest()
    profiles = derive_profiles(artifacts.specs, artifacts.config, request, artifacts.vae_receptive_field)
    tok = artifacts.audio_tokenizer
    profiles.update(derive_audio_profiles(artifacts.audio_specs, artifacts.config, request,
                                          artifacts.vae_encoder_receptive_field, tok.pool_window if tok else None))
    out = Path(out_dir) if out_dir is not None else default_engine_dir(artifacts_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = _header(trt, gpu, precision, version_compatible, request)
    previous = None if force else _previous(out, header)
    session = _Session(trt, Path(timing_cache) if timing_cache else out / TIMING_CACHE, workspace_gib)
    graphs = {}
    for name in (*GRAPH_NAMES, *artifacts.audio_graphs):  # audio graphs: the ones this export has
        record = _record(artifacts, name, profiles[name])
        if name in EXACT_FP32 and precision != "fp32":  # part of the record: validated at the fp32 floor
            record["precision"] = "fp32"
        if refit and name == DIT_STEP:  # part of the record: a refit request rebuilds a plain engine
            record["refit"] = True
        old = (previous or {}).get(name)
        if old is not None and _reusable(out, old, record):
            log.info("%s: engine up to date, kept (%s)", name, old["engine"])
            graphs[name] = old
            continue
        graphs[name] = session.build(out, artifacts, name, record, record.get("precision", precision),
                                     version_compatible)
    session.save_timing_cache()
    manifest = EngineManifest(out, {**header, "graphs": graphs, "built_unix": int(time.time()),
                                    "artifacts_dir": str(Path(artifacts_dir).resolve())})
    manifest.write()
    log.debug("engines written to %s (TensorRT %s, %s, compute capability %s)", out, trt.__version__, gpu.name,
              gpu.compute_capability)  # the build command prints the summary
    return manifest


def _refuse_cpu_recipe(manifest: dict) -> None:
    """int8 exports (``export --precision int8``) are a CPU recipe: their ``MatMulInteger``/``DynamicQuantizeLinear``
    products are ONNX Runtime's form of dynamic quantisation, not the Q/DQ form TensorRT builds int8 from."""
    int8 = [name for name, graph in manifest.get("graphs", {}).items() if graph.get("precision") == "int8"]
    if int8:
        raise InputError(f"{', '.join(int8)} {'was' if len(int8) == 1 else 'were'} exported with the int8 CPU "
                         "recipe, which TensorRT does not build.",
                         "build engines from an fp32 or bf16 export (acestep-trt export --precision bf16).")


def _header(trt, gpu: GpuInfo, precision: str, version_compatible: bool, request: ProfileRequest) -> dict:
    import acestep_trt

    return {
        "format_version": ENGINE_FORMAT_VERSION,
        "toolkit_version": acestep_trt.__version__,
        "tensorrt_version": str(trt.__version__),
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "version_compatible": bool(version_compatible),
        "precision": precision,
        "request": request.to_dict(),
    }


_HEADER_KEYS = ("format_version", "tensorrt_version", "gpu", "version_compatible", "precision")


def _previous(out: Path, header: dict) -> dict | None:
    """Graph records of an earlier build in ``out`` made with the same settings, else None."""
    if not (out / ENGINE_MANIFEST).is_file():
        return None
    try:
        old = read_engine_manifest(out, "")
    except ArtifactError:
        return None
    if any(old.data.get(k) != header[k] for k in _HEADER_KEYS):
        return None
    return old.data["graphs"]


def _record(artifacts: Artifacts, name: str, profile: GraphProfile) -> dict:
    """What an engine depends on: its ONNX files (by hash), the ONNX precision and the profile."""
    return {"onnx": onnx_records(artifacts.manifest, name), "onnx_precision": artifacts.precision(name),
            "profile": profile.to_dict()}


def _reusable(out: Path, old: dict, new: dict) -> bool:
    if any(old.get(k) != v for k, v in new.items()):
        return False
    path = out / old["engine"]
    return path.is_file() and path.stat().st_size == old["bytes"] and sha256_file(path) == old["sha256"]


class _Session:
    """One TensorRT builder, logger and timing cache shared by all engines of a build."""

    def __init__(self, trt, cache_path: Path, workspace_gib: float | None):
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.cache_path = cache_path
        self.cache = None
        self.workspace_gib = workspace_gib

    def network(self):
        """An empty strongly typed network (the flag is the default, and ignored, in TensorRT 11)."""
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return self.builder.create_network(0 if flag is None else 1 << int(flag))

    def config(self, precision: str, version_compatible: bool):
        trt = self.trt
        config = self.builder.create_builder_config()
        if hasattr(trt.BuilderFlag, "TF32"):  # fp32: exact fp32 kernels, comparable with ONNX Runtime
            (config.set_flag if precision == "tf32" else config.clear_flag)(trt.BuilderFlag.TF32)
        if version_compatible:
            # the plan embeds the lean runtime, so `tensorrt-lean` (or a later TensorRT) can run it
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            config.clear_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
        if self.workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * (1 << 30)))
        self._attach_timing_cache(config)
        return config

    def _attach_timing_cache(self, config) -> None:
        """Attach the shared timing cache, read from ``cache_path`` for the first engine.

        ``set_timing_cache(cache, ignore_mismatch=False)`` returns False when the file was written by another
        TensorRT version or GPU (its verification header differs) or is not a timing cache: then a fresh cache
        is used, and it replaces the file after the build (logged; the old file is not worth keeping, TensorRT
        cannot use it here).
        """
        if self.cache is None:
            data = self.cache_path.read_bytes() if self.cache_path.is_file() else b""
            self.cache = config.create_timing_cache(data)
            log.debug("timing cache %s (%d bytes)", self.cache_path, len(data))
            if self.cache is not None and config.set_timing_cache(self.cache, False):
                return
            if data:
                log.warning("timing cache %s does not match this TensorRT and GPU (or is not a timing cache); "
                            "starting a new one, which replaces it after the build", self.cache_path)
                self.cache = config.create_timing_cache(b"")
        if self.cache is None or not config.set_timing_cache(self.cache, False):
            raise BackendError(f"TensorRT refused the timing cache ({self.cache_path}, or a new empty one).",
                               "check the TensorRT log above; retry with another --timing-cache path.")

    def build(self, out: Path, artifacts: Artifacts, name: str, record: dict, precision: str,
              version_compatible: bool) -> dict:
        """Build one engine, write ``<name>.plan`` and return its manifest record."""
        started = time.perf_counter()
        network = self.network()
        spec = artifacts.spec(name)
        _warn_undocumented(artifacts.graph_path(name))
        keep = _parse_onnx(self.trt, network, self.logger, artifacts.graph_path(name))
        _check_io(network, spec)
        config = self.config(precision, version_compatible)
        if record.get("refit"):
            config.set_flag(self.trt.BuilderFlag.REFIT)
        config.add_optimization_profile(_optimization_profile(self.builder, GraphProfile.from_dict(
            name, record["profile"])))
        log.info("%s: building engine...", name)
        plan = self.builder.build_serialized_network(network, config)
        del keep  # the parser owns the weights until the engine is serialized
        if plan is None:
            raise BackendError(f"TensorRT could not build the {name} engine (see the TensorRT log above).",
                               "check GPU memory and the TensorRT log; retry with a smaller --max-duration "
                               "or --max-batch, or use --backend ort.")
        path = out / f"{name}.plan"
        data = memoryview(plan)  # size and hash from the bytes in hand, not by reading the file back
        _write_atomic(path, plan)
        seconds = time.perf_counter() - started
        log.info("%s: %s (%.1f MiB, %.1f s)", name, path.name, data.nbytes / 2**20, seconds)
        return {"engine": path.name, "bytes": data.nbytes, "sha256": hashlib.sha256(data).hexdigest(), **record,
                "build_seconds": round(seconds, 2)}

    def save_timing_cache(self) -> None:
        if self.cache is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.cache_path, self.cache.serialize())


def _warn_undocumented(path: Path) -> None:
    """Log what the graph uses outside TensorRT's documented ONNX support (onnx_support.py); the parser decides."""
    try:
        from .onnx_support import unsupported

        problems = unsupported(path)
    except ImportError:  # the onnx package is not installed: nothing to check with
        log.debug("onnx is not installed; %s not checked against TensorRT's operator matrix", path.name)
        return
    for problem in problems:
        log.warning("%s: %s", path.name, problem)


def _parse_onnx(trt, network, logger, path: Path):
    """Parse ``path`` into ``network``; returns the parser (it must outlive the build)."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ArtifactError(f"TensorRT's ONNX parser rejected {path.name}: {'; '.join(errors)[:500]}",
                            "re-export with `acestep-trt export MODEL_DIR ARTIFACTS_DIR --overwrite`; if it "
                            "persists, the graph uses an operator this TensorRT does not support.")
    return parser


def _check_io(network, spec: GraphSpec) -> None:
    """The parsed network's inputs and outputs must be the spec's (the public graph contract)."""
    inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    outputs = sorted(network.get_output(i).name for i in range(network.num_outputs))
    want_in, want_out = sorted(t.name for t in spec.inputs), sorted(t.name for t in spec.outputs)
    if inputs != want_in or outputs != want_out:
        raise ArtifactError(f"{spec.name}: the ONNX graph has inputs {inputs} and outputs {outputs}, the spec "
                            f"says {want_in} and {want_out}.", "re-export the artifacts with this toolkit.")


def _optimization_profile(builder, profile: GraphProfile):
    """One TensorRT optimisation profile: ``set_shape(name, min, opt, max)`` for every input."""
    trt_profile = builder.create_optimization_profile()
    for name, shape in profile.inputs.items():
        trt_profile.set_shape(name, shape.min, shape.opt, shape.max)
    return trt_profile


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:  # interrupted (Ctrl-C, SIGTERM) or failed: no partial engine file
        tmp.unlink(missing_ok=True)
