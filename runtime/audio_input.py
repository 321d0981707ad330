"""Reading source and reference audio files for the audio-to-audio tasks.

soundfile (libsndfile) reads WAV, FLAC and OGG; soxr resamples to the model's rate when the file's differs
(its default "high quality" setting); mono is made stereo by duplication. Every refusal is an
:class:`InputError` naming the file and the fix. Audio codes travel as text (``<|audio_code_N|>`` tokens),
given inline or as ``@FILE``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import default_mode
from .errors import InputError


@dataclass
class AudioFile:
    """One decoded file: ``audio`` [channels, samples] float32 at the model rate, and what was done to it."""

    audio: np.ndarray
    note: str


def read_audio(path: str | Path, sample_rate: int, channels: int = 2, option: str = "--src-audio") -> AudioFile:
    """Read ``path`` -> :class:`AudioFile` at ``sample_rate`` with ``channels`` channels."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file {path} does not exist.", f"pass an existing WAV, FLAC or OGG file to {option}.")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [samples, channels]
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"cannot read {path} as audio ({str(exc).splitlines()[0]}).",
                         f"pass a WAV, FLAC or OGG file to {option}.") from None
    if data.shape[0] == 0:
        raise InputError(f"audio file {path} holds no samples.", f"pass a non-empty recording to {option}.")
    if data.shape[1] > channels:
        raise InputError(f"audio file {path} has {data.shape[1]} channels; the model takes at most {channels}.",
                         "mix it down to stereo or mono first (e.g. sox in.wav -c 2 out.wav).")
    if not np.all(np.isfinite(data)):
        raise InputError(f"audio file {path} contains NaN or Inf samples.", "pass a file with finite samples.")
    notes = [f"{path.name}: {data.shape[0] / rate:.2f} s"]
    if rate != sample_rate:
        import soxr

        data = soxr.resample(data, rate, sample_rate).astype(np.float32)
        notes.append(f"resampled {rate} -> {sample_rate} Hz")
    if data.shape[1] < channels:
        data = np.repeat(data[:, :1], channels, axis=1)
        notes.append("mono -> stereo")
    return AudioFile(np.ascontiguousarray(data.T), ", ".join(notes))


def read_codes(value: str | None) -> str | None:
    """``--audio-codes TEXT`` or ``@FILE`` -> the code string (None when not given)."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"audio codes file {path} does not exist.",
                         "pass --audio-codes @FILE with an existing file, or the codes inline.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read audio codes file {path} ({exc}).", "pass a UTF-8 text file.") from None


def write_codes(path: str | Path, codes: str) -> Path:
    """Write a code string to ``path`` atomically (a temporary file in the same directory, renamed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(codes + "\n")
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
