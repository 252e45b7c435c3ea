"""Fused modules that the `fuse` pass puts into a denoiser (and exporters/kernels recognise).

They live in the edgediff package and carry `_edgediff_init` so that edgediff/serialize.py
rebuilds them from an artifact without unpickling.
"""

from __future__ import annotations

import torch
from torch import nn


def project_qkv(attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V projections of a diffusers Attention, packed (to_qkv / to_kv) or not."""
    to_qkv = getattr(attn, "to_qkv", None)
    if isinstance(to_qkv, nn.Module) and encoder_hidden_states is None:
        return tuple(to_qkv(hidden_states).chunk(3, dim=-1))  # type: ignore[return-value]
    ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query = attn.to_q(hidden_states)
    to_kv = getattr(attn, "to_kv", None)
    if isinstance(to_kv, nn.Module):
        key, value = to_kv(ctx).chunk(2, dim=-1)
        return query, key, value
    return query, attn.to_k(ctx), attn.to_v(ctx)
