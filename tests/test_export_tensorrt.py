"""TensorRT backend without TensorRT or a GPU (this machine): ONNX + trtexec command, exit 3, compat check."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from edgediff.exporters import get_backend
from edgediff.exporters import tensorrt as et

from edgediff.errors import Unavailable
from edgediff.testing import minmax_quantize
from edgediff.verify import verify

pytestmark = pytest.mark.skipif(et._tensorrt()[0] is not None, reason="TensorRT and a GPU are present here")


def test_fp16_writes_onnx_and_trtexec_then_unavailable(tiny_unet, tmp_path: Path) -> None:
    out = tmp_path / "u.engine"
    with pytest.raises(Unavailable, match="trtexec|tensorrt|GPU") as e:
        get_backend("tensorrt").export(tiny_unet, out, "fp16")
    assert e.value.exit_code == 3 and "pip install tensorrt" in str(e.value)
    assert not out.exists()
    onnx.checker.check_model(str(tmp_path / "u.onnx"))
    script = (tmp_path / "u.trtexec.sh").read_text()
    cmd = script.strip().splitlines()[-1]
    assert cmd.startswith("trtexec ") and "--fp16" in cmd and "--int8" not in cmd
    assert f"--saveEngine={out}" in cmd and f"--onnx={tmp_path / 'u.onnx'}" in cmd
    assert "--minShapes=sample:1x1x16x16,timestep:1" in cmd and "--maxShapes=sample:16x1x16x16,timestep:16" in cmd
    assert "0 problem(s)" in script


def test_verify_engine_here_is_exit_3_with_check(tiny_unet, tmp_path: Path) -> None:
    out = tmp_path / "u.engine"
    with pytest.raises(Unavailable):
        get_backend("tensorrt").export(tiny_unet, out, "fp32")
    out.write_bytes(b"not built here")  # stands for an engine copied back from a device
    r = verify(tiny_unet, out, steps=2, samples=1)
    assert r["target"] == "tensorrt" and r["verified"] is False and r["exit_code"] == 3
    assert "GPU" in r["reason"] or "tensorrt" in r["reason"]
    assert r["check"]["ok"] and r["check"]["compat_issues"] == []


def test_verify_of_trt_ready_onnx_says_what_ran(tiny_unet, tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        get_backend("tensorrt").export(tiny_unet, tmp_path / "u.onnx", "fp16")
    r = verify(tiny_unet, tmp_path / "u.onnx", steps=2, samples=1)
    assert r["target"] == "onnx" and r["exit_code"] == 0 and "not built or run here" in r["note"]


def test_compat_flags_asymmetric_zero_points(tiny_unet, tmp_path: Path) -> None:
    sym, asym = minmax_quantize(tiny_unet, symmetric=True), minmax_quantize(tiny_unet, symmetric=False)
    with pytest.raises(Unavailable):
        get_backend("tensorrt").export(sym, tmp_path / "s.engine", "int8")
    assert "--int8" in (tmp_path / "s.trtexec.sh").read_text()
    assert et.trt_compat(onnx.load(str(tmp_path / "s.onnx"))) == []
    with pytest.raises(Unavailable, match="compatibility problem"):
        get_backend("tensorrt").export(asym, tmp_path / "a.engine", "int8")
    issues = et.trt_compat(onnx.load(str(tmp_path / "a.onnx")))
    assert issues and all("zero point" in i["problem"] or "uint8" in i["problem"] for i in issues)
    assert any(i["node"].startswith("/down_blocks.0/resnets.0/conv1/") for i in issues)


def test_compat_flags_unsupported_ops() -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 4, 4])
    node = helper.make_node("QLinearConv", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"], name="/conv_in/QLinearConv")
    m = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    issues = et.trt_compat(m)
    assert issues == [{"node": "/conv_in/QLinearConv", "op": "QLinearConv",
                       "problem": "operator QLinearConv is not supported by TensorRT's ONNX parser"}]
