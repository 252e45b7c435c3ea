"""From a diffusers UNet2DModel to an op schedule over named buffers, and the executor that runs it.

The schedule is plain JSON (a list of ops, each with its input/output buffer names, its weight
names and attributes); the weights are a flat name -> tensor dict (safetensors in a bundle). The
builder walks the diffusers modules the way UNet2DModel.forward calls them and folds the
UNet's cheap fusions into the kernels' epilogues: the time embedding is added inside conv1, the
resnet shortcut and the output scale inside conv2, the attention residual inside the output
projection; GroupNorm and SiLU are one kernel; Q, K and V are one 1x1 conv feeding
FlashAttention through offsets. Anything it does not know is refused with a clear message
rather than run wrongly.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DenoiserModule, DiffusionModel
from edgediff.quant_params import strip_quant_wrappers

SCHEDULE_VERSION = 1
# float parameters kept in float32 even in fp16 bundles (small; precision matters)
F32_SUFFIXES = (".bias", ".gamma", ".beta", ".freqs", ".w_scale")


ARCHS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


def _unet_of(model: DiffusionModel) -> nn.Module:
    den = model.denoiser
    if isinstance(den, DenoiserModule):
        den = den.inner
    if type(den).__name__ not in ARCHS:
        raise BadInput(f"opencl target: runs diffusers {', '.join(ARCHS)} denoisers; this model is "
                       f"{type(den).__name__} (export it to onnx/tflite instead)")
    if any(getattr(m, "_edgediff_quant_wrapper", False) for m in den.modules()):
        den = strip_quant_wrappers(copy.deepcopy(den))  # on-grid float weights; never modify the input
    return den


def grid_attrs(q: Any) -> dict[str, Any]:
    """An edgediff.lowering.ActQ as schedule attributes: scale, zero point, range and storage type."""
    return {**q.to_dict(), "dtype": q.dtype}


def attention_attrs(att: Any) -> dict[str, Any]:
    """An edgediff.lowering.LoweredAttention as the attention_int8 op's attributes."""
    return {"q": grid_attrs(att.q), "k": grid_attrs(att.k), "p": grid_attrs(att.p), "v": grid_attrs(att.v),
            "output": grid_attrs(att.output) if att.output is not None else None, "scale": float(att.scale),
            "qk_scale": float(att.qk_scale), "av_multiplier": att.av_multiplier}


