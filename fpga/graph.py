"""The FPGA converters' output: the quantized layers the array runs, their inputs, and the host-side ops.

Both converters (convert_onnx: a QDQ ONNX, convert_quantparams: an edgediff artifact) produce an
`Extracted`; the writer and the C-simulation check consume it (hls4ml's converter -> model -> writer split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgediff.fpga.sim import QLayer

VEC = 16  # int8 operands per 128-bit AXI word of the design (hls/systolic.h)

HOST_SIDE_HINT = {
    "GroupNorm": "GroupNorm", "SiLU": "SiLU", "InstanceNormalization": "GroupNorm", "GroupNormalization": "GroupNorm",
    "LayerNormalization": "LayerNorm",
    "Softmax": "softmax", "Sigmoid": "SiLU (sigmoid)", "Mul": "elementwise", "Add": "elementwise", "Conv": "float conv",
    "MatMul": "float matmul", "Gemm": "float gemm", "Resize": "upsample", "Concat": "concat",
}
SHAPE_OPS = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast", "ConstantOfShape",
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
                                  else x_shape[-1]) // VEC), "groups": 1}
    assert layer.w is not None
    _, c, h, w = x_shape
    o, cg, kh, kw = layer.w.shape
    g = layer.geom
    ho, wo = g.out_hw(h, w, kh, kw)
    return {"k_words": kh * kw * -(-cg // VEC), "groups": g.groups,
            "conv": {"h": h, "w": w, "ho": ho, "wo": wo, "kh": kh, "kw": kw, "sh": g.stride[0], "sw": g.stride[1],
                     "pt": g.pads[0], "pl": g.pads[1], "dh": g.dilation[0], "dw": g.dilation[1]}}


@dataclass
class Extracted:
    source: str
    layers: list[ExtractedLayer] = field(default_factory=list)
    host_ops: list[dict[str, Any]] = field(default_factory=list)

    def layer_dicts(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self.layers]
