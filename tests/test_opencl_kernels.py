"""Each OpenCL kernel against its PyTorch reference, on odd shapes, on the first OpenCL device (PoCL in CI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edgediff.kernels import reference as ref

pytest.importorskip("pyopencl")
from edgediff.kernels.runtime import CLRuntime, opencl_available, winograd_weights  # noqa: E402

if not opencl_available()[0]:
    pytest.skip(f"no OpenCL device: {opencl_available()[1]}", allow_module_level=True)


@pytest.fixture(scope="module")
def rt() -> CLRuntime:
    return CLRuntime()


@pytest.fixture(scope="module")
def rt16() -> CLRuntime:
    return CLRuntime(precision="fp16")


def _t(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _close(got: np.ndarray, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want.numpy(), atol=atol, rtol=rtol)


def test_elementwise(rt: CLRuntime) -> None:
    a, b = _t(2, 3, 5, 7, seed=1, scale=4), _t(2, 3, 5, 7, seed=2)
    da, db = rt.to_device(a), rt.to_device(b)
    _close(rt.silu(da).get(), torch.nn.functional.silu(a))
    _close(rt.gelu(da).get(), torch.nn.functional.gelu(a))
    _close(rt.add(da, db, 0.5).get(), (a + b) * 0.5)
    _close(rt.affine(da, 2.0, -1.0).get(), 2 * a - 1.0)
    c = _t(2, 4, 5, 7, seed=3)
    _close(rt.concat(da, rt.to_device(c)).get(), torch.cat([a, c], 1))
    _close(rt.upsample2x(da).get(), torch.nn.functional.interpolate(a, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0.0), (17, False, 1.0)])
def test_timestep_embedding(rt: CLRuntime, dim: int, flip: bool, shift: float) -> None:
    t = torch.tensor([0.0, 1.0, 37.0, 999.0])
    freqs = ref.timestep_freqs(dim, shift)
    got = rt.timestep_embedding(rt.to_device(t, np.float32), rt.to_device(freqs, np.float32), dim, flip).get()
    _close(got.reshape(4, dim), ref.timestep_embedding(t, dim, flip, shift), atol=2e-5)


@pytest.mark.parametrize("shape,groups,silu", [((2, 12, 5, 7), 4, True), ((1, 6, 3, 1), 3, False), ((3, 8, 33, 9), 2, True)])
def test_group_norm_fused_and_unfused(rt: CLRuntime, shape: tuple[int, ...], groups: int, silu: bool) -> None:
    x = _t(*shape, seed=4, scale=3) + 5.0  # an offset mean: naive sum-of-squares variance would lose digits
    g, b = _t(shape[1], seed=5), _t(shape[1], seed=6)
    want = ref.group_norm(x, g, b, groups, 1e-5, silu)
    dg, db = rt.to_device(g, np.float32), rt.to_device(b, np.float32)
    _close(rt.group_norm(rt.to_device(x), dg, db, groups, 1e-5, silu).get(), want, atol=2e-5, rtol=1e-4)
    _close(rt.group_norm_unfused(rt.to_device(x), dg, db, groups, 1e-5, silu).get(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rows,cols,scale", [(7, 37, 1.0), (3, 1, 1.0), (5, 300, 40.0)])
def test_softmax(rt: CLRuntime, rows: int, cols: int, scale: float) -> None:
    x = _t(rows, cols, seed=7, scale=scale)
    _close(rt.softmax(rt.to_device(x)).get(), ref.softmax(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("B,heads,d,n,m", [(2, 2, 8, 19, 23), (1, 1, 32, 64, 64), (1, 3, 5, 7, 130)])
def test_flash_attention_fused_qkv(rt: CLRuntime, B: int, heads: int, d: int, n: int, m: int) -> None:
    C = heads * d
    q = _t(B, C, n, seed=8, scale=2)
    k, v = _t(B, C, m, seed=9, scale=2), _t(B, C, m, seed=10)
    want = ref.attention(q, k, v, heads)
    got = rt.flash_attention(rt.to_device(q), rt.to_device(k), rt.to_device(v), heads, d, n, m).get()
    _close(got, want, atol=2e-5, rtol=1e-4)
    if n == m:  # q, k, v as three slices of one fused projection (B, 3C, N): offsets, no copies
        qkv = torch.cat([q, k, v], 1)
        dq = rt.to_device(qkv)
        got = rt.flash_attention(dq, dq, dq, heads, d, n, m, q_off=0, k_off=C * n, v_off=2 * C * n).get()
        _close(got, want, atol=2e-5, rtol=1e-4)
    got = rt.attention_unfused(rt.to_device(q), rt.to_device(k), rt.to_device(v), heads, d, n, m).get()
    _close(got, want, atol=2e-5, rtol=1e-4)


def test_flash_attention_tiles_fit_local_memory(rt: CLRuntime) -> None:
    bq, bkv = rt.attention_tiles(256)
    assert 2 * bkv * 256 * 4 <= rt.local_mem // 2 and bq <= rt.max_wg


@pytest.mark.parametrize("ci,co,h,w,k,stride,pad", [(3, 5, 7, 9, 3, 1, 1), (4, 6, 9, 8, 3, 2, 1), (17, 3, 5, 5, 1, 1, 0),
                                                    (2, 4, 6, 6, 3, 2, (0, 0, 1, 1))])
def test_conv2d_implicit_gemm(rt: CLRuntime, ci: int, co: int, h: int, w: int, k: int, stride: int, pad: object) -> None:
    x, wt, b = _t(2, ci, h, w, seed=11), _t(co, ci, k, k, seed=12), _t(co, seed=13)
    want = ref.conv2d(x, wt, b, stride, pad)  # type: ignore[arg-type]
    got = rt.conv2d(rt.to_device(x), rt.to_device(wt), rt.to_device(b, np.float32), stride, pad)  # type: ignore[arg-type]
    _close(got.get(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("h,w", [(5, 7), (8, 8), (1, 3)])
def test_conv2d_winograd_with_epilogue(rt: CLRuntime, h: int, w: int) -> None:
    x, wt, b = _t(2, 5, h, w, seed=14), _t(7, 5, 3, 3, seed=15), _t(7, seed=16)
    temb, res = _t(2, 7, seed=17), _t(2, 7, h, w, seed=18)
    want = ref.conv2d(x, wt, b, 1, 1, chan_add=temb, res=res, out_scale=0.5)
    db = rt.to_device(b, np.float32)
    u = rt.to_device(winograd_weights(wt.numpy()))
    got = rt.conv2d_winograd(rt.to_device(x), u, db, rt.to_device(temb), rt.to_device(res), 0.5).get()
    _close(got, want, atol=3e-5, rtol=1e-4)
    got = rt.conv2d(rt.to_device(x), rt.to_device(wt), db, 1, 1, rt.to_device(temb), rt.to_device(res), 0.5).get()
    _close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("signed,zp_x,zp_y", [(True, 3, -2), (False, 128, 120)])
def test_int8_quantize_and_conv_bit_exact(rt: CLRuntime, signed: bool, zp_x: int, zp_y: int) -> None:
    qmin, qmax = (-128, 127) if signed else (0, 255)
    x = _t(2, 5, 7, 6, seed=19, scale=2)
    s_x, s_y = 0.021, 0.05
    xq = ref.quantize(x, s_x, zp_x, qmin, qmax)
    # values exactly half-way between grid points must round to even
    x_half = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 300.0]) * s_x
    got_half = rt.quantize(rt.to_device(x_half, np.float32), s_x, zp_x, signed).get()
    np.testing.assert_array_equal(got_half.astype(np.int32), ref.quantize(x_half, s_x, zp_x, qmin, qmax).numpy())
    dq = rt.quantize(rt.to_device(x, np.float32), s_x, zp_x, signed)
    np.testing.assert_array_equal(dq.get().astype(np.int32), xq.numpy())
    wq = torch.randint(-127, 128, (4, 5, 3, 3), generator=torch.Generator().manual_seed(20), dtype=torch.int32)
    s_w = torch.rand(4, generator=torch.Generator().manual_seed(21)) * 0.01 + 0.001
    bias = torch.randint(-3000, 3000, (4,), generator=torch.Generator().manual_seed(22), dtype=torch.int32)
    mult = (torch.tensor(s_x, dtype=torch.float32) * s_w / torch.tensor(s_y, dtype=torch.float32)).float()
    for stride in (1, 2):
        want = ref.conv2d_int8(xq, wq, bias, mult, zp_x, zp_y, qmin, qmax, stride=stride, pad=1)
        got = rt.conv2d_int8(dq, rt.to_device(wq, np.int8), rt.to_device(bias, np.int32), rt.to_device(mult, np.float32),
                             zp_x, zp_y, stride=stride, pad=1).get()
        np.testing.assert_array_equal(got.astype(np.int32), want.numpy())
    deq = rt.dequantize(dq, s_x, zp_x).get()
    _close(deq, (xq.float() - zp_x) * s_x, atol=0, rtol=0)


def test_int8_conv_matches_onnxruntime_qlinearconv(rt: CLRuntime) -> None:
    """The same integer conv through ORT's QLinearConv (uint8 activations, int8 per-channel weights).

    Weights are kept to 7 bits as ORT's quantizer does with reduce_range: its x86 u8s8 kernels add
    pairs of products in int16 (vpmaddubsw) and saturate with full-range weights, where we do not."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(23)
    xq = torch.randint(0, 256, (1, 6, 9, 7), generator=g, dtype=torch.int32)
    wq = torch.randint(-64, 64, (5, 6, 3, 3), generator=g, dtype=torch.int32)
    bias = torch.randint(-5000, 5000, (5,), generator=g, dtype=torch.int32)
    s_x, zp_x, s_y, zp_y = np.float32(0.03), 131, np.float32(0.07), 118
    s_w = (torch.rand(5, generator=g) * 0.01 + 0.002).numpy().astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (np.array(s_x, np.float32), "sx"), (np.array(zp_x, np.uint8), "zx"), (wq.numpy().astype(np.int8), "w"),
        (s_w, "sw"), (np.zeros(5, np.int8), "zw"), (np.array(s_y, np.float32), "sy"), (np.array(zp_y, np.uint8), "zy"),
        (bias.numpy().astype(np.int32), "b")]]
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 6, 9, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": xq.numpy().astype(np.uint8)})[0]
    mult = (np.float32(s_x) * s_w / np.float32(s_y)).astype(np.float32)
    got = rt.conv2d_int8(rt.to_device(xq, np.uint8), rt.to_device(wq, np.int8), rt.to_device(bias, np.int32),
                         rt.to_device(mult, np.float32), zp_x, zp_y, pad=1).get()
    assert onnx is not None
    np.testing.assert_array_equal(got, want)


def test_fp16_storage_kernels(rt16: CLRuntime) -> None:
    """fp16 bundles: half storage, float arithmetic; on a device without cl_khr_fp16 the runtime says so."""
    if not rt16.native_half:
        assert any("cl_khr_fp16" in n for n in rt16.notes)
    x, wt, b = _t(2, 8, 6, 5, seed=24), _t(6, 8, 3, 3, seed=25), _t(6, seed=26)
    dx = rt16.to_device(x)
    assert dx.dtype == np.float16
    g, be = _t(8, seed=27), _t(8, seed=28)
    want = ref.group_norm(x.half().float(), g, be, 4, 1e-5, True)
    got = rt16.group_norm(dx, rt16.to_device(g, np.float32), rt16.to_device(be, np.float32), 4, 1e-5, True).get()
    _close(got, want, atol=2e-3, rtol=2e-3)
    want = ref.conv2d(x.half().float(), wt.half().float(), b, 1, 1)
    got = rt16.conv2d(dx, rt16.to_device(wt), rt16.to_device(b, np.float32), 1, 1).get()
    _close(got, want, atol=1e-2, rtol=5e-3)
