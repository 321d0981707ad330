"""Property-based tests (hypothesis): any argument gives finite audio or InputError, never another exception.

The Python API (``AceStepRuntime.__call__``) and the Triton orchestrator's request parsing plus the same runtime
call (``serving.request_kwargs`` + ``serving.generate``, without a server). Valid durations are drawn short and
step counts small so that the calls that do generate stay fast; the example counts are bounded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acestep_trt.runtime.errors import InputError
from acestep_trt.runtime.triton.serving import generate, request_kwargs

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

odd_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
weird = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), odd_text, st.binary(max_size=8),
                  st.lists(st.integers(), max_size=3), st.just(np.float32(0.5)), st.just(np.array([1.0])))
texts = st.one_of(odd_text, st.lists(odd_text, max_size=10), weird)
durations = st.one_of(st.floats(0.04, 1.0), st.floats(max_value=0.0), st.floats(min_value=600.5), st.just(math.nan),
                      st.just(math.inf), st.integers(-5, 10**12), weird)
steps = st.one_of(st.integers(1, 3), st.integers(-(2**40), 0), st.integers(1001, 2**64), st.floats(), weird)
numbers = st.one_of(st.floats(), st.integers(-(2**40), 2**40), weird)
seeds = st.one_of(st.none(), st.integers(-(2**66), 2**66), st.lists(st.integers(-3, 2**40), max_size=4), weird)


def _check(call) -> None:
    try:
        out = call()
    except InputError:
        return
    audio = out.audios if hasattr(out, "audios") else out[0]
    assert audio.dtype == np.float32 and audio.size and np.all(np.isfinite(audio))


@FUZZ
@given(prompt=texts, lyrics=texts, duration=durations, n_steps=steps, shift=numbers, guidance=numbers, seed=seeds,
       language=texts, bpm=st.one_of(st.integers(-10, 2000), weird), keyscale=st.one_of(odd_text, weird),
       timesignature=st.one_of(odd_text, weird), cfg=st.tuples(numbers, numbers),
       latents=st.one_of(st.none(), st.sampled_from(["nan", "shape", "list"])))
def test_api_arguments(runtime, prompt, lyrics, duration, n_steps, shift, guidance, seed, language, bpm, keyscale,
                       timesignature, cfg, latents):
    if latents == "nan":
        latents = np.full((1, 3, 64), np.nan, np.float32)
    elif latents == "shape":
        latents = np.zeros((2, 7, 64), np.float32)
    elif latents == "list":
        latents = [[0.0]]
    _check(lambda: runtime(prompt=prompt, lyrics=lyrics, audio_duration=duration, num_inference_steps=n_steps,
                           shift=shift, guidance_scale=guidance, seed=seed, vocal_language=language, bpm=bpm,
                           keyscale=keyscale, timesignature=timesignature, cfg_interval_start=cfg[0],
                           cfg_interval_end=cfg[1], latents=latents, show_progress=False))


_NAMES = ("prompt", "lyrics", "vocal_language", "keyscale", "timesignature", "audio_duration", "shift",
          "guidance_scale", "seed", "num_inference_steps", "bpm")


def _tensor(kind: str, value, shape):
    if kind == "bytes":
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
        return np.array([data] * int(np.prod(shape)), dtype=object).reshape(shape)
    dtype = {"fp32": np.float32, "fp64": np.float64, "int64": np.int64, "int8": np.int8, "bool": np.bool_}[kind]
    with np.errstate(all="ignore"):
        try:
            return np.full(shape, value).astype(dtype)
        except (TypeError, ValueError, OverflowError):
            return np.zeros(shape, dtype)


tensor = st.tuples(st.sampled_from(["bytes", "fp32", "fp64", "int64", "int8", "bool"]),
                   st.one_of(st.floats(), st.integers(-(2**62), 2**62), st.floats(0.04, 1.0), st.integers(1, 3),
                             odd_text, st.binary(max_size=6)),
                   st.sampled_from([(1,), (1,), (1,), (0,), (2,), (1, 1)]))


@FUZZ
@given(request=st.dictionaries(st.sampled_from(_NAMES + ("unknown",)), tensor, max_size=8),
       prompt=st.one_of(st.none(), st.just(("bytes", b"piano", (1,))), tensor))
def test_orchestrator_request_tensors(runtime, request, prompt):
    if prompt is not None:
        request["prompt"] = prompt
    if "num_inference_steps" not in request:  # keep the valid requests short
        request["num_inference_steps"] = ("int64", 2, (1,))
    if "audio_duration" not in request:
        request["audio_duration"] = ("fp32", 0.3, (1,))
    arrays = {name: _tensor(*spec) for name, spec in request.items()}
    _check(lambda: generate(runtime, request_kwargs(arrays.get)))


@pytest.mark.parametrize("value", [b"\xff\xfe", b"\x00", "🎹" * 50])
def test_odd_prompt_bytes(runtime, value):
    arrays = {"prompt": np.array([value if isinstance(value, bytes) else value.encode()], dtype=object),
              "audio_duration": np.array([0.3], np.float32), "num_inference_steps": np.array([2], np.int64)}
    _check(lambda: generate(runtime, request_kwargs(arrays.get)))
