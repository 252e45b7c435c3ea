"""TFLite int8: PT2E Q/DQ twins (the "qdq" layout) and the full-integer layout (float twins of the
lowered layers, then `integerize` rewrites their ops in the flatbuffer to int8-in/int8-out)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from edgediff.exporters.tflite_runtime import require
from torch import nn

from edgediff.errors import BadInput
from edgediff.lowering.match import PartMatcher
from edgediff.quant_params import LayerQuant, QuantParams, TensorQuant

# ------------------------------------------------------------------------------------------
# int8: PT2E quantize/dequantize pairs with the artifact's scales
# ------------------------------------------------------------------------------------------


def _qd() -> Any:
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

    return torch.ops.quantized_decomposed


class _Int8QDQ(nn.Module):
    """quantize_per_tensor -> dequantize_per_tensor on int8 with the subclass's scale/zp/qmin/qmax."""

    scale: float
    zp: int
    qmin: int
    qmax: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        q = qd.quantize_per_tensor(x, self.scale, self.zp, self.qmin, self.qmax, torch.int8)
        return qd.dequantize_per_tensor(q, self.scale, self.zp, self.qmin, self.qmax, torch.int8)


class _TflQDQ(_Int8QDQ):
    """Per-tensor activation quantization as quantize_per_tensor -> dequantize_per_tensor.

    The scale and zero point are the artifact's; narrower grids than 8 bits (e.g. 6-bit
    activations) are expressed through quant_min/quant_max, which the int8 type carries.
    """

    def __init__(self, tq: TensorQuant, what: str) -> None:
        super().__init__()
        if tq.bits > 8:
            raise BadInput(f"{what}: {tq.bits}-bit activations cannot be written as int8 in TFLite")
        if tq.scale.numel() != 1:
            raise BadInput(f"{what}: activation quantization must be per tensor for TFLite")
        self.scale = float(tq.scale.reshape(()))
        zp = int(tq.zero_point.reshape(()))
        # TFLite's activation type is int8: an unsigned (uint8) grid shifts by 128, same values
        self.shift = 0 if tq.signed else -128
        self.zp = zp + self.shift
        self.qmin, self.qmax = tq.qmin + self.shift, tq.qmax + self.shift
        if not -128 <= self.zp <= 127:
            raise BadInput(f"{what}: zero point {zp} outside the int8 range")


