"""``engines.json``: what each engine was built from and with, and the checks that refuse a stale engine.

An engine is valid only for the TensorRT version that built it (unless built version-compatible, then for
the runtimes NVIDIA documents: see :func:`version_compatible_runs`), for the GPU compute capability it was built on,
and for the exact ONNX files it was built from. Each of these is recorded at build time and checked at
load time; a mismatch is an :class:`ArtifactError` that says how to rebuild. An engine is never reused
on the file's existence alone.

Layout (``ENGINE_DIR`` defaults to ``ARTIFACTS_DIR/engines``)::

    engines.json     format version, TensorRT version, GPU, flags, profile request, per-graph records
    <graph>.plan     one serialized engine per graph
    timing.cache     TensorRT timing cache (reused by the next build)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import sha256_file
from ..errors import ArtifactError
from ..specs import AUDIO_GRAPH_NAMES, GRAPH_NAMES
from .libs import version_tuple
from .profiles import GraphProfile, ProfileRequest


ENGINE_FORMAT_VERSION = 1
ENGINE_MANIFEST = "engines.json"
ENGINE_SUBDIR = "engines"
TIMING_CACHE = "timing.cache"


def default_engine_dir(artifacts_dir: str | Path) -> Path:
    return Path(artifacts_dir) / ENGINE_SUBDIR


def rebuild_remedy(artifacts_dir: str | Path, engine_dir: str | Path | None = None) -> str:
    out = "" if engine_dir is None or Path(engine_dir) == default_engine_dir(artifacts_dir) else f" --out {engine_dir}"
    return (f"rebuild the engines on this machine: `acestep-trt build {artifacts_dir}{out}` "
            "(or use --backend ort).")


def onnx_records(artifact_manifest: dict, graph: str) -> list[dict]:
    """The artifact manifest's file records of one graph: ``<graph>.onnx`` and its external data files."""
    if graph not in artifact_manifest["graphs"]:
        return []
    onnx = artifact_manifest["graphs"][graph]["onnx"]
    return sorted(({"path": r["path"], "sha256": r["sha256"]} for r in artifact_manifest["files"]
                   if r["path"] == onnx or r["path"].startswith(onnx + ".")), key=lambda r: r["path"])


@dataclass
class EngineManifest:
    """A parsed ``engines.json``. ``graphs[name]`` has engine, bytes, sha256, onnx, profile, precision."""

    root: Path
    data: dict

    @property
    def tensorrt_version(self) -> str:
        return self.data["tensorrt_version"]

    @property
    def compute_capability(self) -> str:
        return self.data["gpu"]["compute_capability"]

    @property
    def version_compatible(self) -> bool:
        return bool(self.data["version_compatible"])

    @property
    def request(self) -> ProfileRequest:
        return ProfileRequest.from_dict(self.data["request"])

    def profile(self, graph: str) -> GraphProfile:
        return GraphProfile.from_dict(graph, self.data["graphs"][graph]["profile"])

    def engine_path(self, graph: str) -> Path:
        return self.root / self.data["graphs"][graph]["engine"]

    def write(self) -> None:
        """Write atomically: a build that stops half-way leaves the previous manifest or none."""
        tmp = self.root / f"{ENGINE_MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.root / ENGINE_MANIFEST)


def read_engine_manifest(engine_dir: str | Path, remedy: str) -> EngineManifest:
    """Parse ``engine_dir/engines.json``; :class:`ArtifactError` with ``remedy`` if absent or malformed."""
    root = Path(engine_dir)
    path = root / ENGINE_MANIFEST
    if not path.is_file():
        raise ArtifactError(f"no TensorRT engines at {root} ({ENGINE_MANIFEST} is missing).", remedy)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        version = data["format_version"]
        for key in ("tensorrt_version", "gpu", "version_compatible", "request", "graphs"):
            data[key]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is unreadable or incomplete ({exc.__class__.__name__}: {exc}).", remedy) from None
    if version != ENGINE_FORMAT_VERSION:
        raise ArtifactError(f"{path} has engine format {version!r}; this toolkit reads {ENGINE_FORMAT_VERSION}.",
                            remedy)
    return EngineManifest(root, data)


# NVIDIA, TensorRT 11.4.0 support matrix, "Engine Portability"
# (https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/getting-started/support-matrix.html): engines built with
# the version-compatible flag run with newer TensorRT runtimes of the same major version; across majors only
# TensorRT 10 -> 11 and 8 -> 10 are supported. Version compatibility exists from TensorRT 8.6 on (developer
# guide, "Version Compatibility"), and an engine never runs on a runtime older than its builder.
VERSION_COMPATIBLE_SINCE = (8, 6)
CROSS_MAJOR_RUNS = {(8, 10), (10, 11)}  # (builder major, runtime major)


