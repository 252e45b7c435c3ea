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


def _unet_of(model: DiffusionModel) -> nn.Module:
    den = model.denoiser
    if isinstance(den, DenoiserModule):
        den = den.inner
    from diffusers import UNet2DModel

    if not isinstance(den, UNet2DModel):
        raise BadInput(f"opencl target: runs diffusers UNet2DModel denoisers; this model is {type(den).__name__} "
                       "(export it to onnx/tflite instead)")
    if any(getattr(m, "_edgediff_quant_wrapper", False) for m in den.modules()):
        den = strip_quant_wrappers(copy.deepcopy(den))  # on-grid float weights; never modify the input
    return den


def _tq(t: Any) -> dict[str, Any]:
    """A per-tensor activation TensorQuant as schedule attributes."""
    if t.scale.numel() != 1:
        raise BadInput("opencl int8: activation quantization must be per tensor")
    lo, hi = t.qmin, t.qmax
    return {"scale": float(t.scale.reshape(())), "zp": int(t.zero_point.reshape(())), "bits": int(t.bits),
            "signed": bool(t.signed), "qmin": int(lo), "qmax": int(hi)}


class _Builder:
    def __init__(self, qp: Any = None) -> None:
        self.ops: list[dict[str, Any]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self._n = 0
        self.qp = qp  # QuantParams for int8 bundles, else None

    def lq(self, name: str) -> Any:
        """The LayerQuant of a module path (QuantParams names are paths in model.denoiser, which may be
        a DenoiserModule around the UNet)."""
        if self.qp is None:
            return None
        return self.qp.layers.get(name) or self.qp.layers.get(f"inner.{name}")

    def qconv(self, mod: nn.Module, name: str, x: str, lq: Any, chan_add: str | None, res: str | None,
              out_scale: float, pad: tuple[int, int, int, int] | None) -> str:
        """An integer conv/linear: quantize the input (two channel ranges with shortcut splitting),
        int8 weights on their per-channel grid, int32 accumulation, float epilogue."""
        if lq.weight is None or lq.input is None:
            raise BadInput(f"opencl int8: {name}: QuantParams lack weight or input quantization")
        w = mod.weight if isinstance(mod, nn.Conv2d) else mod.weight[:, :, None, None]
        s_w = lq.weight.scale.reshape(-1).float()
        if s_w.numel() not in (1, w.shape[0]) or (lq.weight.axis not in (0, None)):
            raise BadInput(f"opencl int8: {name}: weight quantization must be per output channel (axis 0) or per tensor")
        s_w = s_w.expand(w.shape[0]).contiguous()
        if not lq.weight.symmetric:
            raise BadInput(f"opencl int8: {name}: weights must be symmetric (zero point 0)")
        ratio = w.detach().float() / s_w[:, None, None, None]
        wi = torch.round(ratio)
        if float((ratio - wi).abs().max()) > 1e-3 or wi.min() < lq.weight.qmin or wi.max() > lq.weight.qmax:
            raise BadInput(f"opencl int8: {name}: weights are not on their quantization grid "
                           "(export the artifact the quant pass wrote)")
        i1 = _tq(lq.input)
        split = int(lq.meta.get("split_at") or w.shape[1])
        i2 = _tq(lq.input2) if lq.input2 is not None and split < w.shape[1] else i1
        if i1["signed"] != i2["signed"] or i1["bits"] != i2["bits"]:
            raise BadInput(f"opencl int8: {name}: the two input ranges differ in sign or bit-width")
        if isinstance(mod, nn.Conv2d):
            stride = mod.stride[0]
            p = pad or (mod.padding[0], mod.padding[1], mod.padding[0], mod.padding[1])
        else:
            stride, p = 1, (0, 0, 0, 0)
        self.weights[f"{name}.weight_q"] = wi.to(torch.int8).contiguous()
        self.w(f"{name}.w_scale", s_w)
        ins = [x] + [b for b in (chan_add, res) if b is not None]
        return self.emit("qconv", name, ins, weight=f"{name}.weight_q", w_scale=f"{name}.w_scale",
                         bias=self.w(f"{name}.bias", mod.bias) if mod.bias is not None else None, stride=stride,
                         pad=list(p), chan_add=chan_add, res=res, out_scale=float(out_scale), split=split, in1=i1, in2=i2,
                         kernel=[int(w.shape[2]), int(w.shape[3])])

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
        lq = self.lq(name)
        if lq is not None and not lq.meta.get("input_unquantized") and isinstance(mod, (nn.Linear, nn.Conv2d)) \
                and mod.weight is not None and lq.kind in ("conv", "linear"):
            return self.qconv(mod, name, x, lq, chan_add, res, out_scale, pad)
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
        qk, av = self.lq(f"{name}:qk"), self.lq(f"{name}:av")
        if self.qp is not None and any(self.lq(f"{name}.{p}") for p in ("to_q", "to_k", "to_v")):
            # int8: each projection has its own input quantization; no QKV weight stacking
            q, k, v = (self.conv(getattr(mod, p), f"{name}.{p}", h) for p in ("to_q", "to_k", "to_v"))
            if qk is not None and av is not None:  # quantized matmul operands (Q-Diffusion), simulated in float
                o = self.emit("attention_fq", f"{name}.attn", [q, k, v], heads=heads, head_dim=C // heads,
                              scale=float(mod.scale), q=_tq(qk.input), k=_tq(qk.input2), p=_tq(av.input), v=_tq(av.input2))
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


def build_schedule(model: DiffusionModel, quant: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The op schedule (JSON-able) and the weights (name -> tensor) of a UNet2DModel denoiser.

    With `quant` (edgediff.quant_params.QuantParams) every conv/linear it lists becomes an integer
    conv (`qconv`) and attention with quantized matmul operands an `attention_fq`."""
    unet = _unet_of(model)
    cfg = unet.config
    if cfg.time_embedding_type != "positional":
        raise BadInput(f"opencl target: time_embedding_type {cfg.time_embedding_type!r} is not supported (positional only)")
    if unet.class_embedding is not None:
        raise BadInput("opencl target: class-conditional UNet2DModel is not supported")
    te = unet.time_embedding
    if getattr(te, "cond_proj", None) is not None or getattr(te, "post_act", None) is not None \
            or not isinstance(te.act, nn.SiLU):
        raise BadInput("opencl target: only TimestepEmbedding(linear, SiLU, linear) is supported")
    b = _Builder(quant)
    x = "sample"
    if cfg.center_input_sample:
        x = b.emit("affine", "center_input_sample", [x], alpha=2.0, beta=-1.0)
    tp = unet.time_proj
    from edgediff.kernels.reference import timestep_freqs

    dim = int(tp.num_channels)
    freqs = timestep_freqs(dim, float(tp.downscale_freq_shift)) * float(getattr(tp, "scale", 1))
    temb = b.emit("timestep_embedding", "time_proj", ["timestep"], freqs=b.w("time_proj.freqs", freqs), dim=dim,
                  flip=bool(tp.flip_sin_to_cos))
    temb = b.conv(te.linear_1, "time_embedding.linear_1", temb)
    temb = b.emit("silu", "time_embedding.act", [temb])
    temb = b.conv(te.linear_2, "time_embedding.linear_2", temb)
    # every ResnetBlock2D applies SiLU to the same embedding first: do it once
    temb_act = b.emit("silu", "resnets.time_act", [temb])

    h = b.conv(unet.conv_in, "conv_in", x)
    skips = [h]
    for i, blk in enumerate(unet.down_blocks):
        kind = type(blk).__name__
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise BadInput(f"opencl target: down block {kind} is not supported (DownBlock2D, AttnDownBlock2D)")
        attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
        for j, (res, att) in enumerate(zip(blk.resnets, attns)):
            h = b.resnet(res, f"down_blocks.{i}.resnets.{j}", h, temb_act)
            if att is not None:
                h = b.attention(att, f"down_blocks.{i}.attentions.{j}", h)
            skips.append(h)
        for j, ds in enumerate(blk.downsamplers or []):
            if type(ds).__name__ != "Downsample2D":
                raise BadInput(f"opencl target: downsampler {type(ds).__name__} is not supported (downsample_type 'conv')")
            h = b.downsample(ds, f"down_blocks.{i}.downsamplers.{j}", h)
            skips.append(h)
    if unet.mid_block is not None:
        mb = unet.mid_block
        if type(mb).__name__ != "UNetMidBlock2D":
            raise BadInput(f"opencl target: mid block {type(mb).__name__} is not supported")
        h = b.resnet(mb.resnets[0], "mid_block.resnets.0", h, temb_act)
        for j, (att, res) in enumerate(zip(mb.attentions, mb.resnets[1:])):
            if att is not None:
                h = b.attention(att, f"mid_block.attentions.{j}", h)
            h = b.resnet(res, f"mid_block.resnets.{j + 1}", h, temb_act)
    for i, blk in enumerate(unet.up_blocks):
        kind = type(blk).__name__
        if kind not in ("UpBlock2D", "AttnUpBlock2D"):
            raise BadInput(f"opencl target: up block {kind} is not supported (UpBlock2D, AttnUpBlock2D)")
        attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
        for j, (res, att) in enumerate(zip(blk.resnets, attns)):
            h = b.emit("concat", f"up_blocks.{i}.cat.{j}", [h, skips.pop()])
            h = b.resnet(res, f"up_blocks.{i}.resnets.{j}", h, temb_act)
            if att is not None:
                h = b.attention(att, f"up_blocks.{i}.attentions.{j}", h)
        for j, us in enumerate(blk.upsamplers or []):
            if type(us).__name__ != "Upsample2D":
                raise BadInput(f"opencl target: upsampler {type(us).__name__} is not supported (upsample_type 'conv')")
            h = b.upsample(us, f"up_blocks.{i}.upsamplers.{j}", h)
    if unet.conv_norm_out is not None:
        if not isinstance(unet.conv_act, nn.SiLU):
            raise BadInput("opencl target: only SiLU after conv_norm_out is supported")
        h = b.group_norm(unet.conv_norm_out, "conv_norm_out", h, silu=True)
    h = b.conv(unet.conv_out, "conv_out", h)
    b.ops[-1]["out"] = "out"
    sig = model.signature
    sched = {"version": SCHEDULE_VERSION, "arch": "UNet2DModel", "inputs": ["sample", "timestep"], "output": "out",
             "sample_shape": list(sig.sample_shape), "out_channels": int(cfg.out_channels), "ops": b.ops}
    return sched, b.weights


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
        self.dev: dict[str, Any] = {}
        self.winograd: dict[str, Any] = {}
        for name, t in weights.items():
            a = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
            if a.dtype == np.int8:  # integer weights of an int8 bundle
                self.dev[name] = rt.to_device(a, np.int8)
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
        if kind == "attention_fq":
            B, C, H, W = x.shape
            n, heads, d = H * W, op["heads"], op["head_dim"]

            def fq(a: Any, t: dict[str, Any]) -> Any:
                return rt.fake_quant_seg(a, [(0, t["scale"], t["zp"], t["qmin"], t["qmax"])])

            q, k, v = fq(x, op["q"]), fq(env[op["in"][1]], op["k"]), fq(env[op["in"][2]], op["v"])
            o = rt.attention_unfused(q, k, v, heads, d, n, n, scale=op["scale"], p_hook=lambda p: fq(p, op["p"]))
            return o.reshape(B, C, H, W)
        if kind == "group_norm":
            return rt.group_norm(x, self.dev[op["gamma"]], self.dev[op["beta"]], op["groups"], op["eps"], op["silu"])
        if kind == "silu":
            return rt.silu(x)
        if kind == "flash_attention":
            B, C3, H, W = x.shape
            C = C3 // 3
            n = H * W
            o = rt.flash_attention(x, x, x, op["heads"], op["head_dim"], n, n, 0, C * n, 2 * C * n, op["scale"])
            return o.reshape(B, C, H, W)
        if kind == "concat":
            return rt.concat(x, env[op["in"][1]])
        if kind == "upsample2x":
            return rt.upsample2x(x)
        if kind == "timestep_embedding":
            return rt.timestep_embedding(x, self.dev[op["freqs"]], op["dim"], op["flip"])
        if kind == "affine":
            return rt.affine(x, op["alpha"], op["beta"])
        raise BadInput(f"opencl schedule: unknown op {kind!r} ({op['name']})")

    def run(self, sample: torch.Tensor, timestep: torch.Tensor, timings: list[tuple[str, str, float]] | None = None
            ) -> torch.Tensor:
        """One denoiser call. With `timings` (a list), each op's time is appended: from its kernels'
        OpenCL event timestamps when the runtime's queue profiles, else wall time with the queue
        drained after the op."""
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
               "timestep": self.rt.to_device(t.contiguous(), np.float32)}
        for op, frees in zip(self.ops, self.frees):
            t0 = time.perf_counter() if timings is not None else 0.0
            self.rt.label = op["name"]
            env[op["out"]] = self._op(op, env)
            if timings is not None and not events:
                self.rt.finish()
                timings.append((op["name"], op["op"], (time.perf_counter() - t0) * 1e3))
            for name in frees:
                if name != op["out"]:
                    env.pop(name, None)
        out = env["out"].get()
        if events:
            per_op: dict[str, float] = {}
            for label, _, ms in self.rt.event_times():
                per_op[label] = per_op.get(label, 0.0) + ms
            timings.extend((op["name"], op["op"], per_op.get(op["name"], 0.0)) for op in self.ops)  # type: ignore[union-attr]
        return torch.from_numpy(out.astype(np.float32))
