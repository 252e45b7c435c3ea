"""Fused modules that the `fuse` pass puts into a denoiser (and exporters/kernels recognise).

They live in the edgediff package and carry `_edgediff_init` so that edgediff/serialize.py
rebuilds them from an artifact without unpickling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import Timesteps
from torch import nn

from edgediff.serialize import serializable


def project_qkv(attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V projections of a diffusers Attention, packed (to_qkv / to_kv) or not."""
    to_qkv = getattr(attn, "to_qkv", None)
    if isinstance(to_qkv, nn.Module) and encoder_hidden_states is None:
        # split with constant sizes: one ONNX Split, no shape arithmetic
        n = to_qkv.out_features // 3
        return tuple(to_qkv(hidden_states).split([n, n, n], dim=-1))  # type: ignore[return-value]
    ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query = attn.to_q(hidden_states)
    to_kv = getattr(attn, "to_kv", None)
    if isinstance(to_kv, nn.Module):
        n = to_kv.out_features // 2
        key, value = to_kv(ctx).split([n, n], dim=-1)
        return query, key, value
    return query, attn.to_k(ctx), attn.to_v(ctx)


@serializable("packed_away")
class PackedAway(nn.Module):
    """Stands where to_q/to_k/to_v were after packing: calling it is a bug in the caller, said loudly."""

    def __init__(self, into: str = "to_qkv") -> None:
        super().__init__()
        self._edgediff_init = {"into": into}
        self.into = into

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(f"this projection was packed into `{self.into}` by the fuse pass (pack_qkv=true); "
                           "code that needs separate Q/K/V projections must run before fuse or use pack_qkv=false")


@serializable("packed_attn_processor")
class PackedAttnProcessor(nn.Module):
    """diffusers' AttnProcessor2_0 with packed projections (to_qkv, or to_q + to_kv): one matmul
    for Q/K/V and one scaled_dot_product_attention. An nn.Module so the artifact keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self._edgediff_init: dict[str, Any] = {}

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        # an explicit signature: diffusers' Attention inspects it to decide which kwargs (temb) to pass
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False, scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


@serializable("folded_timesteps")
class FoldedTimesteps(Timesteps):
    """diffusers' Timesteps with the sinusoid frequencies (and `scale`) folded into a constant.

    A subclass, so code reading num_channels/flip_sin_to_cos/downscale_freq_shift/scale still
    works; the buffer is recomputed from those on load (not saved: the state dict is unchanged).
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1,
                 max_period: int = 10000) -> None:
        super().__init__(num_channels, flip_sin_to_cos, downscale_freq_shift, scale)
        self._edgediff_init = {"num_channels": num_channels, "flip_sin_to_cos": flip_sin_to_cos,
                               "downscale_freq_shift": downscale_freq_shift, "scale": scale, "max_period": max_period}
        half = num_channels // 2
        exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / (half - downscale_freq_shift)
        self.register_buffer("freqs", torch.exp(exponent) * scale, persistent=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timesteps[:, None].float() * self.freqs[None, :]
        sin, cos = torch.sin(emb), torch.cos(emb)
        emb = torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)
        if self.num_channels % 2 == 1:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb
