"""One attention processor for diffusers' `Attention`, with hooks on the matmul operands.

Every edgediff place that computes attention goes through `ExplicitAttnProcessor.forward`:
the fused model (packed Q/K/V projections, SDPA), the quantization simulation (fake-quantized
Q, K, softmax output and V) and the int8 exporters (Q/DQ or integer-kernel operands). The body
(spatial/group norm, projections, heads, mask, output projection, residual, rescale) is written
once, so the simulation and the exports cannot drift apart.

Hooks (methods a subclass overrides; identity by default):
  operand(which, x)  which in "q", "k", "p", "v": the matmul operands (p: softmax output)
  scores(x)          QK^T * scale before the mask and softmax
  output(x)          softmax(QK^T)V before the heads are merged (what the output projection reads)
  qk(q, k) / pv(p, v) the two matmuls themselves (integer arithmetic in the quantization simulation)
A subclass that sets `sdpa = True` and overrides no hook runs torch's
scaled_dot_product_attention instead of the explicit matmuls (same arithmetic, faster).

Heads are laid out (B, H, S, d) for both paths; per-tensor quantization makes the layout
irrelevant to the numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OPERANDS = ("q", "k", "p", "v")


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


def is_joint(attn: nn.Module) -> bool:
    """SD3-style joint attention (diffusers' JointAttnProcessor2_0): the context has its own
    add_q/add_k/add_v projections and attends together with the sample tokens."""
    return isinstance(getattr(attn, "add_q_proj", None), nn.Module)


# diffusers processors whose arithmetic the explicit body reproduces; any other (Sana's linear
# attention, added-K/V, IP-adapter...) computes something else and must stay in place
_REPRODUCED = ("AttnProcessor", "AttnProcessor2_0", "JointAttnProcessor2_0")


def explicit_supports(attn: nn.Module) -> bool:
    """Whether ExplicitAttnProcessor computes what `attn`'s current processor computes."""
    proc = getattr(attn, "processor", None)
    if isinstance(proc, ExplicitAttnProcessor):
        return True
    name = type(proc).__name__
    if name == "SanaAttnProcessor2_0":  # plain SDPA, but its q/k norms act before the head split
        return getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
    return name in _REPRODUCED and type(proc).__module__.startswith("diffusers.")


def _heads(x: torch.Tensor, batch_size: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)


def direct_producers(attn: nn.Module) -> dict[str, str]:
    """Operand -> projection attribute whose output reaches that matmul operand unchanged
    (only reshapes in between), e.g. {"q": "to_q", "k": "to_k", "v": "to_v"}.

    For those, the projection's output quantization *is* the operand's quantization: an
    integer projection writes the operand's int8 directly and no requantization happens in
    between. Packed projections (one output split three ways) and Q/K norms break the link.
    """
    if isinstance(getattr(attn, "to_qkv", None), nn.Module) or isinstance(getattr(attn, "to_kv", None), nn.Module):
        return {}
    if is_joint(attn):  # each operand is a concatenation of two projections: no single producer
        return {}
    out = {}
    for which, attr in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
        if which in ("q", "k") and getattr(attn, f"norm_{which}", None) is not None:
            continue
        if isinstance(getattr(attn, attr, None), nn.Module):
            out[which] = attr
    return out


class ExplicitAttnProcessor(nn.Module):
    """diffusers' attention with explicit matmuls and hooks (see the module docstring).

    An nn.Module so that processors holding quantizers travel in the artifact's state dict.
    """

    sdpa = False

    def __init__(self) -> None:
        super().__init__()
        self._edgediff_init: dict[str, Any] = {}

    # ---- hooks ---------------------------------------------------------------------------
    def operand(self, which: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def qk(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, k.transpose(-1, -2))

    def pv(self, attn: nn.Module, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(p, v)

    def _hooked(self) -> bool:
        cls = type(self)
        return any(getattr(cls, h) is not getattr(ExplicitAttnProcessor, h)
                   for h in ("operand", "scores", "output", "qk", "pv"))

    # ---- the body ------------------------------------------------------------------------
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
        # joint attention: the sample and the context are projected separately, then attend as one sequence
        joint = encoder_hidden_states is not None and is_joint(attn)
        query, key, value = project_qkv(attn, hidden_states, None if joint else encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = _heads(query, batch_size, attn.heads, head_dim)
        key = _heads(key, batch_size, attn.heads, head_dim)
        value = _heads(value, batch_size, attn.heads, head_dim)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        if joint:
            assert encoder_hidden_states is not None
            cq = _heads(attn.add_q_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            ck = _heads(attn.add_k_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            cv = _heads(attn.add_v_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            if getattr(attn, "norm_added_q", None) is not None:
                cq = attn.norm_added_q(cq)
            if getattr(attn, "norm_added_k", None) is not None:
                ck = attn.norm_added_k(ck)
            n_sample = query.shape[2]
            query, key, value = (torch.cat([query, cq], dim=2), torch.cat([key, ck], dim=2),
                                 torch.cat([value, cv], dim=2))
        if self.sdpa and not self._hooked():
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                           is_causal=False, scale=attn.scale)
        else:
            q, k = self.operand("q", query), self.operand("k", key)
            scores = self.scores(self.qk(attn, q, k) * attn.scale)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.float().softmax(dim=-1).to(query.dtype)
            hidden_states = self.output(self.pv(attn, self.operand("p", probs), self.operand("v", value)))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if joint:  # sample tokens first, then the context's (diffusers' order)
            hidden_states, context = hidden_states[:, :n_sample], hidden_states[:, n_sample:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            return hidden_states, context  # type: ignore[return-value]
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class OperandAttnProcessor(ExplicitAttnProcessor):
    """Explicit-matmul attention whose operand/output hooks are modules (quantizers, Q/DQ twins).

    `ops` maps "q"/"k"/"p"/"v"/"scores"/"output" to modules; missing ones pass through.
    """

    def __init__(self, ops: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.ops = nn.ModuleDict(ops or {})

    def operand(self, which: str, x: torch.Tensor) -> torch.Tensor:
        return self.ops[which](x) if which in self.ops else x

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops["scores"](x) if "scores" in self.ops else x

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops["output"](x) if "output" in self.ops else x
