"""``dit_step`` graph: one evaluation of ``AceStepTransformer1DModel``.

Mirrors ``AceStepTransformer1DModel.forward`` (ace_step_transformer.py) with ``timestep_r = timestep`` as
the pipeline passes it. Upstream pads the sequence to a multiple of the patch size inside a Python
``if`` on the traced shape, which both exporters bake in (odd lengths would silently lose a frame);
here the padding ``(-T) % patch`` is unconditional and symbolic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DitStepAdapter(nn.Module):
    """latents [B, T, 64], timestep [B], encoder_hidden_states [B, C, H_enc], context [B, T, 128], dt [B]
    -> velocity [B, T, 64], next_latents [B, T, 64] (the scheduler's Euler step, folded in).

    Inputs and outputs are fp32 whatever the DiT's dtype; with ``precision.cast_dit`` the stream runs in
    bf16 between the fp32 islands (time embedding, AdaLN tables, norms, input/output convolutions, Euler).
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.dit = transformer

    def forward(self, latents, timestep, encoder_hidden_states, context_latents, dt):
        from diffusers.models.transformers.ace_step_transformer import _ace_step_rotary_freqs, _create_4d_mask

        dit = self.dit
        low = dit.condition_embedder.weight.dtype  # the stream's dtype: fp32, or bf16 with fp32 islands
        temb_t, proj_t = dit.time_embed(timestep)
        temb_r, proj_r = dit.time_embed_r(timestep - timestep)  # t - r with r = t
        temb = temb_t + temb_r  # [B, H]
        timestep_proj = proj_t + proj_r  # [B, 6, H]

        hidden = torch.cat([context_latents, latents], dim=-1)  # [B, T, 192]
        seq_len = hidden.shape[1]
        hidden = F.pad(hidden, (0, 0, 0, (-seq_len) % dit.patch_size))  # [B, T_pad, 192]
        hidden = dit.proj_in_conv(hidden.transpose(1, 2)).transpose(1, 2).to(low)  # [B, T_pad / p, H]
        cond = dit.condition_embedder(encoder_hidden_states.to(low))  # [B, C, H]

        tokens = hidden.shape[1]
        cos, sin = _ace_step_rotary_freqs(tokens, dit.head_dim, dit.rope_theta, hidden.device, hidden.dtype)
        sliding = _create_4d_mask(
            seq_len=tokens,
            dtype=hidden.dtype,
            device=hidden.device,
            sliding_window=dit.config.sliding_window,
            is_sliding_window=True,
            is_causal=False,
        )
        for kind, layer in zip(dit.layer_types, dit.layers):
            hidden = layer(
                hidden_states=hidden,
                position_embeddings=(cos, sin),
                temb=timestep_proj,
                attention_mask=sliding if kind == "sliding_attention" else None,
                encoder_hidden_states=cond,
                encoder_attention_mask=None,
            )
        shift, scale = (dit.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = dit.norm_out(hidden) * (1 + scale) + shift
        hidden = dit.proj_out_conv(hidden.transpose(1, 2)).transpose(1, 2)  # [B, T_pad, 64]
        velocity = hidden[:, :seq_len, :].float()
        return velocity, latents + dt[:, None, None] * velocity
