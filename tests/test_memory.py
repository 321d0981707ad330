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


def test_cpu_sessions_keep_an_arena_only_for_the_vae(runtime):
    from acestep_trt.runtime.backends.ort import CPU_ARENA_GRAPHS

    arenas = {name: runner.session.get_session_options().enable_cpu_mem_arena
              for name, runner in runtime.runners.items() if hasattr(runner, "session")}
    assert arenas and all(on == (name in CPU_ARENA_GRAPHS) for name, on in arenas.items()), arenas
    assert not arenas["dit_step"] and arenas["vae_decoder"]


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