class TflQDQLayer(nn.Module):
    """Conv2d/Linear with its input and weight as Q/DQ pairs (the artifact's scales)."""

    def __init__(self, inner: nn.Module, lq: LayerQuant) -> None:
        super().__init__()
        self.inner = inner
        self.name = lq.name
        wq = lq.weight
        if wq is None:
            raise BadInput(f"quantization parameters of {lq.name!r} have no weight quantizer")
        lq.refuse_split_weight("the TFLite Q/DQ layout")
        w = inner.weight.detach().float()
        from edgediff.lowering.layers import int8_weight_scale

        scale = int8_weight_scale(wq, w.shape[0], lq.name, ": TFLite int8 weights are symmetric")
        self.register_buffer("w_scale", scale.clone())
        self.register_buffer("w_zp", torch.zeros(w.shape[0], dtype=torch.int64))
        # TFLite's int8 weights use [-127, 127] (symmetric); a 4-bit grid is a subset of it
        self.w_min, self.w_max = max(wq.qmin, -127), wq.qmax
        self.split_at = lq.meta.get("split_at")
        quant_in = lq.input is not None and not lq.meta.get("input_unquantized")
        self.aq = _TflQDQ(lq.input, lq.name) if quant_in else None
        self.aq2 = _TflQDQ(lq.input2, lq.name) if quant_in and self.split_at and lq.input2 is not None else None
        if self.aq2 is not None and isinstance(inner, nn.Conv2d) and inner.groups != 1:
            raise BadInput(f"{lq.name}: shortcut-split input on a grouped convolution cannot be exported to TFLite")

    @property
    def split(self) -> bool:
        """Shortcut-split input: the layer runs as two int8 layers on the halves (see forward)."""
        return self.aq is not None and self.aq2 is not None

    def _w(self, w: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        wq = qd.quantize_per_channel(w, self.w_scale, self.w_zp, 0, self.w_min, self.w_max, torch.int8)
        return qd.dequantize_per_channel(wq, self.w_scale, self.w_zp, 0, self.w_min, self.w_max, torch.int8)

    def _apply(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.inner, nn.Conv2d):
            return self.inner._conv_forward(x, w, bias)
        return F.linear(x, w, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.inner.weight, self.inner.bias
        if self.split and x.shape[1] > self.split_at:
            # The two halves have different scales. Q/DQ on each half followed by a concat
            # becomes an int8 CONCATENATION, which the TFLite converter rejects unless both
            # inputs share one scale. A layer is linear in its input channels, so it is run
            # as layer(x1, W[:, :C1]) + layer(x2, W[:, C1:]) + bias instead: each half keeps
            # its own int8 scale (the artifact's), weights keep their per-channel scales.
            c1 = self.split_at
            y1 = self._apply(self.aq(x[:, :c1]), self._w(weight[:, :c1]), None)
            y2 = self._apply(self.aq2(x[:, c1:]), self._w(weight[:, c1:]), None)
            y = y1 + y2
            if bias is not None:
                y = y + (bias.view(1, -1, *([1] * (y.dim() - 2))) if isinstance(self.inner, nn.Conv2d) else bias)
            return y
        return self._apply(self.aq(x) if self.aq is not None else x, self._w(weight), bias)


def _attn_processor(qk: LayerQuant, av: LayerQuant) -> nn.Module:
    """exporters.onnx's explicit-matmul attention with TFLite Q/DQ on Q, K, softmax output and V."""
    from edgediff.exporters.onnx_int8 import QDQAttnProcessor

    return QDQAttnProcessor(qk, av, quant=_TflQDQ)


def insert_tflite_qdq(den: nn.Module, qp: QuantParams) -> dict[str, int]:
    """Q/DQ twins with the same placement as exporters.onnx.insert_qdq (and so as the simulation)."""
    from edgediff.exporters.onnx_int8 import insert_qdq

    return insert_qdq(den, qp, layer_cls=TflQDQLayer, attn_processor=_attn_processor)


# ------------------------------------------------------------------------------------------
# int8, full-integer: float twins from edgediff.lowering, integerized in the flatbuffer
# ------------------------------------------------------------------------------------------
#
# litert-torch 0.10's NHWC layout pass rejects a dequantize on a conv's output ("Attempting to
# convert non-NHWC compatible node to NHWC"), so output scales cannot be placed through PT2E.
# Instead the lowered layers are converted as plain float convs/linears whose weights and bias
# are the lowering's dequantized integers (exact), and `integerize` then rewrites each such op
# in the .tflite itself: int8 input (QUANTIZE in front, or the producer's int8 directly), int8
# per-channel weights, int32 bias at s_x*s_w, int8 output with the lowered output quantization
# and a DEQUANTIZE behind it for float consumers. Attention operands keep PT2E Q/DQ (float
# BATCH_MATMUL on on-grid operands: what the simulation computes; ~2% of the demo's MACs).


class _TflActQDQ(_Int8QDQ):
    """A lowered activation quantization (edgediff.lowering.ActQ) as int8 PT2E quantize/dequantize."""

    def __init__(self, aq: Any, what: str) -> None:
        super().__init__()
        a = aq.as_int8()
        self.scale, self.zp, self.qmin, self.qmax = float(a.scale), int(a.zero_point), int(a.qmin), int(a.qmax)
        if not -128 <= self.zp <= 127:
            raise BadInput(f"{what}: zero point {aq.zero_point} outside the int8 range")


class _Barrier(nn.Module):
    """litert-torch's optimization barrier (dropped by the converter once folding is done)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            from litert_torch.backend.optimization_barrier import optimization_barrier
        except ImportError:  # a litert-torch without it: folded layers show in integerized.not_found
            return x
        # two operands: the barrier's lowering of a single tensor fails (its result is not a list)
        return optimization_barrier(x, x)[0]


def _no_quant(aq: Any, what: str) -> nn.Module:
    # not an Identity: with no Q/DQ between them the converter folds constants through a twin
    # (the next layer's bias absorbs its bias; a constant ADD after it, PixArt's scale_shift_table,
    # goes into its bias), so neither op's bias equals the lowering's and `integerize` leaves
    # both float, without the artifact's activation quantization. A barrier keeps each twin's
    # input and output where the lowering has them.
    return _Barrier()


def _tfl_float_twin_cls() -> Any:
    from edgediff.exporters.onnx_int8 import IntLayer

    class _TflFloatTwin(IntLayer):
        """exporters.onnx's integer twin without any Q/DQ: one float conv/linear per lowered part on
        its input channels, weights and bias exactly the lowering's dequantized integers (so
        `integerize` recognises each op by its weights and writes the integers back)."""

        def __init__(self, low: Any) -> None:
            super().__init__(low, quant=_no_quant)

        def weight(self, i: int) -> torch.Tensor:
            return getattr(self, f"w{i}")

    return _TflFloatTwin


def full_integer_ok(qp: QuantParams) -> tuple[bool, str]:
    """Whether the artifact's quantization has an int8-in/int8-out TFLite form."""
    if not any(lq.output is not None for lq in qp.layers.values()):
        return False, "the artifact has no output quantization (made before output requantization)"
    for lq in qp.layers.values():
        for t in (lq.input, lq.input2, lq.output, lq.output2):
            if t is not None and t.bits != 8:
                return False, f"{lq.name}: {t.bits}-bit activations (TFLite int8 tensors clamp at 8 bits)"
    return True, "8-bit activations with output quantization"


def insert_tflite_int(den: nn.Module, qp: QuantParams) -> tuple[dict[str, int], Any]:
    """Float twins of the lowered layers and PT2E Q/DQ on attention operands, in place; returns
    (counts, LoweredModel) for `integerize`."""
    from edgediff.exporters.onnx_int8 import insert_int_layers

    from edgediff.lowering import lower

    low = lower(den, qp)
    return insert_int_layers(den, low, layer_cls=_tfl_float_twin_cls(), quant=_TflActQDQ), low


_INT_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "QUANTIZE": 2, "DEQUANTIZE": 2}


