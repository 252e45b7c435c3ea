"""ONNX int8 layouts: Q/DQ twins of the quantized layers and the integer-kernel (QLinear) twins.

- "qdq" (TensorRT): insert_qdq puts QuantizeLinear/DequantizeLinear where the simulation
  (edgediff.quant) fake-quantizes: layer inputs, per-channel symmetric weights, attention operands.
- "qlinear" (onnxruntime): insert_int_layers puts the lowered layers (edgediff.lowering) in as
  Q/DQ around every conv/linear, with int32 bias (int32_bias) and output requantization, so
  onnxruntime fuses them into QLinearConv / QGemm.
- fold_weight_quantize and int32_bias post-process the traced graph (exact: weights are on the grid).
Other backends (TFLite) reuse the placement with their own twin classes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgediff.attention import OperandAttnProcessor
from edgediff.errors import BadInput
from edgediff.lowering import ActQ, LoweredLayer, LoweredModel
from edgediff.lowering.layers import int8_weight_scale
from edgediff.quant_params import LayerQuant, QuantParams, TensorQuant

# int8 layouts: "qlinear" (onnxruntime integer kernels: Q/DQ on inputs, weights, int32 bias and
# outputs) and "qdq" (Q/DQ on inputs and weights only, as NVIDIA ModelOpt places them: TensorRT)
INT8_LAYOUTS = ("qlinear", "qdq")


# ------------------------------------------------------------------------------------------
# int8: fake-quant modules that the TorchScript exporter turns into Q/DQ pairs
# ------------------------------------------------------------------------------------------


class QDQ(nn.Module):
    """Per-tensor fake quantization that exports as QuantizeLinear -> DequantizeLinear.

    ONNX Q/DQ work on the full int8/uint8 range; for narrower grids (e.g. 6-bit) the float
    clip in front gives exactly clamp(round(x/s)+z, qmin, qmax).
    """

    def __init__(self, tq: TensorQuant | ActQ, what: str) -> None:
        super().__init__()
        if isinstance(tq, ActQ):
            self.scale, self.zp = float(tq.scale), int(tq.zero_point)
            self.lo, self.hi = (0, 255) if tq.dtype == "uint8" else (-128, 127)
            self.clip = None
            if (tq.qmin, tq.qmax) != (self.lo, self.hi):
                self.clip = ((tq.qmin - self.zp) * self.scale, (tq.qmax - self.zp) * self.scale)
            return
        if tq.bits > 8:
            raise BadInput(f"{what}: {tq.bits}-bit activations cannot be written as int8 Q/DQ")
        if tq.scale.numel() != 1:
            raise BadInput(f"{what}: activation quantization must be per tensor for ONNX Q/DQ")
        self.scale = float(tq.scale.reshape(()))
        self.zp = int(tq.zero_point.reshape(()))
        # an unsigned grid with zero point 0 that fits in int8 (e.g. a 7-bit softmax) is written as
        # int8: the same arithmetic, and TensorRT only takes signed int8
        as_int8 = tq.signed or (self.zp == 0 and tq.qmax <= 127)
        self.lo, self.hi = (-128, 127) if as_int8 else (0, 255)
        if not self.lo <= self.zp <= self.hi:
            raise BadInput(f"{what}: zero point {self.zp} outside the {'int8' if tq.signed else 'uint8'} range")
        self.clip = None
        if (tq.qmin, tq.qmax) != (self.lo, self.hi):
            self.clip = ((tq.qmin - self.zp) * self.scale, (tq.qmax - self.zp) * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            x = x.clamp(*self.clip)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zp, self.lo, self.hi)


def weight_qdq(w: torch.Tensor, tq: TensorQuant, what: str) -> torch.Tensor:
    # on-grid weights (q - z) * s: q - z is what the int8 initializer holds, zero point 0
    scale = int8_weight_scale(tq, w.shape[0], what, ", as TensorRT requires", centered_ok=True)
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(tq.zero_point), 0, -128, 127)


class QDQLayer(nn.Module):
    """Conv2d/Linear with its input and weight quantized the way edgediff.quant simulates it."""

    def __init__(self, inner: nn.Module, lq: LayerQuant) -> None:
        super().__init__()
        self.inner = inner
        self.name = lq.name
        if lq.weight is None:
            raise BadInput(f"quantization parameters of {lq.name!r} have no weight quantizer")
        self.wq = lq.weight
        self.w_parts = lq.weight_parts()
        self.split_at = lq.meta.get("split_at")
        quant_in = lq.input is not None and not lq.meta.get("input_unquantized")
        self.aq = QDQ(lq.input, lq.name) if quant_in else None
        self.aq2 = QDQ(lq.input2, lq.name) if quant_in and self.split_at and lq.input2 is not None else None

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is None:
            return x
        if self.aq2 is not None and x.shape[1] > self.split_at:
            return torch.cat([self.aq(x[:, : self.split_at]), self.aq2(x[:, self.split_at :])], dim=1)
        return self.aq(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.inner.weight
        # a weight split at a shortcut concatenation: each input half on its own per-channel grid
        w = torch.cat([weight_qdq(w[:, cols], tq, self.name) for cols, tq in self.w_parts], 1) \
            if len(self.w_parts) > 1 else weight_qdq(w, self.wq, self.name)
        if isinstance(self.inner, nn.Conv2d):
            return self.inner._conv_forward(self._in(x), w, self.inner.bias)
        return F.linear(self._in(x), w, self.inner.bias)


class QDQAttnProcessor(OperandAttnProcessor):
    """edgediff.attention's explicit-matmul processor with Q/DQ on Q, K, softmax output and V
    (the operands the simulation quantizes); `quant` builds the Q/DQ module (TFLite passes its own)."""

    def __init__(self, qk: LayerQuant, av: LayerQuant, quant: Any = None) -> None:
        for lq in (qk, av):
            if lq.input is None or lq.input2 is None:
                raise BadInput(f"quantization parameters of {lq.name!r} need both matmul operands")
        quant = quant or QDQ
        super().__init__({"q": quant(qk.input, qk.name), "k": quant(qk.input2, qk.name),
                          "p": quant(av.input, av.name), "v": quant(av.input2, av.name)})


# ------------------------------------------------------------------------------------------
# int8 for onnxruntime: integer kernels from the lowered layers
# ------------------------------------------------------------------------------------------


class IntLayer(nn.Module):
    """A lowered Conv2d/Linear as Q/DQ that onnxruntime fuses into QLinearConv / QGemm.

    Per part (two for a shortcut-split layer): Q/DQ on the input, int8 weight -> DQ, int32
    bias -> DQ (written by int32_bias after tracing), the op, then Q/DQ on the output with the
    lowered output quantization: DQ -> Conv -> Q is what ORT's QDQ transformer turns into one
    integer kernel. Linear layers run as a 2-D Gemm (QGemm): a 3-D MatMul + Add would leave the
    bias Add between the MatMul and its Q. Parts with a float output (the model's last layer)
    stay DQ -> Conv.
    """

    def __init__(self, low: LoweredLayer, quant: Any = None) -> None:
        super().__init__()
        quant = quant or QDQ
        self.name, self.kind = low.name, low.kind
        self.geometry = low.geometry
        self.channels = [p.channels for p in low.parts]
        self.aqs = nn.ModuleList(quant(p.input, low.name) for p in low.parts)
        # integer kernels take input and output in one storage type (QLinearConv/QGemm: u8 -> u8)
        self.oqs = nn.ModuleList(quant(p.output.stored_like(p.input), low.name) if p.output is not None
                                 else nn.Identity() for p in low.parts)
        for i, p in enumerate(low.parts):
            self.register_buffer(f"w{i}", torch.from_numpy(p.float_weight()))
            self.register_buffer(f"ws{i}", torch.from_numpy(p.weight_scale))
            fb = p.float_bias()
            self.register_buffer(f"b{i}", torch.from_numpy(fb) if fb is not None else None)

    def weight(self, i: int) -> torch.Tensor:
        w, s = getattr(self, f"w{i}"), getattr(self, f"ws{i}")
        return torch.fake_quantize_per_channel_affine(w, s, torch.zeros(s.shape, dtype=torch.int32), 0, -128, 127)

    def _op(self, x: torch.Tensor, i: int) -> torch.Tensor:
        w, b = self.weight(i), getattr(self, f"b{i}")
        if self.kind == "conv":
            g = self.geometry
            return F.conv2d(x, w, b, g["stride"], g["padding"], g["dilation"], g["groups"])
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.kind == "linear" and x.dim() != 2:
            # feature sizes as python ints (the weights'): traced, only the leading dims stay dynamic,
            # so fewer Shape/Gather/Unsqueeze/Concat ops run around every linear (docs/int8.md)
            x = x.reshape(-1, int(self.channels[-1][1]))
        y = None
        for i, (a, b) in enumerate(self.channels):
            xs = x if len(self.channels) == 1 else x[:, a:b]
            r = self.oqs[i](self._op(self.aqs[i](xs), i))
            y = r if y is None else y + r
        assert y is not None
        if self.kind == "linear" and len(shape) != 2:
            y = y.reshape(*shape[:-2], -1, int(y.shape[-1]))
        return y


def insert_int_layers(den: nn.Module, low: LoweredModel, layer_cls: Any = None, quant: Any = None) -> dict[str, int]:
    """Replace every lowered layer by its integer twin and every lowered attention's processor
    by Q/DQ on its operands (plus the output requantization to to_out's input), in place.

    `layer_cls(lowered_layer)` and `quant(act_q, what)` build the twins (TFLite passes its own)."""
    layer_cls = layer_cls or IntLayer
    quant = quant or QDQ
    counts: Counter[str] = Counter()
    for name, lay in low.layers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(den.get_submodule(parent) if parent else den, leaf, layer_cls(lay))
        counts[lay.kind] += 1
        counts["split"] += lay.split
    for path, att in low.attentions.items():
        # an operand written by a projection keeps the projection's storage type: DQ -> reshape -> Q
        # pairs then match exactly and onnxruntime drops them (int8 all the way)
        stored = {w: getattr(att, w).stored_like(low.layers[att.producers[w]].parts[0].input) if w in att.producers
                  else getattr(att, w) for w in ("q", "k", "p", "v")}
        ops: dict[str, nn.Module] = {w: quant(stored[w], f"{path}:{w}") for w in ("q", "k", "p", "v")}
        if att.output is not None:
            ops["output"] = quant(att.output, f"{path}:output")
        (den.get_submodule(path) if path else den).set_processor(OperandAttnProcessor(ops))
        counts["attention"] += 1
    return dict(counts)


def int32_bias(model: Any) -> int:
    """Conv/Gemm fed by DQ(input) and DQ(int8 weight): float bias -> int32 initializer -> DQ.

    The bias scale is s_x * s_w (float32, per output channel) and the bias already lies on that
    grid (the lowering rounded it), so this is exact; it is the form onnxruntime's QDQ fusion
    needs to make QLinearConv / QGemm.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = producer.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    done, new_nodes = 0, []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        if [c.op_type for c in consumers.get(n.output[0], [])] != ["QuantizeLinear"]:
            continue  # a float-output layer stays DQ -> Conv with its float bias (not fused anyway)
        dq_x, dq_w = producer.get(n.input[0]), producer.get(n.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        sx, sw = const(dq_x.input[1]), const(dq_w.input[1])
        if sx is None or sw is None or sx.size != 1:
            continue
        b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)
        s = np.broadcast_to(np.float32(sx.reshape(())) * sw.astype(np.float32).reshape(-1), b.shape)
        s = np.ascontiguousarray(s, dtype=np.float32)
        q = np.clip(np.rint(b / s), -(2**31), 2**31 - 1).astype(np.int32)
        base = n.input[2]
        g.initializer.extend([numpy_helper.from_array(q, base + "_int32"), numpy_helper.from_array(s, base + "_scale"),
                              numpy_helper.from_array(np.zeros_like(q), base + "_zp")])
        out = base + "_dq"
        new_nodes.append((n, helper.make_node("DequantizeLinear", [base + "_int32", base + "_scale", base + "_zp"],
                                              [out], name=n.name + "_bias_dq", axis=0)))
        n.input[2] = out
        done += 1
    for consumer, dq in new_nodes:
        g.node.insert(list(g.node).index(consumer), dq)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in list(g.initializer):
        if init.name not in used:
            g.initializer.remove(init)
    return done


def insert_qdq(den: nn.Module, qp: QuantParams, layer_cls: Any = None, attn_processor: Any = None) -> dict[str, int]:
    """Replace every layer QuantParams names by its Q/DQ twin, in place; returns counts.

    `layer_cls(module, layer_quant)` and `attn_processor(qk, av)` build the twins; other backends
    (TFLite) pass their own so that every target places Q/DQ where the simulation quantizes.
    """
    layer_cls = layer_cls or QDQLayer
    attn_processor = attn_processor or QDQAttnProcessor
    counts: Counter[str] = Counter()
    modules = dict(den.named_modules())
    attn_pairs: dict[str, dict[str, LayerQuant]] = {}
    for name, lq in qp.layers.items():
        if lq.kind in ("matmul_qk", "matmul_av"):
            path, _, which = name.rpartition(":")
            attn_pairs.setdefault(path, {})[which] = lq
            continue
        m = modules.get(name)
        if m is None:
            raise BadInput(f"quantization parameters name layer {name!r}, which the model does not have")
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise BadInput(f"quantization parameters of {name!r}: expected a Conv2d or Linear, found {type(m).__name__}")
        parent, _, leaf = name.rpartition(".")
        setattr(den.get_submodule(parent) if parent else den, leaf, layer_cls(m, lq))
        counts[lq.kind] += 1
    for path, pair in attn_pairs.items():
        attn = modules.get(path)
        if attn is None or not hasattr(attn, "set_processor"):
            raise BadInput(f"quantization parameters name attention {path!r}, which the model does not have")
        if set(pair) != {"qk", "av"}:
            raise BadInput(f"attention {path!r}: quantization parameters need both ':qk' and ':av'")
        attn.set_processor(attn_processor(pair["qk"], pair["av"]))
        counts["attention"] += 1
    return dict(counts)


def fold_weight_quantize(model: Any) -> int:
    """QuantizeLinear on a constant weight -> an int8 initializer feeding DequantizeLinear.

    TensorRT and onnxruntime both read int8 initializers + DQ as quantized weights; the file
    shrinks about 4x on those tensors. The weights are on the grid, so this is exact.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    # the exporter deduplicates equal constants (a split layer's two halves share their
    # weight scales) and reads the copy through an Identity
    idents = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}

    def value(name: str) -> np.ndarray | None:
        while name in idents:
            name = idents[name]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    folded, remove = 0, []
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] not in inits:
            continue
        w, s = value(n.input[0]), value(n.input[1])
        zp = value(n.input[2]) if len(n.input) > 2 else np.zeros((), np.uint8)
        if w is None or s is None or zp is None:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if s.ndim == 1:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / s.reshape(shape)) + zp.reshape(shape if zp.ndim else ()), info.min, info.max)
        name = n.output[0]
        g.initializer.append(numpy_helper.from_array(q.astype(zp.dtype), name))
        remove.append(n)
        folded += 1
    for n in remove:
        g.node.remove(n)
    # drop the float weights nothing reads any more
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in list(g.initializer):
        if init.name not in used:
            g.initializer.remove(init)
    return folded
