"""Reference integer kernels for lowered layers (numpy in/out; exact int32 accumulation).

What a backend's integer layer must produce, bit for bit, given the lowered data: tests
compare the simulation and the runtimes against these, and the OpenCL/FPGA backends can
check their kernels with them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgediff.lowering.arith import requantize
from edgediff.lowering.layers import IntPart, LoweredAttention, LoweredLayer


def accumulate(layer: LoweredLayer, part: IntPart, q_x: np.ndarray) -> np.ndarray:
    """int64 accumulators sum((q_x - z_x) * q_w) + bias for one part (float64 math: exact below 2^53)."""
    x = torch.from_numpy(np.asarray(q_x, np.float64) - part.input.zero_point)
    w = torch.from_numpy(part.weight.astype(np.float64))
    if layer.kind == "conv":
        g = layer.geometry
        acc = F.conv2d(x, w, None, g["stride"], g["padding"], g["dilation"], g["groups"])
    else:
        acc = x @ w.T
    out = acc.numpy()
    if part.bias is not None:
        shape = [1] * out.ndim
        shape[1 if layer.kind == "conv" else -1] = -1
        out = out + part.bias.astype(np.float64).reshape(shape)
    return np.rint(out).astype(np.int64)


def run_part(layer: LoweredLayer, part: IntPart, q_x: np.ndarray, rounding: str = "float32") -> np.ndarray:
    """Integer output of one part (int32), or float32 acc * s_x*s_w when the part's output is float."""
    acc = accumulate(layer, part, q_x)
    axis = 1 if layer.kind == "conv" else acc.ndim - 1
    if part.output is None:
        shape = [1] * acc.ndim
        shape[axis] = -1
        return (acc.astype(np.float32) * part.acc_scale.reshape(shape)).astype(np.float32)
    o = part.output
    return requantize(acc, part.multiplier, o.zero_point, o.qmin, o.qmax, rounding, axis=axis)


def run_layer(layer: LoweredLayer, x: np.ndarray, rounding: str = "float32") -> np.ndarray:
    """The layer's float32 output as an integer runtime computes it from float input x.

    Each part quantizes its input channels, runs the integer kernel and (if its output is
    int8) dequantizes; split layers sum the parts in float, as the exports do.
    """
    x = np.asarray(x, np.float32)
    y = None
    for part in layer.parts:
        a, b = part.channels
        xs = x[:, a:b] if layer.kind == "conv" else x[..., a:b]
        r = run_part(layer, part, part.input.quantize(xs), rounding)
        r = part.output.dequantize(r) if part.output is not None else r
        y = r if y is None else y + r
    assert y is not None
    return y


def run_attention(att: LoweredAttention, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  rounding: str = "float32") -> np.ndarray:
    """softmax(QK^T * scale) V with the lowered operands; (B, H, S, d) float in, float out.

    QK^T is exact (int32 acc * s_q*s_k, float logits); P and V are int8; the output is
    requantized to to_out's input when the lowering says so.
    """
    qq = att.q.quantize(q).astype(np.float64) - att.q.zero_point
    kq = att.k.quantize(k).astype(np.float64) - att.k.zero_point
    logits = (np.rint(qq @ np.swapaxes(kq, -1, -2)).astype(np.float32) * np.float32(att.qk_scale)
              * np.float32(att.scale))
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    pq = att.p.quantize(probs).astype(np.float64) - att.p.zero_point
    vq = att.v.quantize(v).astype(np.float64) - att.v.zero_point
    acc = np.rint(pq @ vq).astype(np.int64)
    if att.output is None:
        return (acc.astype(np.float32) * np.float32(att.p.scale) * np.float32(att.v.scale)).astype(np.float32)
    o = att.output
    return o.dequantize(requantize(acc, np.float32(att.av_multiplier), o.zero_point, o.qmin, o.qmax, rounding))