# TFLite filter layouts of the lowering's weights: OHWI convs, [1, kh, kw, O] depthwise (one input
# channel per group), [O, I] fully connected
_LAYOUTS = {
    "CONV_2D": ("conv", lambda w: w.transpose(0, 2, 3, 1), 0, lambda w: True),
    "DEPTHWISE_CONV_2D": ("conv", lambda w: w.transpose(1, 2, 3, 0), 3, lambda w: w.shape[1] == 1),
    "FULLY_CONNECTED": ("linear", lambda w: w, 0, lambda w: True),
}


def integerize(data: bytes, low: Any) -> tuple[bytes, dict[str, Any]]:
    """Rewrite the lowered layers' float CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED ops of a
    .tflite into int8-in, int8-weight, int32-bias, int8-out ops (see the section comment).

    An op is recognised by its float32 filter and bias, which are the lowering's dequantized
    integers (edgediff.lowering.match: within a hundredth of a step, ties between identical
    layers settled by the converter's tensor names and order). A part with a float output (the
    model's last layer) keeps a float kernel behind QUANTIZE -> DEQUANTIZE of its input (TFLite
    has no int8-in/float-out conv). Returns the new bytes and a report (ops rewritten,
    float-output layers, layers not found).
    """
    schema = require("ai_edge_litert.schema_py_generated")
    import flatbuffers

    TT, BO = schema.TensorType, schema.BuiltinOperator
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    if any(getattr(b, "offset", 0) for b in m.buffers or []):
        raise BadInput("the converted .tflite stores buffers outside the flatbuffer (> 2 GB model): "
                       "full-integer rewriting is not supported for it")
    sg = m.subgraphs[0]
    names = {v: k for k, v in vars(BO).items() if not k.startswith("_")}
    code_name = [names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "?") for c in m.operatorCodes]
    matcher = PartMatcher(low, _LAYOUTS)

    def opcode(name: str) -> int:
        want = getattr(BO, name)
        for i, c in enumerate(m.operatorCodes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == want:
                c.version = max(int(c.version), _INT_VERSIONS.get(name, 1))
                return i
        oc = schema.OperatorCodeT()
        oc.builtinCode = want
        oc.deprecatedBuiltinCode = min(want, 127)
        oc.version = _INT_VERSIONS.get(name, 1)
        m.operatorCodes.append(oc)
        code_name.append(name)
        return len(m.operatorCodes) - 1

    def const(ti: int) -> np.ndarray | None:
        t = sg.tensors[ti]
        buf = m.buffers[t.buffer]
        if buf.data is None or len(buf.data) == 0 or t.type != TT.FLOAT32:
            return None
        return np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), np.float32)

    def qparams(scale: Any, zp: Any, dim: int = 0) -> Any:
        q = schema.QuantizationParametersT()
        q.scale = [float(s) for s in np.atleast_1d(scale)]
        q.zeroPoint = [int(z) for z in np.atleast_1d(zp)]
        q.quantizedDimension = dim
        return q

    def new_tensor(like: Any, name: str, ttype: int, quant: Any, payload: bytes | None = None,
                   shape: Any = None) -> int:
        t = schema.TensorT()
        t.shape = list(like.shape) if shape is None else list(shape)
        t.shapeSignature = like.shapeSignature if shape is None else None
        t.type, t.name, t.quantization = ttype, name.encode(), quant
        b = schema.BufferT()
        if payload is not None:
            b.data = np.frombuffer(payload, np.uint8).copy()
        m.buffers.append(b)
        t.buffer = len(m.buffers) - 1
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def simple_op(name: str, inp: int, out: int) -> Any:
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(name), [inp], [out]
        if name == "QUANTIZE":
            op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.QuantizeOptions, schema.QuantizeOptionsT()
        else:
            op.builtinOptionsType = schema.BuiltinOptions.DequantizeOptions
            op.builtinOptions = schema.DequantizeOptionsT()
        return op

    def grid(t: Any) -> tuple[float, int] | None:
        q = t.quantization
        if t.type != TT.INT8 or q is None or q.scale is None or len(q.scale) != 1:
            return None
        return float(np.float32(q.scale[0])), int(q.zeroPoint[0])

    # float tensor -> its int8 source, for tensors that are a DEQUANTIZE's output
    dq_source: dict[int, int] = {}
    for op in sg.operators:
        if code_name[op.opcodeIndex] == "DEQUANTIZE" and grid(sg.tensors[op.inputs[0]]) is not None:
            dq_source[int(op.outputs[0])] = int(op.inputs[0])
    quantized: dict[tuple[int, float, int], int] = {}  # (float tensor, scale, zp) -> int8 tensor
    report: dict[str, Any] = {"integer_ops": Counter(), "float_output_layers": [], "quantize_ops": 0,
                              "dequantize_ops": 0, "round_trips_removed": 0}
    found: set[tuple[str, int]] = set()
    ops: list[Any] = []

    def int8_input(x: int, aq: Any) -> int:
        a = aq.as_int8()
        key = (x, float(np.float32(a.scale)), int(a.zero_point))
        if key in quantized:
            return quantized[key]
        src = dq_source.get(x)
        if src is not None and grid(sg.tensors[src]) == key[1:]:
            report["round_trips_removed"] += 1  # the producer already wrote this grid: no DQ -> Q
            quantized[key] = src
            return src
        xt = sg.tensors[x]
        xq = new_tensor(xt, f"{xt.name.decode() if isinstance(xt.name, bytes) else xt.name}_q{len(sg.tensors)}",
                        TT.INT8, qparams(a.scale, a.zero_point))
        ops.append(simple_op("QUANTIZE", x, xq))
        report["quantize_ops"] += 1
        quantized[key] = xq
        return xq

    for op in sg.operators:
        kind = code_name[op.opcodeIndex]
        if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op.inputs) < 2:
            ops.append(op)
            continue
        w = const(int(op.inputs[1]))
        bias_i = int(op.inputs[2]) if len(op.inputs) > 2 else -1
        yt = sg.tensors[int(op.outputs[0])]
        # an op whose bias the converter changed (folded something in) matches nothing: it stays float
        hit = None if w is None else matcher.match(
            kind, w.reshape([int(d) for d in sg.tensors[int(op.inputs[1])].shape]),
            const(bias_i) if bias_i >= 0 else None, yt.name.decode() if isinstance(yt.name, bytes) else str(yt.name))
        if hit is None:
            ops.append(op)
            continue
        name, i = hit
        part = low.layers[name].parts[i]
        x, y = int(op.inputs[0]), int(op.outputs[0])
        found.add((name, i))
        op.inputs = [int(v) for v in op.inputs]
        if part.output is None:
            # float output: int8 input grid as QUANTIZE -> DEQUANTIZE, float kernel on exact weights
            xq = int8_input(x, part.input)
            xt = sg.tensors[x]
            xf = new_tensor(xt, f"{xt.name.decode()}_dq{len(sg.tensors)}", TT.FLOAT32, None)
            ops.append(simple_op("DEQUANTIZE", xq, xf))
            report["dequantize_ops"] += 1
            op.inputs[0] = xf
            ops.append(op)
            report["float_output_layers"].append(name)
            continue
        op.inputs[0] = int8_input(x, part.input)
        wt = sg.tensors[op.inputs[1]]
        dim = 3 if kind == "DEPTHWISE_CONV_2D" else 0
        wi = part.weight.transpose(0, 2, 3, 1) if kind == "CONV_2D" else (
            part.weight.transpose(1, 2, 3, 0) if kind == "DEPTHWISE_CONV_2D" else part.weight)
        op.inputs[1] = new_tensor(wt, f"{name}.weight{i}_int8", TT.INT8,
                                  qparams(part.weight_scale, np.zeros(len(part.weight_scale), np.int64), dim),
                                  np.ascontiguousarray(wi, np.int8).tobytes(), shape=list(wt.shape))
        if bias_i >= 0:
            bq = part.bias if part.bias is not None else np.zeros(len(part.weight_scale), np.int32)
            op.inputs[2] = new_tensor(sg.tensors[bias_i], f"{name}.bias{i}_int32", TT.INT32,
                                      qparams(part.acc_scale, np.zeros(len(bq), np.int64)),
                                      np.ascontiguousarray(bq, np.int32).tobytes(), shape=[len(bq)])
        o = part.output.as_int8()
        yt = sg.tensors[y]
        yq = new_tensor(yt, f"{yt.name.decode() if isinstance(yt.name, bytes) else yt.name}_int8", TT.INT8,
                        qparams(o.scale, o.zero_point))
        op.outputs = [yq]
        opcode(kind)  # bumps the op's version to its int8 form
        ops.append(op)
        ops.append(simple_op("DEQUANTIZE", yq, y))
        report["dequantize_ops"] += 1
        dq_source[y] = yq
        report["integer_ops"][kind] += 1
    # a DEQUANTIZE/QUANTIZE whose output nothing reads any more (its consumers now take the int8
    # tensor directly, e.g. after P.V into to_out) still runs over the whole tensor: drop it
    graph_out = {int(i) for i in sg.outputs}
    while True:
        read = {int(i) for o in ops for i in o.inputs if int(i) >= 0} | graph_out
        dead = [o for o in ops if code_name[o.opcodeIndex] in ("DEQUANTIZE", "QUANTIZE")
                and not any(int(t) in read for t in o.outputs)]
        if not dead:
            break
        ops = [o for o in ops if all(o is not d for d in dead)]
        report["dead_ops_removed"] = report.get("dead_ops_removed", 0) + len(dead)
    sg.operators = ops
    # the float weights and biases that were replaced are no tensor's data any more: empty them
    # (buffer indices must stay), else the file would carry both copies
    used: set[int] = set()
    for g in m.subgraphs:
        live = {int(i) for o in g.operators for i in list(o.inputs) + list(o.outputs) if int(i) >= 0}
        live |= {int(i) for i in list(g.inputs) + list(g.outputs)}
        used |= {int(g.tensors[i].buffer) for i in live}
    freed = 0
    for bi, buf in enumerate(m.buffers):
        if bi not in used and buf.data is not None and len(buf.data):
            freed += len(buf.data)
            buf.data = None
    report["float_bytes_dropped"] = int(freed)
    want = {(n, i) for n, lay in low.layers.items() for i in range(len(lay.parts))}
    report["not_found"] = sorted(f"{n}[{i}]" if len(low.layers[n].parts) > 1 else n for n, i in want - found)
    report["integer_ops"] = dict(report["integer_ops"])
    b = flatbuffers.Builder(len(data) + (1 << 20))
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output()), report
