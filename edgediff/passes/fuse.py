"""fuse: fold constants and scales, pack Q/K/V, one SDPA per attention, mark GroupNorm+SiLU, drop dead code.

What it does to a diffusers denoiser (results stay equal up to float rounding; checked at the
end of the pass on fixed inputs and reported as `max_abs_diff`):
- timestep-embedding constants: every `Timesteps` (sinusoid frequencies computed from arange
  and exp on each call) becomes `FoldedTimesteps`, whose frequencies (times `scale`) are a
  precomputed constant;
- scale folds: a ResnetBlock2D's `output_scale_factor` is folded into conv2 and conv_shortcut
  (when the shortcut is a conv), an attention's `rescale_output_factor` into its output
  projection when it has no residual connection; the divisions disappear;
- Q/K/V packing (pack_qkv): self-attention gets one `to_qkv` Linear, cross-attention one
  `to_kv`, served by `PackedAttnProcessor` (one matmul, one scaled_dot_product_attention);
  the old projections are removed (a `PackedAway` placeholder says so if called);
- attention: processors that compute softmax(QK^T)V with explicit matmuls are switched to
  diffusers' AttnProcessor2_0 (one scaled_dot_product_attention);
- GroupNorm+SiLU pairs (ResnetBlock2D norm1 and norm2 with the default time-embedding norm,
  UNet conv_norm_out + conv_act) are marked with `edgediff_silu_after = True`, which the
  OpenCL and FPGA backends read to use one fused kernel; the module tree is unchanged, so
  later passes (quant, which finds ResnetBlock2D by class) and backends still recognise it;
- dead code: Dropout modules (no-ops at inference) become Identity.
Weight folds and packing are skipped on an already-quantized model (folding would move
weights off their quantization grid). It reports the ONNX node count before and after
(what a runtime executes) and how many of each rewrite it made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.fused import FoldedTimesteps, PackedAttnProcessor, PackedAway
from edgediff.model import DiffusionModel, set_submodule
from edgediff.passes import PassContext, register
from edgediff.quant_params import is_quant_wrapper


@dataclass
class FuseOptions:
    # one Linear for Q/K/V; off where later passes/backends read to_q/to_k/to_v (the quant
    # pass and the OpenCL builder do, so the `edge` recipe turns it off before quantization)
    pack_qkv: bool = True
    fold_scales: bool = True
    fold_timesteps: bool = True
    mark_groupnorm_silu: bool = True
    drop_dropout: bool = True
    # count ONNX nodes before and after (one TorchScript trace each)
    count_ops: bool = True
    # the pass fails if outputs move more than this (relative to the output's max magnitude)
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1:
            raise BadInput(f"fuse: tolerance must be in (0, 1), got {self.tolerance}")


def _quantized(model: DiffusionModel) -> bool:
    return "quant" in model.extras or any(is_quant_wrapper(m) for m in model.denoiser.modules())


def fold_timesteps(den: nn.Module) -> int:
    from diffusers.models.embeddings import Timesteps

    n = 0
    for name, m in list(den.named_modules()):
        if type(m) is Timesteps:
            set_submodule(den, name, FoldedTimesteps(int(m.num_channels), bool(m.flip_sin_to_cos),
                                            float(m.downscale_freq_shift), m.scale))
            n += 1
    return n


def _scale(layers: tuple[nn.Module, ...], k: float) -> None:
    for c in layers:
        c.weight.mul_(k)
        if c.bias is not None:
            c.bias.mul_(k)


@torch.no_grad()
def fold_scales(den: nn.Module) -> int:
    """1/output_scale_factor into the convs that feed the residual sum (both branches must be convs)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    n = 0
    for m in den.modules():
        if isinstance(m, ResnetBlock2D) and float(m.output_scale_factor) != 1.0 and m.conv_shortcut is not None:
            if not all(isinstance(c, nn.Conv2d) for c in (m.conv2, m.conv_shortcut)):
                continue
            _scale((m.conv2, m.conv_shortcut), 1.0 / float(m.output_scale_factor))
            m.output_scale_factor = 1.0
            n += 1
        elif isinstance(m, Attention) and float(m.rescale_output_factor) != 1.0 and not m.residual_connection:
            out = m.to_out[0]
            if not isinstance(out, nn.Linear):
                continue
            _scale((out,), 1.0 / float(m.rescale_output_factor))
            m.rescale_output_factor = 1.0
            n += 1
    return n


