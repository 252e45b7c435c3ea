"""ONNX backend: fp32, fp16 and int8 (QuantizeLinear/DequantizeLinear from the artifact's own scales).

How the file is made
- The float denoiser (quantization wrappers stripped: its weights lie on the quantization
  grid) is traced by torch.onnx's TorchScript exporter. We use that exporter rather than the
  dynamo one on purpose: it is about 10x faster here (1 s vs 15 s for a tiny UNet, which
  matters for tests and for the 35.7M-param cifar model), and its node names are the module
  paths ("/down_blocks.0/resnets.0/conv1/Conv"), which profiling maps back to the model.
- Opset 17: the newest opset that TensorRT 8.6 (JetPack 6.0, still the most common Jetson
  image) parses, while already having native LayerNormalization and per-channel
  QuantizeLinear/DequantizeLinear (opset >= 13). onnxruntime, TensorRT 10, OpenVINO and the
  other edge runtimes all read it.
- int8: every layer named in QuantParams gets Q/DQ pairs placed exactly where the PyTorch
  simulation (edgediff.quant) fake-quantizes: the layer's input activation (per tensor, two
  halves when the quant pass split a skip concatenation), its weight (int8 initializer ->
  DequantizeLinear, per output channel, symmetric: what TensorRT's explicit quantization
  wants), and the operands of the attention matmuls (Q, K, softmax output, V). Nothing is
  re-calibrated: scales and zero points are copied from the artifact.
- fp16: onnxruntime's float16 converter, keeping float32 I/O so that every target has the
  same interface.
- Models over 2 GB are written with external data (`<name>.onnx.data` beside the file).

Exported I/O (all targets): inputs sample float32 [B,C,H,W], timestep float32 [B], optional
encoder_hidden_states float32 [B,S,D] / class_labels int64 [B]; output out float32; B dynamic.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from edgediff.exporters.base import (
    PRECISIONS,
    Backend,
    ExportReport,
    contract_feed,
    float_denoiser,
    input_names,
    probe_import,
    threads,
)
from torch import nn

from edgediff.artifact import atomic_file
from edgediff.attention import OperandAttnProcessor
from edgediff.errors import BadInput, Unavailable
from edgediff.lowering import ActQ, LoweredLayer, LoweredModel, lower
from edgediff.lowering.layers import int8_weight_scale
from edgediff.model import DenoiserModule, DiffusionModel, InputSignature
from edgediff.quant_params import LayerQuant, QuantParams, TensorQuant

OPSET = 17
# int8 layouts: "qlinear" (onnxruntime integer kernels: Q/DQ on inputs, weights, int32 bias and
# outputs) and "qdq" (Q/DQ on inputs and weights only, as NVIDIA ModelOpt places them: TensorRT)
INT8_LAYOUTS = ("qlinear", "qdq")
# protobuf's hard limit is 2 GiB; stay clear of it (the graph itself also takes space)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
OUTPUT_NAME = "out"
META_PREFIX = "edgediff."


# ------------------------------------------------------------------------------------------
# the module that gets traced
# ------------------------------------------------------------------------------------------


class _ExportWrapper(DenoiserModule):
    """Positional inputs in contract order (what torch.onnx.export passes) -> DenoiserModule's call.

    The float denoiser sits at `.inner`, so node names start with "/inner/"; the exporter
    strips that prefix and names are then module paths of `model.denoiser`.
    """

    def __init__(self, inner: nn.Module, sig: InputSignature) -> None:
        super().__init__(inner, sig)
        self.names = input_names(sig)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(**dict(zip(self.names, args)))


# ------------------------------------------------------------------------------------------
# int8: fake-quant modules that the TorchScript exporter turns into Q/DQ pairs
# ------------------------------------------------------------------------------------------


class _QDQ(nn.Module):
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


def _weight_qdq(w: torch.Tensor, tq: TensorQuant, what: str) -> torch.Tensor:
    scale = int8_weight_scale(tq, w.shape[0], what, ", as TensorRT requires")
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(tq.zero_point), 0, -128, 127)


class _QDQLayer(nn.Module):
    """Conv2d/Linear with its input and weight quantized the way edgediff.quant simulates it."""

    def __init__(self, inner: nn.Module, lq: LayerQuant) -> None:
        super().__init__()
        self.inner = inner
        self.name = lq.name
        if lq.weight is None:
            raise BadInput(f"quantization parameters of {lq.name!r} have no weight quantizer")
        self.wq = lq.weight
        self.split_at = lq.meta.get("split_at")
        quant_in = lq.input is not None and not lq.meta.get("input_unquantized")
        self.aq = _QDQ(lq.input, lq.name) if quant_in else None
        self.aq2 = _QDQ(lq.input2, lq.name) if quant_in and self.split_at and lq.input2 is not None else None

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is None:
            return x
        if self.aq2 is not None and x.shape[1] > self.split_at:
            return torch.cat([self.aq(x[:, : self.split_at]), self.aq2(x[:, self.split_at :])], dim=1)
        return self.aq(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _weight_qdq(self.inner.weight, self.wq, self.name)
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
        quant = quant or _QDQ
        super().__init__({"q": quant(qk.input, qk.name), "k": quant(qk.input2, qk.name),
                          "p": quant(av.input, av.name), "v": quant(av.input2, av.name)})


# ------------------------------------------------------------------------------------------
# int8 for onnxruntime: integer kernels from the lowered layers
# ------------------------------------------------------------------------------------------


class IntLayer(nn.Module):
    """A lowered Conv2d/Linear as Q/DQ that onnxruntime fuses into QLinearConv / QGemm.

    Per part (two for a shortcut-split layer): Q/DQ on the input, int8 weight -> DQ, int32
    bias -> DQ (written by _int32_bias after tracing), the op, then Q/DQ on the output with the
    lowered output quantization: DQ -> Conv -> Q is what ORT's QDQ transformer turns into one
    integer kernel. Linear layers run as a 2-D Gemm (QGemm): a 3-D MatMul + Add would leave the
    bias Add between the MatMul and its Q. Parts with a float output (the model's last layer)
    stay DQ -> Conv.
    """

    def __init__(self, low: LoweredLayer, quant: Any = None) -> None:
        super().__init__()
        quant = quant or _QDQ
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
            x = x.reshape(-1, shape[-1])
        y = None
        for i, (a, b) in enumerate(self.channels):
            xs = x if len(self.channels) == 1 else x[:, a:b]
            r = self.oqs[i](self._op(self.aqs[i](xs), i))
            y = r if y is None else y + r
        assert y is not None
        if self.kind == "linear" and len(shape) != 2:
            y = y.reshape(*shape[:-1], y.shape[-1])
        return y


def insert_int_layers(den: nn.Module, low: LoweredModel, layer_cls: Any = None, quant: Any = None) -> dict[str, int]:
    """Replace every lowered layer by its integer twin and every lowered attention's processor
    by Q/DQ on its operands (plus the output requantization to to_out's input), in place.

    `layer_cls(lowered_layer)` and `quant(act_q, what)` build the twins (TFLite passes its own)."""
    layer_cls = layer_cls or IntLayer
    quant = quant or _QDQ
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


def _int32_bias(model: Any) -> int:
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
    layer_cls = layer_cls or _QDQLayer
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


# ------------------------------------------------------------------------------------------
# graph post-processing
# ------------------------------------------------------------------------------------------


def _rename_nodes(graph: Any) -> None:
    """Strip the wrapper's "/inner" scope so node names are paths in model.denoiser."""
    seen: set[str] = set()
    for n in graph.node:
        # nodes of the wrapper itself (I/O casts) go under "/io/" so they cannot collide
        name = n.name[len("/inner"):] if n.name.startswith("/inner/") else "/io/" + n.name.lstrip("/")
        base, i = name, 1
        while name in seen:
            name, i = f"{base}_{i}", i + 1
        seen.add(name)
        n.name = name


def module_of(node_name: str) -> str:
    """The module path a node came from: "/down_blocks.0/resnets.0/conv1/Conv" -> "down_blocks.0.resnets.0.conv1"."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def _fold_weight_quantize(model: Any) -> int:
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


def _set_meta(model: Any, meta: dict[str, Any]) -> None:
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = META_PREFIX + k, v if isinstance(v, str) else json.dumps(v)


def read_meta(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            k = p.key[len(META_PREFIX):]
            try:
                out[k] = json.loads(p.value)
            except json.JSONDecodeError:
                out[k] = p.value
    return out


# ------------------------------------------------------------------------------------------
# the whole export
# ------------------------------------------------------------------------------------------


def build_onnx(model: DiffusionModel, precision: str, progress: Any = None,
               layout: str = "qlinear", entry: Any = None, dynamic_hw: bool = False) -> tuple[Any, dict[str, Any]]:
    """Trace and post-process; returns (onnx.ModelProto, report). Nothing is written.

    `layout` (int8 only): "qlinear" for onnxruntime's integer kernels, "qdq" for TensorRT.
    `entry(wrapper, args) -> (module, args, input_names, output_names)` traces another entry
    point of the same prepared denoiser instead (DeepCache's full and shallow calls).
    """
    import onnx

    if precision not in PRECISIONS:
        raise BadInput(f"unknown precision {precision!r} for ONNX; expected one of {', '.join(PRECISIONS)}")
    from edgediff.onnx_source import graph_proto, is_graph_model

    if is_graph_model(model):  # an ONNX-in model: its (quantized) graph is already the export
        return graph_proto(model, precision)
    if not isinstance(model, DiffusionModel):
        raise BadInput("the ONNX exporter takes a model or an artifact")
    qp = QuantParams.of(model)
    if precision == "int8" and qp is None:
        raise BadInput("--precision int8 needs an artifact with quantization parameters (compress it first, "
                       "e.g. `edgediff compress MODEL --recipe w8a8`)")
    t0 = time.perf_counter()
    den = float_denoiser(model)
    report: dict[str, Any] = {"target": "onnx", "precision": precision, "opset": OPSET}
    if precision == "int8":
        assert qp is not None
        if layout not in INT8_LAYOUTS:
            raise BadInput(f"unknown int8 layout {layout!r}; expected one of {', '.join(INT8_LAYOUTS)}")
        report["int8_layout"] = layout
        if layout == "qlinear":
            low = lower(den, qp)
            report["quantized_layers"] = insert_int_layers(den, low)
            report["lowering"] = low.summary()
        else:
            report["quantized_layers"] = insert_qdq(den, qp)
        report["weight_bits"], report["act_bits"] = qp.weight_bits, qp.act_bits
    wrapper = _ExportWrapper(den, model.signature).eval()
    names = input_names(model.signature)
    example = model.signature.example_inputs(batch=2)
    args = tuple(example[n] for n in names)
    outputs = [OUTPUT_NAME]
    if entry is not None:
        wrapper, args, names, outputs = entry(wrapper, args)
    dyn = {n: {0: "batch"} for n in [*names, *outputs]}
    if dynamic_hw and len(model.signature.sample_shape) == 3:  # bundles: optimum's dynamic H/W where it traces
        for n in ("sample", *outputs):
            if n in dyn:
                dyn[n] = {0: "batch", 2: "height", 3: "width"}
    import io
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgediff-onnx-") as td, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python branches on shapes: batch stays dynamic
        big = sum(p.numel() * 4 for p in den.parameters()) > EXTERNAL_DATA_THRESHOLD
        target: Any = os.path.join(td, "m.onnx") if big else io.BytesIO()
        torch.onnx.export(wrapper, args, target, input_names=names, output_names=outputs, opset_version=OPSET,
                          dynamo=False, dynamic_axes=dyn, do_constant_folding=True)
        proto = onnx.load(target) if big else onnx.load_from_string(target.getvalue())
    _rename_nodes(proto.graph)
    if precision == "int8":
        report["weights_int8"] = _fold_weight_quantize(proto)
        if layout == "qlinear":
            report["bias_int32"] = _int32_bias(proto)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # I/O stays float32 (contract); the converter casts at the edges
        from onnxruntime.transformers.onnx_model import OnnxModel

        proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=big)
        om = OnnxModel(proto)
        om.topological_sort()  # the converter appends its I/O casts at the end of the node list
        proto = om.model
    if precision == "int8":
        _set_meta(proto, {"int8_layout": layout})
    _set_meta(proto, {"precision": precision, "arch": model.arch, "signature": model.signature.to_dict(),
                      "source": str(model.provenance.get("source", "")), "opset_reason": "TensorRT 8.6 parses <= 17"})
    ops = Counter(n.op_type for n in proto.graph.node)
    report.update({"nodes": len(proto.graph.node), "ops": dict(ops.most_common()),
                   "qdq_pairs": ops.get("DequantizeLinear", 0), "inputs": names, "outputs": outputs,
                   "trace_seconds": round(time.perf_counter() - t0, 2)})
    return proto, report


def write_onnx(proto: Any, out: Path, force: bool = False) -> dict[str, Any]:
    """Check and write atomically; external data beside the file when over 2 GB."""
    import onnx

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise BadInput(f"{out}: an ONNX export must end in .onnx")
    external = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD if _size_known(proto) else True
    data_name = out.name + ".data"
    with atomic_file(out, force=force) as tmp:
        if external:
            data_path = out.parent / data_name
            try:
                onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
                onnx.checker.check_model(str(tmp))
            except BaseException:
                data_path.unlink(missing_ok=True)
                raise
        else:
            onnx.checker.check_model(proto)
            onnx.save_model(proto, str(tmp))
    size = out.stat().st_size + ((out.parent / data_name).stat().st_size if external else 0)
    return {"path": str(out), "size_bytes": size, "external_data": external, "checker": "passed"}


def _size_known(proto: Any) -> bool:
    try:
        proto.ByteSize()
        return True
    except ValueError:  # protobuf refuses to size a message over 2 GB
        return False


class OnnxDenoiser:
    """An exported ONNX file in onnxruntime, callable like any edgediff Denoiser."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers or _providers())
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BadInput(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.path = Path(path)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        feed = contract_feed(self.inputs, x, t, cond, self.path)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feed)[0]).float()


def _providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def onnx_info(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper  # noqa: F401 - imported for side effects on older onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors
        raise BadInput(f"{path}: not a readable ONNX file ({e.__class__.__name__})") from None
    ops = Counter(n.op_type for n in m.graph.node)
    params = sum(int(np.prod(i.dims)) for i in m.graph.initializer if i.data_type in (1, 10, 11, 3, 2))

    def io(vs: Any) -> list[dict[str, Any]]:
        out = []
        for v in vs:
            tt = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                        "shape": [d.dim_param or d.dim_value for d in tt.shape.dim]})
        return out

    meta = read_meta(m)
    return {"format": "onnx", "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None),
            "precision": meta.get("precision"), "params": params, "nodes": len(m.graph.node),
            "ops": dict(ops.most_common()), "qdq_pairs": ops.get("DequantizeLinear", 0), "inputs": io(m.graph.input),
            "outputs": io(m.graph.output), "arch": meta.get("arch"), "made_for": meta.get("made_for", "onnx"),
            "external_data": any(i.data_location == 1 for i in m.graph.initializer)}



# ------------------------------------------------------------------------------------------
# which MACs run in integer kernels after onnxruntime's optimizer
# ------------------------------------------------------------------------------------------

# op -> (index of the weight/right operand, kind); kind "conv" counts numel(out) * prod(w[1:]),
# "matmul" numel(out) * K (K: the left operand's reduced axis)
_MAC_OPS: dict[str, tuple[int, str, bool]] = {
    "Conv": (1, "conv", False), "FusedConv": (1, "conv", False), "NhwcConv": (1, "conv", False),
    "ConvTranspose": (1, "convT", False),
    "QLinearConv": (3, "conv", True), "NhwcQLinearConv": (3, "conv", True), "ConvInteger": (1, "conv", True),
    "MatMul": (0, "matmul", False), "FusedMatMul": (0, "matmul", False), "Gemm": (0, "gemm", False),
    "FusedGemm": (0, "gemm", False),
    "QLinearMatMul": (0, "matmul", True), "MatMulInteger": (0, "matmul", True),
    "MatMulIntegerToFloat": (0, "matmul", True), "DynamicQuantizeMatMul": (0, "matmul", True),
    "QGemm": (0, "gemm", True),
}


def integer_macs(path: Path, threads: int = 1) -> dict[str, Any]:
    """MACs of conv/linear/matmul nodes in onnxruntime's optimized CPU graph, integer vs float.

    The file is optimized by onnxruntime (ORT_ENABLE_ALL, CPU provider) and written out with
    SessionOptions.optimized_model_filepath; that graph is run once at batch 1 with every
    intermediate exposed, to read the shapes, and each node's MACs are counted from them.
    Returns macs (per call, batch 1), integer_macs, integer_macs_share and per-op counts.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="edgediff-ortopt-") as td:
        opt = os.path.join(td, "opt.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = opt
        # a model with external data: the optimized copy keeps its own beside it (else it would
        # point at the original's .data name relative to this temp dir)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BadInput(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None
        m = onnx.load(opt)
        inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
        nodes = [n for n in m.graph.node if n.op_type in _MAC_OPS]
        wanted = {o for n in nodes for o in n.output[:1]} | {n.input[_MAC_OPS[n.op_type][0]] for n in nodes}
        wanted |= {n.input[1] for n in nodes if _MAC_OPS[n.op_type][1] == "conv"}
        wanted |= {n.input[3] for n in nodes if n.op_type in ("QLinearMatMul", "QGemm")}
        wanted -= set(inits)
        graph_out = {o.name for o in m.graph.output}
        for name in sorted(wanted - graph_out):
            m.graph.output.append(onnx.ValueInfoProto(name=name))
        so2 = ort.SessionOptions()
        so2.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so2.intra_op_num_threads = threads
        so2.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), so2, providers=["CPUExecutionProvider"])
        feed = _example_feed(sess)
        names = [o.name for o in sess.get_outputs()]
        shapes = {n: tuple(v.shape) for n, v in zip(names, sess.run(names, feed))}
    shapes.update(inits)
    total = integer = 0
    by_op: Counter[str] = Counter()
    float_nodes: list[dict[str, Any]] = []
    for n in nodes:
        idx, kind, is_int = _MAC_OPS[n.op_type]
        out = shapes.get(n.output[0])
        if out is None:
            continue
        numel = int(np.prod(out))
        if kind in ("conv", "convT"):
            w = shapes.get(n.input[3] if n.op_type in ("QLinearConv", "NhwcQLinearConv") else n.input[1])
            if w is None:
                continue
            macs = numel * int(np.prod(w[1:])) if kind == "conv" else int(np.prod(shapes.get(n.input[0], (0,)))) * int(
                np.prod(w[1:]))
        else:
            a = shapes.get(n.input[0])
            if a is None or not a:
                continue
            trans_a = any(x.name == "transA" and x.i for x in n.attribute)
            k = a[0] if (kind == "gemm" and trans_a) else a[-1]
            macs = numel * int(k)
        total += macs
        by_op[n.op_type] += macs
        if is_int:
            integer += macs
        else:
            float_nodes.append({"node": n.name, "op": n.op_type, "macs": macs})
    float_nodes.sort(key=lambda d: -d["macs"])
    return {"macs": total, "integer_macs": integer, "integer_macs_share": round(integer / total, 4) if total else 0.0,
            "macs_by_op": dict(by_op.most_common()), "float_mac_nodes": float_nodes[:10],
            "measured_on": f"onnxruntime {ort.__version__} CPU optimized graph (ORT_ENABLE_ALL), batch 1"}


def _example_feed(sess: Any) -> dict[str, np.ndarray]:
    """Batch-1 inputs for a session: the graph's own shapes, symbolic axes as 1."""
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        if "int" in i.type:
            feed[i.name] = np.zeros(shape, np.int64 if "64" in i.type else np.int32)
        else:
            feed[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * (
                100 if i.name == "timestep" else 1)
    return feed


def structural_check(path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
    """I/O names, dtypes and shapes against the contract (and the reference's signature)."""
    info = onnx_info(path)
    problems = []
    names = [i["name"] for i in info["inputs"]]
    if reference is not None:
        want = input_names(reference.signature)
        if names != want:
            problems.append(f"inputs {names} != {want}")
        s = next((i for i in info["inputs"] if i["name"] == "sample"), None)
        if s and [d for d in s["shape"][1:]] != list(reference.signature.sample_shape):
            problems.append(f"sample shape {s['shape']} does not match {list(reference.signature.sample_shape)}")
    if [o["name"] for o in info["outputs"]] != [OUTPUT_NAME]:
        problems.append(f"outputs {[o['name'] for o in info['outputs']]} != ['{OUTPUT_NAME}']")
    for i in info["inputs"]:
        want_dtype = "int64" if i["name"] == "class_labels" else "float32"
        if i["dtype"] != want_dtype:
            problems.append(f"input {i['name']} is {i['dtype']}, expected {want_dtype}")
        if i["shape"] and isinstance(i["shape"][0], int):
            problems.append(f"input {i['name']} has a fixed batch axis")
    return {"ok": not problems, "problems": problems, "ops": info["ops"], "inputs": info["inputs"],
            "outputs": info["outputs"]}


class OnnxBackend(Backend):
    target = "onnx"
    precisions = PRECISIONS
    suffixes = (".onnx",)

    def available(self) -> tuple[bool, str]:
        return probe_import("onnx", "pip install onnx")

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        return probe_import("onnxruntime", "pip install onnxruntime")

    def _export(self, model: DiffusionModel, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        proto, facts = build_onnx(model, precision)
        facts.update(write_onnx(proto, out, force=force))
        return ExportReport(self.target, precision, str(out), facts.pop("size_bytes"), extra=facts)

    def load_denoiser(self, path: Path) -> OnnxDenoiser:
        ok, why = self.runtime_available(path)
        if not ok:
            raise Unavailable(f"running {path} needs onnxruntime: {why}")
        return OnnxDenoiser(Path(path), threads=threads())

    def check(self, path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
        return structural_check(Path(path), reference)

    def info(self, path: Path) -> dict[str, Any]:
        data = onnx_info(Path(path))
        ok, why = self.runtime_available(path)
        if not ok:
            data["macs_reason"] = f"macs and integer_macs_share come from onnxruntime's optimized graph: {why}"
            return data
        im = integer_macs(Path(path))
        data["macs"] = im["macs"]
        if data.get("precision") == "int8" or im["integer_macs"]:
            data.update({k: im[k] for k in ("integer_macs", "integer_macs_share", "macs_by_op", "float_mac_nodes")})
        data["macs_measured_on"] = im["measured_on"]
        return data


BACKEND = OnnxBackend()
