"""Writing audio files atomically: a temporary file in the target directory, renamed on success."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .artifacts import default_mode
from .errors import InputError

FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16")}


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse unknown extensions, missing directories and (unless asked) existing files."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"cannot write {path.name}: unknown audio format {path.suffix!r}.",
                         "use a .wav or .flac file name.")
    if not path.parent.is_dir():
        raise InputError(f"directory {path.parent} does not exist.", "create it first or choose another --out.")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists.", "choose another --out, or pass --overwrite to replace it.")
    return path


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    """Rename the finished file into place; without ``overwrite`` only if ``path`` still does not exist.

    ``os.link`` fails if the name exists, atomically, so of two processes writing one new name the second
    learns it instead of replacing the first one's file; where hard links are not supported the check and
    the rename are two steps.
    """
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise InputError(f"{path} was created by another process while this one was generating; it was left as "
                         "it is and this audio was not written.",
                         "choose another --out, or pass --overwrite.") from None
    except OSError:  # no hard links on this file system (some network and FAT mounts)
        if path.exists():
            raise InputError(f"{path} was created by another process while this one was generating.",
                             "choose another --out, or pass --overwrite.") from None
        os.replace(tmp, path)


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int, overwrite: bool = False) -> Path:
    """Write ``audio`` [channels, samples] float32 in [-1, 1] to a WAV or FLAC file, atomically."""
    import soundfile as sf

    path = check_output_path(path, overwrite)
    fmt, subtype = FORMATS[path.suffix.lower()]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        sf.write(tmp, np.clip(audio.T, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)
        os.chmod(tmp, default_mode())  # mkstemp files are private; give the output the user's usual mode
        _publish(tmp, path, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
