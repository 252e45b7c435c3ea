"""TFLite / LiteRT backend: fp32, fp16 and int8 `.tflite` files through litert-torch (no TensorFlow).

How the file is made
- The float denoiser (quantization wrappers stripped, fp16 hooks removed: see
  exporters.onnx.float_denoiser) is wrapped so that its signature is
  `serving_default(sample, timestep[, encoder_hidden_states | class_labels][, extras]) -> {"out": ...}`
  (every input of `model.signature.input_names()`, extras such as SDXL text_embeds/time_ids or
  SD3 pooled_projections included, each with a batch axis) and converted with
  `litert_torch.convert` (torch.export -> StableHLO -> TFLite converter).
- GroupNorm: torch's decomposition of `native_group_norm` lowers to MEAN/SUB/RSQRT plus
  BROADCAST_TO, and BROADCAST_TO is not in the TFLite GPU delegate's operator list, so each
  nn.GroupNorm is exported as `GpuGroupNorm` (reshape to (B, G, -1), MEAN, SUB, MUL, RSQRT,
  implicit broadcasting only): the same arithmetic, every op delegate-supported.
- Attention: diffusers' SDPA processor lowers to BATCH_MATMUL + SOFTMAX + MUL, all of which
  the GPU delegate runs.
- Batch: litert-torch 0.10 cannot lower a dynamic batch axis through diffusers' timestep
  broadcast (`torch.ones(sample.shape[0])` fails in its JAX bridge), so the batch is fixed at
  export (`batch=1` by default: one image per call is what phones run). `load_denoiser`
  splits and pads any batch to that size.
- fp16: the fp32 file's CONV_2D / FULLY_CONNECTED / DEPTHWISE weights are cast to float16
  by ai-edge-quantizer's `float_casting` recipe (explicit DEQUANTIZE ops: the standard TFLite
  "fp16 weights" model; the GPU delegate skips those DEQUANTIZE nodes and runs in fp16,
  XNNPACK runs fp32 arithmetic on the dequantized weights).
- int8: every layer named in the artifact's QuantParams gets the scales and zero points of
  the artifact, written as PT2E `quantized_decomposed` quantize/dequantize pairs that the
  TFLite converter (STATIC Q/DQ mode) turns into int8 tensors: the layer's input activation
  (per tensor; two halves for shortcut-split layers, which are written as two layers on the
  halves plus ADD, see `split_layers` in the report), its weight (int8, per output channel,
  symmetric; the on-grid float weights give the integers exactly), and the operands of the
  attention matmuls. See `int8_report` in the export report and docs/tflite_coreml.md for
  what LiteRT does with them.

Exported I/O: inputs sample float32 [B,C,H,W], timestep float32 [B], optional
encoder_hidden_states float32 [B,S,D] / class_labels (int64 in PyTorch; int32 in the
.tflite since TFLite runtimes have no int64 inputs), then the signature's extras by name
(LiteRTDenoiser feeds them from a dict `cond`); output `out` float32 [B,C_out,H,W].
Flux does not convert: the float64 POW of diffusers' RoPE is not legalized (exit 2 names tfl.pow).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from edgediff.exporters.base import PRECISIONS, Backend, ExportReport, FixedBatchDenoiser, float_denoiser, input_names, threads
from edgediff.exporters.ops import LITERT_GPU_OPS, LITERT_GPU_SOURCE
from torch import nn

from edgediff.artifact import atomic_file
from edgediff.errors import BadInput, Unavailable
from edgediff.model import Cond, DenoiserModule, DiffusionModel, InputSignature
from edgediff.quant_params import LayerQuant, QuantParams, TensorQuant

INSTALL = 'pip install -e ".[tflite]"'
SIGNATURE = "serving_default"
OUTPUT_NAME = "out"


# ------------------------------------------------------------------------------------------
# optional packages
# ------------------------------------------------------------------------------------------


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Unavailable(f"the tflite target needs {module.split('.')[0]} ({e}); install it with {INSTALL}") from None


def _interpreter_cls() -> Any:
    return _require("ai_edge_litert.interpreter").Interpreter


# ------------------------------------------------------------------------------------------
# the module that gets converted
# ------------------------------------------------------------------------------------------


class GpuGroupNorm(nn.Module):
    """nn.GroupNorm written with ops the TFLite GPU delegate runs (no BROADCAST_TO).

    Same arithmetic as torch: biased variance over (C/G, *spatial) per group, then affine.
    Works on (B, C, *) inputs of any rank (diffusers' attention applies it to (B, C, S)).
    """

    def __init__(self, gn: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups, self.eps, self.affine = gn.num_groups, gn.eps, gn.affine
        self.weight, self.bias = gn.weight, gn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = x.reshape(shape[0], self.num_groups, -1)
        d = y - y.mean(-1, keepdim=True)
        var = (d * d).mean(-1, keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).reshape(shape)
        if not self.affine:
            return y
        view = [1, -1] + [1] * (len(shape) - 2)
        return y * self.weight.view(view) + self.bias.view(view)


def gpu_friendly(den: nn.Module) -> int:
    """Replace every nn.GroupNorm by GpuGroupNorm, in place; returns how many."""
    n = 0
    for name, child in list(den.named_children()):
        if isinstance(child, nn.GroupNorm):
            setattr(den, name, GpuGroupNorm(child))
            n += 1
        else:
            n += gpu_friendly(child)
    return n


class _Signature(DenoiserModule):
    """DenoiserModule's keyword call, output as {"out": tensor}: the .tflite signature's output name.

    Takes every input of the signature by name (sample_kwargs' keys become the .tflite
    signature's input names), extras (SDXL text_embeds/time_ids, SD3/Flux pooled_projections,
    ids, guidance) included; DenoiserModule routes them (added_cond_kwargs, unbatched ids).
    """

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {OUTPUT_NAME: super().forward(**inputs)}


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


class _TflQDQLayer(nn.Module):
    """Conv2d/Linear with its input and weight as Q/DQ pairs (the artifact's scales)."""

    def __init__(self, inner: nn.Module, lq: LayerQuant) -> None:
        super().__init__()
        self.inner = inner
        self.name = lq.name
        wq = lq.weight
        if wq is None:
            raise BadInput(f"quantization parameters of {lq.name!r} have no weight quantizer")
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
    from edgediff.exporters.onnx import QDQAttnProcessor

    return QDQAttnProcessor(qk, av, quant=_TflQDQ)


def insert_tflite_qdq(den: nn.Module, qp: QuantParams) -> dict[str, int]:
    """Q/DQ twins with the same placement as exporters.onnx.insert_qdq (and so as the simulation)."""
    from edgediff.exporters.onnx import insert_qdq

    return insert_qdq(den, qp, layer_cls=_TflQDQLayer, attn_processor=_attn_processor)


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


def _no_quant(aq: Any, what: str) -> nn.Module:
    return nn.Identity()


def _tfl_float_twin_cls() -> Any:
    from edgediff.exporters.onnx import IntLayer

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
    from edgediff.exporters.onnx import insert_int_layers

    from edgediff.lowering import lower

    low = lower(den, qp)
    return insert_int_layers(den, low, layer_cls=_tfl_float_twin_cls(), quant=_TflActQDQ), low


_INT_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "QUANTIZE": 2, "DEQUANTIZE": 2}


def _weight_keys(low: Any) -> dict[bytes, tuple[str, int, str]]:
    """float32 weight bytes in each TFLite filter layout -> (layer, part index, op kind)."""
    keys: dict[bytes, tuple[str, int, str]] = {}
    for name, lay in low.layers.items():
        for i, p in enumerate(lay.parts):
            w = p.float_weight()
            if lay.kind == "linear":
                keys[np.ascontiguousarray(w).tobytes()] = (name, i, "FULLY_CONNECTED")
                continue
            keys[np.ascontiguousarray(w.transpose(0, 2, 3, 1)).tobytes()] = (name, i, "CONV_2D")  # OHWI
            if w.shape[1] == 1:  # a conv with one input channel per group may become DEPTHWISE [1, kh, kw, O]
                keys[np.ascontiguousarray(w.transpose(1, 2, 3, 0)).tobytes()] = (name, i, "DEPTHWISE_CONV_2D")
    return keys


def integerize(data: bytes, low: Any) -> tuple[bytes, dict[str, Any]]:
    """Rewrite the lowered layers' float CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED ops of a
    .tflite into int8-in, int8-weight, int32-bias, int8-out ops (see the section comment).

    An op is recognised by its float32 filter, which equals the lowering's dequantized weights
    bit for bit. A part with a float output (the model's last layer) keeps a float kernel behind
    QUANTIZE -> DEQUANTIZE of its input (TFLite has no int8-in/float-out conv). Returns the new
    bytes and a report (ops rewritten, float-output layers, layers not found).
    """
    schema = _require("ai_edge_litert.schema_py_generated")
    import flatbuffers

    TT, BO = schema.TensorType, schema.BuiltinOperator
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    if any(getattr(b, "offset", 0) for b in m.buffers or []):
        raise BadInput("the converted .tflite stores buffers outside the flatbuffer (> 2 GB model): "
                       "full-integer rewriting is not supported for it")
    sg = m.subgraphs[0]
    names = {v: k for k, v in vars(BO).items() if not k.startswith("_")}
    code_name = [names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "?") for c in m.operatorCodes]
    keys = _weight_keys(low)

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
        hit = keys.get(w.tobytes()) if w is not None else None
        if hit is None or hit[2] != kind:
            ops.append(op)
            continue
        name, i, _ = hit
        part = low.layers[name].parts[i]
        x, y = int(op.inputs[0]), int(op.outputs[0])
        bias_i = int(op.inputs[2]) if len(op.inputs) > 2 else -1
        fb = part.float_bias()
        have = const(bias_i) if bias_i >= 0 else None
        if fb is None and have is not None and not np.any(have):
            have = None  # the converter gives bias-free convs a shared zero bias
        if (fb is None) != (have is None) or (fb is not None and not np.array_equal(have, fb.reshape(-1))):
            ops.append(op)  # the converter changed the bias (folded something in): leave it float
            continue
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