class _Builder:
    def __init__(self, low: Any = None) -> None:
        self.ops: list[dict[str, Any]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self._n = 0
        self.low = low  # edgediff.lowering.LoweredModel for int8 bundles, else None

    def iconv(self, mod: nn.Module, name: str, x: str, layer: Any, chan_add: str | None, res: str | None,
              out_scale: float, pad: tuple[int, int, int, int] | None) -> str:
        """A lowered integer conv/linear (edgediff.lowering.LoweredLayer): its input quantized onto each
        part's grid (a `quantize` op, folded into the producer by keep_int8 where it can), int8
        weights, int32 bias, per part requantization onto its output grid (or a float output for the
        last layer), float epilogue terms; stored float unless keep_int8 gives it a consumer grid."""
        if isinstance(mod, nn.Conv2d):
            g = layer.geometry
            if g["groups"] != 1 or tuple(g["dilation"]) != (1, 1) or g["stride"][0] != g["stride"][1]:
                raise BadInput(f"opencl int8: {name}: only dense, undilated, square-stride integer convs are supported")
            stride = int(g["stride"][0])
            p = pad or (g["padding"][0], g["padding"][1], g["padding"][0], g["padding"][1])
        else:
            stride, p = 1, (0, 0, 0, 0)
        parts = layer.parts
        grids = [parts[0].input] + [pt.input.stored_like(parts[0].input) for pt in parts[1:]]
        if any((g.qmin, g.qmax) != (grids[0].qmin, grids[0].qmax) for g in grids):
            raise BadInput(f"opencl int8: {name}: the two input ranges differ in bit-width")
        wq = np.concatenate([pt.weight for pt in parts], axis=1)
        if wq.ndim == 2:
            wq = wq[:, :, None, None]
        self.weights[f"{name}.weight_q"] = torch.from_numpy(np.ascontiguousarray(wq))
        bias = None
        if parts[0].bias is not None:
            bias = f"{name}.bias_q"
            self.weights[bias] = torch.from_numpy(parts[0].bias.astype(np.int32))
        xq = self.quantize(x, f"{name}.quantize", grids, parts[0].channels[1] if len(parts) > 1 else -1)
        pd = []
        for i, (pt, gi) in enumerate(zip(parts, grids)):
            self.w(f"{name}.p{i}.acc_scale", torch.from_numpy(pt.acc_scale))
            mult = self.w(f"{name}.p{i}.mult", torch.from_numpy(pt.multiplier)) if pt.output is not None else None
            pd.append({"split": int(pt.channels[1]), "zp": gi.zero_point, "acc_scale": f"{name}.p{i}.acc_scale",
                       "mult": mult, "out": grid_attrs(pt.output) if pt.output is not None else None,
                       "source": pt.output_source})
        ins = [xq] + [b for b in (chan_add, res) if b is not None]
        return self.emit("iconv", name, ins, weight=f"{name}.weight_q", bias=bias, parts=pd, stride=stride, pad=list(p),
                         chan_add=chan_add, res=res, out_scale=float(out_scale), kernel=[int(wq.shape[2]), int(wq.shape[3])],
                         store=None, direct=False)

    def quantize(self, x: str, name: str, grids: list[Any], split: int) -> str:
        """x quantized onto grids[0] (channels [0, split)) and grids[1] (the rest; split -1: one grid),
        int8/uint8 storage."""
        return self.emit("quantize", name, [x], segs=[grid_attrs(g) for g in grids], split=int(split))

    def buf(self, hint: str) -> str:
        self._n += 1
        return f"{hint}#{self._n}"

    def w(self, name: str, t: torch.Tensor) -> str:
        self.weights[name] = t.detach().float().contiguous().cpu()
        return name

    def emit(self, op: str, name: str, inputs: list[str], out_hint: str | None = None, **attrs: Any) -> str:
        out = self.buf(out_hint or name)
        self.ops.append({"op": op, "name": name, "in": inputs, "out": out, **attrs})
        return out

    # ---- layers
    def conv(self, mod: nn.Module, name: str, x: str, chan_add: str | None = None, res: str | None = None,
             out_scale: float = 1.0, pad: tuple[int, int, int, int] | None = None) -> str:
        layer = self.low.layers.get(name) if self.low is not None else None
        if layer is not None:
            return self.iconv(mod, name, x, layer, chan_add, res, out_scale, pad)
        if isinstance(mod, nn.Linear):
            wt = mod.weight[:, :, None, None]
            stride, p = 1, (0, 0, 0, 0)
        elif isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or mod.dilation != (1, 1) or mod.stride[0] != mod.stride[1] or mod.padding_mode != "zeros":
                raise BadInput(f"opencl target: {name}: only dense, undilated, square-stride, zero-padded convs are supported")
            if isinstance(mod.padding, str):
                raise BadInput(f"opencl target: {name}: string padding {mod.padding!r} is not supported")
            wt = mod.weight
            stride = mod.stride[0]
            p = pad or (mod.padding[0], mod.padding[1], mod.padding[0], mod.padding[1])
        else:
            raise BadInput(f"opencl target: {name}: expected Conv2d or Linear, got {type(mod).__name__}")
        ins = [x] + [b for b in (chan_add, res) if b is not None]
        return self.emit("conv", name, ins, weight=self.w(f"{name}.weight", wt),
                         bias=self.w(f"{name}.bias", mod.bias) if mod.bias is not None else None,
                         stride=stride, pad=list(p), chan_add=chan_add, res=res, out_scale=float(out_scale),
                         kernel=[int(wt.shape[2]), int(wt.shape[3])])

    def group_norm(self, mod: nn.Module, name: str, x: str, silu: bool) -> str:
        if not isinstance(mod, nn.GroupNorm) or not mod.affine:
            raise BadInput(f"opencl target: {name}: expected an affine GroupNorm, got {type(mod).__name__}")
        return self.emit("group_norm", name, [x], gamma=self.w(f"{name}.gamma", mod.weight),
                         beta=self.w(f"{name}.beta", mod.bias), groups=mod.num_groups, eps=float(mod.eps), silu=silu)

    def resnet(self, mod: nn.Module, name: str, x: str, temb_act: str) -> str:
        if mod.time_embedding_norm != "default" or mod.upsample is not None or mod.downsample is not None \
                or not isinstance(mod.nonlinearity, nn.SiLU) or getattr(mod, "skip_time_act", False):
            raise BadInput(f"opencl target: {name}: ResnetBlock2D variant not supported (needs SiLU, default time "
                           "embedding norm, no up/down sampling inside)")
        h = self.group_norm(mod.norm1, f"{name}.norm1", x, silu=True)
        tb = None
        if mod.time_emb_proj is not None:
            tb = self.conv(mod.time_emb_proj, f"{name}.time_emb_proj", temb_act)
        h = self.conv(mod.conv1, f"{name}.conv1", h, chan_add=tb)
        h = self.group_norm(mod.norm2, f"{name}.norm2", h, silu=True)
        sc = x
        if mod.conv_shortcut is not None:
            sc = self.conv(mod.conv_shortcut, f"{name}.conv_shortcut", x)
        return self.conv(mod.conv2, f"{name}.conv2", h, res=sc, out_scale=1.0 / float(mod.output_scale_factor))

    def attention(self, mod: nn.Module, name: str, x: str) -> str:
        if mod.group_norm is None or mod.spatial_norm is not None or mod.is_cross_attention or not mod.residual_connection \
                or getattr(mod, "norm_q", None) is not None or getattr(mod, "norm_k", None) is not None:
            raise BadInput(f"opencl target: {name}: only self-attention with GroupNorm and a residual (UNet2DModel's) "
                           "is supported")
        proc = type(mod.processor).__name__
        # FloatAttnProcessor: what a stripped QuantAttnProcessor (edgediff.quant) leaves behind
        if proc not in ("AttnProcessor2_0", "AttnProcessor", "FloatAttnProcessor"):
            raise BadInput(f"opencl target: {name}: attention processor {proc} is not supported")
        h = self.group_norm(mod.group_norm, f"{name}.group_norm", x, silu=False)
        C = mod.to_q.out_features
        heads = int(mod.heads)
        if C % heads or mod.to_k.out_features != C or mod.to_v.out_features != C:
            raise BadInput(f"opencl target: {name}: q/k/v widths {C}/{mod.to_k.out_features}/{mod.to_v.out_features} "
                           f"with {heads} heads are not supported")
        if self.low is not None and any(f"{name}.{p}" in self.low.layers for p in ("to_q", "to_k", "to_v")):
            # int8: each projection has its own input and output quantization; no QKV weight stacking
            q, k, v = (self.conv(getattr(mod, p), f"{name}.{p}", h) for p in ("to_q", "to_k", "to_v"))
            att = self.low.attentions.get(name)
            if att is not None:
                o = self.attention_int8(att, name, q, k, v, heads, C // heads)
            else:
                qkv = self.emit("concat", f"{name}.cat_qkv", [self.emit("concat", f"{name}.cat_qk", [q, k]), v])
                o = self.emit("flash_attention", f"{name}.attn", [qkv], heads=heads, head_dim=C // heads,
                              scale=float(mod.scale))
            return self.conv(mod.to_out[0], f"{name}.to_out.0", o, res=x, out_scale=1.0 / float(mod.rescale_output_factor))
        # QKV fusion: one 1x1 conv with the three projections stacked
        wqkv = torch.cat([mod.to_q.weight, mod.to_k.weight, mod.to_v.weight])[:, :, None, None]
        biases = [m.bias if m.bias is not None else torch.zeros(C) for m in (mod.to_q, mod.to_k, mod.to_v)]
        qkv = self.emit("conv", f"{name}.to_qkv", [h], weight=self.w(f"{name}.to_qkv.weight", wqkv),
                        bias=self.w(f"{name}.to_qkv.bias", torch.cat(biases)), stride=1, pad=[0, 0, 0, 0], chan_add=None,
                        res=None, out_scale=1.0, kernel=[1, 1])
        o = self.emit("flash_attention", f"{name}.attn", [qkv], heads=heads, head_dim=C // heads, scale=float(mod.scale))
        return self.conv(mod.to_out[0], f"{name}.to_out.0", o, res=x, out_scale=1.0 / float(mod.rescale_output_factor))

    def attention_int8(self, att: Any, name: str, q: str, k: str, v: str, heads: int, head_dim: int) -> str:
        """A lowered attention (edgediff.lowering.LoweredAttention): Q, K, V on their int8 grids (the
        projections write them directly once keep_int8 has run), integer QK^T and PV, softmax in
        float, the output requantized onto to_out's input grid where the lowering says so."""
        qi, ki, vi = (self.quantize(b, f"{name}.quantize_{w}", [g], -1)
                      for b, w, g in ((q, "q", att.q), (k, "k", att.k), (v, "v", att.v)))
        for w, g in (("q", att.q), ("k", att.k), ("v", att.v)):
            if g.dtype != "int8" or g.zero_point != 0:
                raise BadInput(f"opencl int8: {name}: attention operand {w} must be symmetric int8")
        return self.emit("attention_int8", f"{name}.attn", [qi, ki, vi], heads=heads, head_dim=head_dim,
                         att=attention_attrs(att),
                         store=None, direct=False)

    # ---- transformer blocks: tokens stay channels-first (B, C, H, W), a Linear is a 1x1 conv
    def layer_norm(self, mod: nn.Module, name: str, x: str, mod_buf: str | None = None, scale_off: int = 0,
                   shift_off: int = 0) -> str:
        if not isinstance(mod, nn.LayerNorm) or len(mod.normalized_shape) != 1:
            raise BadInput(f"opencl target: {name}: expected a LayerNorm over channels, got {type(mod).__name__}")
        affine = mod.weight is not None
        gamma = self.w(f"{name}.gamma", mod.weight) if affine else None
        beta = None
        if affine:
            beta = self.w(f"{name}.beta", mod.bias if mod.bias is not None else torch.zeros_like(mod.weight))
        ins = [x] + ([mod_buf] if mod_buf else [])
        return self.emit("layer_norm", name, ins, gamma=gamma, beta=beta, eps=float(mod.eps), mod=mod_buf,
                         scale_off=int(scale_off), shift_off=int(shift_off))

    def attention_tokens(self, mod: nn.Module, name: str, h: str, res: str | None, ctx: str | None) -> str:
        """diffusers Attention over channels-first tokens h: self-attention (ctx None: Q, K, V one
        stacked 1x1 conv) or cross-attention (Q from h; K and V one stacked conv over the
        channels-first context ctx). The output projection adds `res`."""
        proc = type(mod.processor).__name__
        # FloatAttnProcessor: what a stripped QuantAttnProcessor (edgediff.quant) leaves behind
        if proc not in ("AttnProcessor2_0", "AttnProcessor", "FloatAttnProcessor"):
            raise BadInput(f"opencl target: {name}: attention processor {proc} is not supported")
        if mod.group_norm is not None or mod.spatial_norm is not None or mod.norm_cross is not None \
                or getattr(mod, "norm_q", None) is not None or getattr(mod, "norm_k", None) is not None \
                or mod.residual_connection or getattr(mod, "added_kv_proj_dim", None):
            raise BadInput(f"opencl target: {name}: attention with norms, added KV or an inner residual is not supported")
        C, heads = mod.to_q.out_features, int(mod.heads)
        if C % heads or mod.to_k.out_features != C or mod.to_v.out_features != C:
            raise BadInput(f"opencl target: {name}: q/k/v widths {C}/{mod.to_k.out_features}/{mod.to_v.out_features} "
                           f"with {heads} heads are not supported")

        def stacked(mods: tuple[nn.Linear, ...], tag: str, src: str) -> str:
            w = torch.cat([m.weight for m in mods])[:, :, None, None]
            bias = None
            if any(m.bias is not None for m in mods):
                bias = self.w(f"{name}.{tag}.bias", torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features)
                                                              for m in mods]))
            return self.emit("conv", f"{name}.{tag}", [src], weight=self.w(f"{name}.{tag}.weight", w), bias=bias, stride=1,
                             pad=[0, 0, 0, 0], chan_add=None, res=None, out_scale=1.0, kernel=[1, 1])

        if self.low is not None and any(f"{name}.{p}" in self.low.layers for p in ("to_q", "to_k", "to_v")):
            # int8: each projection its own integer layer (own input and output grids), no stacking
            src = h if ctx is None else ctx
            q = self.conv(mod.to_q, f"{name}.to_q", h)
            k, v = (self.conv(getattr(mod, p), f"{name}.{p}", src) for p in ("to_k", "to_v"))
            att = self.low.attentions.get(name)
            if att is not None:
                o = self.attention_int8(att, name, q, k, v, heads, C // heads)
            elif ctx is None:
                qkv = self.emit("concat", f"{name}.cat_qkv", [self.emit("concat", f"{name}.cat_qk", [q, k]), v])
                o = self.emit("flash_attention", f"{name}.attn", [qkv], heads=heads, head_dim=C // heads,
                              scale=float(mod.scale))
            else:
                o = self.emit("cross_attention", f"{name}.attn", [q, self.emit("concat", f"{name}.cat_kv", [k, v])],
                              heads=heads, head_dim=C // heads, scale=float(mod.scale))
        elif ctx is None:
            qkv = stacked((mod.to_q, mod.to_k, mod.to_v), "to_qkv", h)
            o = self.emit("flash_attention", f"{name}.attn", [qkv], heads=heads, head_dim=C // heads, scale=float(mod.scale))
        else:
            q = self.conv(mod.to_q, f"{name}.to_q", h)
            kv = stacked((mod.to_k, mod.to_v), "to_kv", ctx)
            o = self.emit("cross_attention", f"{name}.attn", [q, kv], heads=heads, head_dim=C // heads,
                          scale=float(mod.scale))
        return self.conv(mod.to_out[0], f"{name}.to_out.0", o, res=res, out_scale=1.0 / float(mod.rescale_output_factor))

    def feed_forward(self, mod: nn.Module, name: str, h: str, res: str | None) -> str:
        act = mod.net[0]
        kind = type(act).__name__
        if kind == "GEGLU":
            u = self.conv(act.proj, f"{name}.net.0.proj", h)
            u = self.emit("geglu", f"{name}.net.0.geglu", [u])
        elif kind == "GELU":
            u = self.conv(act.proj, f"{name}.net.0.proj", h)
            u = self.emit("gelu_tanh" if act.approximate == "tanh" else "gelu", f"{name}.net.0.act", [u])
        else:
            raise BadInput(f"opencl target: {name}: feed-forward activation {kind} is not supported (GEGLU, GELU)")
        if len(mod.net) > 3 or not isinstance(mod.net[2], nn.Linear):
            raise BadInput(f"opencl target: {name}: feed-forward layout not supported")
        return self.conv(mod.net[2], f"{name}.net.2", u, res=res)

    def transformer2d(self, mod: nn.Module, name: str, x: str, ctx: str) -> str:
        """Transformer2DModel with continuous input (SD-1.x/2.x): GroupNorm, proj_in, per block
        LayerNorm -> self-attention -> LayerNorm -> cross-attention -> LayerNorm -> feed-forward
        (each with its residual folded into the output projection), proj_out + the block input."""
        if not getattr(mod, "is_input_continuous", False):
            raise BadInput(f"opencl target: {name}: only continuous-input Transformer2DModel is supported")
        h = self.group_norm(mod.norm, f"{name}.norm", x, silu=False)
        h = self.conv(mod.proj_in, f"{name}.proj_in", h)  # Conv2d 1x1 or Linear: the same op channels-first
        for j, blk in enumerate(mod.transformer_blocks):
            bn = f"{name}.transformer_blocks.{j}"
            if blk.norm_type != "layer_norm" or blk.only_cross_attention or blk.pos_embed is not None \
                    or getattr(blk, "use_ada_layer_norm", False) or blk.attn2 is None \
                    or getattr(blk, "fuser", None) is not None:
                raise BadInput(f"opencl target: {bn}: only the layer_norm self-attn -> cross-attn -> FF block is supported")
            n1 = self.layer_norm(blk.norm1, f"{bn}.norm1", h)
            h = self.attention_tokens(blk.attn1, f"{bn}.attn1", n1, h, None)
            n2 = self.layer_norm(blk.norm2, f"{bn}.norm2", h)
            h = self.attention_tokens(blk.attn2, f"{bn}.attn2", n2, h, ctx)
            n3 = self.layer_norm(blk.norm3, f"{bn}.norm3", h)
            h = self.feed_forward(blk.ff, f"{bn}.ff", n3, h)
        return self.conv(mod.proj_out, f"{name}.proj_out", h, res=x)

    def downsample(self, mod: nn.Module, name: str, x: str) -> str:
        if not mod.use_conv or mod.norm is not None:
            raise BadInput(f"opencl target: {name}: only conv Downsample2D without norm is supported")
        if mod.padding == 0:  # diffusers pads (0, 1, 0, 1) by hand then convolves unpadded
            return self.conv(mod.conv, f"{name}.conv", x, pad=(0, 0, 1, 1))
        return self.conv(mod.conv, f"{name}.conv", x)

    def upsample(self, mod: nn.Module, name: str, x: str) -> str:
        if mod.use_conv_transpose or mod.norm is not None or not mod.interpolate:
            raise BadInput(f"opencl target: {name}: only nearest-2x Upsample2D (+conv) is supported")
        h = self.emit("upsample2x", f"{name}.upsample", [x])
        if mod.use_conv:
            conv = mod.conv if mod.name == "conv" else mod.Conv2d_0
            h = self.conv(conv, f"{name}.conv", h)
        return h


def _time_embedding(b: _Builder, tp: nn.Module, te: nn.Module, name_p: str, name_e: str,
                    cache: dict[tuple[int, float, bool], str] | None = None) -> str:
    """Timesteps (sinusoidal, frequencies from the host) -> TimestepEmbedding(linear, SiLU, linear)."""
    from edgediff.kernels.reference import timestep_freqs

    if getattr(te, "cond_proj", None) is not None or getattr(te, "post_act", None) is not None \
            or not isinstance(te.act, nn.SiLU):
        raise BadInput("opencl target: only TimestepEmbedding(linear, SiLU, linear) is supported")
    dim = int(tp.num_channels)
    key = (dim, float(tp.downscale_freq_shift) * float(getattr(tp, "scale", 1)), bool(tp.flip_sin_to_cos))
    temb = (cache or {}).get(key)
    if temb is None:
        freqs = timestep_freqs(dim, float(tp.downscale_freq_shift)) * float(getattr(tp, "scale", 1))
        temb = b.emit("timestep_embedding", name_p, ["timestep"], freqs=b.w(f"{name_p}.freqs", freqs), dim=dim,
                      flip=bool(tp.flip_sin_to_cos))
        if cache is not None:
            cache[key] = temb
    temb = b.conv(te.linear_1, f"{name_e}.linear_1", temb)
    temb = b.emit("silu", f"{name_e}.act", [temb])
    return b.conv(te.linear_2, f"{name_e}.linear_2", temb)


def _unet_schedule(b: _Builder, unet: nn.Module, cond: bool) -> str:
    """UNet2DModel, or UNet2DConditionModel (cond: cross-attention transformers reading the
    channels-first encoder_hidden_states buffer "context")."""
    cfg = unet.config
    if not cond and cfg.time_embedding_type != "positional":
        raise BadInput(f"opencl target: time_embedding_type {cfg.time_embedding_type!r} is not supported (positional only)")
    if unet.class_embedding is not None:
        raise BadInput("opencl target: class-conditional UNets are not supported")
    if cond:
        for attr in ("encoder_hid_proj", "add_embedding", "time_embed_act"):
            if getattr(unet, attr, None) is not None:
                raise BadInput(f"opencl target: UNet2DConditionModel with {attr} (SDXL-style added conditioning) is not "
                               "supported")
        if cfg.time_embedding_type != "positional":
            raise BadInput(f"opencl target: time_embedding_type {cfg.time_embedding_type!r} is not supported")
    x = "sample"
    if cfg.center_input_sample:
        x = b.emit("affine", "center_input_sample", [x], alpha=2.0, beta=-1.0)
    temb = _time_embedding(b, unet.time_proj, unet.time_embedding, "time_proj", "time_embedding")
    # every ResnetBlock2D applies SiLU to the same embedding first: do it once
    temb_act = b.emit("silu", "resnets.time_act", [temb])
    down_kinds = ("DownBlock2D", "AttnDownBlock2D") + (("CrossAttnDownBlock2D",) if cond else ())
    up_kinds = ("UpBlock2D", "AttnUpBlock2D") + (("CrossAttnUpBlock2D",) if cond else ())
    mid_kinds = ("UNetMidBlock2DCrossAttn",) if cond else ("UNetMidBlock2D",)

    def attend(att: nn.Module, name: str, h: str) -> str:
        if type(att).__name__ == "Transformer2DModel":
            return b.transformer2d(att, name, h, "context")
        if type(att).__name__ == "DualTransformer2DModel":
            raise BadInput(f"opencl target: {name}: dual cross-attention is not supported")
        return b.attention(att, name, h)

    def layers(blk: nn.Module, where: str, kinds: tuple[str, ...]) -> list[tuple[nn.Module, nn.Module | None]]:
        """(resnet, attention or None) pairs of a down/up block of a supported kind."""
        kind = type(blk).__name__
        if kind not in kinds:
            raise BadInput(f"opencl target: {where} block {kind} is not supported ({', '.join(kinds)})")
        return list(zip(blk.resnets, getattr(blk, "attentions", None) or [None] * len(blk.resnets)))

    h = b.conv(unet.conv_in, "conv_in", x)
    skips = [h]
    for i, blk in enumerate(unet.down_blocks):
        for j, (res, att) in enumerate(layers(blk, "down", down_kinds)):
            h = b.resnet(res, f"down_blocks.{i}.resnets.{j}", h, temb_act)
            if att is not None:
                h = attend(att, f"down_blocks.{i}.attentions.{j}", h)
            skips.append(h)
        for j, ds in enumerate(blk.downsamplers or []):
            if type(ds).__name__ != "Downsample2D":
                raise BadInput(f"opencl target: downsampler {type(ds).__name__} is not supported (downsample_type 'conv')")
            h = b.downsample(ds, f"down_blocks.{i}.downsamplers.{j}", h)
            skips.append(h)
    if unet.mid_block is not None:
        mb = unet.mid_block
        if type(mb).__name__ not in mid_kinds:
            raise BadInput(f"opencl target: mid block {type(mb).__name__} is not supported ({', '.join(mid_kinds)})")
        h = b.resnet(mb.resnets[0], "mid_block.resnets.0", h, temb_act)
        for j, (att, res) in enumerate(zip(mb.attentions, mb.resnets[1:])):
            if att is not None:
                h = attend(att, f"mid_block.attentions.{j}", h)
            h = b.resnet(res, f"mid_block.resnets.{j + 1}", h, temb_act)
    for i, blk in enumerate(unet.up_blocks):
        for j, (res, att) in enumerate(layers(blk, "up", up_kinds)):
            h = b.emit("concat", f"up_blocks.{i}.cat.{j}", [h, skips.pop()])
            h = b.resnet(res, f"up_blocks.{i}.resnets.{j}", h, temb_act)
            if att is not None:
                h = attend(att, f"up_blocks.{i}.attentions.{j}", h)
        for j, us in enumerate(blk.upsamplers or []):
            if type(us).__name__ != "Upsample2D":
                raise BadInput(f"opencl target: upsampler {type(us).__name__} is not supported (upsample_type 'conv')")
            h = b.upsample(us, f"up_blocks.{i}.upsamplers.{j}", h)
    if unet.conv_norm_out is not None:
        if not isinstance(unet.conv_act, nn.SiLU):
            raise BadInput("opencl target: only SiLU after conv_norm_out is supported")
        h = b.group_norm(unet.conv_norm_out, "conv_norm_out", h, silu=True)
    return b.conv(unet.conv_out, "conv_out", h)


def _dit_schedule(b: _Builder, dit: nn.Module, sample_shape: tuple[int, ...]) -> str:
    """DiTTransformer2DModel: patchify (a PxP stride-P conv) + the fixed positional embedding, per
    block adaLN-Zero (its own timestep + class-label embedding -> SiLU -> linear -> 6 chunks:
    shift/scale/gate for attention and for the MLP), final adaLN (proj_out_1) + proj_out_2,
    unpatchify."""
    cfg = dit.config
    if cfg.norm_type != "ada_norm_zero":
        raise BadInput(f"opencl target: DiT norm_type {cfg.norm_type!r} is not supported (ada_norm_zero)")
    pe = dit.pos_embed
    p = int(cfg.patch_size)
    if getattr(pe, "layer_norm", None) or getattr(pe, "pos_embed_max_size", None) or pe.pos_embed is None:
        raise BadInput("opencl target: DiT patch embedding with a layer norm or cropped positional table is not supported")
    H, W = sample_shape[1], sample_shape[2]
    if H % p or W % p or (H // p, W // p) != (int(pe.height), int(pe.width)):
        raise BadInput(f"opencl target: DiT sample {H}x{W} does not match its positional table "
                       f"({pe.height}x{pe.width} patches of {p})")
    h = b.conv(pe.proj, "pos_embed.proj", "sample")
    D = int(pe.proj.out_channels)
    pos = pe.pos_embed[0].detach().float().t().contiguous()  # (N, D) -> channels-first (D, N)
    h = b.emit("add_broadcast", "pos_embed.add", [h], table=b.w("pos_embed.pos_embed", pos))
    tcache: dict[tuple[int, float, bool], str] = {}
    cond0 = None
    for i, blk in enumerate(dit.transformer_blocks):
        bn = f"transformer_blocks.{i}"
        if blk.norm_type != "ada_norm_zero" or blk.attn2 is not None or blk.pos_embed is not None:
            raise BadInput(f"opencl target: {bn}: only adaLN-Zero self-attention blocks are supported")
        n1 = blk.norm1
        emb = n1.emb
        if type(emb).__name__ != "CombinedTimestepLabelEmbeddings":
            raise BadInput(f"opencl target: {bn}: adaLN embedding {type(emb).__name__} is not supported")
        te = _time_embedding(b, emb.time_proj, emb.timestep_embedder, f"{bn}.norm1.emb.time_proj",
                             f"{bn}.norm1.emb.timestep_embedder", tcache)
        table = emb.class_embedder.embedding_table.weight
        ce = b.emit("embedding", f"{bn}.norm1.emb.class_embedder", ["class_labels"],
                    table=b.w(f"{bn}.norm1.emb.class_embedder.table", table), rows=int(table.shape[0]))
        cond = b.emit("add", f"{bn}.norm1.emb.add", [te, ce])
        cond0 = cond0 or cond
        mod = b.conv(n1.linear, f"{bn}.norm1.linear", b.emit("silu", f"{bn}.norm1.silu", [cond]))
        # chunks of mod: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        x1 = b.layer_norm(n1.norm, f"{bn}.norm1.norm", h, mod, scale_off=D, shift_off=0)
        a = b.attention_tokens(blk.attn1, f"{bn}.attn1", x1, None, None)
        h = b.emit("gate_residual", f"{bn}.attn1.gate", [a, h, mod], off=2 * D)
        x3 = b.layer_norm(blk.norm3, f"{bn}.norm3", h, mod, scale_off=4 * D, shift_off=3 * D)
        f = b.feed_forward(blk.ff, f"{bn}.ff", x3, None)
        h = b.emit("gate_residual", f"{bn}.ff.gate", [f, h, mod], off=5 * D)
    assert cond0 is not None
    so = b.conv(dit.proj_out_1, "proj_out_1", b.emit("silu", "proj_out_1.silu", [cond0]))  # shift, scale
    h = b.layer_norm(dit.norm_out, "norm_out", h, so, scale_off=D, shift_off=0)
    h = b.conv(dit.proj_out_2, "proj_out_2", h)
    return b.emit("unpatchify", "unpatchify", [h], patch=p, out_channels=int(cfg.out_channels))


def level_schedule(resnet: nn.Module, transformer: nn.Module) -> tuple[list[dict[str, Any]], dict[str, tuple[int, ...]]]:
    """The ops of one conditional-UNet level, a ResnetBlock2D (its input "sample", time embedding
    "temb") then a Transformer2DModel over the context "context", and the weight shapes: what the
    bundle builder emits for it, for the cost model (edgediff.kernels.cost) at shapes never run."""
    b = _Builder()
    h = b.resnet(resnet.eval(), "resnets.0", "sample", "temb")
    b.transformer2d(transformer.eval(), "attentions.0", h, "context")
    return b.ops, {k: tuple(v.shape) for k, v in b.weights.items()}


def build_schedule(model: DiffusionModel, quant: Any = None,
                   keep_int8: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The op schedule (JSON-able) and the weights (name -> tensor) of a UNet2DModel,
    UNet2DConditionModel (SD-1.x/2.x cross-attention; encoder_hidden_states a runtime input) or
    DiTTransformer2DModel (class labels a runtime input) denoiser.

    With `quant` (edgediff.quant_params.QuantParams) the model is lowered once
    (edgediff.lowering.lower) and every layer it lists becomes an integer conv (`iconv`),
    attention with quantized operands an `attention_int8`; keep_int8 (the default) then keeps
    activations int8 between them (see keep_int8). keep_int8=False leaves every activation
    float between ops (quantized by each consumer): the layout the cost model compares against."""
    den = _unet_of(model)
    arch = type(den).__name__
    sig = model.signature
    low = None
    if quant is not None:
        from edgediff.lowering import lower

        low = lower(den, quant)
    if sig.timestep_scale != 1.0 or sig.extra:
        raise BadInput("opencl target: denoisers with extra inputs or a scaled timestep are not supported")
    b = _Builder(low)
    inputs = ["sample", "timestep"]
    if arch == "DiTTransformer2DModel":
        if not sig.num_classes:
            raise BadInput("opencl target: DiT without class labels is not supported")
        inputs.append("class_labels")
        _dit_schedule(b, den, tuple(sig.sample_shape))
        out_channels = int(den.config.out_channels)
    else:
        cond = arch == "UNet2DConditionModel"
        if cond:
            if not sig.cond_shape:
                raise BadInput("opencl target: UNet2DConditionModel without encoder_hidden_states is not supported")
            inputs.append("encoder_hidden_states")
        _unet_schedule(b, den, cond)
        out_channels = int(den.config.out_channels)
    b.ops[-1]["out"] = "out"
    if low is not None and keep_int8:
        b.ops = keep_int8_between(b.ops)
    sched = {"version": SCHEDULE_VERSION, "arch": arch, "inputs": inputs, "output": "out",
             "sample_shape": list(sig.sample_shape), "out_channels": out_channels, "ops": b.ops}
    if sig.cond_shape:
        sched["cond_shape"] = list(sig.cond_shape)
    return sched, b.weights


# ops that can write their output quantized onto a consumer's grid instead of float
_QUANT_STORE = ("iconv", "group_norm", "attention_int8", "concat", "layer_norm", "geglu")
# of those, the ones that can also store a shortcut-split layer's two grids
_SPLIT_STORE = ("group_norm", "concat")


def _same_grid(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    keys = ("scale", "zero_point", "qmin", "qmax", "dtype")
    return a is not None and b is not None and all(a[k] == b[k] for k in keys)


def keep_int8_between(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Activations stay int8 between integer layers: every `quantize` op whose float input has no
    other reader is folded into that input's producer when the producer can store quantized (an
    integer conv requantizes in its epilogue, GroupNorm, LayerNorm, GEGLU, concat and the integer
    attention quantize before the store; GroupNorm and concat also onto a shortcut-split layer's two
    grids); identical quantize ops of one buffer are merged first. A float tensor is left only
    where a float op reads it, or several layers on different grids. The values
    are those of the unfolded schedule: the producer applies the same float32 quantization the
    consumer would, and where the consumer's grid is the producer's own output grid the
    requantized integer is stored as is (DIRECT), which is the same number."""
    ops = [dict(op) for op in ops]
    rename: dict[str, str] = {}
    seen: dict[tuple[str, str], str] = {}
    kept = []
    for op in ops:
        op["in"] = [rename.get(i, i) for i in op["in"]]
        for key in ("chan_add", "res"):
            if op.get(key):
                op[key] = rename.get(op[key], op[key])
        if op["op"] == "quantize":
            sig = (op["in"][0], repr((op["segs"], op["split"])))
            if sig in seen:  # the same tensor on the same grid(s): quantize once
                rename[op["out"]] = seen[sig]
                continue
            seen[sig] = op["out"]
        kept.append(op)
    readers: dict[str, int] = {}
    for op in kept:
        for i in op["in"]:
            readers[i] = readers.get(i, 0) + 1
    producer = {op["out"]: op for op in kept}
    out = []
    for op in kept:
        src = producer.get(op["in"][0]) if op["op"] == "quantize" else None
        if src is None or readers[op["in"][0]] != 1 or src["op"] not in _QUANT_STORE \
                or (op["split"] != -1 and src["op"] not in _SPLIT_STORE) or src.get("store") is not None \
                or src["out"] == "out":
            out.append(op)
            continue
        grid = op["segs"][0]
        src["store"], src["out"] = grid, op["out"]
        if op["split"] != -1:
            src["store2"], src["store_split"] = op["segs"][1], op["split"]
        if src["op"] == "iconv":
            p = src["parts"]
            src["direct"] = (len(p) == 1 and not src.get("chan_add") and not src.get("res")
                             and src["out_scale"] == 1.0 and _same_grid(p[0]["out"], grid))
        elif src["op"] == "attention_int8":
            src["direct"] = _same_grid(src["att"]["output"], grid)
    return out


def _last_uses(ops: list[dict[str, Any]]) -> list[list[str]]:
    """For each op, the buffers whose last reader it is (so the executor can free them early)."""
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op["in"]:
            last[name] = i
    frees: list[list[str]] = [[] for _ in ops]
    for name, i in last.items():
        frees[i].append(name)
    return frees


class Executor:
    """Runs a schedule on a CLRuntime. conv_algo: 'gemm' (implicit GEMM everywhere), 'winograd'
    (F(2x2,3x3) for every 3x3 stride-1 pad-1 conv) or 'auto' (Winograd where the channel counts
    make it pay off: Cin, Cout >= winograd_min_channels)."""

    def __init__(self, schedule: dict[str, Any], weights: dict[str, Any], rt: Any, conv_algo: str = "auto",
                 winograd_min_channels: int = 32) -> None:
        from edgediff.kernels.runtime import winograd_weights

        if schedule.get("version") != SCHEDULE_VERSION:
            raise BadInput(f"opencl schedule version {schedule.get('version')!r} is not supported "
                           f"(this edgediff reads {SCHEDULE_VERSION})")
        if conv_algo not in ("auto", "gemm", "winograd"):
            raise BadInput(f"conv_algo must be auto, gemm or winograd, got {conv_algo!r}")
        self.schedule = schedule
        self.rt = rt
        self.ops = schedule["ops"]
        self.frees = _last_uses(self.ops)
        # ops that read only the conditioning (cross-attention K/V of the context, the class
        # embedding): the same for every step of a prompt, so run once per distinct conditioning
        derived = {"context" if n == "encoder_hidden_states" else n for n in schedule["inputs"]
                   if n not in ("sample", "timestep")}
        self.cond_ops: set[int] = set()
        for i, op in enumerate(self.ops):
            if op["in"] and all(b in derived for b in op["in"]) and op["out"] != "out":
                derived.add(op["out"])
                self.cond_ops.add(i)
        self._cond_host: dict[str, np.ndarray] = {}
        self._cond_cache: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
        self.dev: dict[str, Any] = {}
        self.winograd: dict[str, Any] = {}
        for name, t in weights.items():
            a = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
            if a.dtype in (np.int8, np.int32):  # integer weights and biases of an int8 bundle
                self.dev[name] = rt.to_device(a, a.dtype)
            else:
                self.dev[name] = rt.to_device(a, np.float32 if name.endswith(F32_SUFFIXES) else None)
        for op in self.ops:
            if op["op"] != "conv":
                continue
            w = weights[op["weight"]]
            co, ci = int(w.shape[0]), int(w.shape[1])
            fits = op["kernel"] == [3, 3] and op["stride"] == 1 and op["pad"] == [1, 1, 1, 1]
            use = fits and (conv_algo == "winograd" or (conv_algo == "auto" and min(co, ci) >= winograd_min_channels))
            if use:
                wn = w.numpy() if hasattr(w, "numpy") else np.asarray(w)
                self.winograd[op["name"]] = rt.to_device(winograd_weights(wn.astype(np.float32)))

    def _op(self, op: dict[str, Any], env: dict[str, Any]) -> Any:
        rt, kind = self.rt, op["op"]
        x = env[op["in"][0]]
        if kind == "conv":
            bias = self.dev[op["bias"]] if op.get("bias") else None
            ca = env[op["chan_add"]] if op.get("chan_add") else None
            res = env[op["res"]] if op.get("res") else None
            if op["name"] in self.winograd:
                return rt.conv2d_winograd(x, self.winograd[op["name"]], bias, ca, res, op["out_scale"])
            return rt.conv2d(x, self.dev[op["weight"]], bias, op["stride"], tuple(op["pad"]), ca, res, op["out_scale"])
        if kind == "qconv":
            i1, i2 = op["in1"], op["in2"]
            xq = rt.quantize_split(x, op["split"], i1["scale"], i1["zp"], i2["scale"], i2["zp"], i1["bits"], i1["signed"])
            bias = self.dev[op["bias"]] if op.get("bias") else None
            ca = env[op["chan_add"]] if op.get("chan_add") else None
            res = env[op["res"]] if op.get("res") else None
            return rt.conv2d_int8_dq(xq, self.dev[op["weight"]], self.dev[op["w_scale"]], bias, op["split"], i1["zp"],
                                     i2["zp"], i1["scale"], i2["scale"], op["stride"], tuple(op["pad"]), ca, res,
                                     op["out_scale"])
        if kind == "quantize":
            return rt.quantize_grid(x, op["segs"], op["split"])
        if kind == "iconv":
            parts = [{**p, "acc_scale": self.dev[p["acc_scale"]], "mult": self.dev[p["mult"]] if p["mult"] else None}
                     for p in op["parts"]]
            return rt.conv2d_int8_lowered(x, self.dev[op["weight"]], parts, self.dev[op["bias"]] if op.get("bias") else None,
                                          op["stride"], tuple(op["pad"]),
                                          env[op["chan_add"]] if op.get("chan_add") else None,
                                          env[op["res"]] if op.get("res") else None, op["out_scale"], op.get("store"),
                                          bool(op.get("direct")))
        if kind == "attention_int8":
            B, C, H, W = x.shape
            k = env[op["in"][1]]  # K and V: (B, C, M, 1) over the context tokens, or (B, C, H, W)
            o = rt.attention_int8(x, k, env[op["in"][2]], op["heads"], op["head_dim"], H * W, int(np.prod(k.shape[2:])),
                                  op["att"], store=op.get("store"), direct=bool(op.get("direct")))
            return o.reshape(B, C, H, W)
        # qconv and attention_fq: the int8 ops of bundles written before the lowering (float between layers)
        if kind == "attention_fq":
            B, C, H, W = x.shape
            n, heads, d = H * W, op["heads"], op["head_dim"]

            def fq(a: Any, t: dict[str, Any]) -> Any:
                return rt.fake_quant_seg(a, [(0, t["scale"], t["zp"], t["qmin"], t["qmax"])])

            q, k, v = fq(x, op["q"]), fq(env[op["in"][1]], op["k"]), fq(env[op["in"][2]], op["v"])
            o = rt.attention_unfused(q, k, v, heads, d, n, n, scale=op["scale"], p_hook=lambda p: fq(p, op["p"]))
            return o.reshape(B, C, H, W)
        if kind == "group_norm" and op.get("store"):
            return rt.group_norm_q(x, self.dev[op["gamma"]], self.dev[op["beta"]], op["groups"], op["eps"], op["silu"],
                                   op["store"], op.get("store2"), op.get("store_split", -1))
        if kind == "group_norm":
            return rt.group_norm(x, self.dev[op["gamma"]], self.dev[op["beta"]], op["groups"], op["eps"], op["silu"])
        if kind == "silu":
            return rt.silu(x)
        if kind == "flash_attention":  # the path per shape: flash or unfused, whichever the cost model prefers here
            B, C3, H, W = x.shape
            C = C3 // 3
            n = H * W
            if rt.attention_path(B, op["heads"], op["head_dim"], n, n, copied=B * C3 * n) == "unfused":
                q, k, v = (rt.slice_channels(x, i * C, C).reshape(B, C, n) for i in range(3))
                return rt.attention_unfused(q, k, v, op["heads"], op["head_dim"], n, n, op["scale"]).reshape(B, C, H, W)
            o = rt.flash_attention(x, x, x, op["heads"], op["head_dim"], n, n, 0, C * n, 2 * C * n, op["scale"])
            return o.reshape(B, C, H, W)
        if kind == "cross_attention":  # q (B, C, H, W), kv: K then V over the M context tokens (B, 2C, M, 1)
            kv = env[op["in"][1]]
            B, C, H, W = x.shape
            m = int(np.prod(kv.shape[2:]))
            if rt.attention_path(B, op["heads"], op["head_dim"], H * W, m, copied=B * 2 * C * m) == "unfused":
                k, v = (rt.slice_channels(kv, i * C, C).reshape(B, C, m) for i in range(2))
                o = rt.attention_unfused(x.reshape(B, C, H * W), k, v, op["heads"], op["head_dim"], H * W, m, op["scale"])
                return o.reshape(B, C, H, W)
            o = rt.flash_attention(x, kv, kv, op["heads"], op["head_dim"], H * W, m, 0, 0, C * m, op["scale"],
                                   q_bstride=C * H * W, kv_bstride=2 * C * m)
            return o.reshape(B, C, H, W)
        if kind == "layer_norm":
            mod = env[op["mod"]] if op.get("mod") else None
            return rt.layer_norm_channels(x, self.dev[op["gamma"]] if op.get("gamma") else None,
                                          self.dev[op["beta"]] if op.get("beta") else None, op["eps"], mod,
                                          op["scale_off"], op["shift_off"], op.get("store"))
        if kind == "geglu":
            return rt.geglu(x, op.get("store"))
        if kind == "gelu":
            return rt.gelu(x)
        if kind == "gelu_tanh":
            return rt.gelu_tanh(x)
        if kind == "gate_residual":
            return rt.gate_residual(x, env[op["in"][1]], env[op["in"][2]], op["off"])
        if kind == "add":
            return rt.add(x, env[op["in"][1]])
        if kind == "add_broadcast":
            return rt.add_broadcast(x, self.dev[op["table"]])
        if kind == "embedding":
            return rt.embedding_rows(x, self.dev[op["table"]])
        if kind == "unpatchify":
            return rt.unpatchify(x, op["patch"], op["out_channels"])
        if kind == "concat" and op.get("store"):
            return rt.concat_q(x, env[op["in"][1]], op["store"], op.get("store2"), op.get("store_split", -1))
        if kind == "concat":
            return rt.concat(x, env[op["in"][1]])
        if kind == "upsample2x":
            return rt.upsample2x(x)
        if kind == "timestep_embedding":
            return rt.timestep_embedding(x, self.dev[op["freqs"]], op["dim"], op["flip"])
        if kind == "affine":
            return rt.affine(x, op["alpha"], op["beta"])
        raise BadInput(f"opencl schedule: unknown op {kind!r} ({op['name']})")

    def _inputs(self, sample: torch.Tensor, cond: Any) -> dict[str, Any]:
        """The conditioning inputs the schedule names, checked and on the device: the context
        (encoder_hidden_states (B, M, D)) uploaded channels-first (B, D, M, 1), as every kernel
        reads tokens; class labels as int32, each checked against the embedding table."""
        want = [n for n in self.schedule["inputs"] if n not in ("sample", "timestep")]
        if not want:
            if cond is not None:
                raise BadInput("opencl bundle: this denoiser takes no conditioning")
            return {}
        B = sample.shape[0]
        out: dict[str, Any] = {}
        for name in want:
            v = cond.get(name) if isinstance(cond, dict) else cond
            if v is None:
                raise BadInput(f"opencl bundle: this denoiser needs {name}")
            v = torch.as_tensor(v)
            if v.shape[0] == 1 and B > 1:
                v = v.expand(B, *v.shape[1:])
            if v.shape[0] != B:
                raise BadInput(f"opencl bundle: {name} has batch {v.shape[0]}, the sample {B}")
            if name == "encoder_hidden_states":
                dim = self.schedule.get("cond_shape", [None, None])[-1]
                if v.dim() != 3 or (dim is not None and v.shape[2] != dim):
                    raise BadInput(f"opencl bundle: encoder_hidden_states must be (B, M, {dim}), got {tuple(v.shape)}")
                host = v.detach().float().transpose(1, 2).contiguous()[..., None].numpy()
                self._cond_host["context"] = host
                out["context"] = self.rt.to_device(host)
            else:
                rows = min(int(op["rows"]) for op in self.ops if op["op"] == "embedding")
                lab = v.detach().reshape(B).long()
                if bool(((lab < 0) | (lab >= rows)).any()):
                    raise BadInput(f"opencl bundle: class_labels must be in [0, {rows}), got {lab.tolist()}")
                self._cond_host[name] = lab.to(torch.int32).numpy()
                out[name] = self.rt.to_device(self._cond_host[name], np.int32)
        return out

    def run(self, sample: torch.Tensor, timestep: torch.Tensor, timings: list[tuple[str, str, float]] | None = None,
            cond: Any = None, capture: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """One denoiser call; `cond` is what the schedule's extra inputs need (encoder_hidden_states
        or class_labels: the tensor, or a dict by name). With `timings` (a list), each op's time is
        appended: from its kernels' OpenCL event timestamps when the runtime's queue profiles, else
        wall time with the queue drained after the op. With `capture` (a dict), every buffer
        (inputs and op outputs, by schedule name) is copied there to the host, in its stored type."""
        events = timings is not None and self.rt.profiling
        if events:
            self.rt.event_times()  # drop what was queued before
        exp = tuple(self.schedule["sample_shape"])
        if sample.dim() != 4 or tuple(sample.shape[1:]) != exp:
            raise BadInput(f"opencl runtime: sample must be (B, {', '.join(map(str, exp))}), got {tuple(sample.shape)}")
        t = timestep.detach().float().reshape(-1)
        if t.numel() == 1 and sample.shape[0] > 1:
            t = t.expand(sample.shape[0])
        env = {"sample": self.rt.to_device(sample.detach().float()),
               "timestep": self.rt.to_device(t.contiguous(), np.float32), **self._inputs(sample, cond)}
        cached = None
        if self._cond_cache is not None and self._cond_cache[0].keys() == self._cond_host.keys() \
                and all(np.array_equal(self._cond_cache[0][k], v) for k, v in self._cond_host.items()):
            cached = self._cond_cache[1]
        fresh: dict[str, Any] = {}
        for i, (op, frees) in enumerate(zip(self.ops, self.frees)):
            t0 = time.perf_counter() if timings is not None else 0.0
            self.rt.label = op["name"]
            if capture is not None:
                capture.update({b: env[b].get() for b in op["in"] if b not in capture})
            if i in self.cond_ops and cached is not None:
                env[op["out"]] = cached[op["out"]]  # computed for this conditioning by an earlier call
            else:
                env[op["out"]] = self._op(op, env)
                if i in self.cond_ops:
                    fresh[op["out"]] = env[op["out"]]
            if capture is not None:
                capture[op["out"]] = env[op["out"]].get()
            if timings is not None and not events:
                self.rt.finish()
                timings.append((op["name"], op["op"], (time.perf_counter() - t0) * 1e3))
            for name in frees:
                if name != op["out"]:
                    env.pop(name, None)
        if fresh:
            self._cond_cache = ({k: v.copy() for k, v in self._cond_host.items()}, fresh)
        out = env["out"].get()
        if events:
            per_op: dict[str, float] = {}
            for label, _, ms in self.rt.event_times():
                per_op[label] = per_op.get(label, 0.0) + ms
            timings.extend((op["name"], op["op"], per_op.get(op["name"], 0.0)) for op in self.ops)  # type: ignore[union-attr]
        return torch.from_numpy(out.astype(np.float32))
