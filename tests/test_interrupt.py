"""Interruption and concurrent use: real signals to child processes, locks, re-export under a running runtime.

Each child is a real ``acestep-trt`` process; the signal is sent right after a marker (a log line, or a lock
file appearing), so the tests stay short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from acestep_trt.cli import main
from acestep_trt.runtime import AceStepRuntime
from acestep_trt.runtime import artifacts as art
from acestep_trt.runtime import staging as stg
from acestep_trt.runtime.errors import ArtifactError, InputError

from .conftest import noise
from .test_cli_errors import assert_refused

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "acestep_trt.cli"]


def _start(args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, **kwargs)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read the child's output until a line containing ``needle``; returns the lines read."""
    lines: list[str] = []
    found = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if needle in line:
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if not found.wait(timeout):
        proc.kill()
        pytest.fail(f"{needle!r} never appeared: {''.join(lines)[-2000:]}")
    return lines


def _wait_for_path(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared (exit {proc.poll()}): {proc.stdout.read()[-2000:]}")
        time.sleep(0.02)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}"))


# -------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_export_leaves_nothing(tiny, tmp_path, sig, code):
    out = tmp_path / "out"
    proc = _start(CLI + ["export", tiny.checkpoint, out, "--no-validate"])
    _wait_for_line(proc, "exporting text_encoder")
    assert len(_leftovers(tmp_path, "out")) == 2  # the marked staging directory and the lock
    if sig == signal.SIGTERM:  # meanwhile a second export into the same directory is refused by the lock
        second = CliRunner().invoke(main, ["export", str(tiny.checkpoint), str(out), "--no-validate"])
        assert_refused(second, 2, "another acestep-trt process (pid", "exporting into")
        os.kill(proc.pid, sig)  # the process alone: its tracing child must be stopped by it
    else:
        os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole process group
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == code, rest
    assert "Traceback" not in rest and "interrupted" in rest
    assert _leftovers(tmp_path, "out") == []


def test_sigkill_during_export_is_recognised_and_cleaned(tiny, tmp_path, monkeypatch):
    from acestep_trt.export import exporter
    from acestep_trt.runtime.errors import CheckpointError

    out = tmp_path / "out"
    proc = _start(CLI + ["export", tiny.checkpoint, out, "--no-validate"])
    _wait_for_line(proc, "exporting text_encoder")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    left = _leftovers(tmp_path, "out")
    staging = [tmp_path / n for n in left if stg.PARTIAL in n]
    assert len(staging) == 1 and stg.read_marker(staging[0])["pid"] == proc.pid
    with pytest.raises(ArtifactError, match="unfinished output of an export"):
        AceStepRuntime.load(staging[0])
    assert_refused(CliRunner().invoke(main, ["generate", str(out), "--prompt", "p", "--out", str(tmp_path / "a.wav")]),
                   3, "does not exist")  # the target itself was never created

    def fail_fast(*args, **kwargs):  # the next export: it cleans up before its first graph
        raise CheckpointError("stop here.", "nothing.")

    monkeypatch.setattr(exporter, "_export_groups", fail_fast)
    with pytest.raises(CheckpointError):
        exporter.export_artifacts(tiny.checkpoint, out, progress=False)
    assert _leftovers(tmp_path, "out") == []  # the killed export's staging, lock file and its own: all gone


def test_live_staging_of_another_process_is_kept(tmp_path):
    target = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        staging = stg.make_staging(target)
        marker = json.loads((staging / stg.STAGING_MARKER).read_text())
        marker.update(pid=sleeper.pid, start=stg._process_start(sleeper.pid))
        (staging / stg.STAGING_MARKER).write_text(json.dumps(marker))
        assert stg.clean_stale(target) == [] and staging.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert stg.clean_stale(target) == [staging] and not staging.exists()


# ------------------------------------------------------------------------------------------ generate


def _terminate(proc, quiet: bool = True) -> None:
    """SIGTERM ``proc``; it must exit as killed by the signal (143), and without a traceback when ``quiet``."""
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, rest
    assert not quiet or "Traceback" not in rest, rest