def _example_kwargs(sig: InputSignature, batch: int) -> dict[str, torch.Tensor]:
    ex = sig.example_inputs(batch=batch)
    return {k: ex[k] for k in input_names(sig)}


# ------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------


def _fp16_weights(tflite_bytes: bytes) -> bytes:
    """Cast conv/FC weights to float16 with explicit DEQUANTIZE (ai-edge-quantizer float_casting)."""
    import os
    import tempfile

    quantizer = _require("ai_edge_quantizer.quantizer")
    recipe = [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
               "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                             "compute_precision": "FLOAT", "explicit_dequantize": True}}]
    fd, name = tempfile.mkstemp(suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tflite_bytes)
        return bytes(quantizer.Quantizer(name, recipe).quantize().quantized_model)
    finally:
        os.unlink(name)


def _float_inputs(data: bytes) -> tuple[bytes, list[str]]:
    """Give int8 graph inputs back a float32 interface (a QUANTIZE op in front); returns their names.

    In STATIC Q/DQ mode the converter folds a quantize that sits right at a graph input into
    the input itself (the first conv's input quantizer makes `sample` int8). Every edgediff
    export takes float32 `sample`, so the float tensor and its QUANTIZE (same scale and zero
    point: the artifact's) are put back in front.
    """
    schema = _require("ai_edge_litert.schema_py_generated")
    import flatbuffers

    model = schema.Model.GetRootAsModel(data, 0)
    m = schema.ModelT.InitFromObj(model)
    sg = m.subgraphs[0]
    sg.inputs = [int(i) for i in sg.inputs]  # numpy views of the flatbuffer are read-only
    fixed: list[str] = []
    for pos, ti in enumerate(list(sg.inputs)):
        old = sg.tensors[ti]
        if old.type not in (schema.TensorType.INT8, schema.TensorType.UINT8) or old.quantization is None:
            continue
        name = old.name.decode() if isinstance(old.name, bytes) else str(old.name)
        buf = schema.BufferT()
        m.buffers.append(buf)
        new = schema.TensorT()
        new.shape, new.shapeSignature = old.shape, old.shapeSignature
        new.type, new.name, new.buffer = schema.TensorType.FLOAT32, name, len(m.buffers) - 1
        old.name = name + "_int8"
        sg.tensors.append(new)
        new_idx = len(sg.tensors) - 1
        codes = [i for i, c in enumerate(m.operatorCodes)
                 if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.QUANTIZE]
        if codes:
            code = codes[0]
        else:
            oc = schema.OperatorCodeT()
            oc.builtinCode = oc.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE
            oc.version = 1
            m.operatorCodes.append(oc)
            code = len(m.operatorCodes) - 1
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, [new_idx], [ti]
        op.builtinOptionsType = schema.BuiltinOptions.QuantizeOptions
        op.builtinOptions = schema.QuantizeOptionsT()
        sg.operators.insert(0, op)
        sg.inputs[pos] = new_idx
        for sd in m.signatureDefs or []:
            for tm in sd.inputs or []:
                if tm.tensorIndex == ti:
                    tm.tensorIndex = new_idx
        fixed.append(name)
    if not fixed:
        return data, fixed
    b = flatbuffers.Builder(len(data) + 65536)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output()), fixed


