"""ONNX Runtime's own integer execution of one quantized layer, for bit-exact comparison with sim.py.

Each QLayer becomes a one-node model (QLinearConv / QLinearMatMul when the layer requantizes,
ConvInteger / MatMulInteger when it emits int32 accumulators), or a QDQ graph
(DequantizeLinear -> Conv -> QuantizeLinear) that ONNX Runtime's graph optimizer fuses into its
integer kernel. The model is built with onnx.helper and run on the CPU execution provider.
"""

from __future__ import annotations

import numpy as np
from edgediff.fpga.sim import QLayer

OPSET = 21


def _np_dtype(bits: int, signed: bool) -> type:
    if bits > 8:
        raise ValueError("ONNX Runtime reference supports 8-bit (or narrower, stored in 8) tensors only")
    return np.int8 if signed else np.uint8


def _session(model: object) -> object:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


def _model(nodes: list, inputs: list, outputs: list, inits: list) -> object:
    from onnx import helper

    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 10
    return m


def run_layer(layer: QLayer, x: np.ndarray, x2: np.ndarray | None = None, qdq: bool = False) -> np.ndarray:
    """Run `layer` on integer input(s) in ONNX Runtime; returns its integer output as int32."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    xdt = _np_dtype(8, layer.x_signed)
    xq = np.asarray(x).astype(xdt)
    feeds = {"x": xq}
    inputs = [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(xdt)), xq.shape)]
    inits = [nh.from_array(np.array(layer.s_x, np.float32), "sx"), nh.from_array(np.array(layer.zp_x, xdt), "zx")]
    requant = layer.out_scale is not None
    if requant:
        ydt = _np_dtype(layer.out_bits, layer.out_signed)
        inits += [nh.from_array(np.array(layer.out_scale, np.float32), "sy"), nh.from_array(np.array(layer.out_zp, ydt), "zy")]
    if layer.kind == "matmul":
        assert x2 is not None
        bdt = _np_dtype(8, layer.x_signed if layer.x2_signed is None else layer.x2_signed)
        bq = np.asarray(x2).astype(bdt)
        feeds["b"] = bq
        inputs.append(helper.make_tensor_value_info("b", helper.np_dtype_to_tensor_dtype(np.dtype(bdt)), bq.shape))
        inits += [nh.from_array(np.array(np.asarray(layer.s_w).reshape(()), np.float32), "sw"),
                  nh.from_array(np.array(layer.zp_w, bdt), "zw")]
        if requant:
            node = helper.make_node("QLinearMatMul", ["x", "sx", "zx", "b", "sw", "zw", "sy", "zy"], ["y"])
        else:
            node = helper.make_node("MatMulInteger", ["x", "b", "zx", "zw"], ["y"])
        nodes = [node]
    else:
        assert layer.w is not None
        w = np.asarray(layer.w).astype(np.int8)
        sw = np.asarray(layer.s_w, np.float32).reshape(-1)
        inits += [nh.from_array(w, "w"), nh.from_array(sw if sw.size > 1 else sw.reshape(()), "sw"),
                  nh.from_array(np.zeros(sw.shape if sw.size > 1 else (), np.int8), "zw")]
        if layer.kind == "conv":
            g = layer.geom
            attrs = {"strides": list(g.stride), "pads": [g.pads[0], g.pads[1], g.pads[2], g.pads[3]],
                     "dilations": list(g.dilation), "group": g.groups, "kernel_shape": list(w.shape[2:])}
            if layer.bias is not None:
                inits.append(nh.from_array(np.asarray(layer.bias, np.int32), "bias"))
            if qdq:
                nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
                         helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0)]
                conv_in = ["xf", "wf"]
                if layer.bias is not None:
                    bs = (np.float32(layer.s_x) * sw).astype(np.float32)
                    inits += [nh.from_array(bs if bs.size > 1 else bs.reshape(()), "bs"),
                              nh.from_array(np.zeros(bs.shape if bs.size > 1 else (), np.int32), "bz")]
                    nodes.append(helper.make_node("DequantizeLinear", ["bias", "bs", "bz"], ["bf"], axis=0))
                    conv_in.append("bf")
                nodes.append(helper.make_node("Conv", conv_in, ["yf"], **attrs))
                if not requant:
                    raise ValueError("a QDQ reference needs an output scale")
                nodes.append(helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"]))
            elif requant:
                names = ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"] + (["bias"] if layer.bias is not None else [])
                nodes = [helper.make_node("QLinearConv", names, ["y"], **attrs)]
            else:
                # ConvInteger takes no bias and only a per-tensor weight zero point; add the bias after
                nodes = [helper.make_node("ConvInteger", ["x", "w", "zx"], ["acc"], **attrs)]
                if layer.bias is not None:
                    inits.append(nh.from_array(np.asarray(layer.bias, np.int32).reshape(1, -1, 1, 1), "bias4"))
                    nodes.append(helper.make_node("Add", ["acc", "bias4"], ["y"]))
                else:
                    nodes[0].output[0] = "y"
        elif layer.kind == "gemm":
            if requant and layer.bias is not None:
                # DequantizeLinear -> Gemm(+int32 bias) -> QuantizeLinear: ORT fuses it into its QGemm kernel
                bs = (np.float32(layer.s_x) * sw).astype(np.float32)
                inits += [nh.from_array(np.asarray(layer.bias, np.int32), "bias"),
                          nh.from_array(bs if bs.size > 1 else bs.reshape(()), "bs"),
                          nh.from_array(np.zeros(bs.shape if bs.size > 1 else (), np.int32), "bz")]
                nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
                         helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=1),
                         helper.make_node("DequantizeLinear", ["bias", "bs", "bz"], ["bf"], axis=0),
                         helper.make_node("Gemm", ["xf", "wf", "bf"], ["yf"]),
                         helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])]
            elif requant:
                nodes = [helper.make_node("QLinearMatMul", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"])]
            else:
                nodes = [helper.make_node("MatMulInteger", ["x", "w", "zx"], ["acc"])]
                if layer.bias is not None:
                    inits.append(nh.from_array(np.asarray(layer.bias, np.int32), "biasv"))
                    nodes.append(helper.make_node("Add", ["acc", "biasv"], ["y"]))
                else:
                    nodes[0].output[0] = "y"
        else:
            raise ValueError(f"unknown layer kind {layer.kind!r}")
    out_type = (helper.np_dtype_to_tensor_dtype(np.dtype(_np_dtype(layer.out_bits, layer.out_signed))) if requant
                else TensorProto.INT32)
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", out_type, None)], inits)
    sess = _session(model)
    return np.asarray(sess.run(None, feeds)[0]).astype(np.int32)  # type: ignore[attr-defined]
