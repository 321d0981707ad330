"""``vae_decoder`` graph: ``AutoencoderOobleck.decoder`` with weight norm folded into plain weights.

Removing weight norm gives identical output and a clean graph (no per-call norm of every kernel); the Snake
activations are folded (``vae_blocks.fold_snakes``: constants computed once, ``Pow`` -> ``Mul``).
The pipeline decodes without tiling (``use_tiling`` is off), so this graph is the whole-decode reference;
the runtime windows long clips itself.
"""

from __future__ import annotations

import torch
from torch import nn

from .vae_blocks import fold_snakes


def stripped_decoder(vae: nn.Module) -> nn.Module:
    """A copy of ``vae.decoder`` whose weight-normed convolutions hold plain weights."""
    return stripped_part(vae, "decoder")


def stripped_part(vae: nn.Module, part: str) -> nn.Module:
    """A copy of ``vae.<part>`` (``encoder`` or ``decoder``) whose weight-normed convolutions hold plain weights
    and whose Snake activations are folded (:func:`~.vae_blocks.fold_snakes`; same function, less work).

    (weight-normed modules cannot be deep-copied, so the copy is rebuilt from config and state dict.)
    """
    clone = type(vae).from_config(vae.config)
    clone.load_state_dict(vae.state_dict())
    module = getattr(clone, part).eval()
    for sub in module.modules():
        if hasattr(sub, "weight_g") and hasattr(sub, "weight_v"):
            torch.nn.utils.remove_weight_norm(sub)
        elif hasattr(sub, "parametrizations") and "weight" in getattr(sub, "parametrizations", {}):
            torch.nn.utils.parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
    fold_snakes(module)
    return module


class VaeDecoderAdapter(nn.Module):
    """latents [B, 64, T] -> audio [B, 2, T * hop]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.decoder = stripped_decoder(vae)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)


def receptive_field(vae: nn.Module, hop: int, probe_frames: int = 64) -> int:
    """Latent frames on each side that influence a frame's audio (measured with an impulse)."""
    decoder = vae.decoder
    with torch.no_grad():
        base = torch.zeros(1, decoder.conv1.in_channels, probe_frames)
        bump = base.clone()
        bump[:, :, probe_frames // 2] = 1.0
        diff = (decoder(bump) - decoder(base)).abs().amax(dim=1)[0]  # [samples]
    touched = torch.nonzero(diff > 0).flatten()
    first, last = int(touched[0]) // hop, int(touched[-1]) // hop
    return max(probe_frames // 2 - first, last - probe_frames // 2)