def build_tflite(model: DiffusionModel, precision: str, batch: int = 1) -> tuple[bytes, dict[str, Any]]:
    """Convert `model` (never modified) to .tflite bytes; returns (bytes, facts for the report)."""
    from edgediff.exporters.base import check_batch, check_precision, int8_quant_params

    check_precision("tflite", precision)
    check_batch("tflite", batch)
    qp = int8_quant_params(model, precision)
    litert_torch = _require("litert_torch")
    facts: dict[str, Any] = {"batch": batch}
    den = float_denoiser(model)
    facts["groupnorms_rewritten"] = gpu_friendly(den)
    wrapper = _Signature(den, model.signature).eval()
    quant_config = None
    low = None
    if precision == "int8":
        assert qp is not None
        full, why = full_integer_ok(qp)
        if full:
            layers, low = insert_tflite_int(den, qp)
            facts["int8"] = {"layers": layers, "weight_bits": qp.weight_bits, "act_bits": qp.act_bits,
                             "layout": "full-integer",
                             "kernels": "int8-in/int8-out CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED (XNNPACK QS8); "
                                        "attention BATCH_MATMUL float on int8-grid operands",
                             "lowering": low.summary()}
            split = low.summary()["split_layers"]
        else:
            facts["int8"] = {"layers": insert_tflite_qdq(den, qp), "weight_bits": qp.weight_bits,
                             "act_bits": qp.act_bits, "layout": "qdq",
                             "kernels": f"float kernels between int8 Q/DQ ({why})"}
            split = sorted(m.name for m in den.modules() if isinstance(m, _TflQDQLayer) and m.split)
        # shortcut-split layers: run as two layers (one per input half, each with its own
        # input scale) plus ADD, since an int8 CONCATENATION needs one scale for both halves
        facts["int8"]["split_layers"] = {
            "layers": split, "as": "layer(x[:, :C1], W[:, :C1]) + layer(x[:, C1:], W[:, C1:]) + bias"}
        from litert_torch.quantize import pt2e_quantizer as pq
        from litert_torch.quantize import quant_config as qc

        # only to switch the converter's Q/DQ handling to STATIC: our Q/DQ ops already carry
        # the artifact's scales and nothing is observed or re-calibrated by litert-torch
        quant_config = qc.QuantConfig(pt2e_quantizer=pq.PT2EQuantizer().set_global(
            pq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)))
    kwargs = _example_kwargs(model.signature, batch)
    t0 = time.perf_counter()
    try:
        edge = litert_torch.convert(wrapper, sample_kwargs=kwargs, quant_config=quant_config)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise BadInput(f"litert-torch could not convert this denoiser ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300]})") from None
    data = bytes(edge.model_content())
    facts["convert_seconds"] = round(time.perf_counter() - t0, 2)
    if precision == "fp16":
        data = _fp16_weights(data)
    if precision == "int8":
        if low is not None:
            data, facts["int8"]["integerized"] = integerize(data, low)
        data, facts["int8"]["float_inputs_restored"] = _float_inputs(data)
    return data, facts


