"""QuantParams -> integer layers, computed once for every int8 backend.

`lower(denoiser, qp)` reads the float denoiser (quantization wrappers stripped: its weights lie
on the quantization grid) and the artifact's QuantParams and returns a `LoweredModel`:

- `layers[name]`: a `LoweredLayer` per quantized Conv2d/Linear, made of one `IntPart` (or two
  for a shortcut-split layer: one integer layer per concatenated half, their float outputs
  summed), each with int8 weights, per-channel weight scales, the input's scale/zero point,
  int32 bias (at scale s_x * s_w, in the first part only), the output quantization and the
  requantization multipliers (float32 form and TFLite fixed-point form).
- `attentions[path]`: a `LoweredAttention` per quantized attention: the operands Q, K, softmax
  output P, V, the logit scale, and the output quantization of softmax(QK^T)V when the output
  projection consumes int8 (then the matmul writes to_out's input directly).

Where the output goes: `IntPart.output` is None for a float output (the last layer), the
layer's own calibrated output quantization, or the quantization of the op that consumes it
directly (`output_source` names it: "attn.path:q" for to_q feeding the Q operand). In the
latter case no requantization happens in between: the integer projection writes the
operand's int8. The PyTorch simulation (edgediff.quant.core) applies the same rule
(link_attention_outputs), so it computes what the runtimes compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.lowering.arith import multiplier, quantize_multipliers
from edgediff.quant_params import LayerQuant, QuantParams, TensorQuant


@dataclass(frozen=True)
class ActQ:
    """Per-tensor activation quantization: x ~ (q - zero_point) * scale, q in [qmin, qmax]."""

    scale: float
    zero_point: int
    bits: int
    signed: bool
    offset: int = 0  # storage shift: an unsigned grid written as int8 (TFLite) has offset -128

    @classmethod
    def of(cls, tq: TensorQuant, what: str) -> ActQ:
        if tq.scale.numel() != 1:
            raise BadInput(f"{what}: activation quantization must be per tensor for integer kernels")
        if tq.bits > 8:
            raise BadInput(f"{what}: {tq.bits}-bit activations have no int8 kernel")
        return cls(float(tq.scale.reshape(()).abs().clamp_min(1e-12)), int(tq.zero_point.reshape(())), int(tq.bits),
                   bool(tq.signed))

    @property
    def qmin(self) -> int:
        return (-(2 ** (self.bits - 1)) if self.signed else 0) + self.offset

    @property
    def qmax(self) -> int:
        return (2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1) + self.offset

    @property
    def dtype(self) -> str:
        """Storage type: uint8 when the grid needs [0, 255], int8 otherwise (a 7-bit unsigned grid fits int8)."""
        return "uint8" if self.qmin >= 0 and self.qmax > 127 else "int8"

    def as_int8(self) -> ActQ:
        """The same grid in int8 storage (TFLite): an unsigned 8-bit grid shifts by -128, same values."""
        return self if self.dtype == "int8" else ActQ(self.scale, self.zero_point - 128, self.bits, self.signed,
                                                      self.offset - 128)

    def as_uint8(self) -> ActQ:
        """The same grid in uint8 storage: a signed grid shifts by +128, same values."""
        if self.qmin >= 0:
            return self
        return ActQ(self.scale, self.zero_point + 128, self.bits, self.signed, self.offset + 128)

    def stored_like(self, other: ActQ) -> ActQ:
        """This grid in `other`'s storage type (integer kernels want input and output alike)."""
        return self.as_uint8() if other.dtype == "uint8" else self.as_int8()

    def quantize(self, x: np.ndarray) -> np.ndarray:
        q = np.rint(np.asarray(x, np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, self.qmin, self.qmax).astype(np.int32)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((np.asarray(q, np.float32) - self.zero_point) * np.float32(self.scale)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "bits": self.bits, "signed": self.signed,
                "qmin": self.qmin, "qmax": self.qmax}


@dataclass
class IntPart:
    """One integer conv/matmul: int8 input x int8 weight -> int32 acc -> requantized (or float) output."""

    input: ActQ
    channels: tuple[int, int]  # input channels [start, stop) of the layer this part reads
    weight: np.ndarray  # int8, (O, I_part, kh, kw) or (O, I_part)
    weight_scale: np.ndarray  # float32 (O,), zero point 0 (symmetric)
    weight_bits: int
    bias: np.ndarray | None  # int32 (O,) at scale input.scale * weight_scale
    output: ActQ | None  # None: float output acc * s_x * s_w
    output_source: str = "own"  # "own", "none" (float) or the consumer whose quantization it writes

    @property
    def acc_scale(self) -> np.ndarray:
        """float32 (O,): s_x * s_w, the scale of the int32 accumulator (and of the bias)."""
        return (np.float32(self.input.scale) * self.weight_scale).astype(np.float32)

    @property
    def multiplier(self) -> np.ndarray | None:
        """float32 (O,) s_x*s_w/s_y: what onnxruntime and XNNPACK multiply the accumulator by."""
        return None if self.output is None else multiplier(self.input.scale, self.weight_scale, self.output.scale)

    @property
    def fixed_point(self) -> tuple[np.ndarray, np.ndarray] | None:
        """TFLite form of the multiplier: (M0 int32 Q31, shift int32) per output channel."""
        m = self.multiplier
        return None if m is None else quantize_multipliers(m.astype(np.float64))

    def float_weight(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.weight.ndim - 1)
        return (self.weight.astype(np.float32) * self.weight_scale.reshape(shape)).astype(np.float32)

    def float_bias(self) -> np.ndarray | None:
        return None if self.bias is None else (self.bias.astype(np.float32) * self.acc_scale).astype(np.float32)


@dataclass
class LoweredLayer:
    name: str
    kind: str  # "conv" | "linear"
    parts: list[IntPart]
    geometry: dict[str, Any] = field(default_factory=dict)  # conv: stride, padding, dilation, groups
    edge_layer: bool = False

    @property
    def split(self) -> bool:
        return len(self.parts) > 1

    @property
    def int_output(self) -> bool:
        return all(p.output is not None for p in self.parts)


@dataclass
class LoweredAttention:
    name: str  # the Attention module's path
    q: ActQ
    k: ActQ
    p: ActQ  # softmax output, fixed range [0, 1]
    v: ActQ
    scale: float  # logit scale (attn.scale)
    heads: int
    output: ActQ | None  # softmax(QK^T)V's quantization (to_out's input) or None: float
    output_source: str = "none"
    producers: dict[str, str] = field(default_factory=dict)  # operand -> layer writing it directly

    @property
    def qk_scale(self) -> float:
        """float32 s_q * s_k: QK^T = acc * qk_scale exactly (float logits, then * scale, softmax)."""
        return float(np.float32(self.q.scale) * np.float32(self.k.scale))

    @property
    def av_multiplier(self) -> float | None:
        return None if self.output is None else float(multiplier(self.p.scale, self.v.scale, self.output.scale))


@dataclass
class LoweredModel:
    layers: dict[str, LoweredLayer]
    attentions: dict[str, LoweredAttention]
    weight_bits: int
    act_bits: int

    def summary(self) -> dict[str, Any]:
        parts = [p for lay in self.layers.values() for p in lay.parts]
        return {"layers": len(self.layers), "integer_parts": len(parts),
                "split_layers": sorted(n for n, lay in self.layers.items() if lay.split),
                "int8_outputs": sum(p.output is not None for p in parts),
                "float_outputs": sorted(n for n, lay in self.layers.items() if not lay.int_output),
                "outputs_written_for_consumer": sorted(f"{n} -> {p.output_source}" for n, lay in self.layers.items()
                                                       for p in lay.parts if p.output_source not in ("own", "none")),
                "attentions": len(self.attentions)}


# ------------------------------------------------------------------------------------------
# lowering
# ------------------------------------------------------------------------------------------


def int8_weight_scale(tq: TensorQuant, out_channels: int, what: str, why_symmetric: str = "",
                      too_wide: str = "cannot be written as int8", centered_ok: bool = False) -> torch.Tensor:
    """The per-output-channel weight scale (clamped away from 0) of a quantizer an int8 backend can
    write: axis 0, symmetric, at most 8 bits; BadInput naming `what` otherwise (every int8 writer).

    `centered_ok`: the writer stores q - z (the weight is a constant, so the zero point can be
    subtracted once): an asymmetric grid of at most 7 bits then fits int8 with zero point 0,
    exactly (|q - z| <= 2^b - 1 <= 127)."""
    if tq.axis != 0 or tq.scale.numel() != out_channels:
        raise BadInput(f"{what}: weights must be quantized per output channel (axis 0, {out_channels} scales)")
    if not tq.symmetric and not (centered_ok and tq.bits <= 7):
        raise BadInput(f"{what}: weight zero points must be 0 (symmetric){why_symmetric}"
                       + (f"; asymmetric {tq.bits}-bit weights do not fit int8 once centred (at most 7 bits)"
                          if centered_ok else ""))
    if tq.bits > 8:
        raise BadInput(f"{what}: {tq.bits}-bit weights {too_wide}")
    return tq.scale.clamp_min(1e-12)


def _int_weight(w: torch.Tensor, tq: TensorQuant, what: str) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights q - z (zero point subtracted: symmetric int8 for every kernel) and their scales."""
    s = int8_weight_scale(tq, w.shape[0], what, too_wide="have no int8 kernel", centered_ok=True).float()
    col = (-1, *([1] * (w.dim() - 1)))
    z = tq.zero_point.float().view(col)
    q = torch.clamp(torch.round(w.detach().float() / s.view(col)) + z, tq.qmin, tq.qmax) - z
    return q.to(torch.int8).numpy(), s.numpy().astype(np.float32)


def _int_bias(b: torch.Tensor | None, acc_scale: np.ndarray) -> np.ndarray | None:
    if b is None:
        return None
    # the same float32 division and round-half-even as the simulation (edgediff.quant.core)
    q = torch.round(b.detach().float() / torch.from_numpy(acc_scale)).clamp(-(2**31), 2**31 - 1)
    return q.to(torch.int64).numpy().astype(np.int32)


def _consumer_quant(qp: QuantParams, attn: str) -> dict[str, tuple[TensorQuant, str]]:
    qk, av = qp.layers.get(f"{attn}:qk"), qp.layers.get(f"{attn}:av")
    out: dict[str, tuple[TensorQuant, str]] = {}
    if qk is not None and qk.input is not None and qk.input2 is not None:
        out["q"], out["k"] = (qk.input, f"{attn}:q"), (qk.input2, f"{attn}:k")
    if av is not None and av.input2 is not None:
        out["v"] = (av.input2, f"{attn}:v")
    return out


def lower(den: nn.Module, qp: QuantParams, int_outputs: bool = True) -> LoweredModel:
    """Integer layers for every layer and attention QuantParams names (see the module docstring).

    `den` is the float denoiser whose module paths QuantParams uses. With int_outputs=False
    every output stays float (the accumulator times s_x*s_w): the layout of artifacts made
    without output requantization, and of TensorRT-style Q/DQ graphs.
    """
    from edgediff.attention import direct_producers, is_joint

    modules = dict(den.named_modules())
    # who writes an attention operand directly: "attn.to_q" -> (Q's quantization, "attn:q")
    written_for: dict[str, tuple[TensorQuant, str]] = {}
    for path in {n.rpartition(":")[0] for n, lq in qp.layers.items() if lq.kind in ("matmul_qk", "matmul_av")}:
        attn = modules.get(path)
        if attn is None:
            raise BadInput(f"quantization parameters name attention {path!r}, which the model does not have")
        cons = _consumer_quant(qp, path)
        for which, attr in direct_producers(attn).items():
            if which in cons:
                written_for[f"{path}.{attr}" if path else attr] = cons[which]
    layers: dict[str, LoweredLayer] = {}
    for name, lq in qp.layers.items():
        if lq.kind not in ("conv", "linear"):
            continue
        m = modules.get(name)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            found = "nothing" if m is None else type(m).__name__
            raise BadInput(f"quantization parameters of {name!r}: expected a Conv2d or Linear, found {found}")
        layers[name] = _lower_layer(name, m, lq, written_for.get(name) if int_outputs else None, int_outputs)
    attentions: dict[str, LoweredAttention] = {}
    for name, lq in qp.layers.items():
        if lq.kind != "matmul_qk":
            continue
        path = name.rpartition(":")[0]
        av = qp.layers.get(f"{path}:av")
        if av is None or lq.input is None or lq.input2 is None or av.input is None or av.input2 is None:
            raise BadInput(f"attention {path!r}: quantization parameters need both ':qk' and ':av' with both operands")
        attn = modules[path]
        out_layer = f"{path}.to_out.0" if path else "to_out.0"
        out_lay = layers.get(out_layer)
        out_q = out_lay.parts[0].input if (int_outputs and out_lay is not None and not out_lay.split
                                           and not qp.layers[out_layer].meta.get("input_unquantized")
                                           and not is_joint(attn)) else None
        producers = {w: f"{path}.{a}" if path else a for w, a in direct_producers(attn).items()
                     if (f"{path}.{a}" if path else a) in layers and int_outputs}
        attentions[path] = LoweredAttention(
            path, ActQ.of(lq.input, name), ActQ.of(lq.input2, name), ActQ.of(av.input, f"{path}:av"),
            ActQ.of(av.input2, f"{path}:av"), float(attn.scale), int(attn.heads), out_q,
            out_layer if out_q is not None else "none", producers)
    return LoweredModel(layers, attentions, qp.weight_bits, qp.act_bits)


def _lower_layer(name: str, m: nn.Module, lq: LayerQuant, written_for: tuple[TensorQuant, str] | None,
                 int_outputs: bool) -> LoweredLayer:
    if lq.weight is None:
        raise BadInput(f"quantization parameters of {name!r} have no weight quantizer")
    if lq.input is None or lq.meta.get("input_unquantized"):
        raise BadInput(f"{name}: the layer's input is not quantized (it never saw calibration data); "
                       "it has no integer kernel")
    bias = m.bias
    split = lq.meta.get("split_at") if lq.input2 is not None else None
    if lq.weight2 is not None and not split:
        raise BadInput(f"{name}: a split weight quantization (weight2) without a split input has no integer lowering")
    cin = m.weight.shape[1] * (m.groups if isinstance(m, nn.Conv2d) else 1)
    if split and isinstance(m, nn.Conv2d) and m.groups != 1:
        raise BadInput(f"{name}: a shortcut-split input on a grouped convolution has no integer lowering")
    ranges = [(0, int(split)), (int(split), cin)] if split else [(0, cin)]
    inputs = [lq.input, lq.input2] if split else [lq.input]
    outs: list[tuple[TensorQuant | None, str]]
    if not int_outputs:
        outs = [(None, "none")] * len(ranges)
    elif written_for is not None and not split:
        outs = [(written_for[0], written_for[1])]
    else:
        own = [lq.output, lq.output2] if split else [lq.output]
        outs = [(o, "own" if o is not None else "none") for o in own]
    # a split weight: each part its own per-channel scale (Q-Diffusion's weight splitting)
    w_parts = [_int_weight(m.weight[:, a:b], tq, name) for (a, b), tq in zip(ranges, (lq.weight, lq.weight2))] \
        if lq.weight2 is not None else None
    if w_parts is None:
        w_int, w_scale = _int_weight(m.weight, lq.weight, name)
    parts = []
    for i, ((a, b), tq_in, (tq_out, src)) in enumerate(zip(ranges, inputs, outs)):
        assert tq_in is not None
        x_q = ActQ.of(tq_in, name)
        if w_parts is not None:
            wi, w_scale = w_parts[i]
        else:
            wi = w_int[:, a:b] if split else w_int
        acc = (np.float32(x_q.scale) * w_scale).astype(np.float32)
        # centred asymmetric weights span [-(2^b - 1), 2^b - 1]: one bit more as a signed grid
        w_bits = lq.weight.bits + (0 if lq.weight.symmetric else 1)
        parts.append(IntPart(x_q, (a, b), wi, w_scale, w_bits, _int_bias(bias, acc) if i == 0 else None,
                             ActQ.of(tq_out, name) if tq_out is not None else None, src))
    geometry: dict[str, Any] = {}
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise BadInput(f"{name}: only explicit zero padding has an integer lowering")
        geometry = {"stride": tuple(m.stride), "padding": tuple(m.padding), "dilation": tuple(m.dilation),
                    "groups": int(m.groups)}
    return LoweredLayer(name, lq.kind, parts, geometry, bool(lq.meta.get("edge_layer")))


def lower_model(model: Any, int_outputs: bool = True) -> tuple[nn.Module, LoweredModel]:
    """(float denoiser copy, lowered layers) of a quantized DiffusionModel or artifact."""
    import copy

    from edgediff.model import DenoiserModule
    from edgediff.quant_params import strip_quant_wrappers

    qp = QuantParams.of(model)
    if qp is None:
        raise BadInput("the model has no quantization parameters (compress it with a quantizing recipe, e.g. w8a8)")
    den = copy.deepcopy(model.denoiser)
    if isinstance(den, DenoiserModule):
        den = den.inner
    strip_quant_wrappers(den)
    den = den.float().eval()
    return den, lower(den, qp, int_outputs=int_outputs)
