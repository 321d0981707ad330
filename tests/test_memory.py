"""Runtime memory (constants read without private copies, ONNX Runtime arenas) and the export's tracing plan."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from acestep_trt.runtime.errors import ArtifactError
from acestep_trt.runtime.mapped import load_mapped


def _constants(tmp_path):
    rng = np.random.default_rng(0)
    values = {"lyric_embedding": rng.standard_normal((37, 5)).astype(np.float32),
              "silence_latent": rng.standard_normal((1, 9, 4)).astype(np.float32),
              "fsq_levels": np.array([8, 8, 5], np.int64), "empty": np.zeros((0, 3), np.float32)}
    path = tmp_path / "constants.safetensors"
    save_file(values, str(path))
    return path


def test_mapped_constants_equal_safetensors_and_rows_read_on_lookup(tmp_path):
    path = _constants(tmp_path)
    want = load_file(str(path))
    got = load_mapped(path, rows=("lyric_embedding",))
    assert sorted(got) == sorted(want)
    for name in ("silence_latent", "fsq_levels", "empty"):
        assert type(got[name]) is np.ndarray and not got[name].flags.writeable
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name])
    table = got["lyric_embedding"]
    assert table.shape == (37, 5) and table.dtype == np.float32
    for ids in ([[3, 3, 36, 0]], [[-1, 5], [7, -37]], np.zeros((2, 0), np.int64), 4):
        assert np.array_equal(np.take(table, ids, axis=0), np.take(want["lyric_embedding"], ids, axis=0))
    assert np.array_equal(np.asarray(table), want["lyric_embedding"])
    with pytest.raises(IndexError):
        np.take(table, [[37]], axis=0)
    other = tmp_path / "new.safetensors"  # a re-export replaces the file by a rename: the table keeps its own
    save_file({"lyric_embedding": np.zeros((37, 5), np.float32)}, str(other))
    other.replace(path)
    assert np.array_equal(np.take(table, [[1, 2]], axis=0), want["lyric_embedding"][[[1, 2]]])


@pytest.mark.parametrize("damage", ["short", "header", "offsets"])
def test_damaged_constants_are_an_artifact_error(tmp_path, damage):
    from acestep_trt.runtime.artifacts import Artifacts

    path = _constants(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "short":
        data = data[:5]
    elif damage == "header":
        data[8:12] = b"\xff\xfe{{"
    else:
        data = data[:-4]  # the last tensor's offsets run past the end of the file
    path.write_bytes(bytes(data))
    artifacts = Artifacts.__new__(Artifacts)
    artifacts.root = tmp_path
    with pytest.raises(ArtifactError, match="cannot be read"):
        artifacts.load_constants()


def test_cpu_sessions_keep_an_arena_only_for_the_vae(tiny, runtime):
    """Whole graphs (split_graphs=False): only the VAE keeps ONNX Runtime's arena. The split runners' pieces run
    without one (the split VAE writes into buffers of its own, ort_snake.py)."""
    from acestep_trt.runtime import AceStepRuntime
    from acestep_trt.runtime.backends.ort import CPU_ARENA_GRAPHS
    from acestep_trt.runtime.backends.ort_snake import Piece, Upsample

    plain = AceStepRuntime.load(tiny.artifacts, split_graphs=False)
    arenas = {name: runner.session.get_session_options().enable_cpu_mem_arena
              for name, runner in plain.runners.items() if name in plain.artifacts.specs}
    assert arenas and all(on == (name in CPU_ARENA_GRAPHS) for name, on in arenas.items()), arenas
    assert not arenas["dit_step"] and arenas["vae_decoder"]
    steps = runtime.runners["vae_decoder"]._runner._steps
    sessions = [s.session for s in steps if isinstance(s, (Piece, Upsample))]
    assert sessions and not any(s.get_session_options().enable_cpu_mem_arena for s in sessions)


def test_small_checkpoints_trace_one_graph_per_child_two_at_once(tiny, monkeypatch):
    from acestep_trt.export import children, exporter

    cfg = exporter.inspect_checkpoint(tiny.checkpoint)
    specs = exporter.export_specs(cfg, tiny.checkpoint)
    monkeypatch.setattr(children, "cores", lambda: 2)
    jobs, workers = exporter.tracing_plan(tiny.checkpoint, specs)
    assert workers == 2 and all(len(job) == 1 for job in jobs) and jobs[0] == ("dit_step",)
    assert sorted(n for (n,) in jobs) == sorted(n for n in specs if n != "cover_blend")
    monkeypatch.setattr(exporter, "PARALLEL_MAX_BYTES", 0)  # as large as the full-size checkpoint: one at a time
    jobs, workers = exporter.tracing_plan(tiny.checkpoint, specs)
    assert workers == 1 and ("vae_decoder", "vae_encoder") in jobs
    assert sorted(n for job in jobs for n in job) == sorted(n for n in specs if n != "cover_blend")


def _fresh(tiny, tmp_path, copy: bool = False):
    import shutil

    from acestep_trt.runtime import AceStepRuntime

    root = tiny.artifacts
    if copy:
        root = tmp_path / "artifacts"
        shutil.copytree(tiny.artifacts, root)
    return AceStepRuntime.load(root, backend="ort", device="cpu"), root


CODES = "".join(f"<|audio_code_{c}|>" for c in (5, 17, 300, 9, 123))


def test_tokenizer_pair_is_opened_at_first_use(tiny, tmp_path, monkeypatch):
    """text2music never opens the audio tokenizer pair (0.8 GiB at full size); a call with audio codes opens
    the detokenizer and counts its weights in the memory check first; the next call counts nothing."""
    from acestep_trt.runtime import limits
    from acestep_trt.runtime.backends.ort import DeferredGraph
    from acestep_trt.runtime.specs import AUDIO_DETOKENIZER, AUDIO_TOKENIZER

    rt, root = _fresh(tiny, tmp_path)
    pair = {name: rt.runners[name].wrapped for name in (AUDIO_TOKENIZER, AUDIO_DETOKENIZER)}
    assert all(isinstance(g, DeferredGraph) and not g.loaded for g in pair.values())
    seen = []
    monkeypatch.setattr(limits, "check_memory", lambda estimate, *a: seen.append(estimate))
    rt(prompt="piano", audio_duration=1.0, seed=0, show_progress=None)
    assert not any(g.loaded for g in pair.values())
    assert seen[-1].weights == 0
    detok = root / "audio_detokenizer.onnx"
    size = detok.stat().st_size + detok.with_name(detok.name + ".data").stat().st_size
    rt._memory_proven = None
    first = rt(prompt="piano", audio_codes=CODES, seed=0, show_progress=None)
    assert seen[-1].weights == size and pair[AUDIO_DETOKENIZER].loaded and not pair[AUDIO_TOKENIZER].loaded
    rt._memory_proven = None
    again = rt(prompt="piano", audio_codes=CODES, seed=0, show_progress=None)
    assert seen[-1].weights == 0
    np.testing.assert_array_equal(first.audios, again.audios)


def test_a_graph_opened_late_refuses_a_replaced_directory(tiny, tmp_path):
    """The pair is opened after load: if the export was replaced meanwhile, the call is refused (it would mix
    graphs of two exports) with the remedy, instead of opening the new file."""
    import os
    import shutil

    rt, root = _fresh(tiny, tmp_path, copy=True)
    path = root / "audio_detokenizer.onnx"
    shutil.copy2(path, path.with_suffix(".new"))
    os.replace(path.with_suffix(".new"), path)  # same bytes, another file: what a re-export leaves
    with pytest.raises(ArtifactError, match="replaced"):
        rt(prompt="piano", audio_codes=CODES, seed=0, show_progress=None)


def test_vae_encoder_is_opened_at_first_use(tiny, tmp_path, monkeypatch):
    """text2music never opens the VAE encoder (on the CPU its rearranged NCHWc weights live in memory, 0.34 GB
    at full size); a repaint of source audio counts its weights in the memory check first and opens it."""
    from acestep_trt.runtime import limits
    from acestep_trt.runtime.backends.ort import DeferredGraph
    from acestep_trt.runtime.backends.ort_snake import SnakeSplitGraph
    from acestep_trt.runtime.specs import VAE_ENCODER

    rt, root = _fresh(tiny, tmp_path)
    encoder = rt.runners[VAE_ENCODER].wrapped
    assert isinstance(encoder, DeferredGraph) and not encoder.loaded
    seen = []
    monkeypatch.setattr(limits, "check_memory", lambda estimate, *a: seen.append(estimate))
    rt(prompt="piano", audio_duration=1.0, seed=0, show_progress=None)
    assert not encoder.loaded and seen[-1].weights == 0
    graph = root / "vae_encoder.onnx"
    size = graph.stat().st_size + graph.with_name(graph.name + ".data").stat().st_size
    source = 0.1 * np.random.default_rng(0).standard_normal((2, rt.sample_rate)).astype(np.float32)
    rt._memory_proven = None
    rt(prompt="piano", src_audio=source, task_type="repaint", repainting_start=0.2, repainting_end=0.6, seed=0,
       show_progress=None)
    assert seen[-1].weights == size and encoder.loaded
    assert isinstance(encoder._graph, SnakeSplitGraph)  # the CPU split runner, once opened