# ------------------------------------------------------------------------------------------
# the .tflite file: op histogram, GPU-delegate coverage, runtime
# ------------------------------------------------------------------------------------------


def _interpreter(path: Path, threads: int | None = None) -> Any:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        it = _interpreter_cls()(model_path=str(path), num_threads=threads)
    except ValueError as e:
        raise BadInput(f"{path}: not a TFLite model LiteRT can load ({str(e).splitlines()[0]})") from None
    return it


def op_histogram(it: Any) -> dict[str, int]:
    return dict(Counter(o["op_name"] for o in it._get_ops_details()).most_common())


def gpu_delegate_report(ops: dict[str, int], quantized: bool) -> dict[str, Any]:
    """Which ops of the graph the TFLite GPU delegate would leave to the CPU (by op type)."""
    supported = set(LITERT_GPU_OPS)
    if not quantized:
        supported.discard("QUANTIZE")  # only with allow_quant_ops
    fallback = {op: n for op, n in ops.items() if op not in supported}
    return {"all_ops_supported": not fallback, "cpu_fallback_ops": fallback, "source": LITERT_GPU_SOURCE}


def _weight_dtypes(it: Any) -> dict[str, int]:
    """Element types of the constant tensors that feed CONV_2D/FC/DEPTHWISE/DEQUANTIZE."""
    details = {d["index"]: d for d in it.get_tensor_details()}
    counts: Counter[str] = Counter()
    seen: set[int] = set()
    for o in it._get_ops_details():
        if o["op_name"] not in ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D", "DEQUANTIZE"):
            continue
        idx = o["inputs"][0] if o["op_name"] == "DEQUANTIZE" else (o["inputs"][1] if len(o["inputs"]) > 1 else -1)
        if idx < 0 or idx in seen:
            continue
        seen.add(idx)
        d = details[idx]
        try:
            it.get_tensor(idx)  # constants are readable; activations are not before invoke
        except ValueError:
            continue
        counts[np.dtype(d["dtype"]).name] += 1
    return dict(counts)


