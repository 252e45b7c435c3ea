"""Converter: a QDQ-quantized ONNX model -> the array's layers (fpga.graph.Extracted).

One handler per quantized op type (HANDLERS: Conv, Gemm, MatMul) turns a node whose operands come
through DequantizeLinear into QLayer(s); every other compute node stays on the host with its MACs.
Patterns: the quantize_static QDQ format, and edgediff's own int8 ONNX export (Transpose'd weights and
K^T, u8 x s8 attention matmuls, a Concat of differently quantized halves before a shortcut-split conv).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.fpga.graph import HOST_SIDE_HINT, SHAPE_OPS, Extracted, ExtractedLayer
from edgediff.fpga.sim import ConvGeom, QLayer

from edgediff.errors import BadInput


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


def _matmul_layers(g: _Graph, node: Any, values: dict[str, np.ndarray] | None) -> list[tuple[QLayer, list[str]]]:
    return [_matmul_layer(g, node, values)]


# one handler per quantized op type: (graph, node, tensor values or None before the run) -> [(layer, inputs)]
HANDLERS: dict[str, Any] = {"Conv": _conv_layers, "Gemm": _matmul_layers, "MatMul": _matmul_layers}

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
        if node.op_type in HANDLERS:
            dq = [g.quantized(node, i) for i in range(min(2, len(node.input)))]
            if all(dq):
                for layer, ins in HANDLERS[node.op_type](g, node, None):
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
                    | {n.output[0] for n in host if n.op_type not in SHAPE_OPS}
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
        made = HANDLERS[node.op_type](g, node, values)
        for layer, ins in made:
            x = values[ins[0]]
            x2 = None
            if len(ins) > 1:
                x2 = values[ins[1]] if isinstance(ins[1], str) else np.transpose(values[ins[1][0]], ins[1][1])
            out.layers.append(ExtractedLayer(layer, node.name, node.op_type, x.astype(np.int64) if with_vectors else None,
                                             None if x2 is None or not with_vectors else x2.astype(np.int64),
                                             tuple(x.shape), None if x2 is None else tuple(x2.shape)))
    for node in host:
        if node.op_type in SHAPE_OPS:
            continue
        shp = shapes.get(node.output[0], ())
        out.host_ops.append({"name": node.name, "op": node.op_type, "what": HOST_SIDE_HINT.get(node.op_type, node.op_type),
                             "macs": _float_macs(node, shapes, g), "elements": int(np.prod(shp)) if shp else 0})
    return out
