"""Windowed VAE decoding: memory stays bounded however long the clip.

The Oobleck decoder's receptive field is a few latent frames (measured at export and stored in the
manifest), so decoding overlapping windows whose overlap covers it and keeping each window's core
reproduces a whole decode up to float rounding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DEFAULT_VAE_WINDOW = 256  # latent frames per decoded window core (~10 s); TensorRT VAE profiles follow it


def window_overlap(receptive_field: int) -> int:
    """Latent frames decoded on each side of a window's core: the receptive field plus a margin of 2."""
    return receptive_field + 2


def decode_windowed(
    decode: Callable[[np.ndarray], np.ndarray],
    latents: np.ndarray,
    hop: int,
    window: int,
    overlap: int,
) -> np.ndarray:
    """latents [B, C, T] -> audio [B, A, T * hop], decoding cores of ``window`` frames plus ``overlap`` each side."""
    frames = latents.shape[-1]
    if frames <= window + 2 * overlap:
        return decode(latents)
    out = None
    for core_start in range(0, frames, window):
        core_end = min(core_start + window, frames)
        lo, hi = max(0, core_start - overlap), min(frames, core_end + overlap)
        audio = decode(np.ascontiguousarray(latents[:, :, lo:hi]))  # [B, A, (hi - lo) * hop]
        if out is None:
            out = np.empty(audio.shape[:2] + (frames * hop,), dtype=audio.dtype)
        out[:, :, core_start * hop:core_end * hop] = audio[:, :, (core_start - lo) * hop:(core_end - lo) * hop]
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
) -> tuple[np.ndarray, np.ndarray]:
    """audio [B, A, S] -> posterior (mean, std), each [B, C, S // hop], encoding cores of ``window`` frames
    with ``overlap`` frames of audio each side (memory bounded by ``window + 2 * overlap`` frames of audio).

    Window edges sit on multiples of the hop, so every strided layer sees the same sample grid as in a whole
    encode; the overlap covers the encoder's receptive field (measured at export), so the cores match a whole
    encode up to float rounding. The last window runs to the clip's last sample (the trailing partial frame
    reaches the last frames through the receptive field, as in a whole encode).
    """
    samples = audio.shape[-1]
    frames = samples // hop
    if frames <= window + 2 * overlap:
        return encode(audio)
    mean = std = None
    for core_start in range(0, frames, window):
        core_end = min(core_start + window, frames)
        lo, hi = max(0, core_start - overlap), min(frames, core_end + overlap)
        stop = samples if hi == frames else hi * hop
        m, s = encode(np.ascontiguousarray(audio[:, :, lo * hop:stop]))  # [B, C, >= hi - lo]
        if mean is None:
            mean = np.empty(m.shape[:2] + (frames,), dtype=m.dtype)
            std = np.empty_like(mean)
        mean[:, :, core_start:core_end] = m[:, :, core_start - lo:core_end - lo]
        std[:, :, core_start:core_end] = s[:, :, core_start - lo:core_end - lo]
    return mean, std
