"""``text_encoder`` graph: Qwen3 ids -> last hidden state.

diffusers calls ``self.text_encoder(input_ids=...)`` with no attention mask
(pipeline_ace_step.py, ``encode_prompt``), so with left padding the real tokens also attend to the pads:
the graph mirrors that exactly and takes ids only.

The adapter still passes an all-ones attention mask, which is the same attention as no mask (every key
visible, causality unchanged) but keeps an INT64 ``CumSum`` out of the graph: without a mask and without a
cache, transformers' ``masking_utils._preprocess_mask_arguments`` runs ``find_packed_sequence_indices``
(``(position_diff != 1).cumsum(-1)`` on int64 position ids), and TensorRT's ONNX parser documents CumSum
for FP32/FP16/BF16 only (runtime/trt/tensorrt_onnx_operators.json).
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
        ones = torch.ones_like(input_ids)  # [B, S]: no padding mask, as diffusers (see the module docstring)
        return self.text_encoder(input_ids=input_ids, attention_mask=ones, use_cache=False).last_hidden_state


def lyric_embedding_table(text_encoder: nn.Module) -> torch.Tensor:
    """The token-embedding table [vocab, text_hidden] that lyrics go through (a NumPy lookup at run time)."""
    return text_encoder.get_input_embeddings().weight.detach().float().contiguous()
