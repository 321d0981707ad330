"""The artifact directory: what ``acestep-trt export`` writes and all the runtime needs.

Layout::

    manifest.json            format version, model config, scheduler config, graph specs, file hashes
    text_encoder.onnx(.data) condition_encoder.onnx(.data) dit_step.onnx(.data) vae_decoder.onnx(.data)
    constants.safetensors    silence_latent [1, 15000, 64], null_condition_emb [1, 1, H],
                             lyric_embedding [vocab, text_hidden]
    tokenizer/               tokenizer.json, tokenizer_config.json

Every file is listed in the manifest with its size and SHA-256. Loading checks sizes always and hashes
once per file version (the result is cached in ``.verified.json`` keyed by size and mtime when the
directory is writable), so a truncated, replaced or corrupted file is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArtifactError
from .specs import (AUDIO_GRAPH_NAMES, GRAPH_NAMES, AudioTokenizerConfig, GraphSpec, ModelConfig, all_specs,
                    audio_specs)
from .staging import STAGING_MARKER, read_marker


FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONSTANTS = "constants.safetensors"
TOKENIZER_DIR = "tokenizer"
VERIFIED_CACHE = ".verified.json"
CONSTANT_NAMES = ("silence_latent", "null_condition_emb", "lyric_embedding")
OPTIONAL_CONSTANT_NAMES = ("fsq_project_out_weight", "fsq_project_out_bias")  # with the audio tokenizer

_REEXPORT = "re-run `acestep-trt export MODEL_DIR ARTIFACTS_DIR --overwrite` to rebuild the artifacts."


def default_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or directory (0o777) gets under the current umask.

    Temporary files and directories (mkstemp, mkdtemp) are private; results renamed into place get this.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(root: Path, path: Path) -> dict:
    """Manifest entry for one file: relative path, size and SHA-256."""
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


@dataclass
class Artifacts:
    """A loaded, verified artifact directory."""

    root: Path
    manifest: dict
    config: ModelConfig
    specs: dict[str, GraphSpec]  # the four core graphs (engines, Triton, precision recipes iterate these)
    audio_specs: dict[str, GraphSpec] = field(default_factory=dict)  # the optional audio-to-audio graphs present
    identity: dict = field(default_factory=dict)  # path -> (device, inode, size, mtime) when verified

    def check_unchanged(self) -> None:
        """Refuse if a file was replaced since verification (a re-export while this process was loading).

        An export renames a complete directory into place, so files opened before it stay the old ones; a file
        opened after verification could be a new one, mixed with old ones. Call after opening everything.
        """
        if _identities(self.root, list(self.identity)) != self.identity:
            raise ArtifactError(f"{self.root} was replaced (re-exported) while it was being loaded.",
                                "load it again once the export has finished.")

    def graph_path(self, name: str) -> Path:
        return self.root / self.manifest["graphs"][name]["onnx"]

    def graph_bytes(self, name: str) -> int:
        """Bytes of ``name``'s graph file and its external data (the verified manifest records)."""
        onnx = self.manifest["graphs"][name]["onnx"]
        return sum(r["bytes"] for r in self.manifest["files"] if _is_graph_file(r["path"], [onnx]))

    def precision(self, name: str) -> str:
        """The dtype ``name`` was exported in (``fp32``, ``bf16`` or ``fp16``; see ``export --precision``)."""
        return self.manifest["graphs"][name].get("precision", "fp32")

    @property
    def scheduler(self) -> dict:
        return self.manifest["scheduler"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def has_graph(self, name: str) -> bool:
        """Whether this directory holds ``name`` (the audio-to-audio graphs are optional)."""
        return name in self.specs or name in self.audio_specs

    def spec(self, name: str) -> GraphSpec:
        """The spec of a core or audio-to-audio graph."""
        return self.specs[name] if name in self.specs else self.audio_specs[name]

    @property
    def audio_graphs(self) -> list[str]:
        """The optional audio-to-audio graphs present here, in :data:`AUDIO_GRAPH_NAMES` order."""
        return [n for n in AUDIO_GRAPH_NAMES if n in self.audio_specs]

    @property
    def audio_tokenizer(self) -> AudioTokenizerConfig | None:
        """Geometry of the audio tokenizer pair, or None when the checkpoint had none."""
        data = self.manifest.get("audio_tokenizer")
        return AudioTokenizerConfig.from_dict(data) if data else None

    @property
    def vae_encoder_receptive_field(self) -> int:
        """Latent frames each side that one audio sample influences in the VAE encoder (measured at export)."""
        return int(self.manifest.get("vae", {}).get("encoder_receptive_field_frames", 16))

    @property
    def vae_receptive_field(self) -> int:
        return int(self.manifest.get("vae", {}).get("receptive_field_frames", 16))

    def load_constants(self) -> dict[str, np.ndarray]:
        """Read-only arrays viewing the file; the lyric table read by rows on lookup (``runtime/mapped.py``)."""
        from .mapped import load_mapped

        try:
            data = load_mapped(self.root / CONSTANTS, rows=("lyric_embedding",))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{self.root / CONSTANTS} cannot be read ({exc}).", _REEXPORT) from None
        missing = [n for n in CONSTANT_NAMES if n not in data]
        if missing:
            raise ArtifactError(f"{self.root / CONSTANTS} lacks {missing}.", _REEXPORT)
        return data


def _identities(root: Path, paths: list[str]) -> dict:
    out = {}
    for rel in paths:
        try:
            st = (root / rel).stat()
            out[rel] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            out[rel] = None
    return out


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(
            f"artifact directory {root} does not exist.",
            "create it with `acestep-trt export MODEL_DIR ARTIFACTS_DIR`, or pass the right path.",
        )
    marker = read_marker(root)
    if marker is not None:  # runtime/staging.py: an export's staging directory, finished or not
        raise ArtifactError(f"{root} is the unfinished output of an export (process {marker.get('pid', '?')}, "
                            f"{STAGING_MARKER}), not an artifact directory.",
                            "use the directory that export was writing, once it has finished; the next export "
                            "into it removes this one if that process is gone.")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}: it is not an acestep-trt artifact directory.", _REEXPORT)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupted ({exc}).", _REEXPORT) from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{root} has artifact format {version!r}; this toolkit reads format {FORMAT_VERSION}.", _REEXPORT
        )
    return manifest


