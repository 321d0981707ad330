"""``condition_encoder`` graph: text projector, lyric encoder, timbre encoder and sequence packing.

Mirrors ``AceStepConditionEncoder.forward`` (modeling_ace_step.py) with two export-safe rewrites:
- the pipeline always sends one timbre reference per batch item (``refer_audio_order_mask = arange(B)``),
  so ``unpack_timbre_embeddings`` (``.item()``/``bincount``, untraceable) reduces to ``pooled[:, None]``;
- ``_pack_sequences`` uses a stable descending argsort of the mask. An argsort exports as ``TopK`` with
  K = the packed length, and TensorRT's ONNX parser documents K < 3840 (runtime/trt/tensorrt_onnx_operators.json),
  which lyric length + text length + 1 crosses once the maximum lengths are raised. The stable sort of a 0/1
  mask is computed without sorting instead: a valid token goes to "valid tokens before it", an invalid one to
  "all valid tokens + invalid tokens before it" (counts by CumSum in float32, exact below 2**24 tokens), and
  the inverse of that permutation is scattered, then gathered as before. Same permutation, no TopK.
"""

from __future__ import annotations

import torch
from torch import nn


def pack_sequences(h1: torch.Tensor, h2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor):
    """Valid tokens first, order kept. h: [B, L_i, D], m: [B, L_i] long -> ([B, L, D], [B, L] bool).

    Equals diffusers' ``_pack_sequences`` (modeling_ace_step.py: ``mask.argsort(descending=True, stable=True)``
    then ``gather``) without a sort; see the module docstring.
    """
    hidden = torch.cat([h1, h2], dim=1)  # [B, L, D]
    mask = torch.cat([m1, m2], dim=1)  # [B, L] 0/1
    length = hidden.shape[1]
    position = torch.arange(length, device=hidden.device).unsqueeze(0).expand_as(mask)  # [B, L]
    valid = mask.to(torch.float32)  # float32: TensorRT documents CumSum for FP32/FP16/BF16, not INT64
    valid_before = torch.cumsum(valid, dim=1) - valid  # [B, L] valid tokens before position i
    invalid_before = position.to(torch.float32) - valid_before  # [B, L] invalid tokens before position i
    n_valid = valid.sum(dim=1, keepdim=True)  # [B, 1]
    dest = torch.where(mask.bool(), valid_before, n_valid + invalid_before).to(torch.int64)  # [B, L] permutation
    order = torch.zeros_like(dest).scatter(1, dest, position)  # [B, L]: order[b, dest[b, i]] = i (the argsort)
    packed = torch.gather(hidden, 1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    new_mask = position < mask.sum(dim=1, keepdim=True)
    return packed, new_mask


class ConditionEncoderAdapter(nn.Module):
    """See the module docstring; the timbre reference of item b is ``timbre_latents[b]``."""

    def __init__(self, condition_encoder: nn.Module):
        super().__init__()
        self.enc = condition_encoder

    def forward(
        self,
        text_hidden_states: torch.Tensor,  # [B, S_t, text_hidden]
        text_attention_mask: torch.Tensor,  # [B, S_t] bool
        lyric_hidden_states: torch.Tensor,  # [B, S_l, text_hidden]
        lyric_attention_mask: torch.Tensor,  # [B, S_l] bool
        timbre_latents: torch.Tensor,  # [B, S_r, 64]
    ):
        text = self.enc.text_projector(text_hidden_states)  # [B, S_t, H]
        text_mask = text_attention_mask.long()
        lyric_mask = lyric_attention_mask.long()
        lyric = self.enc.lyric_encoder(inputs_embeds=lyric_hidden_states, attention_mask=lyric_mask)  # [B, S_l, H]
        timbre = self._timbre(timbre_latents)  # [B, 1, H]
        timbre_mask = torch.ones(timbre.shape[:2], dtype=torch.long, device=timbre.device)
        packed, packed_mask = pack_sequences(lyric, timbre, lyric_mask, timbre_mask)
        return pack_sequences(packed, text, packed_mask.long(), text_mask)

    def _timbre(self, latents: torch.Tensor) -> torch.Tensor:
        """AceStepTimbreEncoder.forward up to the CLS pooling: [B, S_r, 64] -> [B, 1, H]."""
        from diffusers.models.transformers.ace_step_transformer import _ace_step_rotary_freqs, _create_4d_mask

        te = self.enc.timbre_encoder
        hidden = te.embed_tokens(latents)
        seq_len = hidden.shape[1]
        cos, sin = _ace_step_rotary_freqs(seq_len, te.head_dim, te.rope_theta, hidden.device, hidden.dtype)
        sliding = _create_4d_mask(
            seq_len=seq_len,
            dtype=hidden.dtype,
            device=hidden.device,
            attention_mask=None,
            sliding_window=te.sliding_window,
            is_sliding_window=True,
            is_causal=False,
        )
        for kind, layer in zip(te._layer_types, te.layers):
            mask = sliding if kind == "sliding_attention" else None
            hidden = layer(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=mask)
        return te.norm(hidden)[:, :1, :]


def constants(condition_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors the runtime needs besides the graph: silence latent and null-condition embedding."""
    return {
        "silence_latent": condition_encoder.silence_latent.detach().float().contiguous(),  # [1, 15000, 64]
        "null_condition_emb": condition_encoder.null_condition_emb.detach().float().contiguous(),  # [1, 1, H]
    }
