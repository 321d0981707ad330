"""Windowed VAE decoding: memory stays bounded however long the clip.

The Oobleck decoder's receptive field is a few latent frames (measured at export and stored in the
manifest), so decoding overlapping windows whose overlap covers it and keeping each window's core
reproduces a whole decode up to float rounding.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

DEFAULT_VAE_WINDOW = 256  # latent frames per decoded window core (~10 s); TensorRT VAE profiles follow it


def cpu_workers(threads: int | None) -> int:
    """Windows the CPU decodes (or encodes) at once: ``threads``, else the cores this process may use.

    ONNX Runtime runs the Snake activation's ``Sin`` (a third of the decode) on one thread whatever its
    intra-op setting, so a whole-clip decode leaves the other cores idle for that third; independent windows,
    each in a single-threaded session run, keep every core busy (README, Performance).
    """
    if threads:
        return max(1, int(threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


MIN_CORE_OVERLAPS = 4  # parallel windows: each core at least this many overlaps long


def window_cores(frames: int, window: int, overlap: int, workers: int = 1) -> list[tuple[int, int]]:
    """Core ranges ``[start, end)`` covering ``frames`` latent frames.

    One worker: cores of ``window`` frames, or the whole clip when it fits in one window with its overlaps
    (as before parallel windows existed; the TensorRT profiles rely on it). Several workers: the clip splits
    into a multiple of ``workers`` (or ``frames``, if fewer) equal cores of at most ``ceil(window / workers)``
    frames, so the windows decoded at once hold about as many frames as one window of ``window`` frames;
    with fewer workers where cores would be shorter than ``MIN_CORE_OVERLAPS * overlap`` frames.
    """
    if workers <= 1:
        if frames <= window + 2 * overlap:
            return [(0, frames)]
        return [(s, min(s + window, frames)) for s in range(0, frames, window)]
    # a core shorter than MIN_CORE_OVERLAPS overlaps would redo more than half its work in the overlaps (many cores,
    # short clips): use fewer workers then
    workers = min(workers, frames // max(1, MIN_CORE_OVERLAPS * overlap))
    if workers <= 1:
        return window_cores(frames, window, overlap, 1)
    count = math.ceil(frames / math.ceil(window / workers))
    count = min(frames, math.ceil(count / workers) * workers)
    core = math.ceil(frames / count)
    return [(s, min(s + core, frames)) for s in range(0, frames, core)]


def _map(fn: Callable, items: list, workers: int) -> list:
    """``[fn(item) for item in items]``, on ``workers`` threads when more than one (ONNX Runtime's run
    releases the GIL, and one session may run from several threads at once)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="vae-window") as pool:
        return list(pool.map(fn, items))


def window_overlap(receptive_field: int) -> int:
    """Latent frames decoded on each side of a window's core: the receptive field plus a margin of 2."""
    return receptive_field + 2


def decode_windowed(
    decode: Callable[[np.ndarray], np.ndarray],
    latents: np.ndarray,
    hop: int,
    window: int,
    overlap: int,
    workers: int = 1,
) -> np.ndarray:
    """latents [B, C, T] -> audio [B, A, T * hop], decoding cores of ``window`` frames plus ``overlap`` each side
    (``workers`` > 1: smaller cores, that many decoded at once; see :func:`window_cores`)."""
    frames = latents.shape[-1]
    cores = window_cores(frames, window, overlap, workers)
    if len(cores) == 1:
        return decode(latents)

    def one(core: tuple[int, int]) -> np.ndarray:
        lo, hi = max(0, core[0] - overlap), min(frames, core[1] + overlap)
        audio = decode(np.ascontiguousarray(latents[:, :, lo:hi]))  # [B, A, (hi - lo) * hop]
        return audio[:, :, (core[0] - lo) * hop:(core[1] - lo) * hop]

    # windows are decoded (at most ``workers`` at once) and copied in order; a batch of windows at a time,
    # so that only ``workers`` windows' audio is held beside the output
    out = None
    for first in range(0, len(cores), max(1, workers)):
        batch = cores[first:first + max(1, workers)]
        for (start, end), audio in zip(batch, _map(one, batch, workers)):
            if out is None:
                out = np.empty(audio.shape[:2] + (frames * hop,), dtype=audio.dtype)
            out[:, :, start * hop:end * hop] = audio
    return out


def normalize_peak(audio: np.ndarray) -> np.ndarray:
    """diffusers' post-processing: divide by the peak if it exceeds 1, then scale the peak to -1 dBFS.

    audio [B, A, S] float32, per item.
    """
    audio = audio.astype(np.float32, copy=False)
    peak = np.max(np.abs(audio), axis=(1, 2), keepdims=True)
    if np.any(peak > 1.0):
        audio = audio / np.maximum(peak, np.float32(1.0))
    target = np.float32(10.0 ** (-1.0 / 20.0))
    peak = np.maximum(np.max(np.abs(audio), axis=(1, 2), keepdims=True), np.float32(1e-6))
    return (audio * (target / peak)).astype(np.float32)


def encode_windowed(
    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    audio: np.ndarray,
    hop: int,
    window: int,
    overlap: int,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """audio [B, A, S] -> posterior (mean, std), each [B, C, S // hop], encoding cores of ``window`` frames
    with ``overlap`` frames of audio each side (memory bounded by ``window + 2 * overlap`` frames of audio).

    Window edges sit on multiples of the hop, so every strided layer sees the same sample grid as in a whole
    encode; the overlap covers the encoder's receptive field (measured at export), so the cores match a whole
    encode up to float rounding. The last window runs to the clip's last sample (the trailing partial frame
    reaches the last frames through the receptive field, as in a whole encode). ``workers`` > 1: smaller
    cores, that many encoded at once (:func:`window_cores`).
    """
    samples = audio.shape[-1]
    frames = samples // hop
    cores = window_cores(frames, window, overlap, workers)
    if len(cores) <= 1:
        return encode(audio)

    def one(core: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = max(0, core[0] - overlap), min(frames, core[1] + overlap)
        stop = samples if hi == frames else hi * hop
        m, s = encode(np.ascontiguousarray(audio[:, :, lo * hop:stop]))  # [B, C, >= hi - lo]
        return m[:, :, core[0] - lo:core[1] - lo], s[:, :, core[0] - lo:core[1] - lo]

    mean = std = None
    for (start, end), (m, s) in zip(cores, _map(one, cores, workers)):
        if mean is None:
            mean = np.empty(m.shape[:2] + (frames,), dtype=m.dtype)
            std = np.empty_like(mean)
        mean[:, :, start:end] = m
        std[:, :, start:end] = s
    return mean, std
