"""A whole denoiser call as one integer program: the array's layers and the nonlinear units in graph order.

`build_program(model)` reads an int8 artifact (a diffusers UNet2DModel quantized by the edgediff quant
pass) through the shared int8 lowering (edgediff.lowering: weights, biases, input/output grids of every
integer layer, the attention operands) and walks the UNet's forward: time embedding (a table of int8
codes per timestep, then two linears), conv_in, down/mid/up blocks (ResnetBlock2D, Attention,
Downsample2D, Upsample2D), conv_norm_out + SiLU, conv_out. Every op is one of

    array      a conv / linear / attention matmul on the systolic array (fpga/sim.py's QLayer)
    gn         GroupNorm -> Q8 codes (real value / 256, int16)           nl_groupnorm
    act        SiLU / identity of Q8 codes onto an int8 grid (table)      nl_act_q8
    lut        a function of int8 codes (SiLU of the time embedding)      nl_lut
    requant    a change of grid                                           nl_requant
    add        residual add, add_bcast: + time embedding per channel      nl_add, nl_add_bcast
    softmax    attention logits -> int8 probabilities                     nl_softmax
    upsample   2x nearest;  permute: heads split/merged, (C, HW) <-> (HW, C);  concat: skip connections

`run_program` is the bit-accurate NumPy simulator of the call (the twins in fpga/sim.py and
fpga/nonlinear.py); fpga/callsim.py runs the same program in the C-simulation (hls/call_tb.cpp).

Where a tensor has an int8 grid in the artifact (every integer layer's input and output, the attention
operands) the program uses it. Tensors the artifact keeps in float between integer layers (residual
sums, the conv output plus time embedding, the concatenation of a skip connection) get a 16-bit grid
calibrated here from the artifact's simulation (CALIB_MARGIN x the largest magnitude seen).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.fpga import nonlinear as nl
from edgediff.fpga import sim
from edgediff.fpga.sim import ConvGeom, QLayer

from edgediff.errors import BadInput, Unavailable

CALIB_MARGIN = 2.0
CALIB_TIMESTEPS = (999, 800, 600, 400, 200, 50, 5)
I16 = (-32768, 32767)
FORMAT = "edgediff-fpga-program/1"


@dataclass(frozen=True)
class Grid:
    """x ~ (q - zp) * scale, q in [qmin, qmax]."""

    scale: float
    zp: int
    qmin: int
    qmax: int

    @classmethod
    def of(cls, a: Any) -> Grid:  # an ActQ of the lowering
        return cls(float(a.scale), int(a.zero_point), int(a.qmin), int(a.qmax))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        q = np.rint(np.asarray(x, np.float32) / np.float32(self.scale)) + self.zp
        return np.clip(q, self.qmin, self.qmax).astype(np.int64)


Q8 = Grid(1.0 / nl.Q8, 0, *I16)


@dataclass
class Op:
    op: str
    name: str
    ins: list[int]
    out: int
    cfg: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    layer: QLayer | None = None
    x_shape: tuple[int, ...] = ()  # array ops: the A operand's shape for one image
    x2_shape: tuple[int, ...] | None = None


@dataclass
class Program:
    ops: list[Op]
    sizes: dict[int, int]  # elements per image of every buffer
    grids: dict[int, Grid | None]  # None: int32 accumulators
    sample: int  # input buffers
    temb: int
    output: int
    sample_grid: Grid
    sample_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_scale: np.ndarray  # float32 per output channel: acc * s_x * s_w
    temb_table: np.ndarray  # (num_train_timesteps, D) int codes of the time embedding, linear_1's input grid
    calibrated: dict[str, float] = field(default_factory=dict)
    # DeepCache (fpga/deepcache.py): the cached deep feature's buffer, kept by a full call's run, an input of a
    # shallow program's
    feature: int | None = None

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for o in self.ops:
            counts[o.op] = counts.get(o.op, 0) + 1
        return {"ops": len(self.ops), "op_counts": counts, "array_layers": counts.get("array", 0),
                "buffers": len(self.sizes), "int16_grids": len(self.calibrated)}


# ------------------------------------------------------------------ building
def _qlayer(name: str, kind: str, part: Any, geometry: dict[str, Any]) -> QLayer:
    inp, out = part.input, part.output
    common: dict[str, Any] = {"s_x": float(inp.scale), "zp_x": int(inp.zero_point),
                              "s_w": np.asarray(part.weight_scale, np.float32).reshape(-1),
                              "bias": None if part.bias is None else np.asarray(part.bias, np.int64),
                              "x_signed": inp.qmin < 0, "w_bits": int(part.weight_bits)}
    if out is not None:
        common.update(out_scale=float(out.scale), out_zp=int(out.zero_point), out_bits=int(out.bits),
                      out_signed=out.qmin < 0)
    w = np.asarray(part.weight, np.int64)
    if kind == "conv":
        p = geometry["padding"]
        geom = ConvGeom(tuple(geometry["stride"]), (p[0], p[1], p[0], p[1]), tuple(geometry["dilation"]),
                        int(geometry["groups"]))
        return QLayer(name, "conv", w=w, geom=geom, op_type="Conv2d", **common)
    return QLayer(name, "gemm", w=w.T.copy(), op_type="Linear", **common)


class _Builder:
    def __init__(self, low: Any, amax: dict[str, float]) -> None:
        self.low, self.amax = low, amax
        self.ops: list[Op] = []
        self.sizes: dict[int, int] = {}
        self.grids: dict[int, Grid | None] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.calibrated: dict[str, float] = {}

    def buf(self, shape: tuple[int, ...], grid: Grid | None) -> int:
        i = len(self.sizes)
        self.sizes[i], self.grids[i], self.shapes[i] = int(np.prod(shape)), grid, tuple(shape)
        return i

    def emit(self, op: str, name: str, ins: list[int], shape: tuple[int, ...], grid: Grid | None,
             cfg: dict[str, int] | None = None, arrays: dict[str, np.ndarray] | None = None, **kw: Any) -> int:
        out = self.buf(shape, grid)
        self.ops.append(Op(op, name, ins, out, dict(cfg or {}), dict(arrays or {}), **kw))
        return out

    def g16(self, key: str) -> Grid:
        if key not in self.amax:
            raise Unavailable(f"FPGA program: no calibration range for {key}")
        a = max(self.amax[key], 1e-6) * CALIB_MARGIN
        self.calibrated[key] = a
        return Grid(a / I16[1], 0, *I16)

    def layer(self, path: str) -> Any:
        lay = self.low.layers.get(path)
        if lay is None:
            raise Unavailable(f"FPGA program: layer {path} is not an integer layer of the lowering (not quantized)")
        return lay

    # ---- units
    def requant(self, v: int, grid: Grid, name: str, off: int = 0, n: int | None = None,
                shape: tuple[int, ...] | None = None) -> int:
        src = self.grids[v]
        assert src is not None
        n = self.sizes[v] - off if n is None else n
        if src == grid and off == 0 and n == self.sizes[v]:
            return v
        return self.emit("requant", name, [v], shape or (n,), grid,
                         {"off": off, "zx": src.zp, "m": nl.requant_mult(src.scale, grid.scale), "zy": grid.zp,
                          "qmin": grid.qmin, "qmax": grid.qmax})

    def gn(self, v: int, mod: Any, name: str) -> int:
        src = self.grids[v]
        assert src is not None
        c = int(mod.num_channels)
        hw = self.sizes[v] // c
        if not mod.affine:
            raise Unavailable(f"FPGA program: GroupNorm {name} without affine parameters")
        p = nl.groupnorm_params(src.scale, src.zp, mod.weight.detach().double().numpy(),
                                mod.bias.detach().double().numpy(), float(mod.eps), int(mod.num_groups),
                                (c // int(mod.num_groups)) * hw, Q8.scale, 0, *I16, with_silu=False)
        cfg = {"zx": p.zx, "c": c, "hw": hw, "groups": p.groups, "eps_n2": p.eps_n2, "my": p.my, "zy": 0,
               "qmin": I16[0], "qmax": I16[1]}
        return self.emit("gn", name, [v], self.shapes[v], Q8, cfg, {"gamma": p.gamma, "beta": p.beta})

    def act(self, v: int, fn: Any, grid: Grid, name: str, off: int = 0, n: int | None = None,
            shape: tuple[int, ...] | None = None) -> int:
        n = self.sizes[v] - off if n is None else n
        lut, my = nl.act_q8_params(fn, grid.scale, grid.zp, grid.qmin, grid.qmax)
        return self.emit("act", name, [v], shape or (n,), grid,
                         {"off": off, "my": my, "zy": grid.zp, "qmin": grid.qmin, "qmax": grid.qmax, "ntab": lut.size},
                         {"lut": lut})

    def lut(self, v: int, fn: Any, grid: Grid, name: str) -> int:
        src = self.grids[v]
        assert src is not None
        lut = nl.lut_params(fn, src.scale, src.zp, src.qmin, src.qmax, grid.scale, grid.zp, grid.qmin, grid.qmax)
        return self.emit("lut", name, [v], self.shapes[v], grid, {"qmin_in": src.qmin, "ntab": lut.size}, {"lut": lut})

    def add(self, a: int, b: int, grid: Grid, name: str, factor: float = 1.0, bcast: bool = False) -> int:
        ga, gb = self.grids[a], self.grids[b]
        assert ga is not None and gb is not None
        ma, mb = nl.add_params(ga.scale / factor, gb.scale / factor, grid.scale)
        cfg = {"za": ga.zp, "zb": gb.zp, "ma": ma, "mb": mb, "zy": grid.zp, "qmin": grid.qmin, "qmax": grid.qmax}
        if bcast:
            c = self.sizes[b]
            cfg.update(c=c, hw=self.sizes[a] // c)
        return self.emit("add_bcast" if bcast else "add", name, [a, b], self.shapes[a], grid, cfg)

    def permute(self, v: int, d: tuple[int, int, int], perm: int, name: str) -> int:
        shape = tuple(d[i] for i in nl.PERMS[perm])
        return self.emit("permute", name, [v], shape, self.grids[v], {"d0": d[0], "d1": d[1], "d2": d[2], "perm": perm})

    def array(self, layer: QLayer, x: int, x_shape: tuple[int, ...], out_shape: tuple[int, ...],
              x2: int | None = None, x2_shape: tuple[int, ...] | None = None) -> int:
        want = Grid(layer.s_x, layer.zp_x, *sim.qrange(8, layer.x_signed))
        have = self.grids[x]
        if have is None or have.scale != want.scale or have.zp != want.zp:
            raise AssertionError(f"{layer.name}: input grid {have} is not the layer's {want}")
        grid = None if layer.out_scale is None else Grid(layer.out_scale, layer.out_zp,
                                                          *sim.qrange(layer.out_bits, layer.out_signed))
        return self.emit("array", layer.name, [x] if x2 is None else [x, x2], out_shape, grid, layer=layer,
                         x_shape=x_shape, x2_shape=x2_shape)

    def _int8_out(self, path: str, part: Any) -> None:
        if part.output is None and path != "conv_out":
            raise Unavailable(f"FPGA program: layer {path} has a float output (quantization parameters without output "
                              "requantization, made before it existed): the next unit needs its int8 grid")

    def conv_part(self, path: str, part: Any, x: int, shape: tuple[int, int, int]) -> tuple[int, tuple[int, int, int]]:
        lay = self.layer(path)
        self._int8_out(path, part)
        a, e = part.channels
        name = path if len(lay.parts) == 1 else (f"{path}[:{e}]" if a == lay.parts[0].channels[0] else f"{path}[{a}:]")
        q = _qlayer(name, "conv", part, lay.geometry)
        c, h, w = shape
        assert q.w is not None
        ho, wo = q.geom.out_hw(h, w, q.w.shape[2], q.w.shape[3])
        oshape = (q.w.shape[0], ho, wo)
        return self.array(q, x, (1, c, h, w), oshape), oshape

    def linear(self, path: str, x: int, m: int) -> int:
        lay = self.layer(path)
        if len(lay.parts) != 1:
            raise Unavailable(f"FPGA program: linear {path} has a split input")
        self._int8_out(path, lay.parts[0])
        q = _qlayer(path, "gemm", lay.parts[0], {})
        assert q.w is not None
        return self.array(q, x, (m, q.w.shape[0]), (m, q.w.shape[1]))

    def conv_on(self, path: str, segs: list[tuple[int, int]], shape: tuple[int, int, int], name: str,
                out_grid: Grid | None = None) -> tuple[int, tuple[int, int, int]]:
        """A conv whose input is the channel concatenation of `segs` (buffer, channels); parts requantized."""
        lay = self.layer(path)
        _, h, w = shape
        outs = []
        oshape: tuple[int, int, int] = (0, 0, 0)
        for part in lay.parts:
            a, b = part.channels
            grid = Grid.of(part.input)
            pieces, start = [], 0
            for v, ch in segs:  # the segments' channels inside [a, b)
                lo, hi = max(a, start), min(b, start + ch)
                if lo < hi:
                    pieces.append(self.requant(v, grid, f"{name}.in{len(pieces)}", (lo - start) * h * w,
                                               (hi - lo) * h * w, (hi - lo, h, w)))
                start += ch
            xin = pieces[0] if len(pieces) == 1 else self.emit("concat", f"{name}.cat", pieces, (b - a, h, w), grid)
            o, oshape = self.conv_part(path, part, xin, (b - a, h, w))
            outs.append(o)
        if len(outs) == 1:
            return outs[0], oshape
        if out_grid is None:
            raise Unavailable(f"FPGA program: split layer {path} needs a grid for its summed parts")
        return self.add(outs[0], outs[1], out_grid, f"{name}.sum"), oshape


def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def _ident(v: np.ndarray) -> np.ndarray:
    return v


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise Unavailable(f"FPGA program: {what} is not supported by the whole-call program")


def _resnet(b: _Builder, mod: Any, path: str, segs: list[tuple[int, int]], shape: tuple[int, int, int],
            temb: int) -> tuple[int, tuple[int, int, int]]:
    import torch

    _require(mod.upsample is None and mod.downsample is None, f"{path}: a resampling ResnetBlock2D")
    _require(mod.time_embedding_norm == "default" and not mod.skip_time_act, f"{path}: time_embedding_norm")
    _require(isinstance(mod.nonlinearity, torch.nn.SiLU), f"{path}: a non-SiLU nonlinearity")
    c_in, h, w = shape
    if len(segs) == 1:
        x = segs[0][0]
    else:  # GroupNorm over a skip concatenation: both halves onto one 16-bit grid
        g = b.g16(f"gnin:{path}.norm1")
        x = b.emit("concat", f"{path}.cat", [b.requant(v, g, f"{path}.cat{i}", shape=(ch, h, w))
                                            for i, (v, ch) in enumerate(segs)], shape, g)
    t = b.gn(x, mod.norm1, f"{path}.norm1")
    lay = b.layer(f"{path}.conv1")
    outs, oshape = [], (0, 0, 0)
    for part in lay.parts:
        a, e = part.channels
        xa = b.act(t, _silu, Grid.of(part.input), f"{path}.norm1.silu[{a}:{e}]", a * h * w, (e - a) * h * w,
                   (e - a, h, w))
        o, oshape = b.conv_part(f"{path}.conv1", part, xa, (e - a, h, w))
        outs.append(o)
    hbuf = outs[0] if len(outs) == 1 else b.add(outs[0], outs[1], b.g16(f"out:{path}.conv1"), f"{path}.conv1.sum")
    tep = b.layer(f"{path}.time_emb_proj").parts[0]
    e_act = b.lut(temb, _silu, Grid.of(tep.input), f"{path}.temb.silu")
    e_out = b.linear(f"{path}.time_emb_proj", e_act, 1)
    h2 = b.add(hbuf, e_out, b.g16(f"gnin:{path}.norm2"), f"{path}.temb.add", bcast=True)
    t2 = b.gn(h2, mod.norm2, f"{path}.norm2")
    c2p = b.layer(f"{path}.conv2").parts
    _require(len(c2p) == 1, f"{path}.conv2 split")
    a2 = b.act(t2, _silu, Grid.of(c2p[0].input), f"{path}.norm2.silu", shape=oshape)
    c2, oshape = b.conv_part(f"{path}.conv2", c2p[0], a2, oshape)
    g_out = b.g16(f"out:{path}")
    if mod.conv_shortcut is not None:
        _require(mod.use_in_shortcut is not False, f"{path}: conv_shortcut")
        sc, _ = b.conv_on(f"{path}.conv_shortcut", segs, (c_in, h, w), f"{path}.conv_shortcut", g_out)
    else:
        _require(len(segs) == 1, f"{path}: a concatenated input without conv_shortcut")
        sc = x
    return b.add(sc, c2, g_out, f"{path}.residual", factor=float(mod.output_scale_factor)), oshape


def _attention(b: _Builder, mod: Any, path: str, x: int, shape: tuple[int, int, int]) -> int:
    from edgediff.attention import direct_producers

    _require(mod.spatial_norm is None and mod.group_norm is not None and mod.residual_connection,
             f"{path}: attention without group_norm/residual")
    _require(getattr(mod, "norm_q", None) is None and getattr(mod, "norm_k", None) is None
             and set(direct_producers(mod)) == {"q", "k", "v"}, f"{path}: packed or normalized Q/K")
    att = b.low.attentions.get(path)
    _require(att is not None and att.output is not None, f"{path}: an attention with float operands/output")
    c, h, w = shape
    s = h * w
    heads = int(att.heads)
    d = c // heads
    t = b.gn(x, mod.group_norm, f"{path}.group_norm")
    tt = b.permute(t, (1, c, s), 2, f"{path}.tokens")
    acts: dict[Grid, int] = {}
    ops = {}
    for which in ("q", "k", "v"):
        lp = f"{path}.to_{which}"
        part = b.layer(lp).parts[0]
        g = Grid.of(part.input)
        if g not in acts:
            acts[g] = b.act(tt, _ident, g, f"{path}.group_norm.to[{which}]", shape=(s, c))
        want = Grid.of(getattr(att, which))
        _require(part.output is not None and Grid.of(part.output) == want, f"{lp}: output not on the operand grid")
        ops[which] = b.linear(lp, acts[g], s)
    qh = b.permute(ops["q"], (s, heads, d), 0, f"{path}.q.heads")
    kt = b.permute(ops["k"], (s, heads, d), 1, f"{path}.k.heads_t")
    vh = b.permute(ops["v"], (s, heads, d), 0, f"{path}.v.heads")
    gq, gk, gp, gv, go = (Grid.of(a) for a in (att.q, att.k, att.p, att.v, att.output))
    qk = QLayer(f"{path}:qk", "matmul", gq.scale, gq.zp, np.asarray(gk.scale, np.float32), zp_w=gk.zp,
                x_signed=gq.qmin < 0, x2_signed=gk.qmin < 0, op_type="MatMul")
    logits = b.array(qk, qh, (heads, s, d), (heads, s, s), kt, (heads, d, s))
    s_logit = float(np.float32(att.qk_scale) * np.float32(att.scale))
    sp = nl.softmax_params(s_logit, gp.scale, gp.zp, gp.qmin, gp.qmax)
    probs = b.emit("softmax", f"{path}.softmax", [logits], (heads, s, s), gp,
                   {"rows": heads * s, "len": s, "ms": sp.ms, "mp": sp.mp, "zy": sp.zy, "qmin": sp.qmin,
                    "qmax": sp.qmax, "ntab": sp.exp_lut.size}, {"lut": sp.exp_lut})
    pv = QLayer(f"{path}:av", "matmul", gp.scale, gp.zp, np.asarray(gv.scale, np.float32), zp_w=gv.zp,
                out_scale=go.scale, out_zp=go.zp, out_signed=go.qmin < 0, x_signed=gp.qmin < 0,
                x2_signed=gv.qmin < 0, op_type="MatMul")
    o = b.array(pv, probs, (heads, s, s), (heads, s, d), vh, (heads, s, d))
    merged = b.permute(o, (heads, s, d), 0, f"{path}.merge")
    po = b.linear(f"{path}.to_out.0", merged, s)
    back = b.permute(po, (1, s, c), 2, f"{path}.to_chw")
    return b.add(back, x, b.g16(f"out:{path}"), f"{path}.residual", factor=float(mod.rescale_output_factor))


def calibrate(model: Any, seed: int = 0, batch: int = 4) -> dict[str, float]:
    """Largest magnitude of the tensors the artifact keeps in float between integer layers (its simulation)."""
    import torch
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    unet = _unet_of(model.denoiser)  # the artifact's own modules (quantization wrappers in place)
    amax: dict[str, float] = {}

    def rec(key: str, v: torch.Tensor) -> None:
        amax[key] = max(amax.get(key, 0.0), float(v.detach().abs().max()))

    hooks = []
    for n, m in unet.named_modules():
        if isinstance(m, ResnetBlock2D):
            hooks.append(m.register_forward_hook(lambda _m, _a, o, _n=n: rec(f"out:{_n}", o)))
            hooks.append(m.norm1.register_forward_pre_hook(lambda _m, a, _n=n: rec(f"gnin:{_n}.norm1", a[0])))
            hooks.append(m.norm2.register_forward_pre_hook(lambda _m, a, _n=n: rec(f"gnin:{_n}.norm2", a[0])))
            hooks.append(m.conv1.register_forward_hook(lambda _m, _a, o, _n=n: rec(f"out:{_n}.conv1", o)))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(lambda _m, _a, o, _n=n: rec(f"out:{_n}", o)))
    from edgediff.sampling import TorchDenoiser

    den = TorchDenoiser(model, use_cache=False)
    try:
        with torch.inference_mode():
            for i, t in enumerate(CALIB_TIMESTEPS):
                t = min(t, model.schedule.num_train_timesteps - 1)
                inp = model.signature.example_inputs(batch=batch, seed=seed + i)
                den(inp["sample"], torch.full((batch,), float(t)), None)
    finally:
        for h in hooks:
            h.remove()
    return amax


def _unet_of(den: Any) -> Any:
    from diffusers import UNet2DModel

    for m in (den, getattr(den, "unet", None), getattr(den, "inner", None)):
        if isinstance(m, UNet2DModel):
            return m
    raise Unavailable(f"FPGA program: the whole-call program covers diffusers UNet2DModel denoisers, not "
                      f"{type(den).__name__}")


def build_program(model: Any, seed: int = 0) -> Program:
    """The integer program of one denoiser call of `model` (an int8 artifact), per image."""
    import torch

    from edgediff.lowering import lower_model
    from edgediff.quant_params import QuantParams

    if QuantParams.of(model) is None:
        raise BadInput("the model carries no quantization parameters: the FPGA program runs an int8 artifact")
    den, low = lower_model(model)
    unet = _unet_of(den)
    cfg = unet.config
    _require(not cfg.center_input_sample and cfg.time_embedding_type == "positional"
             and unet.class_embedding is None, "center_input_sample / fourier time embedding / class embedding")
    b = _Builder(low, calibrate(model, seed))
    c_in, h, w = model.signature.sample_shape
    # time embedding: the table row (linear_1's input codes of the sinusoidal projection) -> linear_1 -> SiLU -> linear_2
    te = unet.time_embedding
    _require(isinstance(te.act, torch.nn.SiLU) and te.cond_proj is None and te.post_act is None, "time embedding")
    l1 = b.layer("time_embedding.linear_1").parts[0]
    n_t = int(model.schedule.num_train_timesteps)
    with torch.no_grad():
        proj = unet.time_proj(torch.arange(n_t, dtype=torch.float32)).float().numpy()
    g1 = Grid.of(l1.input)
    table = g1.quantize(proj)
    temb_in = b.buf((1, proj.shape[1]), g1)
    e = b.linear("time_embedding.linear_1", temb_in, 1)
    e = b.lut(e, _silu, Grid.of(b.layer("time_embedding.linear_2").parts[0].input), "time_embedding.act")
    temb = b.linear("time_embedding.linear_2", e, 1)
    # conv_in
    ci = b.layer("conv_in").parts
    _require(len(ci) == 1, "conv_in split")
    sample = b.buf((c_in, h, w), Grid.of(ci[0].input))
    x, shape = b.conv_part("conv_in", ci[0], sample, (c_in, h, w))
    skips: list[tuple[int, tuple[int, int, int]]] = [(x, shape)]
    for i, blk in enumerate(unet.down_blocks):
        p = f"down_blocks.{i}"
        attns = getattr(blk, "attentions", None)
        for j, res in enumerate(blk.resnets):
            x, shape = _resnet(b, res, f"{p}.resnets.{j}", [(x, shape[0])], shape, temb)
            if attns is not None:
                x = _attention(b, attns[j], f"{p}.attentions.{j}", x, shape)
            skips.append((x, shape))
        for j, ds in enumerate(blk.downsamplers or []):
            _require(ds.use_conv and ds.padding != 0 and ds.norm is None, f"{p}.downsamplers.{j}")
            x, shape = b.conv_on(f"{p}.downsamplers.{j}.conv", [(x, shape[0])], shape, f"{p}.downsamplers.{j}")
            skips.append((x, shape))
    mid = unet.mid_block
    if mid is not None:
        x, shape = _resnet(b, mid.resnets[0], "mid_block.resnets.0", [(x, shape[0])], shape, temb)
        for j, (att, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            if att is not None:
                x = _attention(b, att, f"mid_block.attentions.{j}", x, shape)
            x, shape = _resnet(b, res, f"mid_block.resnets.{j + 1}", [(x, shape[0])], shape, temb)
    for i, blk in enumerate(unet.up_blocks):
        p = f"up_blocks.{i}"
        attns = getattr(blk, "attentions", None)
        for j, res in enumerate(blk.resnets):
            sv, sshape = skips.pop()
            x, shape = _resnet(b, res, f"{p}.resnets.{j}", [(x, shape[0]), (sv, sshape[0])],
                               (shape[0] + sshape[0], shape[1], shape[2]), temb)
            if attns is not None:
                x = _attention(b, attns[j], f"{p}.attentions.{j}", x, shape)
        for j, us in enumerate(blk.upsamplers or []):
            _require(us.use_conv and not us.use_conv_transpose and us.interpolate and us.norm is None,
                     f"{p}.upsamplers.{j}")
            part = b.layer(f"{p}.upsamplers.{j}.conv").parts[0]
            xq = b.requant(x, Grid.of(part.input), f"{p}.upsamplers.{j}.in", shape=shape)
            c, hh, ww = shape
            xu = b.emit("upsample", f"{p}.upsamplers.{j}.nearest", [xq], (c, 2 * hh, 2 * ww), Grid.of(part.input),
                        {"c": c, "h": hh, "w": ww})
            x, shape = b.conv_part(f"{p}.upsamplers.{j}.conv", part, xu, (c, 2 * hh, 2 * ww))
    _require(isinstance(unet.conv_act, torch.nn.SiLU), "conv_act")
    t = b.gn(x, unet.conv_norm_out, "conv_norm_out")
    co = b.layer("conv_out").parts
    _require(len(co) == 1 and co[0].output is None, "conv_out with an int8 output")
    a = b.act(t, _silu, Grid.of(co[0].input), "conv_act", shape=shape)
    out, oshape = b.conv_part("conv_out", co[0], a, shape)
    return Program(b.ops, b.sizes, b.grids, sample, temb_in, out, b.grids[sample], (c_in, h, w), oshape,  # type: ignore[arg-type]
                   np.asarray(co[0].acc_scale, np.float32), table.astype(np.int32), b.calibrated)


# ------------------------------------------------------------------ the cycle model of a whole call (an estimate)
UNIT_LAT = 8  # pipeline fill charged per unit invocation (assumption)
ISQRT_CLK, DIV_CLK = 32, 64  # nl_isqrt's 32 iterations; a 64-bit divide per group / row (assumption)
CALL_ASSUMPTIONS = ("array layers: the DATAFLOW cycle model (equal to the C-simulation's counted clocks) with the DRAM "
                    "floor; units: one element per clock per pass (II=1: GroupNorm 2 passes, softmax 3), a table "
                    "copied on chip per invocation (one entry per clock), 32 clocks per square root, 64 per divide, "
                    f"{UNIT_LAT} clocks of pipeline fill per invocation; ops run one after another through "
                    "edgediff_top (no overlap of the units with the array); concatenations counted as a copy")


def unit_cycles(o: Op, n: int) -> int:
    """Clocks of one unit op with n output elements (the model above)."""
    c = o.cfg
    base = {"gn": 2 * n + c.get("groups", 0) * (ISQRT_CLK + DIV_CLK),
            "softmax": 3 * n + c.get("rows", 0) * DIV_CLK}.get(o.op, n)
    return base + int(c.get("ntab", 0)) + UNIT_LAT


def call_estimate(prog: Program, rows: int = 16, cols: int = 16, clock_mhz: float = 200.0, k_tile: int = 512,
                  dram_gbs: float | None = None) -> dict[str, Any]:
    """Estimated clocks of one call (one image): per array layer and per unit kind, the total and ms."""
    from edgediff.fpga import estimate
    from edgediff.fpga.graph import ExtractedLayer

    dram = estimate.DEFAULT_DRAM_GBS if dram_gbs is None else dram_gbs
    arr = [o for o in prog.ops if o.op == "array"]
    dicts = [ExtractedLayer(o.layer, o.name, o.layer.op_type or o.layer.kind, None, None, o.x_shape,  # type: ignore[arg-type]
                            o.x2_shape).as_dict() for o in arr]
    est = estimate.estimate_layers(dicts, rows, cols, clock_mhz, k_tile, dram)
    array_cycles = sum(int(e["cycles"]) for e in est)
    units: dict[str, dict[str, int]] = {}
    for o in prog.ops:
        if o.op == "array":
            continue
        u = units.setdefault(o.op, {"ops": 0, "elements": 0, "cycles": 0})
        u["ops"] += 1
        u["elements"] += prog.sizes[o.out]
        u["cycles"] += unit_cycles(o, prog.sizes[o.out])
    unit_total = sum(u["cycles"] for u in units.values())
    total = array_cycles + unit_total
    macs = sum(int(e["macs"]) for e in est)
    secs = total / (clock_mhz * 1e6)
    res, ures = estimate.resources(rows, cols, k_tile), estimate.unit_resources()
    dsp = int(res["dsp"]) + int(ures["dsp"])
    gops = 2 * macs / secs / 1e9 if secs else 0.0
    return {"latency_is": "estimate", "assumptions": CALL_ASSUMPTIONS, "clock_mhz": clock_mhz, "rows": rows,
            "cols": cols, "dram_gbs": dram, "array_cycles": array_cycles,
            "array_pipeline_cycles": sum(int(e["pipeline_cycles"]) for e in est), "unit_cycles": unit_total,
            "units": units, "table_copy_cycles": sum(int(o.cfg.get("ntab", 0)) for o in prog.ops),
            "total_cycles": total, "ms_per_call": round(total / clock_mhz / 1000.0, 4),
            "array_share": array_cycles / total if total else 0.0, "macs": macs, "gops": round(gops, 2),
            "dsp": dsp, "gops_per_dsp": round(gops / dsp, 4) if dsp else 0.0,
            "resources": {"array": res, "units": ures},
            "utilisation_whole_call": macs / (total * rows * cols) if total else 0.0, "layers": est}


# ------------------------------------------------------------------ the bit-accurate simulator of a call
def array_accumulate(layer: QLayer, x: np.ndarray, x2: np.ndarray | None) -> np.ndarray:
    """QLayer.accumulate in float64 BLAS (exact: every sum stays below 2^53), batched over the leading axis."""
    import torch
    import torch.nn.functional as F

    if layer.kind == "conv":
        assert layer.w is not None
        g = layer.geom
        xt = torch.from_numpy(np.asarray(x, np.float64) - layer.zp_x)
        pt, pl, pb, pr = g.pads
        if (pt, pl) != (pb, pr):
            xt = F.pad(xt, (pl, pr, pt, pb))
            pad: tuple[int, int] = (0, 0)
        else:
            pad = (pt, pl)
        acc = F.conv2d(xt, torch.from_numpy(layer.w.astype(np.float64)), None, g.stride, pad, g.dilation,
                       g.groups).numpy()
        if layer.bias is not None:
            acc = acc + np.asarray(layer.bias, np.float64).reshape(1, -1, 1, 1)
    elif layer.kind == "gemm":
        assert layer.w is not None
        acc = (np.asarray(x, np.float64) - layer.zp_x) @ layer.w.astype(np.float64)
        if layer.bias is not None:
            acc = acc + np.asarray(layer.bias, np.float64)
    else:
        assert x2 is not None
        acc = (np.asarray(x, np.float64) - layer.zp_x) @ (np.asarray(x2, np.float64) - layer.zp_w)
    return np.rint(acc).astype(np.int64)


def array_run(layer: QLayer, x: np.ndarray, x2: np.ndarray | None = None) -> np.ndarray:
    """QLayer.run(x, x2, "ort") bit for bit, faster (tests/test_fpga_program.py checks the equality)."""
    acc = array_accumulate(layer, x, x2)
    sim.check_int32(acc, f"{layer.name}: accumulator")
    if layer.out_scale is None:
        return acc
    lo, hi = sim.qrange(layer.out_bits, layer.out_signed)
    axis = 1 if layer.kind == "conv" else acc.ndim - 1
    return sim.requantize(acc, layer.s_x, layer.s_w, layer.out_scale, layer.out_zp, lo, hi, "ort", axis).astype(np.int64)


def _step(o: Op, bufs: dict[int, np.ndarray], sizes: dict[int, int]) -> np.ndarray:
    c = o.cfg
    x = bufs[o.ins[0]]
    nb = x.shape[0]
    n = sizes[o.out]
    if o.op == "array":
        assert o.layer is not None
        xs = x.reshape(nb, *o.x_shape[1:]) if o.layer.kind == "conv" else x.reshape(nb, *o.x_shape)
        x2 = None if o.x2_shape is None else bufs[o.ins[1]].reshape(nb, *o.x2_shape)
        return array_run(o.layer, xs, x2).reshape(nb, -1)
    if o.op == "gn":
        p = nl.GroupNormParams(c["zx"], c["groups"], c["eps_n2"], o.arrays["gamma"], o.arrays["beta"], None, c["my"],
                               c["zy"], c["qmin"], c["qmax"])
        return np.stack([nl.groupnorm_int(xi.reshape(c["c"], c["hw"]), p).ravel() for xi in x]).astype(np.int64)
    if o.op == "act":
        return nl.act_q8_int(x[:, c["off"]:c["off"] + n], o.arrays["lut"], c["my"], c["zy"], c["qmin"],
                             c["qmax"]).astype(np.int64)
    if o.op == "lut":
        return nl.lut_int(x, c["qmin_in"], o.arrays["lut"]).astype(np.int64)
    if o.op == "requant":
        return nl.requant_int(x[:, c["off"]:c["off"] + n], c["zx"], c["m"], c["zy"], c["qmin"], c["qmax"]).astype(np.int64)
    if o.op == "add":
        return nl.add_int(x, bufs[o.ins[1]], c["za"], c["zb"], c["ma"], c["mb"], c["zy"], c["qmin"],
                          c["qmax"]).astype(np.int64)
    if o.op == "add_bcast":
        bb = bufs[o.ins[1]]
        return np.stack([nl.add_bcast_int(x[i].reshape(c["c"], c["hw"]), bb[i], c["za"], c["zb"], c["ma"], c["mb"],
                                          c["zy"], c["qmin"], c["qmax"]).ravel() for i in range(nb)]).astype(np.int64)
    if o.op == "softmax":
        p = nl.SoftmaxParams(c["ms"], o.arrays["lut"], c["mp"], c["zy"], c["qmin"], c["qmax"])
        return nl.softmax_int(x.reshape(nb * c["rows"], c["len"]), p).reshape(nb, -1).astype(np.int64)
    if o.op == "upsample":
        return nl.upsample2x_int(x.reshape(nb, c["c"], c["h"], c["w"])).reshape(nb, -1).astype(np.int64)
    if o.op == "permute":
        perm = (0, *(i + 1 for i in nl.PERMS[c["perm"]]))
        return np.ascontiguousarray(x.reshape(nb, c["d0"], c["d1"], c["d2"]).transpose(perm)).reshape(nb, -1)
    if o.op == "concat":
        return np.concatenate([bufs[i] for i in o.ins], axis=1)
    raise ValueError(f"unknown program op {o.op!r}")


def _ideal_step(o: Op, bufs: dict[int, np.ndarray], prog: Program) -> np.ndarray:
    """GroupNorm / softmax in float64 from the dequantized input, rounded onto the op's own output grid: what the
    unit would give without its fixed-point arithmetic (for measuring what that arithmetic costs)."""
    c, x = o.cfg, bufs[o.ins[0]]
    gin, gout = prog.grids[o.ins[0]], prog.grids[o.out]
    assert gout is not None
    nb = x.shape[0]
    if o.op == "gn":
        assert gin is not None
        n = (c["c"] // c["groups"]) * c["hw"]
        eps = c["eps_n2"] * gin.scale**2 / n**2
        v = (x.reshape(nb, c["c"], c["hw"]) - gin.zp) * gin.scale
        y = np.stack([nl.groupnorm_float(vi, o.arrays["gamma"] / 2**16, o.arrays["beta"] / 2**32, c["groups"], eps,
                                         False) for vi in v])
    else:
        logits = x.reshape(nb, c["rows"], c["len"]) * (c["ms"] / (256 * 2.0**32))
        e = np.exp(logits - logits.max(-1, keepdims=True))
        y = e / e.sum(-1, keepdims=True)
    return np.clip(np.rint(y / gout.scale) + gout.zp, gout.qmin, gout.qmax).astype(np.int64).reshape(nb, -1)


def run_program(prog: Program, sample_codes: np.ndarray, temb_codes: np.ndarray,
                keep: bool = False, ideal: frozenset[str] = frozenset(),
                feature_codes: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Run the call for a batch: inputs (B, ...) int codes; returns the buffers (B, elements) (all with keep;
    the output and the DeepCache feature always).

    `ideal` ("gn", "softmax"): those units in float (_ideal_step), to measure their fixed point's cost.
    `feature_codes`: a shallow program's cached feature (the buffer `prog.feature` of a full call's run).
    """
    nb = sample_codes.shape[0]
    bufs = {prog.sample: np.asarray(sample_codes, np.int64).reshape(nb, -1),
            prog.temb: np.asarray(temb_codes, np.int64).reshape(nb, -1)}
    if feature_codes is not None:
        assert prog.feature is not None
        bufs[prog.feature] = np.asarray(feature_codes, np.int64).reshape(nb, -1)
    last_use: dict[int, int] = {}
    for i, o in enumerate(prog.ops):
        for j in o.ins:
            last_use[j] = i
    for i, o in enumerate(prog.ops):
        bufs[o.out] = _ideal_step(o, bufs, prog) if o.op in ideal else _step(o, bufs, prog.sizes)
        if not keep:  # free what no later op reads
            for j in o.ins:
                if last_use.get(j) == i and j != prog.output and j != prog.feature:
                    bufs.pop(j, None)
    return bufs