def _precision(weights: dict[str, int]) -> str:
    if weights.get("int8"):
        return "int8"
    if weights.get("float16"):
        return "fp16"
    return "fp32"


_MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL")


def integer_macs(path: Path, interpreter: Any = None) -> dict[str, Any]:
    """MACs of the conv/linear/matmul ops of a .tflite, integer vs float.

    An op counts as integer when its activation input and its weight (second input) are int8
    tensors: int8 kernels (XNNPACK QS8/QC8 on CPU). A float op fed by DEQUANTIZE, or a hybrid op
    (float activations, int8 weights), counts as float. Returns macs, integer_macs,
    integer_macs_share and the float MAC ops (name, op, macs).
    """
    from edgediff.profiling.graph import tflite_ops

    it = interpreter or _interpreter(path)
    types = {d["index"]: np.dtype(d["dtype"]) for d in it.get_tensor_details()}
    by_index = {f"{o['op_name']}_{o['index']}": o for o in it._get_ops_details()}
    total = integer = 0
    floats: list[dict[str, Any]] = []
    for w in tflite_ops(Path(path), interpreter=it):
        if w.op not in _MAC_OPS or not w.macs:
            continue
        total += w.macs
        ins = [int(i) for i in by_index[w.node]["inputs"]]
        if len(ins) >= 2 and all(types.get(i) == np.dtype(np.int8) for i in ins[:2]):
            integer += w.macs
        else:
            floats.append({"name": w.name, "op": w.op, "macs": int(w.macs)})
    return {"macs": int(total), "integer_macs": int(integer),
            "integer_macs_share": round(integer / total, 4) if total else 0.0, "float_mac_ops": floats}


