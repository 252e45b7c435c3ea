"""fpga/sim.py against ONNX Runtime's own integer kernels, bit for bit, and TFLite's rounding rules."""

from __future__ import annotations

import numpy as np
import pytest
from edgediff.fpga import sim
from edgediff.fpga.ortref import run_layer
from edgediff.fpga.sim import ConvGeom, QLayer


def _conv(rng: np.random.Generator, shape: tuple[int, ...], geom: ConvGeom, signed: bool, saturate: bool = False,
          requant: bool = True, w_bits: int = 8) -> tuple[QLayer, np.ndarray]:
    n, c, h, w, o, k = shape
    lo, hi = sim.qrange(8, signed)
    wl, wh = sim.qrange(w_bits, True)
    wq = rng.integers(wl, wh + 1, (o, c // geom.groups, k, k))
    x = rng.integers(lo, hi + 1, (n, c, h, w))
    out_scale = float(rng.uniform(0.02, 0.05) if saturate else rng.uniform(0.2, 0.6))  # small scale -> clamps
    layer = QLayer("conv", "conv", s_x=float(rng.uniform(0.01, 0.1)), zp_x=int(rng.integers(lo, hi + 1)),
                   s_w=rng.uniform(0.001, 0.01, o).astype(np.float32), w=wq, bias=rng.integers(-5000, 5000, o),
                   geom=geom, out_scale=out_scale if requant else None, out_zp=int(rng.integers(lo, hi + 1)),
                   out_signed=signed, x_signed=signed, w_bits=w_bits)
    return layer, x


CONV_CASES = [
    ((1, 3, 5, 5, 4, 3), ConvGeom()),  # no padding, odd sizes
    ((2, 8, 9, 7, 16, 3), ConvGeom((2, 2), (1, 1, 1, 1))),  # stride 2, batch 2
    ((1, 8, 11, 9, 12, 3), ConvGeom((1, 1), (1, 0, 2, 1), (2, 1), groups=4)),  # asymmetric pads, dilation, groups
    ((1, 16, 6, 6, 16, 3), ConvGeom((1, 1), (1, 1, 1, 1), groups=16)),  # depthwise
    ((1, 24, 5, 7, 40, 1), ConvGeom()),  # 1x1 (the UNet's shortcut convs)
    ((1, 5, 7, 6, 3, 3), ConvGeom((2, 1), (1, 1, 1, 1))),  # odd channel counts, mixed strides
]


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("shape,geom", CONV_CASES)
def test_conv_matches_onnxruntime_qlinearconv(shape: tuple[int, ...], geom: ConvGeom, signed: bool) -> None:
    rng = np.random.default_rng(hash((shape, signed)) % 2**32)
    layer, x = _conv(rng, shape, geom, signed)
    ref = run_layer(layer, x)
    got = layer.run(x, pair_saturate=sim.ort_pair_saturates(layer))
    assert got.shape == ref.shape
    assert int((got != ref).sum()) == 0


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
def test_qdq_conv_fused_by_onnxruntime_matches(signed: bool) -> None:
    rng = np.random.default_rng(7)
    layer, x = _conv(rng, (1, 8, 9, 9, 8, 3), ConvGeom((1, 1), (1, 1, 1, 1)), signed)
    ref = run_layer(layer, x, qdq=True)  # DequantizeLinear -> Conv -> QuantizeLinear, fused by ORT
    assert int((layer.run(x, pair_saturate=sim.ort_pair_saturates(layer)) != ref).sum()) == 0


def test_output_saturation_and_int32_accumulators() -> None:
    rng = np.random.default_rng(3)
    layer, x = _conv(rng, (1, 8, 6, 6, 8, 3), ConvGeom((1, 1), (1, 1, 1, 1)), False, saturate=True)
    got = layer.run(x, pair_saturate=sim.ort_pair_saturates(layer))
    assert ((got == 0) | (got == 255)).mean() > 0.3  # the small output scale really clamps
    assert int((got != run_layer(layer, x)).sum()) == 0
    acc_layer, x = _conv(rng, (1, 6, 7, 5, 4, 3), ConvGeom((1, 1), (1, 1, 1, 1)), False, requant=False)
    acc = acc_layer.run(x)
    assert acc.dtype == np.int32 and int(np.abs(acc).max()) > 255  # raw accumulators, not requantized
    assert int((acc != run_layer(acc_layer, x)).sum()) == 0  # ConvInteger + bias


def test_int4_weights() -> None:
    rng = np.random.default_rng(4)
    layer, x = _conv(rng, (1, 8, 7, 7, 8, 3), ConvGeom((1, 1), (1, 1, 1, 1)), True, w_bits=4)
    assert layer.w is not None and layer.w.min() >= -8 and layer.w.max() <= 7
    assert int((layer.run(x) != run_layer(layer, x)).sum()) == 0


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("mkn,per_col", [((1, 7, 5), True), ((17, 33, 9), False), ((40, 64, 24), True)])
def test_gemm_matches_onnxruntime(mkn: tuple[int, int, int], per_col: bool, signed: bool) -> None:
    rng = np.random.default_rng(sum(mkn) + signed)
    m, k, n = mkn
    lo, hi = sim.qrange(8, signed)
    for requant in (True, False):
        layer = QLayer("fc", "gemm", s_x=0.05, zp_x=int(rng.integers(lo, hi + 1)),
                       s_w=rng.uniform(0.001, 0.01, n).astype(np.float32) if per_col else np.float32(0.004),
                       w=rng.integers(-128, 128, (k, n)), out_scale=0.7 if requant else None,
                       out_zp=int(rng.integers(lo, hi + 1)), out_signed=signed, x_signed=signed)
        x = rng.integers(lo, hi + 1, (m, k))
        assert int((layer.run(x, pair_saturate=sim.ort_pair_saturates(layer)) != run_layer(layer, x)).sum()) == 0


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
def test_attention_matmul_matches_onnxruntime(signed: bool) -> None:
    rng = np.random.default_rng(11)
    lo, hi = sim.qrange(8, signed)
    a, b = rng.integers(lo, hi + 1, (2, 3, 5, 7)), rng.integers(lo, hi + 1, (2, 3, 7, 4))
    layer = QLayer("attn:qk", "matmul", s_x=0.05, zp_x=int(rng.integers(lo, hi + 1)), s_w=np.float32(0.03),
                   zp_w=int(rng.integers(lo, hi + 1)), out_scale=3.0, out_zp=int(rng.integers(lo, hi + 1)),
                   out_signed=signed, x_signed=signed)
    assert int((layer.run(a, b) != run_layer(layer, a, b)).sum()) == 0


@pytest.mark.skipif(not sim.mlas_u8s8_saturates(), reason="only x86 AVX2 CPUs without VNNI saturate")
def test_mlas_avx2_pair_saturation_is_modelled() -> None:
    # u8 255 * s8 127 twice = 64770 does not fit the int16 that vpmaddubsw adds the pair in
    layer = QLayer("fc", "gemm", s_x=1.0, zp_x=0, s_w=np.float32(1.0), w=np.full((2, 1), 127), out_scale=1000.0)
    x = np.full((1, 2), 255)
    ref = run_layer(layer, x)
    assert int(ref[0, 0]) == 33  # 32767 / 1000 rounded: ORT saturated
    assert int(layer.run(x)[0, 0]) == 65  # the exact integer result (what the FPGA computes)
    assert int(layer.run(x, pair_saturate=True)[0, 0]) == 33


# ------------------------------------------------------------------ TFLite conventions
def _ref_tflite_double(x: int, q: int, shift: int) -> int:
    """gemmlowp in plain Python ints, as written in TFLite's reference_ops (C semantics)."""
    left, right = max(shift, 0), max(-shift, 0)
    a = max(min(x * (1 << left), 2**31 - 1), -(2**31))
    ab = a * q
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    s = ab + nudge
    high = abs(s) // (1 << 31) * (1 if s >= 0 else -1)  # C division truncates toward zero
    mask = (1 << right) - 1
    rem = high & mask
    thr = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if rem > thr else 0)


def test_tflite_fixed_point_helpers() -> None:
    assert sim.quantize_multiplier(0.5) == (1 << 30, 0)
    assert sim.quantize_multiplier(1.0) == (1 << 30, 1)
    assert sim.quantize_multiplier(0.25) == (1 << 30, -1)
    assert sim.rounding_divide_by_pot(np.array([5, -5, 6, -6, 7]), 1).tolist() == [3, -3, 3, -3, 4]  # half away from 0
    assert sim.rounding_divide_by_pot(np.array([6, -6]), 2).tolist() == [2, -2]
    assert int(sim.srdhm(np.array(sim.INT32_MIN), np.array(sim.INT32_MIN))) == sim.INT32_MAX


def test_tflite_requantize_double_and_single_rounding() -> None:
    rng = np.random.default_rng(5)
    acc = rng.integers(-300000, 300000, 4000)
    s_x, s_w, s_y = 0.0123, np.float32(0.00417), 0.0871
    q, shift = sim.tflite_multipliers(s_x, s_w, s_y)
    dbl = sim.requantize(acc, s_x, s_w, s_y, 3, -128, 127, "tflite", axis=0)
    sgl = sim.requantize(acc, s_x, s_w, s_y, 3, -128, 127, "tflite_single", axis=0)
    ort = sim.requantize(acc, s_x, s_w, s_y, 3, -128, 127, "ort", axis=0)
    expect = [min(max(_ref_tflite_double(int(a), int(q[0]), int(shift[0])) + 3, -128), 127) for a in acc]
    assert dbl.tolist() == expect
    real = np.clip(np.round(acc * (s_x * float(s_w) / s_y)) + 3, -128, 127)
    for got in (dbl, sgl, ort):
        assert np.abs(got - real).max() <= 1  # all three are roundings of the same real value
    # double rounding differs from single rounding somewhere in a random set like this one
    tie = np.arange(-(2**20), 2**20, 97)
    a = sim.requantize(tie, 1.0, np.float32(1.0), 2.0**7, 0, -(2**31), 2**31 - 1, "tflite", axis=0)
    b = sim.requantize(tie, 1.0, np.float32(1.0), 2.0**7, 0, -(2**31), 2**31 - 1, "tflite_single", axis=0)
    assert (a != b).any() and np.abs(a.astype(np.int64) - b).max() == 1


def test_float_input_is_rejected_on_the_integer_path() -> None:
    with pytest.raises(TypeError):
        sim.gemm_int(np.ones((2, 2), np.float32), 0, np.ones((2, 2), np.int8))
