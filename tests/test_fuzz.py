"""Property-based tests (hypothesis): any argument gives finite audio or InputError, never another exception.

The Python API (``AceStepRuntime.__call__``) and the Triton orchestrator's request parsing plus the same runtime
call (``serving.request_kwargs`` + ``serving.generate``, without a server). Each example is a valid call (short
clip, few steps, so that it stays fast) with up to three arguments replaced by odd values (NaN, infinities,
negative, huge, empty or too long lists, odd unicode, wrong types); about half the API examples generate. The
example counts are bounded and derandomised.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from acestep_trt.runtime.errors import InputError
from acestep_trt.runtime.triton.serving import generate, request_kwargs

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

odd_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
weird = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), odd_text, st.binary(max_size=8),
                  st.lists(st.integers(), max_size=3), st.just(np.float32(0.5)), st.just(np.array([1.0])))
edge = st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.integers(-(2**66), -1),
                 st.integers(10**6, 2**66), st.floats(min_value=1e6), st.just(0), st.just(-0.0), st.just(""),
                 st.just([]), st.just(["a", "b"]), st.lists(odd_text, min_size=9, max_size=12), weird)

# One valid call per example, with zero to three of its arguments replaced by odd values: the valid calls
# generate (finite audio), the others must be refused with InputError.
VALID = {
    "prompt": st.one_of(odd_text.filter(str.strip), st.lists(st.sampled_from(["piano", "lo-fi, rain", "合唱"]),
                                                             min_size=1, max_size=3)),
    "lyrics": odd_text,
    "audio_duration": st.floats(0.04, 1.0),
    "num_inference_steps": st.integers(1, 3),
    "shift": st.floats(0.5, 6.0),
    "guidance_scale": st.floats(0.0, 10.0),
    "seed": st.one_of(st.none(), st.integers(0, 2**63)),
    "vocal_language": st.sampled_from(["en", "zh", "ja", "unknown"]),
    "bpm": st.one_of(st.none(), st.integers(0, 300)),
    "keyscale": st.one_of(st.none(), odd_text),
    "timesignature": st.one_of(st.none(), odd_text),
    "cfg_interval_start": st.just(0.0),
    "cfg_interval_end": st.floats(0.5, 1.0),
}


def _check(call) -> bool:
    """True if the call generated (finite float32 audio), False if it raised InputError; anything else fails."""
    try:
        out = call()
    except InputError:
        return False
    audio = out.audios if hasattr(out, "audios") else out[0]
    assert audio.dtype == np.float32 and audio.size and np.all(np.isfinite(audio))
    return True


@settings(FUZZ, max_examples=40)
@given(valid=st.fixed_dictionaries(VALID), odd=st.dictionaries(st.sampled_from(sorted(VALID) + ["latents"]), edge,
                                                               max_size=3))
def test_api_arguments(runtime, valid, odd):
    kwargs = {**valid, **odd}
    if odd.get("latents") is None and "latents" in odd:  # NaN noise of the right shape for a 0.04 s... clip
        kwargs["latents"] = np.full((1, 25, 64), np.nan, np.float32)
    generated = _check(lambda: runtime(**kwargs, show_progress=False))
    event("generated" if generated else "InputError")
    if not odd:
        assert generated, kwargs


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

VALID_REQUEST = {"prompt": ("bytes", b"piano", (1,)), "audio_duration": ("fp32", 0.3, (1,)),
                 "num_inference_steps": ("int64", 2, (1,)), "seed": ("int64", 5, (1,))}


@FUZZ
@given(odd=st.dictionaries(st.sampled_from(_NAMES + ("unknown",)), tensor, max_size=3),
       dropped=st.sets(st.sampled_from(sorted(VALID_REQUEST)), max_size=2))
def test_orchestrator_request_tensors(runtime, odd, dropped):
    request = {**{k: v for k, v in VALID_REQUEST.items() if k not in dropped}, **odd}
    if "num_inference_steps" not in request:  # the server default (8 steps at 30 s) is valid but slow here
        request["num_inference_steps"] = VALID_REQUEST["num_inference_steps"]
    if "audio_duration" not in request:
        request["audio_duration"] = VALID_REQUEST["audio_duration"]
    arrays = {name: _tensor(*spec) for name, spec in request.items()}
    generated = _check(lambda: generate(runtime, request_kwargs(arrays.get)))
    event("generated" if generated else "InputError")
    if not odd and not dropped:
        assert generated


@pytest.mark.parametrize("value", [b"\xff\xfe", b"\x00", "🎹" * 50])
def test_odd_prompt_bytes(runtime, value):
    arrays = {"prompt": np.array([value if isinstance(value, bytes) else value.encode()], dtype=object),
              "audio_duration": np.array([0.3], np.float32), "num_inference_steps": np.array([2], np.int64)}
    _check(lambda: generate(runtime, request_kwargs(arrays.get)))
