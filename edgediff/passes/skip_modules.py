"""Stand-ins for operators that LD-Pruner removed; they keep shapes and reload from `_edgediff_init`.

Each one reproduces exactly what the removed operator's enclosing computation reduces to
when the operator's own branch is gone: a ResNet block keeps its shortcut (a 1x1 conv when
the channel count changes) and its output scale, a residual attention keeps its residual
and rescale, a transformer block passes its input through, and an attention inside a
transformer block contributes zero to the block's residual sum. Single Linear layers are
replaced by a cheaper op: a truncated-SVD low-rank pair (LowRankLinear) or their bias alone
(LinearBias); an identity is torch's own nn.Identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgediff.serialize import serializable


@serializable("skip_resnet")
class SkipResnet(nn.Module):
    """ResnetBlock2D without its conv branch: shortcut(x) / output_scale_factor."""

    def __init__(self, in_channels: int, out_channels: int, output_scale_factor: float = 1.0,
                 shortcut_kernel: int = 0, shortcut_bias: bool = True) -> None:
        super().__init__()
        self._edgediff_init = {"in_channels": in_channels, "out_channels": out_channels,
                               "output_scale_factor": output_scale_factor, "shortcut_kernel": shortcut_kernel,
                               "shortcut_bias": shortcut_bias}
        self.output_scale_factor = output_scale_factor
        # same attribute name as in ResnetBlock2D so that the kept weights load under their old keys
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, shortcut_kernel, padding=shortcut_kernel // 2,
                                        bias=shortcut_bias) if shortcut_kernel else None)

    @classmethod
    def replacing(cls, block: nn.Module) -> SkipResnet:
        sc = getattr(block, "conv_shortcut", None)
        k = int(sc.kernel_size[0]) if isinstance(sc, nn.Conv2d) else 0
        new = cls(block.in_channels, block.out_channels if sc is not None else block.in_channels,
                  float(block.output_scale_factor), k, bool(sc is not None and sc.bias is not None))
        if sc is not None:
            new.conv_shortcut.load_state_dict(sc.state_dict())
        return new

    def forward(self, input_tensor: torch.Tensor, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        return x / self.output_scale_factor if self.output_scale_factor != 1 else x


@serializable("skip_attention")
class SkipAttention(nn.Module):
    """A residual Attention (UNet2DModel attention blocks) without its attention branch."""

    def __init__(self, rescale_output_factor: float = 1.0) -> None:
        super().__init__()
        self._edgediff_init = {"rescale_output_factor": rescale_output_factor}
        self.rescale_output_factor = rescale_output_factor

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.rescale_output_factor != 1:
            return hidden_states / self.rescale_output_factor
        return hidden_states


class _NoArgs(nn.Module):
    """A stand-in built without arguments (nothing to record for serialization)."""

    def __init__(self) -> None:
        super().__init__()
        self._edgediff_init: dict[str, Any] = {}


@serializable("zero_branch")
class ZeroBranch(_NoArgs):
    """An attention inside a transformer block: the block adds our output to its residual, so 0."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@serializable("skip_block")
class SkipBlock(_NoArgs):
    """A whole (pre-norm, residual) transformer block: identity on the hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@serializable("low_rank_linear")
class LowRankLinear(nn.Module):
    """A Linear factored as up(down(x)) of rank r: r·(in + out) MACs instead of in·out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self._edgediff_init = {"in_features": in_features, "out_features": out_features, "rank": rank, "bias": bias}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    @torch.no_grad()
    def replacing(cls, lin: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-r approximation of `lin`'s weight (truncated SVD, Eckart-Young), bias kept."""
        new = cls(lin.in_features, lin.out_features, rank, lin.bias is not None).to(lin.weight.dtype)
        u, s, vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)
        root = s[:rank].sqrt()
        new.down.weight.copy_(root[:, None] * vh[:rank])
        new.up.weight.copy_(u[:, :rank] * root[None])
        if lin.bias is not None:
            new.up.bias.copy_(lin.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


@serializable("linear_bias")
class LinearBias(nn.Module):
    """A removed Linear: its output is the bias alone (zero without one), the input is not read."""

    def __init__(self, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self._edgediff_init = {"out_features": out_features, "bias": bias}
        self.out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def replacing(cls, lin: nn.Linear) -> LinearBias:
        new = cls(lin.out_features, lin.bias is not None).to(lin.weight.dtype)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = x.new_zeros((*x.shape[:-1], self.out_features))
        # an add, not bias.expand: a view of a leaf parameter has no grad_fn, which autograd hooks reject
        return zeros if self.bias is None else zeros + self.bias.to(x.dtype)
