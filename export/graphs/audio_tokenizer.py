"""``audio_tokenizer`` and ``audio_detokenizer`` graphs: the optional 5 Hz audio-code pair.

- tokenizer: ``AceStepAudioTokenizer.forward`` on latents already cut into pool-window patches (the
  silence padding of ``tokenize`` is done by the runtime): projection, attention pooler, residual FSQ.
  The FSQ rounds with ``floor``: a value at a bin edge can flip with last-bit differences between
  PyTorch and ONNX Runtime (random inputs rarely sit there).
- detokenizer: ``AceStepAudioTokenDetokenizer.forward``: quantized 5 Hz states -> 25 Hz latents.
- ``fsq_constants``: what the runtime needs to turn code indices into quantized states in NumPy
  (``_AceStepResidualFSQ.get_output_from_indices``): the output projection.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class AudioTokenizerAdapter(nn.Module):
    """latent_patches [B, P, pool, 64] -> quantized [B, P, hidden], indices [B, P, num_quantizers] int64."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, latent_patches: torch.Tensor):
        quantized, indices = self.tokenizer(latent_patches)
        return quantized, indices.to(torch.int64)


class AudioDetokenizerAdapter(nn.Module):
    """quantized [B, P, hidden] -> latents [B, P * pool, 64]."""

    def __init__(self, detokenizer: nn.Module):
        super().__init__()
        self.detokenizer = detokenizer

    def forward(self, quantized: torch.Tensor):
        return self.detokenizer(quantized)


def fsq_constants(tokenizer: nn.Module) -> dict[str, np.ndarray]:
    """The FSQ output projection (weight [hidden, codebook_dim], bias [hidden]) as float32 arrays."""
    proj = tokenizer.quantizer.project_out
    bias = proj.bias if proj.bias is not None else torch.zeros(proj.out_features)
    return {"fsq_project_out_weight": proj.weight.detach().float().numpy(),
            "fsq_project_out_bias": bias.detach().float().numpy()}
