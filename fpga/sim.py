"""Bit-accurate integer model of the quantized layers the FPGA array runs (NumPy).

What "bit-accurate" means here (docs/architecture.md, "Integer arithmetic"):

    acc = sum((q_x - zp_x) * (q_w - zp_w)) + bias_int32          exact, int64 on the host, int32 on the array
    y   = clamp(zp_y + round(acc * M), qmin, qmax)                 M = s_x * s_w / s_y

The accumulation is done with integers only (int64 NumPy arrays; every value fits an int32
for real layers and `check_int32` says when it would not). The requantization step follows a
named convention, because runtimes differ there:

- "ort": ONNX Runtime (MLAS). M is computed in float32 as (s_x * s_w) / s_y, the int32
  accumulator is converted to float32, multiplied by M, clamped to [qmin - zp, qmax - zp] and
  rounded half to even (nearbyintf under the default rounding mode), then zp is added.
- "tflite": TFLite's reference kernels: M is quantized to an int32 fixed-point multiplier and
  a power-of-two shift (QuantizeMultiplier), applied with SaturatingRoundingDoublingHighMul and
  RoundingDivideByPOT (gemmlowp's double rounding).
- "tflite_single": the same multiplier with TFLite's single-rounding build
  (TFLITE_SINGLE_ROUNDING): (x * q + 2^(s-1)) >> s with one rounding.
  Measured with LiteRT (tests/test_fpga_tflite.py): its reference kernels match "tflite", its
  default XNNPACK delegate matches "tflite_single".

One runtime detail matters for bit-exactness against ONNX Runtime on x86 CPUs without
AVX-VNNI: MLAS's uint8 x int8 GEMM uses `vpmaddubsw`, which adds the raw products of two
consecutive K elements in a saturating int16. `pair_saturate=True` models that (raw u8 * s8
products, pairs along K in the order MLAS packs them) so that the simulator can reproduce
ONNX Runtime on such machines too; the FPGA array itself accumulates exactly (int32), which
is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Rounding = Literal["ort", "tflite", "tflite_single"]
ROUNDINGS: tuple[str, ...] = ("ort", "tflite", "tflite_single")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range of a `bits`-wide signed or unsigned tensor."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _i64(a: np.ndarray | int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind == "f":
        raise TypeError("integer path received a float array")
    return arr.astype(np.int64)


def check_int32(acc: np.ndarray, what: str = "accumulator") -> None:
    """An int32 accumulator cannot hold this value: the array (and the runtimes) would wrap."""
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise OverflowError(f"{what} leaves the int32 range [{acc.min()}, {acc.max()}]")


# ------------------------------------------------------------------ requantization
def ort_multiplier(s_x: float, s_w: np.ndarray | float, s_y: float) -> np.ndarray:
    """ONNX Runtime's float32 output scale: (s_x * s_w) / s_y, each step rounded to float32."""
    return (np.float32(s_x) * np.asarray(s_w, dtype=np.float32)) / np.float32(s_y)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: real ~= q * 2^(shift - 31), q an int32 in [2^30, 2^31)."""
    if real == 0.0:
        return 0, 0
    frac, shift = math.frexp(real)
    q = int(math.floor(abs(frac) * (1 << 31) + 0.5)) * (1 if frac >= 0 else -1)  # std::round: half away from 0
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q, shift


def tflite_multipliers(s_x: float, s_w: np.ndarray | float, s_y: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (multiplier, shift) as TFLite computes them: in double from the float32 scales."""
    sw = np.atleast_1d(np.asarray(s_w, dtype=np.float32))
    pairs = [quantize_multiplier(float(np.float64(np.float32(s_x)) * np.float64(w) / np.float64(np.float32(s_y))))
             for w in sw]
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)


def srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    a, b = np.broadcast_arrays(_i64(a), _i64(b))
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    s = ab + nudge
    # C++ integer division truncates toward zero; NumPy's // floors, so divide magnitudes
    q = np.sign(s) * (np.abs(s) // (1 << 31))
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, q)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero."""
    x = _i64(x)
    e = _i64(exponent)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def _channel_view(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    v = np.asarray(v)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def requantize(acc: np.ndarray, s_x: float, s_w: np.ndarray | float, s_y: float, zp_y: int, qmin: int, qmax: int,
               rounding: Rounding = "ort", axis: int = 1) -> np.ndarray:
    """int32 accumulators -> output integers (int32 array) under the named rounding convention.

    `s_w` is per-tensor (scalar) or per output channel along `axis` of `acc`.
    """
    acc = _i64(acc)
    if rounding == "ort":
        m = _channel_view(ort_multiplier(s_x, s_w, s_y), acc.ndim, axis)
        lo, hi = np.float32(qmin - zp_y), np.float32(qmax - zp_y)
        v = acc.astype(np.float32) * m  # MLAS: float(acc) * scale in float32
        v = np.minimum(np.maximum(v, lo), hi)
        return (np.rint(v).astype(np.int64) + zp_y).astype(np.int32)  # rint: round half to even
    if rounding not in ("tflite", "tflite_single"):
        raise ValueError(f"unknown rounding convention {rounding!r}; expected one of {ROUNDINGS}")
    q, shift = tflite_multipliers(s_x, s_w, s_y)
    q, shift = _channel_view(q, acc.ndim, axis), _channel_view(shift, acc.ndim, axis)
    if rounding == "tflite":
        left = np.maximum(shift, 0)
        right = np.maximum(-shift, 0)
        shifted = np.clip(acc * (np.int64(1) << left), INT32_MIN, INT32_MAX)  # the int32 multiply of the reference
        v = rounding_divide_by_pot(srdhm(shifted, q), right)
    else:
        total = 31 - shift
        v = (acc * q + (np.int64(1) << (total - 1))) >> total
        v = np.clip(v, INT32_MIN, INT32_MAX)
    return np.clip(v + zp_y, qmin, qmax).astype(np.int32)


# ------------------------------------------------------------------ integer layers
def _pair_saturated_matmul(a_raw: np.ndarray, b_raw: np.ndarray) -> np.ndarray:
    """sum_k a[m,k] * b[k,n] where consecutive K pairs are added in a saturating int16 (vpmaddubsw)."""
    m, k = a_raw.shape
    n = b_raw.shape[1]
    acc = np.zeros((m, n), np.int64)
    for i in range(0, k, 2):
        pair = np.outer(a_raw[:, i], b_raw[i, :])
        if i + 1 < k:
            pair = pair + np.outer(a_raw[:, i + 1], b_raw[i + 1, :])
        acc += np.clip(pair, -32768, 32767)
    return acc


def gemm_int(a: np.ndarray, za: int, b: np.ndarray, zb: np.ndarray | int = 0, pair_saturate: bool = False) -> np.ndarray:
    """(M,K) x (K,N) integer GEMM with zero points: sum((a - za) * (b - zb)) as int64.

    `zb` may be per column (N,) (per-channel weights). With `pair_saturate`, the raw products
    are summed MLAS-AVX2 style and the zero-point terms corrected afterwards, as MLAS does.
    """
    a, b = _i64(a), _i64(b)
    zb_arr = _i64(zb)
    if not pair_saturate:
        return (a - za) @ (b - zb_arr)
    raw = _pair_saturated_matmul(a, b)
    k = a.shape[1]
    # MLAS: sum(a*b) - za*sum_k(b) - zb*sum_k(a) + K*za*zb
    return raw - za * b.sum(0)[None, :] - zb_arr * a.sum(1)[:, None] + k * za * zb_arr


def matmul_int(a: np.ndarray, za: int, b: np.ndarray, zb: int = 0, pair_saturate: bool = False) -> np.ndarray:
    """Batched integer matmul (numpy broadcasting over leading axes), like ONNX MatMulInteger."""
    a, b = _i64(a), _i64(b)
    if a.ndim == 2 and b.ndim == 2:
        return gemm_int(a, za, b, zb, pair_saturate)
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a2 = np.broadcast_to(a, batch + a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b2 = np.broadcast_to(b, batch + b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = np.stack([gemm_int(x, za, y, zb, pair_saturate) for x, y in zip(a2, b2)])
    return out.reshape(batch + out.shape[-2:])


@dataclass(frozen=True)
class ConvGeom:
    """Geometry of a 2-D convolution; pads are (top, left, bottom, right) like ONNX's (begin..., end...)."""

    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def out_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        ho = (h + self.pads[0] + self.pads[2] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + self.pads[1] + self.pads[3] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return ho, wo


def im2col(x: np.ndarray, kh: int, kw: int, geom: ConvGeom, pad_value: int) -> np.ndarray:
    """(N,C,H,W) -> (N, Ho*Wo, C*kh*kw) with K ordered (c, i, j) like the weight's flattening."""
    n, c, h, w = x.shape
    ho, wo = geom.out_hw(h, w, kh, kw)
    pt, pl, pb, pr = geom.pads
    xp = np.full((n, c, h + pt + pb, w + pl + pr), pad_value, dtype=np.int64)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    sh, sw = geom.stride
    dh, dw = geom.dilation
    cols = np.empty((n, c, kh, kw, ho, wo), np.int64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.reshape(n, c * kh * kw, ho * wo).transpose(0, 2, 1)


def conv2d_int(x: np.ndarray, zx: int, w: np.ndarray, bias: np.ndarray | None = None, geom: ConvGeom = ConvGeom(),
               pair_saturate: bool = False) -> np.ndarray:
    """Integer conv (N,C,H,W) * (O, C/g, kh, kw) -> int64 accumulators (N,O,Ho,Wo), bias int32 added.

    Padding holds the input zero point (the real value 0), so padded taps contribute nothing.
    With `pair_saturate`, K is taken in MLAS's NHWC order (kh, kw, c) for the int16 pairs.
    """
    x, w = _i64(x), _i64(w)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    g = geom.groups
    if c != cg * g or o % g:
        raise ValueError(f"conv shapes do not match: input C={c}, weight {w.shape}, groups={g}")
    ho, wo = geom.out_hw(h, wd, kh, kw)
    og = o // g
    out = np.empty((n, o, ho * wo), np.int64)
    for gi in range(g):
        xs = x[:, gi * cg:(gi + 1) * cg]
        ws = w[gi * og:(gi + 1) * og]
        cols = im2col(xs, kh, kw, geom, zx)  # (N, P, K) with K=(c,i,j)
        wmat = ws.reshape(og, -1).T  # (K, Og)
        if pair_saturate:
            perm = np.arange(cg * kh * kw).reshape(cg, kh, kw).transpose(1, 2, 0).ravel()  # -> (i, j, c)
            cols, wmat = cols[:, :, perm], wmat[perm]
        for ni in range(n):
            out[ni, gi * og:(gi + 1) * og] = gemm_int(cols[ni], zx, wmat, 0, pair_saturate).T
    if bias is not None:
        out += _i64(bias).reshape(1, o, 1)
    return out.reshape(n, o, ho, wo)


# ------------------------------------------------------------------ whole layers
@dataclass
class QLayer:
    """One quantized layer as the array runs it (what project.py extracts from a model).

    kind: "conv" | "gemm" (x @ w, w is (K,N)) | "matmul" (two activations, batched).
    w: int weights ((O,C/g,kh,kw) conv, (K,N) gemm) or None for matmul; s_w per output
    channel (conv: O, gemm: N) or scalar. out_scale None: the layer emits int32 accumulators
    (the next op runs on the host in float, e.g. GroupNorm), else it requantizes.
    """

    name: str
    kind: str
    s_x: float
    zp_x: int
    s_w: np.ndarray
    zp_w: int = 0
    w: np.ndarray | None = None
    bias: np.ndarray | None = None
    geom: ConvGeom = ConvGeom()
    out_scale: float | None = None
    out_zp: int = 0
    out_bits: int = 8
    out_signed: bool = False
    x_signed: bool = False
    w_bits: int = 8
    x2_signed: bool | None = None  # matmul: the right operand's type when it differs from the left's
    op_type: str = ""  # the source node's op type, for reports

    def accumulate(self, x: np.ndarray, x2: np.ndarray | None = None, pair_saturate: bool = False) -> np.ndarray:
        if self.kind == "conv":
            assert self.w is not None
            return conv2d_int(x, self.zp_x, self.w, self.bias, self.geom, pair_saturate)
        if self.kind == "gemm":
            assert self.w is not None
            xx = _i64(x)
            lead = xx.shape[:-1]
            acc = gemm_int(xx.reshape(-1, xx.shape[-1]), self.zp_x, self.w, 0, pair_saturate)
            if self.bias is not None:
                acc = acc + _i64(self.bias)[None, :]
            return acc.reshape(*lead, acc.shape[-1])
        if self.kind == "matmul":
            assert x2 is not None
            return matmul_int(x, self.zp_x, x2, self.zp_w, pair_saturate)
        raise ValueError(f"unknown layer kind {self.kind!r}")

    def run(self, x: np.ndarray, x2: np.ndarray | None = None, rounding: Rounding = "ort",
            pair_saturate: bool = False) -> np.ndarray:
        """Integer inputs -> integer outputs (requantized, or the int32 accumulators)."""
        acc = self.accumulate(x, x2, pair_saturate)
        check_int32(acc, f"{self.name}: accumulator")
        if self.out_scale is None:
            return acc.astype(np.int32)
        lo, hi = qrange(self.out_bits, self.out_signed)
        axis = 1 if self.kind == "conv" else acc.ndim - 1
        return requantize(acc, self.s_x, self.s_w, self.out_scale, self.out_zp, lo, hi, rounding, axis)

    def macs(self, x_shape: tuple[int, ...], x2_shape: tuple[int, ...] | None = None) -> int:
        m, k, n, reps = self.gemm_dims(x_shape, x2_shape)
        return m * k * n * reps

    def gemm_dims(self, x_shape: tuple[int, ...], x2_shape: tuple[int, ...] | None = None) -> tuple[int, int, int, int]:
        """(M, K, N, repeats) of the GEMM(s) the layer lowers to (conv: one per group and image)."""
        if self.kind == "conv":
            assert self.w is not None
            n, _, h, w = x_shape
            o, cg, kh, kw = self.w.shape
            ho, wo = self.geom.out_hw(h, w, kh, kw)
            return ho * wo, cg * kh * kw, o // self.geom.groups, n * self.geom.groups
        if self.kind == "gemm":
            assert self.w is not None
            return int(np.prod(x_shape[:-1])), self.w.shape[0], self.w.shape[1], 1
        assert x2_shape is not None
        batch = np.broadcast_shapes(tuple(x_shape[:-2]), tuple(x2_shape[:-2]))
        return x_shape[-2], x_shape[-1], x2_shape[-1], int(np.prod(batch)) if batch else 1


# ------------------------------------------------------------------ which accumulation ONNX Runtime uses here
def mlas_u8s8_saturates() -> bool:
    """True on x86 CPUs with AVX2 but without AVX-VNNI/AVX512-VNNI, where MLAS's u8 x s8 kernels
    add pairs of products in a saturating int16 (vpmaddubsw). Measured on such a machine: see
    tests/test_fpga_sim.py. Elsewhere (VNNI, ARM) MLAS accumulates exactly in int32."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return False
    return "avx2" in flags and not ({"avx512_vnni", "avx_vnni", "avx512vnni"} & flags)


def ort_pair_saturates(layer: QLayer, integer_op: bool = False) -> bool:
    """Does ONNX Runtime (on this CPU) accumulate `layer` with saturating int16 pairs?

    Observed behaviour of MLAS (onnxruntime 1.31, AVX2 without VNNI): QLinearConv (not
    depthwise), QLinearMatMul and MatMulInteger with uint8 activations and int8 weights
    saturate; depthwise convs, ConvInteger (`integer_op` with a conv), int8 x int8 and
    uint8 x uint8 do not.
    """
    if layer.x_signed or not mlas_u8s8_saturates():
        return False
    if layer.kind == "matmul":  # two activations: u8 x u8 is exact, u8 x s8 takes the saturating kernel
        return bool(layer.x2_signed)
    if layer.kind == "conv":
        assert layer.w is not None
        depthwise = layer.w.shape[1] == 1 and layer.w.shape[0] == layer.geom.groups
        return not depthwise and not integer_op
    return True
