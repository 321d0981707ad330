"""The condition encoder's timbre part, computed once per distinct reference (runtime/backends/ort_memo.py)."""

from __future__ import annotations

import numpy as np
import onnx

from acestep_trt.runtime.specs import CONDITION_ENCODER

from .conftest import noise


def _graphs(model):
    from acestep_trt.runtime.artifacts import load_artifacts
    from acestep_trt.runtime.backends.ort import OrtGraph
    from acestep_trt.runtime.backends.ort_memo import MemoizedInputGraph

    artifacts = load_artifacts(model.artifacts)
    path, spec = artifacts.graph_path(CONDITION_ENCODER), artifacts.specs[CONDITION_ENCODER]
    return OrtGraph(path, spec, "cpu"), MemoizedInputGraph.open(path, spec, "timbre_latents")


def _feeds(batch: int, text: int, lyric: int, timbre: int, seed: int, width: int = 32):
    rng = np.random.default_rng(seed)
    mask = lambda n: np.arange(n)[None, :].repeat(batch, 0) < (n - np.arange(batch)[:, None])  # noqa: E731 padded
    return {"text_hidden_states": rng.standard_normal((batch, text, width)).astype(np.float32),
            "text_attention_mask": mask(text),
            "lyric_hidden_states": rng.standard_normal((batch, lyric, width)).astype(np.float32),
            "lyric_attention_mask": mask(lyric),
            "timbre_latents": rng.standard_normal((batch, timbre, 64)).astype(np.float32)}


def test_timbre_part_runs_once_per_distinct_reference(tiny):
    """Outputs equal the whole graph's (batches with padding, other lengths than traced); the timbre part runs
    again only for a reference it has not seen (by content, not by array identity)."""
    whole, memo = _graphs(tiny)
    assert memo is not None
    width = whole.spec.inputs[0].dims[-1]
    first = _feeds(2, 9, 13, 31, seed=0, width=width)
    calls = [first, {**_feeds(2, 5, 21, 31, seed=1, width=width), "timbre_latents": first["timbre_latents"].copy()},
             _feeds(1, 7, 3, 17, seed=2, width=width), first]
    for feed in calls:
        got, want = memo.run(feed), whole.run(feed)
        assert set(got) == set(want)
        for name, value in want.items():
            if value.dtype == bool:
                np.testing.assert_array_equal(got[name], value)
            else:
                np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5 * np.max(np.abs(value)))
    assert memo.part_runs == 2  # first reference, the third call's; the second and fourth reuse the first's


def test_split_covers_the_timbre_encoder(tiny):
    """The memoised part holds the timbre encoder's layers (most of the graph's weights products)."""
    from acestep_trt.runtime.backends.ort_memo import split_by_input

    model = onnx.load(str(tiny.artifacts / f"{CONDITION_ENCODER}.onnx"), load_external_data=False)
    part, rest = split_by_input(model.graph, "timbre_latents", {t.name for t in model.graph.initializer})
    assert sum(n.op_type == "MatMul" for n in part) > 0 and sum(n.op_type == "MatMul" for n in rest) > 0
    assert not any("timbre_latents" in n.input for n in rest)


def test_runtime_reuses_the_silence_reference(tiny):
    """Text2music without reference audio: the silence reference's token is computed at the first call only,
    and the audio equals the unsplit runtime's."""
    from acestep_trt.runtime import AceStepRuntime

    rt, plain = AceStepRuntime.load(tiny.artifacts), AceStepRuntime.load(tiny.artifacts, split_graphs=False)
    runner = rt.runners[CONDITION_ENCODER]._runner
    kwargs = dict(lyrics="la la", audio_duration=1.7, latents=noise(1, 43), show_progress=False)
    for prompt in ("jazz", "metal, loud", "jazz"):
        a = rt(prompt=prompt, **kwargs).audios
        assert np.max(np.abs(a - plain(prompt=prompt, **kwargs).audios)) < 1e-5
    assert runner.part_runs == 1