def call_inputs(prog: Program, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The program's input codes for float samples x (B, C, H, W) at integer timesteps t (B,)."""
    tt = np.asarray(t, np.float64).reshape(-1)
    ti = np.rint(tt).astype(np.int64)
    if np.any(np.abs(tt - ti) > 1e-6) or ti.min() < 0 or ti.max() >= prog.temb_table.shape[0]:
        raise BadInput(f"the FPGA program takes integer timesteps in [0, {prog.temb_table.shape[0]}), got {tt[:4]}")
    ti = np.broadcast_to(ti, (x.shape[0],)) if ti.size == 1 else ti
    return prog.sample_grid.quantize(x), prog.temb_table[ti]


def dequantize_output(prog: Program, acc: np.ndarray) -> np.ndarray:
    nb = acc.shape[0]
    a = acc.reshape(nb, prog.output_shape[0], -1).astype(np.float32) * prog.output_scale.reshape(1, -1, 1)
    return a.reshape(nb, *prog.output_shape).astype(np.float32)


def extracted_layers(prog: Program, sample_codes: np.ndarray, temb_codes: np.ndarray) -> Any:
    """The program's array layers with the inputs they see in this call: what the per-layer project checks
    (C-sim vs simulator, ONNX Runtime vs simulator), so per-layer and whole-call checks run the same layers."""
    from edgediff.fpga.graph import Extracted, ExtractedLayer

    bufs = run_program(prog, sample_codes[:1], temb_codes[:1], keep=True)
    ext = Extracted("artifact (edgediff.lowering)")
    for o in prog.ops:
        if o.op != "array":
            continue
        assert o.layer is not None
        x = bufs[o.ins[0]].reshape(o.x_shape)
        x2 = None if o.x2_shape is None else bufs[o.ins[1]].reshape(o.x2_shape)
        ext.layers.append(ExtractedLayer(o.layer, o.name, o.layer.op_type or o.layer.kind, x, x2, tuple(x.shape),
                                         None if x2 is None else tuple(x2.shape)))
    ext.host_ops.append({"name": "time_proj", "op": "TimestepTable", "what": "the sinusoidal timestep embedding as "
                         "a table of linear_1's int8 input codes per timestep (computed at export; a ROM on the "
                         "board); every other op runs on the array or the units (call/program.json)", "macs": 0,
                         "elements": int(prog.temb_table.shape[1])})
    return ext


# ------------------------------------------------------------------ storage (json + npz, no pickle)
_LAYER_SCALARS = ("name", "kind", "s_x", "zp_x", "zp_w", "out_scale", "out_zp", "out_bits", "out_signed", "x_signed",
                  "w_bits", "x2_signed", "op_type")


def save_program(prog: Program, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"temb_table": prog.temb_table, "output_scale": prog.output_scale}
    ops = []
    for i, o in enumerate(prog.ops):
        rec: dict[str, Any] = {"op": o.op, "name": o.name, "ins": o.ins, "out": o.out, "cfg": o.cfg,
                               "arrays": sorted(o.arrays), "x_shape": list(o.x_shape),
                               "x2_shape": None if o.x2_shape is None else list(o.x2_shape)}
        for k, v in o.arrays.items():
            arrays[f"{i}.{k}"] = np.asarray(v)
        if o.layer is not None:
            lay = o.layer
            rec["layer"] = {k: getattr(lay, k) for k in _LAYER_SCALARS}
            rec["layer"]["geom"] = [list(lay.geom.stride), list(lay.geom.pads), list(lay.geom.dilation), lay.geom.groups]
            for k in ("s_w", "w", "bias"):
                if getattr(lay, k) is not None:
                    arrays[f"{i}.layer.{k}"] = np.asarray(getattr(lay, k))
        ops.append(rec)
    grid = (lambda g: None if g is None else [g.scale, g.zp, g.qmin, g.qmax])
    meta = {"format": FORMAT, "ops": ops, "sizes": {str(k): v for k, v in prog.sizes.items()},
            "grids": {str(k): grid(g) for k, g in prog.grids.items()}, "sample": prog.sample, "temb": prog.temb,
            "output": prog.output, "sample_grid": grid(prog.sample_grid), "sample_shape": list(prog.sample_shape),
            "output_shape": list(prog.output_shape), "calibrated": prog.calibrated, "summary": prog.summary(),
            "feature": prog.feature}
    (folder / "program.json").write_text(json.dumps(meta, default=float) + "\n")
    np.savez_compressed(folder / "program.npz", **arrays)


def load_program(folder: Path) -> Program:
    from edgediff.files import read_json

    path = Path(folder) / "program.json"
    if not path.is_file():
        raise BadInput(f"{folder}: no whole-call program (program.json)")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise BadInput(f"{path}: not an FPGA whole-call program ({meta.get('format')!r})")
    try:
        with np.load(Path(folder) / "program.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise BadInput(f"{Path(folder) / 'program.npz'}: unreadable ({e})") from None
    ops = []
    for i, r in enumerate(meta["ops"]):
        layer = None
        if "layer" in r:
            lk = dict(r["layer"])
            st, pads, dil, groups = lk.pop("geom")
            layer = QLayer(**lk, s_w=arrays[f"{i}.layer.s_w"], w=arrays.get(f"{i}.layer.w"),
                           bias=arrays.get(f"{i}.layer.bias"), geom=ConvGeom(tuple(st), tuple(pads), tuple(dil), groups))
        ops.append(Op(r["op"], r["name"], list(r["ins"]), int(r["out"]), {k: int(v) for k, v in r["cfg"].items()},
                      {k: arrays[f"{i}.{k}"] for k in r["arrays"]}, layer, tuple(r["x_shape"]),
                      None if r["x2_shape"] is None else tuple(r["x2_shape"])))
    grid = (lambda g: None if g is None else Grid(float(g[0]), int(g[1]), int(g[2]), int(g[3])))
    sg = grid(meta["sample_grid"])
    assert sg is not None
    return Program(ops, {int(k): int(v) for k, v in meta["sizes"].items()},
                   {int(k): grid(g) for k, g in meta["grids"].items()}, int(meta["sample"]), int(meta["temb"]),
                   int(meta["output"]), sg, tuple(meta["sample_shape"]), tuple(meta["output_shape"]),
                   arrays["output_scale"], arrays["temb_table"], dict(meta.get("calibrated", {})),
                   None if meta.get("feature") is None else int(meta["feature"]))
