"""Integer arithmetic of a lowered layer: requantization multipliers and reference kernels.

acc = sum((q_x - z_x) * q_w) + bias_int32            (weights symmetric: z_w = 0)
y   = clamp(z_y + round(acc * s_x * s_w / s_y), qmin, qmax)

The rounding of the second line differs by runtime (docs/architecture.md, "integer arithmetic"):
- "float32": the multiplier s_x*s_w/s_y is a float32, acc is converted to float32, multiplied and
  rounded half to even. onnxruntime's MLAS requantization (QLinearConv, QLinearMatMul, QGemm)
  and XNNPACK's QS8 "fp32" requantization (what LiteRT runs on CPU) both do this.
- "fixed_point": TFLite's reference/builtin kernels: the multiplier as a Q31 integer M0 and a
  shift (QuantizeMultiplier), SaturatingRoundingDoublingHighMul then RoundingDivideByPOT
  (double rounding, ties away from zero).
"""

from __future__ import annotations

import math

import numpy as np

ROUNDINGS = ("float32", "fixed_point")


def multiplier(s_in: float | np.ndarray, s_w: float | np.ndarray, s_out: float) -> np.ndarray:
    """s_in * s_w / s_out in float32, the way the float32 requantization computes it."""
    return (np.float32(s_in) * np.asarray(s_w, np.float32) / np.float32(s_out)).astype(np.float32)


def quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: m = M0 * 2^(shift - 31), M0 in [2^30, 2^31) (or 0)."""
    if m == 0:
        return 0, 0
    frac, shift = math.frexp(float(m))
    q = round(frac * (1 << 31))
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:  # too small to represent: zero
        return 0, 0
    return int(q), int(shift)


def quantize_multipliers(ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised quantize_multiplier over per-channel multipliers (computed in double, as TFLite does)."""
    pairs = [quantize_multiplier(float(m)) for m in np.asarray(ms, np.float64).reshape(-1)]
    return np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int32)


def _rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64)
    b = np.asarray(b, np.int64)
    overflow = (a == b) & (a == -(1 << 31))
    ab = a * b
    v = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    # C integer division truncates toward zero
    res = np.where(v >= 0, v // (1 << 31), -((-v) // (1 << 31)))
    return np.where(overflow, (1 << 31) - 1, res)


def _rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> exponent) + (remainder > threshold).astype(np.int64)


def requantize(acc: np.ndarray, mult: np.ndarray, zp: int, qmin: int, qmax: int, rounding: str = "float32",
               axis: int = 1) -> np.ndarray:
    """int32 accumulators -> output integers, per-channel multipliers along `axis`."""
    acc = np.asarray(acc)
    shape = [1] * acc.ndim
    mult = np.asarray(mult)
    if mult.ndim == 1 and mult.size > 1:
        shape[axis] = -1
    if rounding == "float32":
        y = np.rint(acc.astype(np.float32) * mult.astype(np.float32).reshape(shape))
        return np.clip(y + zp, qmin, qmax).astype(np.int32)
    if rounding == "fixed_point":
        m0, shift = quantize_multipliers(mult)
        m0, shift = m0.reshape(shape).astype(np.int64), shift.reshape(shape).astype(np.int64)
        left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
        x = acc.astype(np.int64) * (np.int64(1) << left)
        y = _rounding_divide_by_pot(_rounding_doubling_high_mul(x, m0), right)
        return np.clip(y + zp, qmin, qmax).astype(np.int32)
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
