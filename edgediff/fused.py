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

from edgediff.attention import ExplicitAttnProcessor, project_qkv
from edgediff.serialize import serializable

__all__ = ["FoldedTimesteps", "PackedAttnProcessor", "PackedAway", "project_qkv"]


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
class PackedAttnProcessor(ExplicitAttnProcessor):
    """diffusers' AttnProcessor2_0 with packed projections (to_qkv, or to_q + to_kv): one matmul
    for Q/K/V and one scaled_dot_product_attention (edgediff.attention's body, SDPA path).
    An nn.Module so the artifact keeps it."""

    sdpa = True


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