def tflite_info(path: Path) -> dict[str, Any]:
    it = _interpreter(path)
    sig = it.get_signature_list().get(SIGNATURE, {})
    runner = it.get_signature_runner(SIGNATURE) if sig else None
    ops = op_histogram(it)
    weights = _weight_dtypes(it)

    def io(d: dict[str, Any]) -> dict[str, Any]:
        return {"shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name}

    inputs = {k: io(v) for k, v in runner.get_input_details().items()} if runner else {}
    outputs = {k: io(v) for k, v in runner.get_output_details().items()} if runner else {}
    precision = _precision(weights)
    return {"kind": "exported", "target": "tflite", "path": str(path), "size_bytes": Path(path).stat().st_size,
            "precision": precision, "signature": SIGNATURE, "inputs": inputs, "outputs": outputs,
            "batch": inputs.get("sample", {}).get("shape", [None])[0], "ops": ops, "num_ops": sum(ops.values()),
            "weight_dtypes": weights, "gpu_delegate": gpu_delegate_report(ops, precision == "int8"),
            **integer_macs(path, it)}


class LiteRTDenoiser(FixedBatchDenoiser):
    """A .tflite denoiser in LiteRT's interpreter (XNNPACK on CPU), called like TorchDenoiser.

    The file has a fixed batch (see the module docstring): FixedBatchDenoiser chunks and pads.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.interpreter = _interpreter(self.path, threads)
        if SIGNATURE not in self.interpreter.get_signature_list():
            raise BadInput(f"{path}: no {SIGNATURE!r} signature (not exported by edgediff?)")
        self.runner = self.interpreter.get_signature_runner(SIGNATURE)
        self.inputs = self.runner.get_input_details()
        if "sample" not in self.inputs or "timestep" not in self.inputs:
            raise BadInput(f"{path}: expected inputs 'sample' and 'timestep', found {sorted(self.inputs)}")
        self.batch = int(self.inputs["sample"]["shape"][0])
        self.cond_name = next((n for n in ("encoder_hidden_states", "class_labels") if n in self.inputs), None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """As FixedBatchDenoiser; `cond` may also be a dict name -> tensor (multi-input models:
        SDXL, SD3, Flux), of which every input the file declares is fed, chunked like the sample."""
        if not isinstance(cond, dict):
            if set(self.inputs) - {"sample", "timestep", self.cond_name}:
                extra = sorted(set(self.inputs) - {"sample", "timestep"})
                raise BadInput(f"{self.path}: the model takes {', '.join(extra)}: pass them as a dict of named inputs")
            return super().__call__(x, t, cond)
        missing = [n for n in self.inputs if n not in ("sample", "timestep") and n not in cond]
        if missing:
            raise BadInput(f"{self.path}: the model needs {', '.join(missing)}, not given")
        n, b = x.shape[0], self.batch
        named = {"sample": x.float(), "timestep": t.float(),
                 **{k: cond[k] for k in self.inputs if k not in ("sample", "timestep")}}
        outs = []
        for i in range(0, n, b):
            chunk = {k: v[i:i + b] for k, v in named.items()}
            k = chunk["sample"].shape[0]
            if k < b:  # pad the last chunk by repeating its last row, as FixedBatchDenoiser
                chunk = {name: torch.cat([v, v[-1:].expand(b - k, *v.shape[1:])]) for name, v in chunk.items()}
            outs.append(self._run(chunk)[:k])
        return torch.cat(outs)

    def _feed(self, name: str, t: torch.Tensor) -> np.ndarray:
        d = self.inputs[name]
        a = t.detach().cpu().numpy()
        if np.issubdtype(d["dtype"], np.integer) and d["quantization"][0] and not np.issubdtype(a.dtype, np.integer):
            s, z = d["quantization"]  # a quantized input (the converter folded the first Q into it)
            info = np.iinfo(d["dtype"])
            return np.clip(np.round(a / s) + z, info.min, info.max).astype(d["dtype"])
        return a.astype(d["dtype"])

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        res = self.runner(**{name: self._feed(name, v) for name, v in feeds.items()})
        return torch.from_numpy(np.asarray(res[OUTPUT_NAME], dtype=np.float32))


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------


class TFLiteBackend(Backend):
    target = "tflite"
    precisions = PRECISIONS
    suffixes = (".tflite",)
    options = frozenset({"batch"})

    def available(self) -> tuple[bool, str]:
        for mod in ("litert_torch", "ai_edge_litert.interpreter", "ai_edge_quantizer"):
            try:
                __import__(mod)
            except ImportError as e:
                return False, f"{mod.split('.')[0]} is not installed ({e}); install it with {INSTALL}"
        return True, "litert-torch and ai-edge-litert are installed"

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        from edgediff.exporters.base import probe

        return probe(_interpreter_cls, "LiteRT interpreter (XNNPACK, CPU) runs .tflite files here")

    def _export(self, model: DiffusionModel, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        data, facts = build_tflite(model, precision, batch=options.get("batch", 1))
        with atomic_file(out, force=force) as tmp:
            tmp.write_bytes(data)
        info = tflite_info(out)
        return ExportReport(self.target, precision, str(out), info["size_bytes"], extra={
            "converter": "litert-torch", **facts, "inputs": info["inputs"], "outputs": info["outputs"],
            "ops": info["ops"], "weight_dtypes": info["weight_dtypes"], "gpu_delegate": info["gpu_delegate"]})

    def load_denoiser(self, path: Path) -> LiteRTDenoiser:
        return LiteRTDenoiser(path, threads=threads())

    def check(self, path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
        """Structural check: loads, inputs/outputs and shapes as the reference expects, op histogram."""
        info = tflite_info(path)
        problems = []
        if reference is not None:
            want = input_names(reference.signature)
            if sorted(info["inputs"]) != sorted(want):
                problems.append(f"inputs {sorted(info['inputs'])} != expected {sorted(want)}")
            shp = info["inputs"].get("sample", {}).get("shape", [])
            if list(shp[1:]) != list(reference.signature.sample_shape):
                problems.append(f"sample shape {shp} does not match {list(reference.signature.sample_shape)}")
        if OUTPUT_NAME not in info["outputs"]:
            problems.append(f"no output named {OUTPUT_NAME!r}")
        return {"loads": True, "ok": not problems, "problems": problems, "inputs": info["inputs"],
                "outputs": info["outputs"], "ops": info["ops"], "weight_dtypes": info["weight_dtypes"]}

    def info(self, path: Path) -> dict[str, Any]:
        return tflite_info(path)


BACKEND = TFLiteBackend()