def test_sigterm_during_generate_leaves_no_file(tiny, tmp_path):
    out = tmp_path / "song.wav"
    proc = _start(CLI + ["generate", tiny.artifacts, "--prompt", "piano", "--duration", "120", "--steps", "300",
                         "--out", out])
    _wait_for_path(tmp_path / ".song.wav.lock", proc)
    time.sleep(1.5)  # loaded (0.7 s) and denoising
    _terminate(proc)
    assert list(tmp_path.iterdir()) == []


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (Linux: /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
            except OSError:
                kids = []
            out.extend(kids)
            todo.extend(kids)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_during_a_separate_process_bench_stops_its_side_at_once(tiny, tmp_path):
    """SIGTERM while a side runs in its own process: the bench stops now (it used to wait for the side to
    finish all its runs) and leaves no process behind."""
    proc = _start(CLI + ["bench", tiny.checkpoint, tiny.artifacts, "--separate-processes", "--runs", "100000",
                         "--diffusers-dtype", "fp32", "--duration", "1"])
    side: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not _descendants(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-2000:]
            time.sleep(0.05)
        side = _descendants(proc.pid)
        time.sleep(4)  # the side has loaded and is in its runs
        started = time.monotonic()
        _terminate(proc)
        assert time.monotonic() - started < 20
        time.sleep(0.5)
        assert not [pid for pid in side if _alive(pid)]
    finally:  # a failure must not leave the bench running its 100000 runs
        for pid in [*_descendants(proc.pid), *side, proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def test_two_generates_to_one_file(tiny, tmp_path):
    import soundfile as sf

    out = tmp_path / "song.wav"
    args = CLI + ["generate", tiny.artifacts, "--prompt", "piano", "--duration", "20", "--steps", "60", "--out", out]
    procs = [_start(args) for _ in range(2)]
    results = [(p.communicate(timeout=300)[0], p.returncode) for p in procs]
    codes = sorted(code for _, code in results)
    assert codes == [0, 2], results
    loser = next(text for text, code in results if code == 2)
    assert "another acestep-trt process (pid" in loser or "already exists" in loser
    assert "Traceback" not in loser
    audio, rate = sf.read(out)
    assert rate == 48000 and audio.shape == (20 * 48000, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["song.wav"]


def test_output_created_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    import soundfile as sf

    from acestep_trt.runtime.audio import write_audio

    out = tmp_path / "x.wav"
    real = sf.write

    def write_then_other_process(*args, **kwargs):
        real(*args, **kwargs)
        out.write_bytes(b"theirs")

    monkeypatch.setattr(sf, "write", write_then_other_process)
    with pytest.raises(InputError, match="created by another process"):
        write_audio(out, np.zeros((2, 10), np.float32), 48000)
    assert out.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["x.wav"]


# ----------------------------------------------------------------------------------- triton, build

_SLOW_CHILD = """
import shutil, sys, time
sys.path.insert(0, {root!r})
{setup}
real = {target}
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(0.3)
    return real(*args, **kwargs)
{target} = slow
from acestep_trt.cli import main
main({argv!r})
"""


def _slow_cli(argv, target, setup=""):
    code = _SLOW_CHILD.format(root=str(REPO_ROOT), setup=textwrap.dedent(setup), target=target,
                              argv=[str(a) for a in argv])
    return _start([sys.executable, "-c", code])


def test_sigterm_during_triton_leaves_no_repository(tiny, tmp_path):
    proc = _slow_cli(["triton", tiny.artifacts, tmp_path / "repo"], "shutil.copy2")
    _wait_for_line(proc, "writing")
    _terminate(proc)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_build_leaves_no_partial_engine(tiny, tmp_path):
    arts = tmp_path / "artifacts"
    shutil.copytree(tiny.artifacts, arts)
    setup = """
    from _pytest.monkeypatch import MonkeyPatch
    from tests import fake_trt
    fake_trt.install(MonkeyPatch())
    import acestep_trt.runtime.trt.builder as builder
    """
    argv = ["build", arts, "--no-validate", "--min-duration", "0.5", "--opt-duration", "1", "--max-duration", "4",
            "--max-lyric-len", "512"]
    proc = _slow_cli(argv, "builder._write_atomic", setup)
    _wait_for_line(proc, "writing")
    time.sleep(0.1)
    _terminate(proc, quiet=False)  # as before: only the exit status is asserted here
    engines = arts / "engines"
    assert not list(engines.glob("*.tmp")) and not (engines / "engines.json").exists()
    assert not [p for p in arts.iterdir() if p.name.startswith(".engines")]  # lock released and removed


# --------------------------------------------------------------------------------- artifacts in use


def test_reexport_while_a_runtime_uses_the_directory(tiny, variant, tmp_path):
    target = tmp_path / "art"
    shutil.copytree(tiny.artifacts, target)
    rt = AceStepRuntime.load(target)
    lat = noise(1, rt.config.latent_length(0.5))
    before = rt(prompt="piano", audio_duration=0.5, latents=lat).audios
    loading = art.load_artifacts(target)  # a second process in the middle of loading

    staging = stg.make_staging(target)  # what `export --overwrite` does once the new graphs are written
    for item in variant.artifacts.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
    stg.publish(staging, target)

    np.testing.assert_array_equal(rt(prompt="piano", audio_duration=0.5, latents=lat).audios, before)
    with pytest.raises(ArtifactError, match="replaced .* while it was being loaded"):
        loading.check_unchanged()
    fresh = AceStepRuntime.load(target)
    assert not fresh.config.is_turbo and fresh.config.cond_hidden != rt.config.cond_hidden
    assert _leftovers(tmp_path, "art") == ["art"]


def test_verification_cache_is_atomic_for_concurrent_readers(tiny, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(tiny.artifacts, root)
    records = art.read_manifest(root)["files"]
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                text = (root / art.VERIFIED_CACHE).read_text()
            except FileNotFoundError:
                continue
            try:
                json.loads(text)
            except ValueError:
                bad.append(text)

    def writer():
        for _ in range(20):
            art._save_cache(root, {r["path"]: "x" * 2000 for r in records})
            art.verify_files(root, records)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    writers = [threading.Thread(target=writer) for _ in range(3)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert bad == []
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    art.verify_files(root, records)  # and the cache left behind is a valid one


def test_lock_is_exclusive_and_removed(tmp_path):
    target = tmp_path / "thing"
    with stg.TargetLock(target, "writing"):
        with pytest.raises(InputError, match=r"another acestep-trt process \(pid \d+\) is writing"):
            stg.TargetLock(target, "writing").acquire()
    assert list(tmp_path.iterdir()) == []
