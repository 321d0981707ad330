"""``text_encoder`` graph: Qwen3 ids -> last hidden state.

diffusers calls ``self.text_encoder(input_ids=...)`` with no attention mask
(pipeline_ace_step.py, ``encode_prompt``), so with left padding the real tokens also attend to the pads:
the graph mirrors that exactly and takes ids only.
"""

from __future__ import annotations

import torch
from torch import nn


class TextEncoderAdapter(nn.Module):
    """input_ids [B, S] int64 -> text_hidden_states [B, S, text_hidden] float32."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, use_cache=False).last_hidden_state


def lyric_embedding_table(text_encoder: nn.Module) -> torch.Tensor:
    """The token-embedding table [vocab, text_hidden] that lyrics go through (a NumPy lookup at run time)."""
    return text_encoder.get_input_embeddings().weight.detach().float().contiguous()
