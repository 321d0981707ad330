"""Shared fixtures: tiny random checkpoints in the real layout, exported once per session.

- ``tiny``: turbo, left-padding tokenizer (as Qwen3-Embedding), condition encoder as wide as the DiT, with the
  optional audio tokenizer / detokenizer pair (cover, audio codes).
- ``variant``: base (non-turbo, APG guidance), right-padding tokenizer, condition encoder narrower than the
  DiT (``encoder_hidden_size``, as the XL checkpoint), without the audio tokenizer pair (as checkpoints
  converted without it: the tasks that need it are refused).
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


def has_gpu() -> bool:
    """An NVIDIA GPU is present; each GPU test checks its own library (onnxruntime-gpu, TensorRT)."""
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def has_ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ACESTEP_TRT_SKIP_HEAVY"):  # minutes on two cores; part of the default suite and CI
        heavy = pytest.mark.skip(reason="heavy (30 s reference-audio encodes); ACESTEP_TRT_SKIP_HEAVY is set")
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(heavy)
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class Model:
    """A tiny checkpoint, its exported artifacts and the matching diffusers pipeline."""

    checkpoint: Path
    artifacts: Path
    _pipe: object = None

    @property
    def pipe(self):
        if self._pipe is None:
            from diffusers import AceStepPipeline

            self._pipe = AceStepPipeline.from_pretrained(self.checkpoint)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe


def _build(tmp_path_factory, name: str, **cfg) -> Model:
    from acestep_trt.export.exporter import export_artifacts
    from acestep_trt.export.tiny import TinyConfig, save_tiny_checkpoint

    root = tmp_path_factory.mktemp(name)
    checkpoint = save_tiny_checkpoint(root / "checkpoint", TinyConfig(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifacts(checkpoint, root / "artifacts", validate=True, progress=False)
    return Model(checkpoint, root / "artifacts")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Model:
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def wide(tmp_path_factory) -> Model:
    """``tiny`` with a VAE decoder of 16-32 channels (tiny's: 4-8), multiples of ONNX Runtime's NCHWc block, so
    that the CPU runtime runs its decoder's convolutions in the blocked layout (runtime/backends/ort_snake.py)."""
    return _build(tmp_path_factory, "wide", vae_channels=16)


@pytest.fixture(scope="session")
def variant(tmp_path_factory) -> Model:
    return _build(tmp_path_factory, "variant", padding_side="right", encoder_hidden=48, is_turbo=False, seed=1,
                  audio_tokenizer=False)


REDUCED_OVERRIDES = {"text_encoder": "fp16", "vae_decoder": "fp16"}


@pytest.fixture(scope="session")
def reduced(tiny, tmp_path_factory) -> Model:
    """``tiny`` exported with ``--precision bf16`` and fp16 text encoder and VAE: every reduced dtype is used."""
    from acestep_trt.export.exporter import export_artifacts

    out = tmp_path_factory.mktemp("reduced") / "artifacts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifacts(tiny.checkpoint, out, precision="bf16", graph_precision=REDUCED_OVERRIDES, progress=False)
    return Model(tiny.checkpoint, out)


@pytest.fixture(scope="session")
def runtime(tiny):
    from acestep_trt.runtime import AceStepRuntime

    return AceStepRuntime.load(tiny.artifacts)


def noise(batch: int, frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, frames, 64)).astype(np.float32)


def reference_audio(model: Model, latents: np.ndarray, **kwargs) -> np.ndarray:
    """diffusers' ``AceStepPipeline(..., latents=latents, output_type="np").audios``."""
    import torch

    with torch.no_grad():
        return model.pipe(latents=torch.from_numpy(latents.copy()), output_type="np", **kwargs).audios
