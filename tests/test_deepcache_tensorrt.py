"""TensorRT bundles with DeepCache's two entry points: both TensorRT-ready graphs, their trtexec scripts,
exit 3 without TensorRT, the structural check of both, and the pair run in onnxruntime under the schedule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from deepcache_fixtures import cached, export_cached
from edgediff.exporters.tensorrt import _tensorrt, check_bundle

from edgediff.model import DiffusionModel
from edgediff.runtime.bundle import MANIFEST, read_bundle

onnx = pytest.importorskip("onnx")
no_trt = pytest.mark.skipif(_tensorrt()[0] is not None, reason="TensorRT and a GPU are here: the engines get built")


@no_trt
def test_cached_tensorrt_bundle_without_tensorrt(tiny_unet: DiffusionModel, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    from edgediff.cli import main

    # the bundle is written, the engines are not: exit 3 with the commands that build them
    m, rc, rep, out = export_cached(tiny_unet, tmp_path, "tensorrt", "b", capsys)
    assert rc == 3
    assert rep["exit_code"] == 3 and "unet_shallow/model.trtexec.sh" in rep["reason"]
    man = json.loads((out / MANIFEST).read_text())
    assert man["target"] == "tensorrt" and man["tensorrt"]["engines_built"] is False
    assert man["cache"]["full_steps"] == [0, 2, 4]
    feat = m.extras["cache"]["feature_shape"]
    for name, role in (("unet", "denoiser"), ("unet_shallow", "denoiser_shallow")):
        comp = man["components"][name]
        assert comp["role"] == role and comp["trt_compat"] == [] and comp["engine"] is None
        proto = onnx.load(str(out / comp["path"]))
        assert {p.key: p.value for p in proto.metadata_props}["edgediff.made_for"] == "tensorrt"
        script = (out / comp["trtexec_script"]).read_text()
        assert "--onnx=model.onnx" in script and "--saveEngine=model.engine" in script and 'cd "$(dirname' in script
    shallow_script = (out / "unet_shallow" / "model.trtexec.sh").read_text()
    assert f"cached_feature:16x{'x'.join(map(str, feat))}" in shallow_script  # the max batch profile of the feature

    # verify: the pair ran in onnxruntime with the cached schedule; exit 3 because no engine ran
    assert main(["verify", str(tmp_path / "art"), str(out), "--samples", "2", "--json"]) == 3
    v = json.loads(capsys.readouterr().out)
    assert v["verified"] is False and v["exit_code"] == 3 and "not built here" in v["reason"]
    assert v["onnxruntime"]["psnr_db"] > 60 and v["onnxruntime"]["within_tolerance"]
    assert (v["denoiser_calls_full"], v["denoiser_calls_shallow"]) == (3, 2)
    s = v["structural"]
    assert s["ok"] and set(s["components"]) == {"unet", "unet_shallow"}
    assert s["components"]["unet_shallow"]["inputs"] == ["sample", "timestep", "cached_feature"]
    assert s["components"]["unet"]["outputs"] == ["out_sample", "cached_feature"]

    npy = tmp_path / "x.npy"
    assert main(["generate", str(out), "--samples", "2", "--save-npy", str(npy), "--json"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert g["runtime"] == "onnxruntime" and (g["denoiser_calls_full"], g["denoiser_calls_shallow"]) == (3, 2)
    assert np.isfinite(np.load(npy)).all()


@no_trt
def test_int8_tensorrt_bundle_is_qdq_and_the_check_finds_rejected_ops(tiny_unet: DiffusionModel,
                                                                      tmp_path: Path) -> None:
    from edgediff.bundle import export_bundle
    from edgediff.testing import minmax_quantize

    q = cached(minmax_quantize(tiny_unet), sampler="ddim", steps=4)
    rep = export_bundle(q, tmp_path / "b", "tensorrt", "int8")
    assert rep["exit_code"] == 3
    b = read_bundle(tmp_path / "b")
    for name in ("unet", "unet_shallow"):
        ops = {n.op_type for n in onnx.load(str(tmp_path / "b" / name / "model.onnx")).graph.node}
        # explicit quantization (Q/DQ), not onnxruntime's integer operators
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & {"QLinearConv", "MatMulInteger"}
        assert b.manifest["components"][name]["trt_compat"] == []
    assert check_bundle(tmp_path / "b")["ok"]
    # a shallow graph TensorRT would reject is reported, by component
    f = tmp_path / "b" / "unet_shallow" / "model.onnx"
    proto = onnx.load(str(f))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    conv.op_type, conv.domain = "QLinearConv", "com.microsoft"
    onnx.save_model(proto, str(f))
    chk = check_bundle(tmp_path / "b")
    assert not chk["ok"] and chk["components"]["unet_shallow"]["compat_issues"]
    assert any(p.startswith("unet_shallow:") and "QLinearConv" in p for p in chk["problems"])
    assert chk["components"]["unet"]["compat_issues"] == []