def _load_cache(root: Path) -> dict:
    try:
        cache = json.loads((root / VERIFIED_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_cache(root: Path, cache: dict) -> None:
    """Write the cache atomically: a unique temporary file renamed over the old one, so a concurrent reader
    sees the old or the new file, never a partial one. Concurrent writers: the last rename wins, and an entry
    lost that way only means that file is hashed again next time."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{VERIFIED_CACHE}.", suffix=".tmp", dir=root)
    except OSError:  # read-only artifact directory: verify again next time
        return
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(cache, fh)
        os.replace(tmp, root / VERIFIED_CACHE)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stamp(stat: os.stat_result, sha256: str) -> str:
    return f"{stat.st_size}:{stat.st_mtime_ns}:{sha256}"


def remember_verified(root: Path, records: list[dict]) -> None:
    """Record ``records`` (just hashed by the writer) as verified, so the first load need not hash again."""
    _save_cache(root, {rec["path"]: _stamp((root / rec["path"]).stat(), rec["sha256"]) for rec in records})


def verify_files(root: Path, records: list[dict], full_hash: bool = True) -> None:
    """Check that every recorded file exists with its size (and SHA-256 when ``full_hash``)."""
    cache = _load_cache(root) if full_hash else {}
    changed = False
    for rec in records:
        path = root / rec["path"]
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the artifact directory.", _REEXPORT)
        stat = path.stat()
        if stat.st_size != rec["bytes"]:
            raise ArtifactError(
                f"{path} has {stat.st_size} bytes, the manifest says {rec['bytes']}: the file is truncated or "
                "was replaced.",
                _REEXPORT,
            )
        if not full_hash:
            continue
        stamp = _stamp(stat, rec["sha256"])
        if cache.get(rec["path"]) == stamp:
            continue
        if sha256_file(path) != rec["sha256"]:
            raise ArtifactError(f"{path} does not match its SHA-256 in the manifest: it is corrupted.", _REEXPORT)
        cache[rec["path"]] = stamp
        changed = True
    if changed:
        _save_cache(root, cache)


def _is_graph_file(path: str, onnx_names: list[str]) -> bool:
    """``<graph>.onnx`` or one of its external data files (``<graph>.onnx.data``)."""
    return any(path == name or path.startswith(name + ".") for name in onnx_names)


def _check_interfaces(root: Path, config: ModelConfig, specs: dict[str, GraphSpec],
                      tok: AudioTokenizerConfig | None = None) -> None:
    """The graphs must have the inputs and outputs this runtime drives (an older export may not)."""
    expected = {**all_specs(config), **audio_specs(config, tok)}
    for name in specs:
        have, want = specs[name], expected.get(name)  # a tokenizer graph without its manifest record: no match
        if want is None or (have.inputs, have.outputs) != (want.inputs, want.outputs):
            missing = sorted({t.name for t in (*want.inputs, *want.outputs)}
                             - {t.name for t in (*have.inputs, *have.outputs)}) if want else []
            detail = f" (missing {', '.join(missing)})" if missing else ""
            raise ArtifactError(
                f"{root}: graph {name} does not have the interface this toolkit drives{detail}; the directory was "
                "written by another acestep-trt version.",
                _REEXPORT,
            )


def load_artifacts(root: str | Path, verify: bool = True, graphs: bool = True) -> Artifacts:
    """Read and verify an artifact directory. Raises :class:`ArtifactError` with the remedy.

    ``graphs=False`` verifies everything but the ONNX files (for a copy that serves its graphs elsewhere,
    such as the Triton orchestrator's); the manifest still describes them.
    """
    root = Path(root)
    manifest = read_manifest(root)
    try:
        config = ModelConfig.from_dict(manifest["model"])
        names = [*GRAPH_NAMES, *(n for n in AUDIO_GRAPH_NAMES if n in manifest["graphs"])]
        every = {name: GraphSpec.from_dict(manifest["graphs"][name]["spec"]) for name in names}
        onnx_names = [manifest["graphs"][name]["onnx"] for name in names]
        records = [r for r in manifest["files"] if graphs or not _is_graph_file(r["path"], onnx_names)]
        tok = AudioTokenizerConfig.from_dict(manifest["audio_tokenizer"]) if manifest.get("audio_tokenizer") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{root / MANIFEST} is incomplete (missing {exc}).", _REEXPORT) from None
    _check_interfaces(root, config, every, tok)
    identity = _identities(root, [MANIFEST] + [r["path"] for r in records])
    verify_files(root, records, full_hash=verify)
    if _identities(root, list(identity)) != identity:  # replaced while we hashed
        raise ArtifactError(f"{root} was replaced (re-exported) while it was being verified.",
                            "load it again once the export has finished.")
    specs = {n: every[n] for n in GRAPH_NAMES}
    return Artifacts(root=root, manifest=manifest, config=config, specs=specs,
                     audio_specs={n: s for n, s in every.items() if n not in specs}, identity=identity)