def version_compatible_runs(built: str, running: str) -> str | None:
    """None when a version-compatible engine built by TensorRT ``built`` may run on ``running``, else why not."""
    b, r = version_tuple(built)[:3], version_tuple(running)[:3]
    if b[:2] < VERSION_COMPATIBLE_SINCE:
        return f"TensorRT {built} predates version compatibility (TensorRT 8.6)"
    if r < b:
        return f"TensorRT {built} is newer than this TensorRT {running}"
    if r[0] != b[0] and (b[0], r[0]) not in CROSS_MAJOR_RUNS:
        return (f"NVIDIA supports version-compatible engines of TensorRT {b[0]} on TensorRT {b[0]}.x"
                + "".join(f" and {m}.x" for a, m in sorted(CROSS_MAJOR_RUNS) if a == b[0])
                + f" only, not on TensorRT {running}")
    return None


def engine_graphs(manifest: EngineManifest, artifact_manifest: dict) -> list[str]:
    """The graphs that run as engines: the four core graphs (required) and the audio-to-audio graphs that both
    the artifacts and ``engines.json`` have. An engine directory built before audio engines existed has none:
    those graphs then run in ONNX Runtime (the backend logs that a rebuild adds them)."""
    audio = [g for g in AUDIO_GRAPH_NAMES if g in artifact_manifest["graphs"] and g in manifest.data["graphs"]]
    return [*GRAPH_NAMES, *audio]


def missing_audio_engines(manifest: EngineManifest, artifact_manifest: dict) -> list[str]:
    """Audio-to-audio graphs the artifacts have but ``engines.json`` does not (built by an older toolkit)."""
    return [g for g in AUDIO_GRAPH_NAMES if g in artifact_manifest["graphs"] and g not in manifest.data["graphs"]]


def check_compatible(manifest: EngineManifest, trt_version: str, compute_capability: str, remedy: str) -> None:
    """Refuse engines of another TensorRT version (unless version-compatible) or another GPU architecture."""
    if manifest.version_compatible:
        reason = version_compatible_runs(manifest.tensorrt_version, trt_version)
        if reason is not None:
            raise ArtifactError(
                f"the engines in {manifest.root} were built version-compatible with TensorRT "
                f"{manifest.tensorrt_version}, which this TensorRT {trt_version} cannot run: {reason}.", remedy)
    elif version_tuple(manifest.tensorrt_version) != version_tuple(trt_version):
        raise ArtifactError(
            f"the engines in {manifest.root} were built with TensorRT {manifest.tensorrt_version}; this is "
            f"TensorRT {trt_version}, which cannot run them.", remedy + " Build with --version-compatible for "
            "engines that later TensorRT releases (and the tensorrt-lean runtime) can run.")
    if manifest.compute_capability != compute_capability:
        gpu = manifest.data["gpu"].get("name", "another GPU")
        raise ArtifactError(
            f"the engines in {manifest.root} were built for compute capability {manifest.compute_capability} "
            f"({gpu}); this GPU has compute capability {compute_capability}.", remedy)


def check_sources(manifest: EngineManifest, artifact_manifest: dict, graphs, remedy: str) -> None:
    """Refuse engines built from other ONNX files than the artifact directory holds now."""
    for graph in graphs:
        record = manifest.data["graphs"].get(graph)
        if record is None:
            raise ArtifactError(f"{manifest.root / ENGINE_MANIFEST} has no engine for {graph}.", remedy)
        if record.get("onnx") != onnx_records(artifact_manifest, graph):
            raise ArtifactError(
                f"the {graph} engine in {manifest.root} was built from other ONNX files than the artifact "
                "directory holds now (the SHA-256 differs): the artifacts were re-exported since.", remedy)


def check_engine_files(manifest: EngineManifest, graphs, remedy: str, full_hash: bool = True) -> None:
    """Each engine file exists with its recorded size and SHA-256."""
    for graph in graphs:
        record = manifest.data["graphs"][graph]
        path = manifest.engine_path(graph)
        if not path.is_file():
            raise ArtifactError(f"engine file {path} is missing.", remedy)
        if path.stat().st_size != record["bytes"]:
            raise ArtifactError(f"engine file {path} has {path.stat().st_size} bytes, the manifest says "
                                f"{record['bytes']}: it is truncated or was replaced.", remedy)
        if full_hash and sha256_file(path) != record["sha256"]:
            raise ArtifactError(f"engine file {path} does not match its SHA-256 in {ENGINE_MANIFEST}.", remedy)


def verify_engines(engine_dir: str | Path, artifacts_dir: str | Path, artifact_manifest: dict, graphs,
                   trt_version: str, compute_capability: str, full_hash: bool = True) -> EngineManifest:
    """All refusal checks at once; returns the manifest when the engines may run here.

    ``graphs=None``: :func:`engine_graphs` (the core graphs and the audio graphs built for these artifacts).
    """
    remedy = rebuild_remedy(artifacts_dir, engine_dir)
    manifest = read_engine_manifest(engine_dir, remedy)
    graphs = engine_graphs(manifest, artifact_manifest) if graphs is None else graphs
    check_compatible(manifest, trt_version, compute_capability, remedy)
    check_sources(manifest, artifact_manifest, graphs, remedy)
    check_engine_files(manifest, graphs, remedy, full_hash)
    return manifest
