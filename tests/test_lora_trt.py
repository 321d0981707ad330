"""LoRA on TensorRT engines: ``build --refit`` and in-place refits, against the fake TensorRT (tests/fake_trt.py).

The fake's Refitter accepts only the ONNX graph's initializer names (what TensorRT's ONNX parser names the
weights) with their element count and type, and its engines then run the refitted values. This checks the
plumbing and the names; it does not prove a real TensorRT refit, which needs a GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from acestep_trt.runtime import AceStepRuntime
from acestep_trt.runtime.errors import BackendError
from acestep_trt.runtime.lora import parameter_map, parse_adapter
from acestep_trt.runtime.trt.builder import build_engines
from acestep_trt.runtime.trt.manifest import ENGINE_MANIFEST
from acestep_trt.runtime.trt.refit import refittable_names

from . import fake_trt
from .conftest import noise
from .test_lora import DURATION, PROMPT, loras  # noqa: F401 - the module-scoped LoRA fixture
from .test_trt import SMALL, arts  # noqa: F401 - the private artifact copy fixture


def test_refit_engine_matches_ort_with_lora(arts, loras, monkeypatch):  # noqa: F811
    trt, _ = fake_trt.install(monkeypatch)
    build_engines(arts, request=SMALL, refit=True)
    graphs = json.loads((arts / "engines" / ENGINE_MANIFEST).read_text())["graphs"]
    assert graphs["dit_step"]["refit"] is True and "refit" not in graphs["vae_decoder"]
    assert "REFIT" in json.loads((arts / "engines" / "dit_step.plan").read_text())["flags"]

    rt = AceStepRuntime.load(arts, backend="trt", device="cuda")
    ort_rt = AceStepRuntime.load(arts, backend="ort")
    engine = rt.runners["dit_step"].engine
    parameters = parameter_map(rt.artifacts.manifest)
    names = refittable_names(trt, engine)
    assert {r["initializer"] for r in parameters.values()} <= names  # every mapped weight is refittable
    for path in (loras["a"], loras["b"]):
        targeted = parse_adapter(path, parameters, "x").layers
        assert {parameters[p]["initializer"] for p in targeted} <= names

    latents = noise(1, rt.config.latent_length(DURATION), seed=3)
    kwargs = dict(audio_duration=DURATION, latents=latents, num_inference_steps=4, **PROMPT)
    plain = rt(**kwargs).audios
    for runtime in (rt, ort_rt):
        runtime.load_lora_weights(loras["a"], adapter_name="a")
        runtime.load_lora_weights(loras["b"], adapter_name="b")
        runtime.set_adapters(["a", "b"], [0.6, 0.9])
    refits = trt.count("refit_cuda_engine")
    got = rt(**kwargs, attention_kwargs={"scale": 0.7}).audios
    assert trt.count("refit_cuda_engine") == refits + 1  # a new scale: one refit, in place
    ref = ort_rt(**kwargs, attention_kwargs={"scale": 0.7}).audios
    assert float(np.max(np.abs(got - plain))) > 1e-2
    assert float(np.max(np.abs(got - ref))) <= 1e-5
    rt(**kwargs, attention_kwargs={"scale": 0.7})
    assert trt.count("refit_cuda_engine") == refits + 1  # same mix and scale: no refit
    rt.unload_lora_weights()
    assert float(np.max(np.abs(rt(**kwargs).audios - plain))) <= 1e-6


def test_engine_without_refit_is_refused_with_the_rebuild_command(arts, loras, monkeypatch):  # noqa: F811
    fake_trt.install(monkeypatch)
    build_engines(arts, request=SMALL)
    rt = AceStepRuntime.load(arts, backend="trt", device="cuda")
    with pytest.raises(BackendError, match="build ARTIFACTS_DIR --refit"):
        rt.load_lora_weights(loras["a"])
    assert rt._lora_controller.state.adapters == {}
