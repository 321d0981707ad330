"""Stateless NumPy flow-matching schedule, Euler step and APG guidance.

Mirrors, in float32 like the reference:
- ``AceStepPipeline._get_timestep_schedule``: ``t = linspace(1, 0, N + 1)[:-1]`` shifted by
  ``shift * t / (1 + (shift - 1) * t)``;
- ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` with the checkpoint's scheduler config
  (its own static shift, ``num_train_timesteps``), terminal sigma 0 appended;
- ``FlowMatchEulerDiscreteScheduler.step``: ``x + (sigma_next - sigma) * v``;
- ``normalized_guidance`` + ``MomentumBuffer(-0.75)`` (adaptive projected guidance) for non-turbo models.
"""

from __future__ import annotations

import numpy as np

from .errors import ArtifactError

_UNSUPPORTED = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "stochastic_sampling", "invert_sigmas", "shift_terminal")


def check_scheduler_config(config: dict) -> None:
    """Refuse scheduler options the runtime does not mirror (the reference pipeline never sets them)."""
    bad = [key for key in _UNSUPPORTED if config.get(key)]
    if bad:
        raise ArtifactError(
            f"the checkpoint's scheduler sets {bad}, which the runtime does not implement.",
            "use a checkpoint whose scheduler is FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0) "
            "as ACE-Step 1.5 ships it.",
        )


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` bit for bit.

    torch evaluates ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the
    second, with a float32 ``step`` and a fused multiply-add (one rounding): float64 arithmetic rounded
    once to float32 reproduces that.
    """
    if steps == 1:
        return np.array([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    front = np.float64(start32) + step * idx
    back = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, front, back).astype(np.float32)


def timestep_schedule(num_steps: int, shift: float, timesteps=None) -> np.ndarray:
    """The pipeline's schedule in [1, 0) (``timesteps`` overrides it, as in diffusers). [N] float32."""
    if timesteps is not None:
        return np.asarray(timesteps, dtype=np.float32)
    t = linspace_f32(1.0, 0.0, num_steps + 1)
    if shift != 1.0:
        t = (shift * t / (1 + (shift - 1) * t)).astype(np.float32)
    return t[:-1]


def scheduler_sigmas(schedule: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """``set_timesteps(sigmas=schedule)``: returns (timesteps [N], sigmas [N + 1] ending in 0), float32."""
    sigmas = np.asarray(schedule, dtype=np.float32)
    shift = float(config.get("shift", 1.0))
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    timesteps = (sigmas * np.float32(config.get("num_train_timesteps", 1))).astype(np.float32)
    return timesteps, np.append(sigmas, np.float32(0.0)).astype(np.float32)


def euler_step(sample: np.ndarray, velocity: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> np.ndarray:
    """One Euler step of the flow ODE. sample, velocity: [B, T, C] float32."""
    dt = np.float32(sigma_next) - np.float32(sigma)
    return (sample.astype(np.float32) + dt * velocity).astype(np.float32)


class MomentumBuffer:
    """Running average ``v_t = d_t + momentum * v_{t-1}`` (diffusers' ``MomentumBuffer``)."""

    def __init__(self, momentum: float = -0.75):
        self.momentum = momentum
        self.running_average: np.ndarray | float = 0.0

    def update(self, value: np.ndarray) -> None:
        self.running_average = value + np.float32(self.momentum) * self.running_average


def apg(pred_cond, pred_uncond, guidance_scale, buffer: MomentumBuffer, norm_threshold=2.5, axis=1):
    """Adaptive projected guidance as the pipeline calls it (eta 0, original formulation, norm over time).

    pred_*: [B, T, C] float32 -> guided velocity [B, T, C] float32.
    """
    diff = pred_cond - pred_uncond
    buffer.update(diff)
    diff = buffer.running_average
    if norm_threshold > 0:
        norm = np.sqrt(np.sum(diff.astype(np.float32) ** 2, axis=axis, keepdims=True, dtype=np.float32))
        with np.errstate(divide="ignore"):
            diff = diff * np.minimum(np.float32(1.0), np.float32(norm_threshold) / norm)
    v0, v1 = diff.astype(np.float64), pred_cond.astype(np.float64)
    v1 = v1 / np.maximum(np.linalg.norm(v1, axis=axis, keepdims=True), 1e-12)
    parallel = np.sum(v0 * v1, axis=axis, keepdims=True) * v1
    orthogonal = (v0 - parallel).astype(np.float32)
    return (pred_cond + np.float32(guidance_scale) * orthogonal).astype(np.float32)
