"""Limits of a Triton repository served by TensorRT engines, read from the engines' manifest.

Triton sends a graph model at most ``max_batch_size`` items and the orchestrator decodes in windows of
``vae_window`` latent frames; with ``tensorrt_plan`` models both must fit the optimisation profiles the
engines were built with (``acestep-trt build --max-batch / --vae-window``, recorded in ``engines.json``).
Taking them from the manifest, rather than from ``triton --max-batch``, keeps a repository from promising
batches or windows its engines would reject at request time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..artifacts import Artifacts
from ..errors import ArtifactError, InputError
from ..trt.manifest import (EngineManifest, check_engine_files, check_sources, engine_graphs, read_engine_manifest)
from ..vae import DEFAULT_VAE_WINDOW

DEFAULT_MAX_BATCH = 8  # ONNX models: Triton batches up to this many prompts


def engine_manifest(artifacts: Artifacts, engines: Path) -> EngineManifest:
    """``engines/engines.json``, checked to be built from these artifacts' ONNX files, engine files present."""
    remedy = (f"build the engines with `acestep-trt build {artifacts.root} --out {engines}` (it writes "
              "engines.json), or drop --engines.")
    manifest = read_engine_manifest(engines, remedy)
    graphs = engine_graphs(manifest, artifacts.manifest)  # the core graphs and the audio graphs built
    check_sources(manifest, artifacts.manifest, graphs, remedy)
    check_engine_files(manifest, graphs, remedy, full_hash=False)
    return manifest


def engine_batches(engines: Path) -> dict[str, int]:
    """Graph -> the largest batch its engine's profile takes, for every engine in ``engines/engines.json``
    (checked by :func:`engine_manifest` before a repository is written)."""
    manifest = read_engine_manifest(engines, "build the engines with `acestep-trt build`, or drop --engines.")
    return {graph: manifest.profile(graph).dims["batch"].max for graph in manifest.data["graphs"]}


def fit_options(artifacts: Artifacts, options):
    """``options`` (a ``RepositoryOptions``) with ``max_batch`` / ``vae_window`` filled in.

    Without engines: the defaults (8 prompts, 256 frames) where unset. With engines: the engines' values where
    unset; a value above the engines' is an :class:`InputError` naming both (a smaller one is kept).
    """
    if options.engines is None:
        return dataclasses.replace(options, max_batch=options.max_batch or DEFAULT_MAX_BATCH,
                                   vae_window=options.vae_window or DEFAULT_VAE_WINDOW)
    if not Path(options.engines).is_dir():
        raise ArtifactError(f"engine directory {options.engines} does not exist.",
                            "build engines with `acestep-trt build`, or drop --engines.")
    request = engine_manifest(artifacts, Path(options.engines)).request
    fitted = {}
    for field, built, flag in (("max_batch", request.max_batch, "--max-batch"),
                               ("vae_window", request.vae_window, "--vae-window")):
        asked = getattr(options, field)
        if asked is not None and asked > built:
            raise InputError(f"{flag} {asked} exceeds what the engines in {options.engines} were built for ({built}).",
                             f"pass {flag} {built} or less (or leave it out), or rebuild the engines with "
                             f"`acestep-trt build {artifacts.root} {flag} {asked}`.")
        fitted[field] = asked or built
    return dataclasses.replace(options, **fitted)