@torch.no_grad()
def pack_qkv(den: nn.Module) -> int:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    n = 0
    for m in den.modules():
        if not isinstance(m, Attention) or not isinstance(m.processor, (AttnProcessor, AttnProcessor2_0)):
            continue  # custom processors (quantized, added K/V projections...) are left alone
        if getattr(m, "add_q_proj", None) is not None or getattr(m, "added_kv_proj_dim", None):
            continue
        projs = [m.to_k, m.to_v] if m.is_cross_attention else [m.to_q, m.to_k, m.to_v]
        if not all(type(p) is nn.Linear for p in projs) or len({p.in_features for p in projs}) != 1:
            continue
        if len({p.bias is None for p in projs}) != 1:
            continue
        w = torch.cat([p.weight for p in projs])
        packed = nn.Linear(w.shape[1], w.shape[0], bias=projs[0].bias is not None, dtype=w.dtype, device=w.device)
        packed.weight.copy_(w)
        if packed.bias is not None:
            packed.bias.copy_(torch.cat([p.bias for p in projs]))
        name = "to_kv" if m.is_cross_attention else "to_qkv"
        setattr(m, name, packed)
        for leaf in (["to_k", "to_v"] if m.is_cross_attention else ["to_q", "to_k", "to_v"]):
            setattr(m, leaf, PackedAway(name))
        m.set_processor(PackedAttnProcessor())
        n += 1
    return n


def one_sdpa(den: nn.Module) -> int:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    plain = [m for m in den.modules() if isinstance(m, Attention) and type(m.processor) is AttnProcessor]
    for m in plain:
        m.set_processor(AttnProcessor2_0())
    return len(plain)


def mark_groupnorm_silu(den: nn.Module) -> int:
    from diffusers.models.resnet import ResnetBlock2D

    n = 0
    for m in den.modules():
        if isinstance(m, ResnetBlock2D) and isinstance(m.nonlinearity, nn.SiLU):
            pairs = [m.norm1] + ([m.norm2] if m.time_embedding_norm == "default" else [])
            for norm in pairs:
                if isinstance(norm, nn.GroupNorm):
                    norm.edgediff_silu_after = True
                    n += 1
    norm_out, act = getattr(den, "conv_norm_out", None), getattr(den, "conv_act", None)
    if isinstance(norm_out, nn.GroupNorm) and isinstance(act, nn.SiLU):
        norm_out.edgediff_silu_after = True
        n += 1
    return n


def drop_dropout(den: nn.Module) -> int:
    n = 0
    for name, m in list(den.named_modules()):
        if isinstance(m, nn.Dropout):
            set_submodule(den, name, nn.Identity())
            n += 1
    return n


@torch.no_grad()
def _outputs(model: DiffusionModel) -> list[torch.Tensor]:
    from edgediff.sampling import TorchDenoiser

    den = TorchDenoiser(model)
    outs = []
    for t in (999, 500, 20):
        inp = model.signature.example_inputs(batch=2, seed=t)
        cond = inp.get("encoder_hidden_states", inp.get("class_labels"))
        outs.append(den(inp["sample"], torch.full((2,), float(t)), cond))
    return outs


@register("fuse", FuseOptions)
def fuse(model: DiffusionModel, opts: FuseOptions, ctx: PassContext) -> DiffusionModel:
    before_out = _outputs(model)
    # the graph-size counter comes from the pass manager (an ONNX trace): a pass never imports a backend
    count = ctx.graph_nodes if opts.count_ops else None
    before_nodes = count(model) if count is not None else None
    den = model.denoiser
    quantized = _quantized(model)
    done: dict[str, int] = {}
    steps = [("timesteps_folded", opts.fold_timesteps, fold_timesteps),
             ("scales_folded", opts.fold_scales and not quantized, fold_scales),
             ("qkv_packed", opts.pack_qkv and not quantized, pack_qkv),
             ("attention_to_sdpa", True, one_sdpa),
             ("groupnorm_silu_marked", opts.mark_groupnorm_silu, mark_groupnorm_silu),
             ("dropout_dropped", opts.drop_dropout, drop_dropout)]
    for name, on, fn in ctx.track(steps, "fuse"):
        done[name] = fn(den) if on else 0
    if quantized:
        ctx.log("fuse: the model is already quantized; weight folds and Q/K/V packing skipped")
    after_out = _outputs(model)
    scale = max(float(o.abs().max()) for o in before_out) or 1.0
    diff = max(float((a - b).abs().max()) for a, b in zip(before_out, after_out))
    if diff > opts.tolerance * scale:
        raise RuntimeError(f"fuse changed the outputs by {diff:.3g} (> {opts.tolerance} x {scale:.3g}); this is a bug")
    after_nodes = count(model) if count is not None else None
    ctx.metrics.update(done)
    ctx.metrics["max_abs_diff"] = diff
    ctx.metrics["quantized_input"] = quantized
    if before_nodes is not None and after_nodes is not None:
        ctx.metrics.update({"onnx_nodes_before": before_nodes, "onnx_nodes_after": after_nodes,
                            "ops_removed": before_nodes - after_nodes})
    model.extras["fuse"] = {k: v for k, v in done.items()}
    return model


def describe(model: DiffusionModel) -> dict[str, Any]:
    """What the fuse pass did to a model (from its extras), for reports."""
    return dict(model.extras.get("fuse", {}))
