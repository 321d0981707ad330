"""Writing results so that an interruption or a second process never leaves a partial or mixed one behind.

- :class:`TargetLock`: an exclusive ``fcntl.flock`` on ``.<name>.lock`` beside a target (artifact directory,
  engine directory, Triton repository, audio file). A second writer is refused at once with the holder's pid.
  The kernel drops the lock when its process dies, even by SIGKILL; the file is unlinked on release, and a
  waiter re-checks that the file it locked is still the one on disk (the usual unlink-safe protocol).
- :func:`make_staging`: a private staging directory ``.<name>.partial-XXXX`` beside the target, holding a
  marker (:data:`STAGING_MARKER`: pid, process start time, target). Results are renamed into place only when
  complete. A staging directory whose process is gone (killed with SIGKILL, power loss) is recognised by its
  marker and removed by the next writer of the same target; the artifact loader refuses any directory that
  still holds a marker, so a staging directory is never taken for a finished export.
- :func:`install_signal_handlers`: SIGTERM (and SIGHUP) raise :class:`Interrupted`, a ``KeyboardInterrupt``,
  so the same ``finally`` blocks that clean up after Ctrl-C run for them too. Python delivers a signal
  between bytecodes: inside one long ONNX Runtime or TensorRT call it takes effect when that call returns.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)

STAGING_MARKER = ".acestep-staging.json"
PARTIAL = ".partial-"


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM/SIGHUP handler; ``signum`` is the signal (the CLI exits with 128 + signum)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP -> :class:`Interrupted` in the main thread (SIGINT already raises KeyboardInterrupt).

    Does nothing outside the main thread (where Python cannot install handlers), e.g. a CLI driven from a thread.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _raise_interrupted)


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs (and, when ``start`` is known, is the same process, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def _owner() -> dict:
    return {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname(),
            "since_unix": int(time.time())}


class TargetLock:
    """Exclusive lock for writing ``target``; ``what`` names the operation in the refusal message."""

    def __init__(self, target: str | Path, what: str = "writing"):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "TargetLock":
        import fcntl

        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(f"cannot create the lock file {self.path} ({exc.strerror}).",
                                 f"make {self.path.parent} writable, or choose another path.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise InputError(f"another acestep-trt process{holder} is {self.what} {self.target}.",
                                 "wait for it to finish, or choose another path.") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not unlinked by the previous holder between our open and our flock
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened it re-checks the inode
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "TargetLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int, wait: float = 0.5) -> str:
    """The lock holder's pid as ``" (pid N)"`` for the refusal message, or "" if it cannot be read. The holder
    writes its record just after taking the lock, so an empty or half-written one is read again for up to
    ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f" (pid {int(data['pid'])})"
        except (ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return ""
            time.sleep(0.01)
        except OSError:
            return ""


def read_marker(directory: str | Path) -> dict | None:
    """The staging marker of ``directory`` ({pid, start, host, target}), or None if it is not a staging dir."""
    path = Path(directory) / STAGING_MARKER
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _stale(marker: dict) -> bool:
    if marker.get("host") not in (None, socket.gethostname()):
        return False  # another machine's (shared file system): cannot tell, leave it
    try:
        return not process_alive(int(marker["pid"]), marker.get("start"))
    except (KeyError, TypeError, ValueError):
        return True


def clean_stale(target: str | Path) -> list[Path]:
    """Remove staging directories of ``target`` left by processes that are gone; report unknown ones.

    Returns the removed paths. Call it while holding the target's :class:`TargetLock`.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in sorted(target.parent.glob(f".{target.name}{PARTIAL}*")):
        marker = read_marker(path) if path.is_dir() else None
        if marker is None:
            log.warning("%s looks like an unfinished staging directory without a marker; remove it by hand", path)
        elif _stale(marker):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s: unfinished output of process %s, which is gone (killed?)", path,
                        marker.get("pid", "?"))
            removed.append(path)
    for path in sorted(target.parent.glob(f".{target.name}.old-*")):  # only exists inside publish()
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s: a replaced output whose removal was interrupted", path)
        removed.append(path)
    return removed


def make_staging(target: str | Path) -> Path:
    """A new private staging directory beside ``target`` with a marker; stale ones are cleaned first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent))
    (staging / STAGING_MARKER).write_text(json.dumps({**_owner(), "target": str(target)}), encoding="utf-8")
    return staging


def publish(staging: Path, target: Path) -> None:
    """Replace ``target`` by the finished ``staging`` directory with as short a gap as the file system allows.

    The old directory is first renamed aside (one rename), the new one renamed into place (a second), then the
    old one removed: a runtime that already opened the old files keeps reading them (their inodes live on).
    """
    (staging / STAGING_MARKER).unlink()
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "previous")
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
