"""The FPGA backend: write an HLS project for a quantized model and verify it by C-simulation.

`edgediff export X --target fpga -o DIR` where X is a QDQ-quantized ONNX model (made by any
tool, e.g. onnxruntime.quantization.quantize_static) or an edgediff artifact carrying
QuantParams. The project holds:

    hls/                 systolic.h/.cpp, top.cpp, tb.cpp (the design and its testbench)
    vectors/             per quantized layer: configuration, int8 weights/bias, input vectors,
                         expected outputs from fpga/sim.py (the bit-accurate model)
    build/csim           the g++ C-simulation binary (what was run here)
    run_hls.tcl          Vitis HLS script: csim_design, csynth_design, cosim_design, export_design
    layers.json          the GEMM view of every layer (for the estimator and `edgediff profile`)
    fpga_project.json    marker + report: each layer with `bit_exact` and `mismatches`, cycles,
                         host-side ops with their MACs share, estimates

Verification rung (docs/architecture.md, "Verification"): the g++ C-simulation runs here and every output of every
quantized layer is compared bit for bit with sim.py, which itself matches ONNX Runtime's integer
kernels (each layer is also run through ONNX Runtime here: `ort_bit_exact`). Synthesis and
co-simulation need Vitis HLS, which is not installed here: the TCL script is written, not run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.exporters.base import Backend, ExportReport
from edgediff.fpga import csim, estimate, sim
from edgediff.fpga.sim import ConvGeom, QLayer

from edgediff.artifact import atomic_dir
from edgediff.errors import BadInput, Unavailable

ROUNDING_DEFAULT: sim.Rounding = "ort"
HOST_SIDE_HINT = {
    "GroupNorm": "GroupNorm", "SiLU": "SiLU", "InstanceNormalization": "GroupNorm", "GroupNormalization": "GroupNorm",
    "LayerNormalization": "LayerNorm",
    "Softmax": "softmax", "Sigmoid": "SiLU (sigmoid)", "Mul": "elementwise", "Add": "elementwise", "Conv": "float conv",
    "MatMul": "float matmul", "Gemm": "float gemm", "Resize": "upsample", "Concat": "concat",
}
_SHAPE_OPS = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast", "ConstantOfShape",
              "Slice", "Transpose", "Concat", "Flatten", "Expand", "Range"}


@dataclass
class ExtractedLayer:
    layer: QLayer
    node: str
    op_type: str
    x: np.ndarray | None = None
    x2: np.ndarray | None = None
    x_shape: tuple[int, ...] = ()
    x2_shape: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        m, k, n, reps = self.layer.gemm_dims(self.x_shape, self.x2_shape)
        return {"name": self.layer.name, "node": self.node, "op": self.op_type, "kind": self.layer.kind, "m": m, "k": k,
                "n": n, "reps": reps, "macs": m * k * n * reps, "input_shape": list(self.x_shape),
                "requant": self.layer.out_scale is not None, "weight_bits": self.layer.w_bits,
                "params": int((self.layer.w.size if self.layer.w is not None else 0)
                              + (np.asarray(self.layer.bias).size if self.layer.bias is not None else 0)),
                "activation": "int8" if self.layer.x_signed else "uint8", **array_geometry(self.layer, self.x_shape)}


def array_geometry(layer: QLayer, x_shape: tuple[int, ...]) -> dict[str, Any]:
    """What the array's schedule needs beyond M/K/N: K in 128-bit words, groups, and a conv's geometry."""
    if layer.kind != "conv":
        return {"k_words": -(-int(layer.w.shape[0] if layer.kind == "gemm" and layer.w is not None
                                  else x_shape[-1]) // estimate.VEC), "groups": 1}
    assert layer.w is not None
    _, c, h, w = x_shape
    o, cg, kh, kw = layer.w.shape
    g = layer.geom
    ho, wo = g.out_hw(h, w, kh, kw)
    return {"k_words": kh * kw * -(-cg // estimate.VEC), "groups": g.groups,
            "conv": {"h": h, "w": w, "ho": ho, "wo": wo, "kh": kh, "kw": kw, "sh": g.stride[0], "sw": g.stride[1],
                     "pt": g.pads[0], "pl": g.pads[1], "dh": g.dilation[0], "dw": g.dilation[1]}}


@dataclass
class Extracted:
    source: str
    layers: list[ExtractedLayer] = field(default_factory=list)
    host_ops: list[dict[str, Any]] = field(default_factory=list)

    def layer_dicts(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self.layers]


# ------------------------------------------------------------------ QDQ ONNX -> layers
def _feeds(model: Any, seed: int) -> dict[str, np.ndarray]:
    """Deterministic inputs for a graph: symbolic dims 1, x_t ~ N(0,1), timesteps 500, labels 0."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[inp.name] = np.zeros(shape, dtype)
        elif "time" in inp.name.lower():
            feeds[inp.name] = np.full(shape, 500.0, dtype)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _run_intermediates(model: Any, names: list[str], seed: int) -> dict[str, np.ndarray]:
    """Values of `names` (intermediate tensors) in one unoptimized ONNX Runtime run."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every Q/DQ node and tensor
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(names, _feeds(model, seed))
    return dict(zip(names, outs))


class _Graph:
    def __init__(self, model: Any, path: str) -> None:
        from onnx import numpy_helper

        self.path = path
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.init_types = {i.name: i.data_type for i in model.graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in model.graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self.inits[node.output[0]] = numpy_helper.to_array(a.t)
        for node in model.graph.node:  # QuantizeLinear of a constant (a weight quantized in the graph): fold it
            if node.op_type == "Identity" and node.input[0] in self.inits:
                self.inits[node.output[0]] = self.inits[node.input[0]]
            if node.op_type == "QuantizeLinear" and all(i in self.inits for i in node.input if i) and len(node.input) > 2:
                x = np.asarray(self.inits[node.input[0]], np.float32)
                scale, zp = np.asarray(self.inits[node.input[1]], np.float32), np.asarray(self.inits[node.input[2]])
                if scale.size > 1:
                    shape = [1] * x.ndim
                    shape[int(_attr(node, "axis", 1)) % x.ndim] = -1
                    scale, zpv = scale.reshape(shape), zp.reshape(shape).astype(np.int64)
                else:
                    zpv = zp.astype(np.int64)
                info = np.iinfo(zp.dtype)
                q = np.clip(np.rint(x / scale).astype(np.int64) + zpv, info.min, info.max).astype(zp.dtype)
                self.inits[node.output[0]] = q
                self.init_types[node.output[0]] = self.init_types.get(node.input[2], 0)

    def dq(self, tensor: str) -> Any | None:
        p = self.producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def weight_dq(self, tensor: str) -> tuple[Any | None, bool]:
        """(DequantizeLinear of a constant, transposed?) behind a weight operand: DQ(W) or Transpose(DQ(W))."""
        dq = self.dq(tensor)
        if dq is not None:
            return dq, False
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "Transpose" and list(_attr(p, "perm", [1, 0])) == [1, 0]:
            dq = self.dq(p.input[0])
            if dq is not None and dq.input[0] in self.inits:
                return dq, True
        return None, False

    def act_dq(self, tensor: str) -> tuple[Any | None, list[int] | None]:
        """(DequantizeLinear, perm) behind an activation operand: DQ(x) or Transpose(DQ(x)) (per-tensor
        quantization commutes with a transpose, e.g. K^T in attention)."""
        dq = self.dq(tensor)
        if dq is not None:
            return dq, None
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "Transpose":
            dq = self.dq(p.input[0])
            if dq is not None and dq.input[0] not in self.inits:
                return dq, [int(v) for v in _attr(p, "perm", [])] or None
        return None, None

    def concat_dqs(self, tensor: str) -> list[Any] | None:
        """The DequantizeLinears of a channel Concat (a shortcut-split input with a scale per part)."""
        p = self.producer.get(tensor)
        if p is None or p.op_type != "Concat" or _attr(p, "axis", 0) != 1:
            return None
        dqs = [self.dq(i) for i in p.input]
        return dqs if dqs and all(d is not None for d in dqs) else None

    def quantized(self, node: Any, i: int) -> bool:
        t = node.input[i]
        if node.op_type == "Conv" and i == 0 and self.concat_dqs(t) is not None:
            return True
        if i == 1 and (self.weight_dq(t)[0] is not None or (node.op_type == "MatMul" and self.act_dq(t)[0] is not None)):
            return True
        return self.dq(t) is not None

    def const(self, name: str, node: Any, what: str) -> np.ndarray:
        if name not in self.inits:
            raise BadInput(f"{self.path}: node {node.name!r} ({node.op_type}): {what} {name!r} is not a constant")
        return self.inits[name]


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dq_params(g: _Graph, dq: Any, who: Any, role: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(scale, zero point, axis) of a DequantizeLinear feeding `who`."""
    scale = np.asarray(g.const(dq.input[1], dq, "scale"), np.float32)
    zp = np.asarray(g.const(dq.input[2], dq, "zero point")) if len(dq.input) > 2 and dq.input[2] else None
    if _attr(dq, "block_size", 0):
        raise BadInput(f"{g.path}: node {dq.name!r}: blocked quantization of the {role} of {who.name!r} is not supported")
    axis = _attr(dq, "axis", 1) if scale.size > 1 else None
    if zp is None:
        zp = np.zeros(scale.shape, np.int32)
    return scale, zp, axis


