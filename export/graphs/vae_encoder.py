"""``vae_encoder`` graph: ``AutoencoderOobleck.encoder`` plus the posterior's mean and std.

Mirrors ``AutoencoderOobleck.encode`` without tiling (the pipeline leaves ``use_tiling`` off) followed by
``OobleckDiagonalGaussianDistribution``: ``mean, scale = h.chunk(2, dim=1)``, ``std = softplus(scale) + 1e-4``.
Sampling stays in the runtime (NumPy noise from the call's seed), so the graph is deterministic.
Weight norm is folded into plain weights, as for the decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from .vae_decoder import stripped_part


class VaeEncoderAdapter(nn.Module):
    """audio [B, 2, S] -> (mean, std) [B, 64, floor(S / hop)]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = stripped_part(vae, "encoder")

    def forward(self, audio: torch.Tensor):
        mean, scale = self.encoder(audio).chunk(2, dim=1)
        return mean, nn.functional.softplus(scale) + 1e-4


def encoder_receptive_field(vae: nn.Module, hop: int, probe_frames: int = 24) -> int:
    """Latent frames on each side of a sample's frame that the sample influences (measured with an impulse).

    The probe doubles until the influence stays inside it, so the figure never hits the probe's edges.
    """
    encoder = vae.encoder
    while True:
        samples = probe_frames * hop
        probe = torch.zeros(2, encoder.conv1.in_channels, samples)
        probe[1, :, samples // 2] = 1.0
        with torch.no_grad():
            out = encoder(probe)
        diff = (out[1] - out[0]).abs().amax(dim=0)  # [frames]
        touched = torch.nonzero(diff > 0).flatten()
        first, last = int(touched[0]), int(touched[-1])
        if first > 0 and last < out.shape[-1] - 1:
            centre = samples // 2 // hop
            return max(centre - first, last - centre)
        probe_frames *= 2
