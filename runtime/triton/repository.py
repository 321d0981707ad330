"""``acestep-trt triton``: a Triton model repository from an artifact directory (and optional engines).

Layout::

    REPOSITORY/
      triton_manifest.json             what it was generated from and with
      text_encoder/ condition_encoder/ dit_step/ vae_decoder/
        config.pbtxt                   onnxruntime_onnx, or tensorrt_plan with --engines
        1/model.onnx (+ <graph>.onnx.data)   or 1/model.plan
        configs/python_onnx.pbtxt      only with python_onnx_shim: the same config, backend "python"
        1/model.py                     only with python_onnx_shim: runs model.onnx in ONNX Runtime
      acestep/
        config.pbtxt                   python backend orchestrator
        1/model.py                     model_orchestrator.py
        1/orchestrator.json            graph -> model names, VAE window
        1/artifacts/                   manifest.json, constants.safetensors, tokenizer/ (no graphs)
        1/acestep_trt/runtime/         a copy of this runtime package (the python backend imports it)

The runtime is copied into the repository rather than imported from an installed package, so a
repository always runs the code it was generated with and the server's Python environment needs only
NumPy < 2, ``tokenizers`` and ``safetensors`` (plus ``onnxruntime`` for the shim).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import Artifacts, load_artifacts, sha256_file
from .. import staging as stg
from ..errors import ArtifactError, InputError
from ..specs import DIT_STEP
from . import config as tc
from .engines import engine_batches, fit_options
from .serving import ARTIFACTS_SUBDIR, ORCHESTRATOR_JSON, served_graphs

log = logging.getLogger(__name__)

REPOSITORY_MANIFEST = "triton_manifest.json"
SHIM_CONFIG_NAME = "python_onnx"  # tritonserver --model-config-name=python_onnx
ENGINE_SUFFIXES = (".plan", ".engine")
_RUNTIME_ROOT = Path(__file__).resolve().parent.parent  # .../acestep_trt/runtime


@dataclass(frozen=True)
class RepositoryOptions:
    """``instances`` per model, ``max_batch`` per graph model, optional engine directory and ONNX shim.

    ``max_batch`` / ``vae_window`` left at None: 8 and 256, or with ``engines`` the values the engines were
    built for (``engines.json``; see :mod:`.engines`).
    """

    engines: Path | None = None
    instances: int = 1
    max_batch: int | None = None
    python_onnx_shim: bool = False
    vae_window: int | None = None
    request_timeout: float = 900.0  # seconds a request may run in the orchestrator (0: no limit)


def _check_options(options: RepositoryOptions) -> None:
    for name in ("instances", "max_batch", "vae_window"):
        value = getattr(options, name)
        if value is None and name != "instances":
            continue  # filled in by engines.fit_options
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"`{name}` must be a positive integer, got {value!r}.", f"pass {name} >= 1.")
    if not isinstance(options.request_timeout, (int, float)) or not 0 <= options.request_timeout < float("inf"):
        raise InputError(f"`request_timeout` must be a number of seconds >= 0, got {options.request_timeout!r}.",
                         "pass e.g. --request-timeout 900 (0: no limit).")
    if options.engines is not None and options.python_onnx_shim:
        raise InputError("the python ONNX shim serves ONNX graphs; it cannot be combined with --engines.",
                         "drop one of --engines and --python-onnx-shim.")


def engine_path(engines: Path, graph: str) -> Path:
    """``<engines>/<graph>.plan`` (or ``.engine``); raises :class:`ArtifactError` when absent."""
    for suffix in ENGINE_SUFFIXES:
        candidate = engines / f"{graph}{suffix}"
        if candidate.is_file():
            return candidate
    raise ArtifactError(f"{engines} has no engine for {graph} ({graph}.plan or {graph}.engine).",
                        "build the engines with `acestep-trt build` into that directory, or drop --engines.")


def _graph_max_batch(artifacts: Artifacts, graph: str, max_batch: int, engine_batch: int | None = None) -> int:
    # Guidance (non-turbo checkpoints) runs the DiT on [conditional, unconditional]: twice the batch.
    batch = 2 * max_batch if graph == DIT_STEP and not artifacts.config.is_turbo else max_batch
    # an engine built for a smaller batch (the VAE encoder and tokenizer take one clip) caps it
    return batch if engine_batch is None else min(batch, engine_batch)


def _write_graph_model(artifacts: Artifacts, graph: str, root: Path, options: RepositoryOptions,
                       built: dict[str, int]) -> dict:
    """One graph model directory; returns its manifest record. ``built``: graph -> max batch of its engine."""
    spec = artifacts.spec(graph)
    engine = graph in built  # audio graphs of an engine directory built before they had engines: ONNX
    platform = tc.PLAN_PLATFORM if engine else tc.ONNX_PLATFORM
    leaf = tc.LeafOptions(platform, options.max_batch, options.instances)
    text = tc.graph_model_config(spec, leaf, _graph_max_batch(artifacts, graph, options.max_batch, built.get(graph)))
    version = root / graph / "1"
    version.mkdir(parents=True)
    (root / graph / "config.pbtxt").write_text(text, encoding="utf-8")
    if engine:
        source = engine_path(options.engines, graph)
        shutil.copy2(source, version / "model.plan")
        return {"platform": "tensorrt_plan", "source": str(source), "sha256": sha256_file(source)}
    onnx = artifacts.graph_path(graph)
    shutil.copy2(onnx, version / "model.onnx")
    for extra in sorted(onnx.parent.glob(onnx.name + ".*")):  # external data keeps its referenced name
        shutil.copy2(extra, version / extra.name)
    if options.python_onnx_shim:
        (root / graph / "configs").mkdir()
        (root / graph / "configs" / f"{SHIM_CONFIG_NAME}.pbtxt").write_text(
            tc.with_platform(text, tc.PYTHON_BACKEND), encoding="utf-8")
        shutil.copy2(Path(__file__).with_name("model_onnx_shim.py"), version / "model.py")
    recorded = {r["path"]: r["sha256"] for r in artifacts.manifest["files"]}
    return {"platform": "onnxruntime_onnx", "source": onnx.name, "sha256": recorded.get(onnx.name)}


def _copy_runtime(dest: Path) -> None:
    """This runtime package's sources -> ``dest/acestep_trt/runtime`` (+ a minimal ``acestep_trt``)."""
    package = dest / "acestep_trt"
    shutil.copytree(_RUNTIME_ROOT, package / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    from acestep_trt import __version__

    (package / "__init__.py").write_text(f'__version__ = "{__version__}"\n', encoding="utf-8")


def _write_orchestrator(artifacts: Artifacts, root: Path, options: RepositoryOptions) -> None:
    version = root / tc.ORCHESTRATOR / "1"
    (version / ARTIFACTS_SUBDIR).mkdir(parents=True)
    (root / tc.ORCHESTRATOR / "config.pbtxt").write_text(
        tc.orchestrator_config(artifacts.config, options.instances), encoding="utf-8")
    shutil.copy2(Path(__file__).with_name("model_orchestrator.py"), version / "model.py")
    settings = {"graph_models": {g: g for g in served_graphs(artifacts)}, "vae_window": options.vae_window,
                "request_timeout_s": float(options.request_timeout)}
    (version / ORCHESTRATOR_JSON).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    graph_files = {record["onnx"] for record in artifacts.manifest["graphs"].values()}  # audio graphs too
    for record in artifacts.manifest["files"]:
        path = record["path"]
        if any(path == f or path.startswith(f + ".") for f in graph_files):
            continue
        target = version / ARTIFACTS_SUBDIR / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(artifacts.root / path, target)
    shutil.copy2(artifacts.root / "manifest.json", version / ARTIFACTS_SUBDIR / "manifest.json")
    _copy_runtime(version)


def _prepare_target(repository: Path, overwrite: bool) -> Path:
    if repository.exists() and not repository.is_dir():
        raise InputError(f"{repository} exists and is not a directory.", "pass a directory path.")
    if repository.is_dir() and any(repository.iterdir()) and not overwrite:
        raise InputError(f"{repository} already exists and is not empty.", "pass --overwrite or another directory.")
    repository.parent.mkdir(parents=True, exist_ok=True)
    return stg.make_staging(repository)  # marked; stale ones of killed runs are removed


def write_repository(artifacts_dir: str | Path, repository: str | Path,
                     options: RepositoryOptions = RepositoryOptions(), overwrite: bool = False) -> Path:
    """Write the model repository (atomically: built beside ``repository``, then renamed into place)."""
    _check_options(options)
    artifacts = load_artifacts(artifacts_dir)
    options = fit_options(artifacts, options)  # batch and VAE window: the engines' (engines.json) with --engines
    repository = Path(repository)
    with stg.TargetLock(repository, "writing"):  # a second writer of the same repository is refused
        staging = _prepare_target(repository, overwrite)
        try:
            built = engine_batches(options.engines) if options.engines is not None else {}
            models = {g: _write_graph_model(artifacts, g, staging, options, built) for g in served_graphs(artifacts)}
            _write_orchestrator(artifacts, staging, options)
            _write_manifest(staging, artifacts, options, models)
            stg.publish(staging, repository)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("Triton model repository written to %s", repository)
    return repository


def _write_manifest(root: Path, artifacts: Artifacts, options: RepositoryOptions, models: dict) -> None:
    from acestep_trt import __version__

    engines_json = options.engines / "engines.json" if options.engines else None
    manifest = {
        "format_version": 1,
        "toolkit_version": __version__,
        "created_unix": int(time.time()),
        "artifacts": {"path": str(Path(artifacts.root).resolve()),
                      "manifest_sha256": sha256_file(artifacts.root / "manifest.json")},
        "engines": {"path": str(Path(options.engines).resolve()),
                    "engines_json": json.loads(engines_json.read_text()) if engines_json.is_file() else None}
        if options.engines else None,
        "instances": options.instances,
        "max_batch": options.max_batch,
        "python_onnx_shim": options.python_onnx_shim,
        "models": {**models, tc.ORCHESTRATOR: {"backend": "python"}},
    }
    (root / REPOSITORY_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