def _act(g: _Graph, dq: Any, who: Any, role: str, values: dict[str, np.ndarray] | None) -> tuple[float, int, bool]:
    scale, zp, _ = _dq_params(g, dq, who, role)
    if scale.size != 1:
        raise BadInput(f"{g.path}: node {who.name!r} ({who.op_type}): unsupported QDQ pattern: the {role} "
                       f"({dq.name!r}) is quantized per channel; the array takes per-tensor activations")
    has_zp = len(dq.input) > 2 and bool(dq.input[2])
    dt = zp.dtype if has_zp else np.dtype(np.uint8)  # ONNX: no zero point means uint8 with zero point 0
    if values is not None and dq.input[0] in values:
        dt = values[dq.input[0]].dtype
    if dt not in (np.dtype(np.uint8), np.dtype(np.int8)):
        raise BadInput(f"{g.path}: node {who.name!r} ({who.op_type}): the {role} is {dt} ({dq.name!r}); "
                       "the array takes 8-bit activations")
    return float(scale.reshape(())), int(zp.reshape(())), dt == np.dtype(np.int8)


def _weight(g: _Graph, dq: Any, who: Any, out_axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer weight, per-output-channel scales (or scalar), bits; checks symmetry and the axis."""
    w = g.const(dq.input[0], dq, "weight")
    scale, zp, axis = _dq_params(g, dq, who, "weight")
    if w.dtype == np.uint8 or (w.dtype.kind == "u"):
        raise BadInput(f"{g.path}: node {dq.name!r} (weight of {who.name!r}): unsigned weights are not supported; "
                       "quantize weights as signed symmetric int8 (QuantType.QInt8)")
    if np.any(np.asarray(zp) != 0):
        raise BadInput(f"{g.path}: node {dq.name!r} (weight of {who.name!r}): per-channel zero points other than zero "
                       "are not supported; the array takes symmetric weights (zero point 0)")
    if scale.size > 1:
        axis = axis % w.ndim if axis is not None else 1
        if axis != out_axis % w.ndim:
            raise BadInput(f"{g.path}: node {dq.name!r} (weight of {who.name!r}): per-channel scales along axis {axis} "
                           f"are not supported; expected the output-channel axis {out_axis % w.ndim}")
    from onnx import TensorProto

    bits = 4 if g.init_types.get(dq.input[0]) == TensorProto.INT4 else 8
    return w.astype(np.int64), scale, bits


def _bias(g: _Graph, name: str, who: Any, s_x: float, s_w: np.ndarray) -> np.ndarray:
    dq = g.dq(name)
    if dq is None:
        # a float bias (some exporters leave it unquantized): the array adds it as int32 at scale s_x*s_w,
        # rounded half to even like onnxruntime's quantizer does
        b = np.asarray(g.const(name, who, "bias"), np.float64)
        return np.rint(b / (np.float64(np.float32(s_x)) * np.asarray(s_w, np.float64))).astype(np.int64)
    b = g.const(dq.input[0], dq, "bias")
    scale, zp, _ = _dq_params(g, dq, who, "bias")
    if b.dtype != np.int32 or np.any(zp != 0):
        raise BadInput(f"{g.path}: node {dq.name!r} (bias of {who.name!r}): expected int32 with zero point 0, got {b.dtype}")
    want = (np.float32(s_x) * np.asarray(s_w, np.float32)).astype(np.float32)
    if not np.allclose(np.broadcast_to(scale, want.shape) if want.size > 1 else scale, want, rtol=1e-5, atol=0):
        raise BadInput(f"{g.path}: node {dq.name!r} (bias of {who.name!r}): bias scale is not s_x*s_w")
    return b.astype(np.int64)


def _output(g: _Graph, node: Any) -> tuple[float | None, int, bool]:
    cons = g.consumers.get(node.output[0], [])
    if len(cons) == 1 and cons[0].op_type == "QuantizeLinear":
        q = cons[0]
        scale = np.asarray(g.const(q.input[1], q, "scale"), np.float32)
        zp = np.asarray(g.const(q.input[2], q, "zero point")) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if scale.size != 1:
            raise BadInput(f"{g.path}: node {q.name!r}: per-channel output quantization of {node.name!r} is not supported")
        if zp.dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
            raise BadInput(f"{g.path}: node {q.name!r}: output of {node.name!r} quantized to {zp.dtype}; expected 8 bits")
        return float(scale.reshape(())), int(zp.reshape(())), zp.dtype == np.dtype(np.int8)
    return None, 0, False  # int32 accumulators go to the host (e.g. a float Add or GroupNorm follows)


def _conv_layers(g: _Graph, node: Any, values: dict[str, np.ndarray] | None) -> list[tuple[QLayer, list[str]]]:
    """One conv layer, or one per part when its input is a Concat of differently quantized parts."""
    parts = g.concat_dqs(node.input[0])
    if parts is None:
        return [_conv_layer(g, node, values)]
    if values is None:  # the parts' channel counts are known once the tensors have run
        return [(None, [d.input[0] for d in parts])]  # type: ignore[list-item]
    if int(_attr(node, "group", 1)) != 1:
        raise BadInput(f"{g.path}: node {node.name!r}: a concatenated input with per-part scales on a grouped conv")
    out, c0 = [], 0
    for i, dq in enumerate(parts):
        c = values[dq.input[0]].shape[1]
        layer, ins = _conv_layer(g, node, values, dqx=dq, channels=(c0, c0 + c), with_bias=i == 0)
        layer.name = f"{node.name}[{c0}:{c0 + c}]"
        layer.out_scale = None  # the parts' accumulators are added (in float) before any requantization
        out.append((layer, ins))
        c0 += c
    return out


def _conv_layer(g: _Graph, node: Any, values: dict[str, np.ndarray] | None, dqx: Any = None,
                channels: tuple[int, int] | None = None, with_bias: bool = True) -> tuple[QLayer, list[str]]:
    dqx = dqx if dqx is not None else g.dq(node.input[0])
    dqw = g.dq(node.input[1])
    if dqw is None:
        raise BadInput(f"{g.path}: node {node.name!r} (Conv): unsupported QDQ pattern: the weight is not quantized")
    s_x, zp_x, x_signed = _act(g, dqx, node, "input", values)
    w, s_w, bits = _weight(g, dqw, node, 0)
    if channels is not None:
        w = w[:, channels[0]:channels[1]]
    if w.ndim != 4:
        raise BadInput(f"{g.path}: node {node.name!r}: only 2-D convolutions are supported (weight {w.shape})")
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise BadInput(f"{g.path}: node {node.name!r}: auto_pad is not supported; export with explicit pads")
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    geom = ConvGeom(tuple(_attr(node, "strides", [1, 1])), (pads[0], pads[1], pads[2], pads[3]),
                    tuple(_attr(node, "dilations", [1, 1])), int(_attr(node, "group", 1)))
    bias = _bias(g, node.input[2], node, s_x, s_w) if len(node.input) > 2 and node.input[2] and with_bias else None
    out_scale, out_zp, out_signed = _output(g, node)
    layer = QLayer(node.name, "conv", s_x, zp_x, s_w.reshape(-1) if s_w.size > 1 else s_w.reshape(()), w=w, bias=bias,
                   geom=geom, out_scale=out_scale, out_zp=out_zp, out_signed=out_signed, x_signed=x_signed, w_bits=bits,
                   op_type="Conv")
    return layer, [dqx.input[0]]


def _matmul_layer(g: _Graph, node: Any, values: dict[str, np.ndarray] | None) -> tuple[QLayer, list[str]]:
    dqa = g.dq(node.input[0])
    dqb, transposed = g.weight_dq(node.input[1])
    s_x, zp_x, x_signed = _act(g, dqa, node, "input", values)
    out_scale, out_zp, out_signed = _output(g, node)
    if node.op_type == "MatMul" and transposed:  # MatMul(x, Transpose(DQ(W (N, K)))): a torch Linear without bias
        w, s_w, bits = _weight(g, dqb, node, 0)
        if w.ndim != 2:
            raise BadInput(f"{g.path}: node {node.name!r}: MatMul weight must be 2-D, got {w.shape}")
        layer = QLayer(node.name, "gemm", s_x, zp_x, s_w.reshape(-1) if s_w.size > 1 else s_w.reshape(()), w=w.T.copy(),
                       out_scale=out_scale, out_zp=out_zp, out_signed=out_signed, x_signed=x_signed, w_bits=bits,
                       op_type="MatMul")
        return layer, [dqa.input[0]]
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            raise BadInput(f"{g.path}: node {node.name!r} (Gemm): only transA=0, alpha=beta=1 is supported")
        trans_b = bool(_attr(node, "transB", 0))
        w, s_w, bits = _weight(g, dqb, node, 0 if trans_b else 1)
        w = w.T if trans_b else w
        bias = _bias(g, node.input[2], node, s_x, s_w) if len(node.input) > 2 and node.input[2] else None
        layer = QLayer(node.name, "gemm", s_x, zp_x, s_w.reshape(-1) if s_w.size > 1 else s_w.reshape(()), w=w, bias=bias,
                       out_scale=out_scale, out_zp=out_zp, out_signed=out_signed, x_signed=x_signed, w_bits=bits,
                       op_type="Gemm")
        return layer, [dqa.input[0]]
    if dqb is not None and dqb.input[0] in g.inits:  # MatMul by a constant weight (K, N): a linear layer without bias
        w, s_w, bits = _weight(g, dqb, node, 1)
        if w.ndim != 2:
            raise BadInput(f"{g.path}: node {node.name!r}: MatMul weight must be 2-D, got {w.shape}")
        layer = QLayer(node.name, "gemm", s_x, zp_x, s_w.reshape(-1) if s_w.size > 1 else s_w.reshape(()), w=w,
                       out_scale=out_scale, out_zp=out_zp, out_signed=out_signed, x_signed=x_signed, w_bits=bits,
                       op_type="MatMul")
        return layer, [dqa.input[0]]
    dqb, perm = g.act_dq(node.input[1])
    s_b, zp_b, b_signed = _act(g, dqb, node, "second input", values)
    layer = QLayer(node.name, "matmul", s_x, zp_x, np.asarray(s_b, np.float32), zp_w=zp_b, out_scale=out_scale,
                   out_zp=out_zp, out_signed=out_signed, x_signed=x_signed, x2_signed=b_signed, op_type="MatMul")
    return layer, [dqa.input[0], dqb.input[0] if perm is None else (dqb.input[0], perm)]  # type: ignore[list-item]


HOST_MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum")


def _float_macs(node: Any, shapes: dict[str, tuple[int, ...]], g: _Graph) -> int:
    """MACs of an op left on the host (float Conv/ConvTranspose/MatMul/Gemm/Einsum); 0 for others."""
    def shape(name: str) -> tuple[int, ...]:
        return tuple(g.inits[name].shape) if name in g.inits else shapes[name]

    try:
        if node.op_type == "Conv":
            return int(np.prod(shapes[node.output[0]])) * int(np.prod(shape(node.input[1])[1:]))
        if node.op_type == "ConvTranspose":  # every input pixel scatters through the whole (C/g, O/g, kh, kw) kernel
            x, w = shape(node.input[0]), shape(node.input[1])
            return int(np.prod(x)) * int(np.prod(w[1:]))
        if node.op_type in ("MatMul", "Gemm"):
            a = shape(node.input[0])
            return int(np.prod(shapes[node.output[0]])) * int(a[-1] if not _attr(node, "transA", 0) else a[-2])
        if node.op_type == "Einsum":
            from edgediff.profiling.graph import einsum_macs

            eq = _attr(node, "equation", b"")
            eq = eq.decode() if isinstance(eq, bytes) else str(eq)
            return einsum_macs(eq, [list(shape(i)) for i in node.input])
    except KeyError:
        return 0
    return 0


def extract_onnx(path: Path | str, with_vectors: bool = True, seed: int = 0) -> Extracted:
    """Every quantized Conv/Gemm/MatMul of a QDQ ONNX model as a QLayer (+ its integer inputs).

    Raises BadInput naming the node for float-only models and for QDQ patterns the array cannot run.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - onnx raises several types for a bad file
        raise BadInput(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    for i, n in enumerate(model.graph.node):  # reports and errors name nodes: give unnamed ones a name (in memory)
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    g = _Graph(model, str(path))
    ops = [n.op_type for n in model.graph.node]
    if "DequantizeLinear" not in ops:
        if any(op in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger") for op in ops):
            raise BadInput(f"{path}: QOperator-format ONNX (QLinearConv/QLinearMatMul) is not supported; "
                           "quantize in QDQ format (QuantFormat.QDQ)")
        raise BadInput(f"{path}: float-only ONNX model (no QuantizeLinear/DequantizeLinear nodes); quantize it first "
                       "(edgediff compress --recipe w8a8, or onnxruntime.quantization.quantize_static in QDQ format)")
    found: list[tuple[QLayer, list[str], Any]] = []
    host: list[Any] = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            dq = [g.quantized(node, i) for i in range(min(2, len(node.input)))]
            if all(dq):
                if node.op_type == "Conv":
                    for layer, ins in _conv_layers(g, node, None):
                        found.append((layer, ins, node))
                else:
                    layer, ins = _matmul_layer(g, node, None)
                    found.append((layer, ins, node))
                continue
            if any(dq):
                which = "input" if not dq[0] else ("weight" if node.op_type != "MatMul" or node.input[1] in g.inits
                                                   else "second input")
                raise BadInput(f"{path}: node {node.name!r} ({node.op_type}): unsupported QDQ pattern: the {which} is "
                               "not quantized (DequantizeLinear on one operand only)")
        if node.op_type in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"):
            raise BadInput(f"{path}: node {node.name!r} ({node.op_type}): QOperator nodes are not supported; "
                           "quantize in QDQ format")
        host.append(node)
    if not found:
        raise BadInput(f"{path}: no quantized Conv/Gemm/MatMul (DequantizeLinear on both operands) found")
    wanted = sorted({t if isinstance(t, str) else t[0] for _, ins, _ in found for t in ins}
                    | {n.output[0] for n in host if n.op_type not in _SHAPE_OPS}
                    | {i for n in host if n.op_type in HOST_MAC_OPS for i in n.input if i and i not in g.inits})
    values = _run_intermediates(model, wanted, seed)
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    out = Extracted(str(path))
    done: set[str] = set()
    for _, _, node in found:
        if node.name in done:
            continue
        done.add(node.name)
        # re-read activation types (and split points) now that the tensors' dtypes and shapes are known
        made = _conv_layers(g, node, values) if node.op_type == "Conv" else [_matmul_layer(g, node, values)]
        for layer, ins in made:
            x = values[ins[0]]
            x2 = None
            if len(ins) > 1:
                x2 = values[ins[1]] if isinstance(ins[1], str) else np.transpose(values[ins[1][0]], ins[1][1])
            out.layers.append(ExtractedLayer(layer, node.name, node.op_type, x.astype(np.int64) if with_vectors else None,
                                             None if x2 is None or not with_vectors else x2.astype(np.int64),
                                             tuple(x.shape), None if x2 is None else tuple(x2.shape)))
    for node in host:
        if node.op_type in _SHAPE_OPS:
            continue
        shp = shapes.get(node.output[0], ())
        out.host_ops.append({"name": node.name, "op": node.op_type, "what": HOST_SIDE_HINT.get(node.op_type, node.op_type),
                             "macs": _float_macs(node, shapes, g), "elements": int(np.prod(shp)) if shp else 0})
    return out


# ------------------------------------------------------------------ edgediff artifact (QuantParams) -> layers
def extract_quantparams(model: Any, seed: int = 0) -> Extracted:
    """Layers of a DiffusionModel quantized by the edgediff quant pass (QuantParams + on-grid float weights).

    The float model (wrappers stripped) runs once on the model's example inputs; each quantized
    layer's input is quantized with its own input TensorQuant (the exact integers the quantized
    model feeds that layer), weights recovered as round(w / scale). QuantParams carry no output
    scale, so the array emits the int32 accumulators and the host dequantizes (`requant: false`).
    """
    import copy

    import torch

    from edgediff.quant_params import QuantParams, strip_quant_wrappers

    qp = QuantParams.of(model)
    if qp is None:
        raise BadInput("the model carries no quantization parameters: run a recipe with the quant pass "
                       "(e.g. edgediff compress MODEL --recipe w8a8) or pass a QDQ-quantized .onnx")
    module = strip_quant_wrappers(copy.deepcopy(model.denoiser)).eval()
    mods = dict(module.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    # attention matmuls: capture Q, K, V (the projections' outputs) of every quantized attention module
    attn_paths = sorted({n.split(":")[0] for n, lq in qp.layers.items() if lq.kind in ("matmul_qk", "matmul_av")})
    qkv: dict[tuple[str, str], torch.Tensor] = {}
    for ap in attn_paths:
        amod = mods.get(ap)
        if amod is None or not all(hasattr(amod, p) for p in ("to_q", "to_k", "to_v", "head_to_batch_dim")):
            continue
        for proj in ("to_q", "to_k", "to_v"):
            hooks.append(getattr(amod, proj).register_forward_hook(
                lambda _m, _a, o, _k=(ap, proj): qkv.__setitem__(_k, o.detach().clone())))
    for name, lq in qp.layers.items():
        if lq.kind not in ("conv", "linear"):
            continue  # attention matmuls: their operands are not module inputs (see the report's `skipped`)
        if name not in mods:
            raise BadInput(f"quantization parameters name layer {name!r}, which the denoiser does not have")
        hooks.append(mods[name].register_forward_pre_hook(
            lambda _m, args, _n=name: inputs.__setitem__(_n, args[0].detach().clone())))
    # the ops that stay on the host (GroupNorm, SiLU, LayerNorm...): listed with the elements they process
    host_elems: dict[str, tuple[str, int]] = {}
    for n, mod in mods.items():
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.SiLU, torch.nn.LayerNorm, torch.nn.GELU, torch.nn.Mish)):
            hooks.append(mod.register_forward_hook(
                lambda m, _a, o, _n=n: host_elems.__setitem__(_n, (type(m).__name__, int(o.numel())))))
    # float MAC ops left on the host: unquantized Conv2d/Linear, and the matmuls of unquantized attention
    quantized = {n for n, lq in qp.layers.items() if lq.kind in ("conv", "linear")}
    host_macs: dict[str, tuple[str, int]] = {}

    def _mac_hook(m: Any, _a: Any, o: Any, _n: str) -> None:
        per_out = m.in_features if isinstance(m, torch.nn.Linear) else (m.in_channels // m.groups) * int(
            np.prod(m.kernel_size))
        host_macs[_n] = (type(m).__name__, int(o.numel()) * int(per_out))

    attn_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    for n, mod in mods.items():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and n not in quantized:
            hooks.append(mod.register_forward_hook(lambda m, a, o, _n=n: _mac_hook(m, a, o, _n)))
        if n not in attn_paths and all(hasattr(mod, p) for p in ("to_q", "to_k", "heads")):
            for proj in ("to_q", "to_k"):
                hooks.append(getattr(mod, proj).register_forward_hook(
                    lambda _m, _a, o, _k=(n, proj): attn_shapes.__setitem__(_k, tuple(o.shape))))
    from edgediff.model import DenoiserModule

    wrapped = DenoiserModule(module, model.signature)
    with torch.no_grad():
        wrapped(**model.example_inputs(batch=1, seed=seed))
    for h in hooks:
        h.remove()
    out = Extracted("artifact")
    for name, lq in qp.layers.items():
        if lq.kind in ("matmul_qk", "matmul_av"):
            _attention_layer(out, name, lq, qp, mods, qkv)
            continue
        if lq.kind not in ("conv", "linear") or name not in inputs:
            continue
        if lq.weight is None or lq.input is None:
            raise BadInput(f"layer {name!r}: quantization parameters lack a weight or input quantizer")
        if lq.weight.bits > 8 or lq.input.bits > 8:
            raise BadInput(f"layer {name!r}: {lq.weight.bits}-bit weights / {lq.input.bits}-bit activations; the array "
                           "takes at most 8 bits")
        if not lq.weight.symmetric:
            raise BadInput(f"layer {name!r}: per-channel zero points other than zero are not supported")
        if lq.input.scale.numel() != 1:
            raise BadInput(f"layer {name!r}: per-channel activation quantization is not supported")
        mod = mods[name]
        if not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            out.host_ops.append({"name": name, "op": type(mod).__name__, "what": "quantized module the array does not "
                                 "run (Conv2d and Linear run on it)", "macs": 0, "elements": 0})
            continue
        x = inputs[name]
        wq = lq.weight.quantize(mod.weight.detach()).numpy().astype(np.int64)
        s_w = lq.weight.scale.numpy().astype(np.float32).reshape(-1)
        b_float = mod.bias.detach().double().numpy() if getattr(mod, "bias", None) is not None else None
        split = lq.meta.get("split_at") if isinstance(mod, torch.nn.Conv2d) else None
        # Q-Diffusion's shortcut splitting: channels [:split] and [split:] of a concatenated input have their own
        # activation scales, so the conv runs as two GEMMs over the two channel ranges (the host adds the two
        # dequantized int32 results); the bias goes with the first part.
        parts = [(lq.input, slice(None), name)]
        if split and lq.input2 is not None and x.shape[1] > split:
            if mod.groups != 1:
                raise BadInput(f"layer {name!r}: a split input on a grouped conv is not supported")
            parts = [(lq.input, slice(0, split), f"{name}[:{split}]"), (lq.input2, slice(split, None), f"{name}[{split}:]")]
        for i, (tq, sl, lname) in enumerate(parts):
            xq = tq.quantize(x[:, sl] if len(parts) > 1 else x).numpy().astype(np.int64)
            s_x = float(tq.scale)
            bias = None
            if b_float is not None and i == 0:
                bias = np.rint(b_float / (np.float64(np.float32(s_x)) * s_w.astype(np.float64))).astype(np.int64)
            common = {"s_x": s_x, "zp_x": int(tq.zero_point), "s_w": s_w, "bias": bias, "x_signed": tq.signed,
                      "w_bits": lq.weight.bits}
            if isinstance(mod, torch.nn.Conv2d):
                pad = mod.padding if isinstance(mod.padding, tuple) else (0, 0)
                if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                    raise BadInput(f"layer {name!r}: padding {mod.padding!r}/{mod.padding_mode} is not supported")
                geom = ConvGeom(tuple(mod.stride), (pad[0], pad[1], pad[0], pad[1]), tuple(mod.dilation), mod.groups)
                w_part = wq[:, sl] if len(parts) > 1 else wq
                layer = QLayer(lname, "conv", w=w_part, geom=geom, op_type="Conv2d", **common)
            else:
                layer = QLayer(lname, "gemm", w=wq.T.copy(), op_type="Linear", **common)
            out.layers.append(ExtractedLayer(layer, name, layer.op_type, xq, None, tuple(xq.shape)))
    if not out.layers:
        raise BadInput("no quantized conv/linear layer found in the model's quantization parameters")
    for n, (op, elems) in host_elems.items():
        out.host_ops.append({"name": n, "op": op, "what": HOST_SIDE_HINT.get(op, op), "macs": 0, "elements": elems})
    for n, (op, macs) in host_macs.items():
        out.host_ops.append({"name": n, "op": op, "what": f"float {op} (not quantized)", "macs": macs, "elements": 0})
    for ap in sorted({k[0] for k in attn_shapes}):
        q, k = attn_shapes.get((ap, "to_q")), attn_shapes.get((ap, "to_k"))
        if q is None or k is None or len(q) != 3:
            continue
        # QK^T and softmax.V in float: B x Sq x Sk x inner multiply-adds each
        out.host_ops.append({"name": f"{ap}:attention", "op": "MatMul", "what": "float attention matmuls (not "
                             "quantized)", "macs": 2 * q[0] * q[1] * k[1] * q[2], "elements": 0})
    for ap in attn_paths:
        if (ap, "to_q") in qkv:
            out.host_ops.append({"name": f"{ap}:softmax", "op": "Softmax", "what": "softmax", "macs": 0,
                                 "elements": int(qkv[(ap, "to_q")].shape[0] * qkv[(ap, "to_q")].shape[1] ** 2
                                                 * mods[ap].heads) if hasattr(mods[ap], "heads") else 0})
    return out


def _attention_layer(out: Extracted, name: str, lq: Any, qp: Any, mods: dict[str, Any], qkv: dict[Any, Any]) -> None:
    """QK^T or softmax(.)V of a quantized attention module as a matmul layer on the array.

    Operands as the quantized model forms them (edgediff.quant's attention processor): heads folded
    into the batch, Q/K/V quantized with the layer's input/input2 quantizers, the softmax computed
    from the dequantized Q and K and quantized with the softmax quantizer.
    """
    import torch

    ap = name.split(":")[0]
    if (ap, "to_q") not in qkv or lq.input is None or lq.input2 is None:
        out.host_ops.append({"name": name, "op": lq.kind, "what": "attention matmul whose operands could not be "
                             "captured (not a diffusers Attention)", "macs": 0, "elements": 0})
        return
    attn = mods[ap]
    q, k, v = (attn.head_to_batch_dim(qkv[(ap, p)]) for p in ("to_q", "to_k", "to_v"))
    if lq.kind == "matmul_qk":
        a_int, b_int = lq.input.quantize(q), lq.input2.quantize(k).transpose(-1, -2)
    else:
        qk = qp.layers.get(f"{ap}:qk")
        if qk is not None and qk.input is not None and qk.input2 is not None:
            q, k = qk.input.dequantize(qk.input.quantize(q)), qk.input2.dequantize(qk.input2.quantize(k))
        probs = (torch.bmm(q, k.transpose(-1, -2)) * attn.scale).float().softmax(dim=-1)
        a_int, b_int = lq.input.quantize(probs), lq.input2.quantize(v)
    for tq in (lq.input, lq.input2):
        if tq.bits > 8 or tq.scale.numel() != 1:
            raise BadInput(f"layer {name!r}: {tq.bits}-bit / per-channel matmul operands are not supported by the array")
    a_np, b_np = a_int.numpy().astype(np.int64), b_int.contiguous().numpy().astype(np.int64)
    layer = QLayer(name, "matmul", float(lq.input.scale), int(lq.input.zero_point), np.asarray(float(lq.input2.scale),
                   np.float32), zp_w=int(lq.input2.zero_point), x_signed=lq.input.signed, x2_signed=lq.input2.signed,
                   op_type="MatMul")
    out.layers.append(ExtractedLayer(layer, name, "MatMul", a_np, b_np, tuple(a_np.shape), tuple(b_np.shape)))


# ------------------------------------------------------------------ the project
TCL = """# Vitis HLS script written by edgediff (run_hls.sh runs it where vitis_hls is on PATH).
#   vitis_hls -f run_hls.tcl         C-simulation, synthesis, RTL co-simulation, IP export
# The C-simulation below is the one edgediff already ran with g++ (build/csim); co-simulation of every
# layer is slow: trim vectors/layers.txt to a few layers for cosim_design.
set here [file normalize [file dirname [info script]]]
open_project -reset edgediff_systolic
set_top systolic_top
set flags "-I$here/hls {defines}"
add_files $here/hls/systolic.cpp -cflags $flags
add_files $here/hls/top.cpp -cflags $flags
add_files -tb $here/hls/tb.cpp -cflags $flags
open_solution -reset solution1 -flow_target vivado
set_part {{{part}}}
create_clock -period {period_ns} -name default
csim_design -argv "$here/vectors"
csynth_design
cosim_design -argv "$here/vectors"
export_design -format ip_catalog
exit
"""


RUN_HLS_SH = """#!/bin/sh
# csim_design, csynth_design, cosim_design and export_design of this project (run_hls.tcl) with Vitis HLS.
# Exit 3 with the reason when vitis_hls is not on PATH.
if ! command -v vitis_hls >/dev/null 2>&1; then
  echo "vitis_hls is not on PATH: install AMD Vitis HLS and source its settings64.sh" >&2
  exit 3
fi
cd "$(dirname "$0")" && exec vitis_hls -f run_hls.tcl
"""


def vitis_hls_status() -> tuple[bool, str]:
    """(on PATH, a one-line status) for Vitis HLS, which synthesis and co-simulation need."""
    exe = shutil.which("vitis_hls")
    return (True, f"found: {exe}") if exe else (False, "vitis_hls is not on PATH: csynth/cosim not run")


def synthesize(project: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run run_hls.tcl (csim, csynth, cosim, export) in `project` with Vitis HLS.

    Raises Unavailable (exit 3) with the reason when vitis_hls is not on PATH, BadInput for a folder that
    is not an FPGA project. Returns {"returncode", "log_tail", "csynth_report"} (the report path if written).
    """
    import subprocess

    from edgediff.errors import Unavailable

    project = Path(project)
    if not (project / "run_hls.tcl").is_file():
        raise BadInput(f"{project}: not an FPGA project (no run_hls.tcl)")
    ok, why = vitis_hls_status()
    if not ok:
        raise Unavailable(why)
    proc = subprocess.run(["vitis_hls", "-f", "run_hls.tcl"], cwd=project, capture_output=True, text=True,
                          timeout=timeout)
    reports = sorted(project.glob("edgediff_systolic/solution1/syn/report/*csynth.rpt"))
    return {"returncode": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-4000:],
            "csynth_report": str(reports[0]) if reports else None}


def _write_vectors(ext: Extracted, vec: Path, rounding: sim.Rounding, progress: Any = None) -> list[dict[str, Any]]:
    vec.mkdir(parents=True, exist_ok=True)
    recs = []
    lines = []
    for i, e in enumerate(ext.layers):
        stem = f"L{i:04d}"
        assert e.x is not None
        expect = e.layer.run(e.x, e.x2, rounding)
        csim.write_layer_vectors(vec, stem, e.layer, e.x, e.x2, expect, rounding)
        lines.append(f"{stem} {stem}\n")
        recs.append({"stem": stem, "expect": expect})
        if progress is not None:
            progress(i + 1, len(ext.layers))
    (vec / "layers.txt").write_text("".join(lines))
    return recs


def _ort_check(e: ExtractedLayer, expect: np.ndarray, rounding: sim.Rounding) -> dict[str, Any]:
    """The same layer in ONNX Runtime's integer kernels, compared with the simulator (ORT convention only)."""
    from edgediff.fpga.ortref import run_layer

    if rounding != "ort":
        return {"ort_bit_exact": None, "ort_note": f"rounding {rounding!r} is not ONNX Runtime's"}
    layer = e.layer
    try:
        ref = run_layer(layer, e.x, e.x2)
    except Exception as exc:  # noqa: BLE001 - a runtime that rejects a layer is reported, not fatal
        return {"ort_bit_exact": None, "ort_note": f"onnxruntime could not run the layer: {type(exc).__name__}: {exc}"[:200]}
    integer_op = layer.out_scale is None
    sat = sim.ort_pair_saturates(layer, integer_op=integer_op)
    ours = layer.run(e.x, e.x2, "ort", pair_saturate=sat) if sat else expect
    mism = int((np.asarray(ours) != ref).sum())
    rec: dict[str, Any] = {"ort_bit_exact": mism == 0, "ort_mismatches": mism,
                           "ort_accumulation": "int16 pairs, saturating (MLAS u8s8 on AVX2)" if sat else "exact int32"}
    if sat:
        rec["array_vs_ort_differing"] = int((np.asarray(expect) != ref).sum())
    return rec


_STAGE_KEYS = ("cycles", "load", "compute", "drain", "params", "words_read", "words_written")
_MODEL_KEY = {"cycles": "pipeline_cycles", "load": "load_cycles", "compute": "compute_cycles", "drain": "drain_cycles",
              "params": "param_cycles", "words_read": "words_read", "words_written": "words_written"}


def export_project(ext: Extracted, out: Path, force: bool = False, rounding: sim.Rounding = ROUNDING_DEFAULT,
                   rows: int = 16, cols: int = 16, k_tile: int = 512, clock_mhz: float = 200.0,
                   part: str = "xczu7ev-ffvc1156-2-e", compare_ort: bool = True, progress: Any = None,
                   board: str = "zcu104") -> dict[str, Any]:
    """Write the HLS project for `ext` at `out` (atomically), run the C-simulation, return the report.

    `board` names the DRAM bandwidth of the memory floor (estimate.DEVICES); rows/cols/clock stay as given.
    """
    if rounding not in sim.ROUNDINGS:
        raise BadInput(f"rounding {rounding!r}: expected one of {', '.join(sim.ROUNDINGS)}")
    for v, flag in ((rows, "rows"), (cols, "cols"), (k_tile, "k_tile")):
        if int(v) <= 0:
            raise BadInput(f"{flag} must be positive, got {v}")
    if int(cols) % estimate.VEC or int(k_tile) % estimate.VEC:
        raise BadInput(f"cols ({cols}) and k_tile ({k_tile}) must be multiples of {estimate.VEC}: the array's words "
                       "hold 16 int8 values")
    dram_gbs = estimate.device(board).dram_gbs
    array = csim.ArrayConfig(int(rows), int(cols), int(k_tile))
    ok, why = csim.toolchain()
    t0 = time.perf_counter()
    with atomic_dir(Path(out), force=force) as tmp:
        hdir = tmp / "hls"
        hdir.mkdir()
        for f in csim.HLS_SOURCES:
            shutil.copy2(csim.hls_dir() / f, hdir / f)
        recs = _write_vectors(ext, tmp / "vectors", rounding, progress)
        (tmp / "run_hls.tcl").write_text(TCL.format(defines=" ".join(array.defines()), part=part,
                                                   period_ns=f"{1000.0 / clock_mhz:.3f}"))
        (tmp / "run_hls.sh").write_text(RUN_HLS_SH)
        (tmp / "run_hls.sh").chmod(0o755)
        layer_dicts = ext.layer_dicts()
        (tmp / "layers.json").write_text(json.dumps({"layers": layer_dicts, "host_ops": ext.host_ops}, indent=1) + "\n")
        est = estimate.estimate_layers(layer_dicts + ext.host_ops, array.rows, array.cols, clock_mhz, array.k_tile,
                                       dram_gbs)
        summary = estimate.summarize(est, array.rows, array.cols, clock_mhz, array.k_tile, dram_gbs,
                                     "ort" if rounding == "ort" else "tflite")
        csim_results: dict[str, dict[str, int]] = {}
        status, csim_s = None, None
        if ok:
            (tmp / "build").mkdir()
            exe = csim.compile_csim(hdir, tmp / "build" / "csim", array)
            t1 = time.perf_counter()
            status, csim_results = csim.run_csim(exe, tmp / "vectors")
            csim_s = time.perf_counter() - t1
        layers_out = []
        for e, rec, d, es in zip(ext.layers, recs, layer_dicts, est):
            r = csim_results.get(rec["stem"])
            row: dict[str, Any] = {**d, "stem": rec["stem"], "outputs": int(np.asarray(rec["expect"]).size),
                                   "bit_exact": (r["mismatches"] == 0 and r["total"] == np.asarray(rec["expect"]).size)
                                   if r else None, "mismatches": r["mismatches"] if r else None,
                                   "csim_cycles": r["cycles"] if r else None,
                                   "csim_stages": {k: r[k] for k in _STAGE_KEYS} if r else None,
                                   "est_pipeline_cycles": es["pipeline_cycles"], "est_cycles": es["cycles"],
                                   "dram_floor_cycles": es["dram_floor_cycles"], "bound": es["bound"],
                                   "load_cycles": es["load_cycles"], "compute_cycles": es["compute_cycles"],
                                   "drain_cycles": es["drain_cycles"], "param_cycles": es["param_cycles"],
                                   "bytes_moved": es["bytes_moved"], "utilisation": es["utilisation"],
                                   "latency_us": es["latency_us"]}
            # the C-simulation's counted clocks per stage against the closed-form model
            row["cycle_model_exact"] = (r is not None and all(r[k] == es[_MODEL_KEY[k]] for k in _STAGE_KEYS)) if r else None
            if compare_ort:
                row.update(_ort_check(e, rec["expect"], rounding))
            layers_out.append(row)
        host_macs = sum(h["macs"] for h in ext.host_ops)
        total_macs = summary["array_macs"] + host_macs
        for h in ext.host_ops:
            h["macs_share"] = h["macs"] / total_macs if total_macs else 0.0
        all_exact = bool(layers_out) and all(r["bit_exact"] for r in layers_out)
        if not ok:
            verified, reason, code = False, f"C-simulation not run: {why}", 3
        elif not all_exact:
            bad = [r["name"] for r in layers_out if not r["bit_exact"]]
            verified, reason, code = False, f"C-simulation differs from the simulator on {len(bad)} layer(s): {bad[:3]}", 4
        else:
            verified, reason, code = True, None, 0
        report: dict[str, Any] = {
            "target": "fpga", "precision": "int8", "source": ext.source, "format": "hls-project", "rounding": rounding,
            "array": {"rows": array.rows, "cols": array.cols, "k_tile": array.k_tile, "dataflow": "output-stationary",
                      "clock_mhz": clock_mhz, "part": part},
            "verified": verified, "verification": "g++ C-simulation of the HLS design vs fpga/sim.py, every output, bit "
            "for bit (rung 1); synthesis/co-simulation need Vitis HLS: run_hls.sh runs run_hls.tcl where vitis_hls is "
            "on PATH (exit 3 otherwise)",
            "exit_code": code, "layers_total": len(layers_out),
            "layers_bit_exact": sum(1 for r in layers_out if r["bit_exact"]),
            "ort_layers_bit_exact": sum(1 for r in layers_out if r.get("ort_bit_exact")),
            "ort_layers_compared": sum(1 for r in layers_out if r.get("ort_bit_exact") is not None),
            "csim_seconds": csim_s, "csim_status": status, "csim_cycles": sum(r["csim_cycles"] or 0 for r in layers_out),
            "cycle_model_layers_exact": sum(1 for r in layers_out if r["cycle_model_exact"]), "board": board,
            "latency_note": "estimates from the cycle model (see estimate.assumptions), not measurements",
            "vitis_hls": vitis_hls_status()[1],
            "estimate": {k: v for k, v in summary.items()}, "array_macs": summary["array_macs"], "host_macs": host_macs,
            "array_macs_share": summary["array_macs"] / total_macs if total_macs else 0.0,
            "layers": layers_out, "host_ops": ext.host_ops,
        }
        if reason:
            report["reason"] = reason
        report["export_seconds"] = time.perf_counter() - t0
        (tmp / "fpga_project.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        report["size_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return report


class FpgaBackend(Backend):
    """The "fpga" target: an HLS project verified by C-simulation (the contract: edgediff.exporters.base)."""

    target = "fpga"
    # fp32 is the CLI's default --precision: the FPGA target then exports the model's own int8 quantization
    precisions = ("int8", "fp32")
    precision_hint = " (the FPGA target runs int8 only: pass --precision int8)"
    marker = "fpga_project.json"
    options = frozenset({"seed", "rounding", "rows", "cols", "k_tile", "clock_mhz", "part", "compare_ort", "board"})
    takes_onnx_source = True

    def available(self) -> tuple[bool, str]:
        return csim.toolchain()

    def needs_toolchain_to_export(self) -> bool:
        return False  # without g++ the project is written and the report says the C-simulation did not run

    def _export(self, model: Any, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        opts = dict(options)
        seed = int(opts.pop("seed", 0))
        if isinstance(model, (str, Path)):
            ext = extract_onnx(Path(model), seed=seed)
        else:
            ext = extract_quantparams(model, seed=seed)
        tick = None
        if progress is not None:  # export_project reports (done, total); the contract hands a rich Progress
            task = progress.add_task("fpga: layer vectors", total=len(ext.layers))

            def tick(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)
        try:
            rep = export_project(ext, Path(out), force=force, progress=tick, **opts)
        finally:
            if progress is not None:
                progress.remove_task(task)
        size = rep.pop("size_bytes", 0)
        for k in ("target", "precision"):
            rep.pop(k, None)
        return ExportReport(self.target, "int8", str(out), size, extra=rep)

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        return False, ("an FPGA project runs on an FPGA board (bitstream from Vitis HLS + Vivado, not installed here); "
                       "its layers were verified bit for bit by g++ C-simulation at export (see fpga_project.json)")

    def load_denoiser(self, path: Path) -> Any:
        raise Unavailable(self.runtime_available(path)[1])

    def check(self, path: Path, reference: Any = None) -> dict[str, Any]:
        """Structural check of an exported project (+ the C-sim results recorded at export)."""
        rep = self.info(path)
        hls = Path(path) / "hls"
        missing = [f for f in csim.HLS_SOURCES if not (hls / f).is_file()]
        return {"target": "fpga", "hls_sources_present": not missing, "missing": missing,
                "layers_total": rep.get("layers_total"), "layers_bit_exact": rep.get("layers_bit_exact"),
                "csim_verified": rep.get("verified"), "ops": {"array": rep.get("layers_total"),
                                                              "host": len(rep.get("host_ops", []))}}

    def info(self, path: Path) -> dict[str, Any]:
        marker = Path(path) / "fpga_project.json"
        if not marker.is_file():
            raise BadInput(f"{path}: not an FPGA project (no fpga_project.json)")
        rep = json.loads(marker.read_text())
        keep = ("target", "precision", "source", "rounding", "array", "verified", "layers_total", "layers_bit_exact",
                "ort_layers_bit_exact", "csim_cycles", "array_macs", "host_macs", "array_macs_share", "estimate", "reason",
                "host_ops")
        out = {k: rep[k] for k in keep if k in rep}
        out["macs"] = rep.get("array_macs", 0) + rep.get("host_macs", 0)
        out["params"] = sum(int(r.get("params", 0)) for r in rep.get("layers", []))  # the array's weights and biases
        out["size_bytes"] = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        return out


BACKEND = FpgaBackend()
