"""edgediff.profiling: one per-layer schema across runtimes, device estimates, coverage, adb parser, report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel, InputSignature
from edgediff.profiling.graph import OpWork
from edgediff.schedule import NoiseSchedule

FIXTURES = Path(__file__).parent / "fixtures"


def _tiny_unet() -> DiffusionModel:
    """The conftest tiny_unet, built here so one ONNX export serves the whole module."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8, attention_head_dim=8).eval()
    return DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((1, 16, 16)), "UNet2DModel", dict(m.config),
                          {"source": "test"})


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffusionModel, Path]:
    from edgediff.profiling.run import export_onnx

    model = _tiny_unet()
    path = tmp_path_factory.mktemp("prof") / "tiny.onnx"
    export_onnx(model, path)
    return model, path


def _torch_macs(model: DiffusionModel) -> int:
    """Conv/linear MACs by forward hooks + the attention matmuls (QK^T and AV) counted by hand."""
    from diffusers.models.attention_processor import Attention

    total = 0
    hooks = []

    def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            total += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            total += out.numel() * mod.in_features
        elif isinstance(mod, Attention):
            x = inp[0]
            tokens = x.shape[2] * x.shape[3] if x.dim() == 4 else x.shape[1]
            total += 2 * tokens * tokens * mod.inner_dim  # QK^T and AV, all heads

    for mod in model.denoiser.modules():
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model.module()(**model.example_inputs(1))
    for h in hooks:
        h.remove()
    return total


# ----------------------------------------------------------------------------- graph analysis
def test_onnx_ops_macs_and_module_names(unet_onnx: tuple[DiffusionModel, Path]) -> None:
    from edgediff.profiling.graph import onnx_ops

    model, path = unet_onnx
    ops = onnx_ops(path)
    assert sum(o.macs for o in ops) == _torch_macs(model)
    names = {o.name for o in ops}
    modules = {n for n, _ in model.denoiser.named_modules()}
    for conv in ("conv_in", "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.1.conv2", "conv_out"):
        assert conv in names
    # every MAC op is attributed to a real module of the source model
    assert all(o.name in modules for o in ops if o.macs)
    assert all(o.gemm is not None and math.prod(o.gemm) == o.macs for o in ops if o.macs)


@pytest.mark.slow  # the dynamo exporter takes minutes on a loaded 2-core machine
def test_module_names_from_dynamo_metadata(tmp_path: Path) -> None:
    from edgediff.profiling.graph import onnx_ops

    model = _tiny_unet()
    ex = model.example_inputs(1)
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(model.module().eval(), tuple(ex.values()), str(path), input_names=list(ex), output_names=["out"],
                      dynamo=True, external_data=False, verbose=False)
    ops = onnx_ops(path)
    names = {o.name for o in ops if o.macs}
    assert {"conv_in", "down_blocks.1.attentions.0.to_q", "mid_block.resnets.0.conv1"} <= names
    assert sum(o.macs for o in ops) == _torch_macs(model)


# ----------------------------------------------------------------------------- onnxruntime
def test_profile_ort_schema(unet_onnx: tuple[DiffusionModel, Path]) -> None:
    from edgediff.profiling.run import profile

    model, path = unet_onnx
    r = profile(path, runtime="ort", warmup=1, repeats=3, threads=1)
    assert r["runtime"] == "ort" and r["estimated"] is False
    assert r["total_ms"] > 0 and r["total"]["runs"] == 3 and r["total"]["p10_ms"] <= r["total"]["p90_ms"]
    layers = r["layers"]
    assert layers and all({"name", "op", "ms", "share"} <= set(la) for la in layers)
    assert abs(sum(la["share"] for la in layers) - 1) < 1e-6
    by = {la["name"]: la for la in layers}
    assert "Conv" in by["down_blocks.0.resnets.0.conv1"]["op"]
    assert by["down_blocks.0.resnets.0.conv1"]["macs"] > 0
    assert r["peak_memory_bytes"] > 0
    assert r["macs"] == _torch_macs(model)


def test_ort_module_map_follows_layout_reorders() -> None:
    """ORT renames fused/NCHWc nodes; the map recovers modules through tensor names."""
    from onnx import TensorProto, helper

    from edgediff.profiling.ort import module_map

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    orig = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="/inner/down/conv1/Conv"),
         helper.make_node("Relu", ["c"], ["y"], name="/inner/down/act/Relu")], "g", [x], [y]))
    opt = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["reorder_1"], name="c_nchwc"),
         helper.make_node("ReorderOutput", ["reorder_1"], ["c"], name="ReorderOutput_token_3"),
         helper.make_node("Relu", ["c"], ["y"], name="/inner/down/act/Relu")], "g", [x], [y]))
    m = module_map(orig, opt)
    assert m == {"c_nchwc": "down.conv1", "ReorderOutput_token_3": "down.conv1", "/inner/down/act/Relu": "down.act"}


# ----------------------------------------------------------------------------- LiteRT
def _tflite_model(path: Path) -> None:
    """A 2-op .tflite (CONV_2D -> LOGISTIC) with litert-torch style scoped tensor names, built with
    LiteRT's own schema (litert-torch conversion takes minutes on a loaded CI machine)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    def tensor(name: str, shape: list[int], buf: int = 0) -> object:
        t = schema.TensorT()
        t.shape, t.type, t.buffer, t.name = shape, schema.TensorType.FLOAT32, buf, name
        return t

    def code(op: int) -> object:
        c = schema.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = op
        c.version = 1
        return c

    scope = "pkg.Root/diffusers.UNet2DModel_inner/torch.nn.modules.conv.Conv2d_conv_in"
    rng = np.random.default_rng(0)
    wbuf, bbuf = schema.BufferT(), schema.BufferT()
    wbuf.data = rng.standard_normal((8, 3, 3, 4)).astype(np.float32).tobytes()
    bbuf.data = np.zeros(8, np.float32).tobytes()
    tensors = [tensor("x", [1, 16, 16, 4]), tensor("w", [8, 3, 3, 4], 1), tensor("b", [8], 2),
               tensor(scope + ";1", [1, 16, 16, 8]),
               tensor("pkg.Root/diffusers.UNet2DModel_inner/torch.nn.modules.activation.SiLU_act;2", [1, 16, 16, 8])]
    conv = schema.OperatorT()
    conv.opcodeIndex, conv.inputs, conv.outputs = 0, [0, 1, 2], [3]
    conv.builtinOptionsType = schema.BuiltinOptions.Conv2DOptions
    opts = schema.Conv2DOptionsT()
    opts.padding, opts.strideH, opts.strideW, opts.dilationHFactor, opts.dilationWFactor = schema.Padding.SAME, 1, 1, 1, 1
    conv.builtinOptions = opts
    act = schema.OperatorT()
    act.opcodeIndex, act.inputs, act.outputs = 1, [3], [4]
    sg = schema.SubGraphT()
    sg.tensors, sg.operators, sg.inputs, sg.outputs = tensors, [conv, act], [0], [4]
    m = schema.ModelT()
    m.version = 3
    m.operatorCodes = [code(schema.BuiltinOperator.CONV_2D), code(schema.BuiltinOperator.LOGISTIC)]
    m.subgraphs, m.buffers = [sg], [schema.BufferT(), wbuf, bbuf]
    path.write_bytes(bytes(fbu.convert_object_to_bytearray(m)))


def test_profile_tflite_op_by_op(tmp_path: Path) -> None:
    from edgediff.profiling.graph import tflite_ops
    from edgediff.profiling.run import profile

    path = tmp_path / "m.tflite"
    _tflite_model(path)
    ops = tflite_ops(path)
    assert [o.op for o in ops] == ["CONV_2D", "LOGISTIC"]
    assert ops[0].macs == 16 * 16 * 8 * 3 * 3 * 4 and ops[0].name == "conv_in"
    r = profile(path, warmup=1, repeats=3, threads=1)
    assert r["runtime"] == "tflite" and r["ops_not_timed"] == []
    names = [la["name"] for la in r["layers"]]
    assert names == ["conv_in", "act"]
    assert all(la["ms"] >= 0 and not math.isnan(la["ms"]) for la in r["layers"])
    assert r["total_ms"] > 0 and r["layers"][0]["macs"] == ops[0].macs


@pytest.mark.slow
def test_profile_tflite_unet_converted(tmp_path: Path) -> None:
    """The real flow: litert-torch converts the tiny UNet, every op gets timed, names map back."""
    import litert_torch

    model = _tiny_unet()
    ex = model.example_inputs(1)
    path = tmp_path / "u.tflite"
    litert_torch.convert(model.module().eval(), tuple(ex.values())).export(str(path))
    from edgediff.profiling.run import profile

    r = profile(path, warmup=1, repeats=3, threads=1)
    assert not r["ops_not_timed"]
    assert any(la["name"] == "conv_in" for la in r["layers"])
    assert r["macs"] == _torch_macs(model)


# ----------------------------------------------------------------------------- estimates
def test_device_estimate_is_labelled_and_roofline(unet_onnx: tuple[DiffusionModel, Path]) -> None:
    from edgediff.profiling.estimate import get_device, op_ms
    from edgediff.profiling.run import profile

    _, path = unet_onnx
    r = profile(path, device="orin-nano")
    assert r["estimated"] is True and "ESTIMATE" in r["note"] and r["runtime"] == "estimate:orin-nano"
    assert r["total_ms"] > 0 and abs(sum(la["share"] for la in r["layers"]) - 1) < 1e-6
    assert r["device"]["sources"]
    dev = get_device("orin-nano")
    eff = dev["efficiency"]
    big = OpWork("x", "x", "Conv", macs=10**9, bytes_in=1000, bytes_w=1000, bytes_out=1000, precision="fp16")
    ms, bound = op_ms(big, dev)
    assert bound == "compute"
    assert ms == pytest.approx((1e9 / (dev["peak_gmacs"]["fp16"] * 1e9 * eff["compute"]) + eff["op_overhead_us"] * 1e-6) * 1e3)
    copy = OpWork("y", "y", "Add", macs=0, bytes_in=10**8, bytes_w=0, bytes_out=10**8, precision="fp32")
    assert op_ms(copy, dev)[1] == "memory"
    # int8 runs faster than fp16 on a device with a faster int8 path
    assert op_ms(OpWork("x", "x", "Conv", 10**9, 0, 0, 0, "int8"), dev)[0] < ms


def test_fpga_estimate_uses_the_array_cycle_model(unet_onnx: tuple[DiffusionModel, Path]) -> None:
    from edgediff.fpga.estimate import gemm_cycles

    from edgediff.profiling.graph import onnx_ops
    from edgediff.profiling.run import profile

    _, path = unet_onnx
    r = profile(path, device="fpga-sa16")
    conv = next(la for la in r["layers"] if la["name"] == "conv_in")
    op = next(o for o in onnx_ops(path) if o.name == "conv_in" and o.macs)
    assert conv["bound"] == "array"
    assert conv["ms"] == pytest.approx(gemm_cycles(*op.gemm[:3], reps=op.gemm[3]) / 200.0 / 1000.0)


def test_this_cpu_calibration_reports_error(unet_onnx: tuple[DiffusionModel, Path]) -> None:
    from edgediff.profiling.run import profile

    _, path = unet_onnx
    r = profile(path, device="this-cpu", warmup=1, repeats=3, threads=1)
    cal = r["calibration"]
    err = cal["error_on_fit_set"]
    assert err["layers_compared"] >= 10
    assert math.isfinite(err["median_abs_pct_err"]) and math.isfinite(err["total_pct_err"])
    assert r["device"]["calibrated"] is True and r["estimated"] is True
    assert cal["peaks"]["gmacs"]["fp32"] > 0 and cal["peaks"]["bandwidth_gbs"] > 0


def test_unknown_device_and_bad_inputs(unet_onnx: tuple[DiffusionModel, Path], tmp_path: Path) -> None:
    from edgediff.profiling.run import profile

    _, path = unet_onnx
    with pytest.raises(BadInput, match="unknown device"):
        profile(path, device="pixel-99")
    with pytest.raises(BadInput, match="--runtime"):
        profile(path, runtime="cuda")
    with pytest.raises(BadInput, match="no such file"):
        profile(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(BadInput, match="junk.onnx"):
        profile(junk)
    out = tmp_path / "r.html"
    out.write_text("keep")
    with pytest.raises(BadInput, match="already exists"):
        profile(path, html=out)
    assert out.read_text() == "keep"


# ----------------------------------------------------------------------------- coverage
def test_coverage_shares() -> None:
    from edgediff.profiling.coverage import coverage

    # Bernoulli: "N" in onnx-tensorrt operators.md (the table in edgediff.exporters.ops)
    ops = [OpWork("a", "a", "Conv", 300, 0, 0, 0, "fp32"), OpWork("b", "b", "Bernoulli", 0, 0, 0, 0, "fp32"),
           OpWork("c", "c", "Einsum", 100, 0, 0, 0, "fp32"), OpWork("d", "d", "InstanceNormalization", 0, 0, 0, 0, "fp32")]
    c = coverage(ops)
    assert c["tensorrt"]["ops_fallback"] == 1 and c["tensorrt"]["macs_share_fallback"] == 0
    assert c["opencl"]["macs_share_fallback"] == pytest.approx(0.25)  # Einsum has no OpenCL kernel
    # the array takes the conv (after int8 quantization); einsum, nonzero and the norm stay on the host
    assert {f["op"] for f in c["fpga"]["fallback_ops"]} == {"Bernoulli", "Einsum", "InstanceNormalization"}
    assert c["fpga"]["macs_share_fallback"] == pytest.approx(0.25)
    int8 = coverage([OpWork("a", "a", "Conv", 10, 0, 0, 0, "int8")])
    assert int8["litert-gpu"]["macs_share_fallback"] == 1.0  # GPU delegate needs float tensors


def test_coverage_on_model_spec_and_html(tmp_path: Path) -> None:
    from edgediff.profiling.run import profile

    model = _tiny_unet()
    folder = tmp_path / "unet"
    model.denoiser.save_pretrained(folder)
    html = tmp_path / "report.html"
    r = profile(folder, warmup=1, repeats=2, threads=1, html=html)
    cov = r["coverage"]
    assert set(cov) >= {"tensorrt", "litert-gpu", "coreml-ane", "opencl", "fpga"}
    assert cov["tensorrt"]["macs_share_fallback"] == 0.0
    # GroupNorm, SiLU and softmax are host-side on the FPGA array, but they carry no MACs
    fpga_fb = {f["op"] for f in cov["fpga"]["fallback_ops"]}
    assert {"InstanceNormalization", "Softmax"} <= fpga_fb and cov["fpga"]["macs_share_fallback"] == 0.0
    text = html.read_text()
    assert "<svg" in text and "conv_in" in text and "Op coverage per target" in text
    assert r["source"]["model"] == str(folder)


# ----------------------------------------------------------------------------- adb, tensorrt, opencl
def test_adb_parser_on_documented_format() -> None:
    from edgediff.profiling.adb import parse_benchmark_output

    r = parse_benchmark_output((FIXTURES / "benchmark_model_op_profiling.txt").read_text())
    assert r["total_ms"] == pytest.approx(0.9214)
    assert r["total"]["runs"] == 1066 and r["total"]["std_ms"] == pytest.approx(0.038)
    assert r["peak_memory_bytes"] == int(9.92188 * 2**20)
    names = [la["name"] for la in r["layers"]]
    # the initialization table (ModifyGraphWithDelegate) is not mistaken for ops
    assert "ModifyGraphWithDelegate" not in names
    assert names[0] == "conv_in" and "DownBlock2D[0].ResnetBlock2D[0].conv1" in names
    norm = next(la for la in r["layers"] if la["name"].endswith("norm2"))
    assert norm["op"] == "MEAN+SQUARED_DIFFERENCE" and norm["ms"] == pytest.approx(0.033)
    assert len(r["nodes"]) == 10


def test_adb_parser_rejects_output_without_op_table() -> None:
    from edgediff.profiling.adb import parse_benchmark_output

    with pytest.raises(BadInput, match="enable_op_profiling"):
        parse_benchmark_output("INFO: Inference timings in us: Init: 1, First inference: 2, Inference (avg): 3\n")


def test_adb_missing_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from edgediff.cli import main

    path = tmp_path / "m.tflite"
    _tflite_model(path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["profile", str(path), "--adb", "R5CT1234"]) == 3
    assert "adb is not installed" in capsys.readouterr().err


def test_tensorrt_unavailable_here_exits_3(unet_onnx: tuple[DiffusionModel, Path]) -> None:
    from edgediff.profiling.run import profile
    from edgediff.profiling.trt import available

    if available()[0]:
        pytest.skip("TensorRT and a GPU are present: the real profiler runs instead")
    with pytest.raises(Unavailable) as e:
        profile(unet_onnx[1], runtime="tensorrt")
    assert e.value.exit_code == 3 and ("tensorrt" in str(e.value) or "CUDA" in str(e.value))


def test_opencl_runtime_profile(unet_onnx: tuple[DiffusionModel, Path], tmp_path: Path) -> None:
    """A real per-kernel profile of the OpenCL bundle from the OpenCL runtime (PoCL here)."""
    from edgediff.exporters import get_backend

    from edgediff.profiling.run import profile

    backend = get_backend("opencl")
    ok, why = backend.available()
    if not ok:
        pytest.skip(f"no OpenCL device here: {why}")
    model = unet_onnx[0]
    bundle = tmp_path / "bundle"
    backend.export(model, bundle, "fp32")
    r = profile(bundle, warmup=1, repeats=2)
    assert r["runtime"] == "opencl" and r["total_ms"] > 0 and r["estimated"] is False
    assert abs(sum(la["share"] for la in r["layers"]) - 1) < 1e-6
    modules = {n for n, _ in model.denoiser.named_modules()}
    assert {"conv_in", "conv_out"} <= {la["name"] for la in r["layers"]}
    # fused kernels (packed QKV) are named inside the module they came from
    assert all(la["name"] in modules or la["name"].rsplit(".", 1)[0] in modules for la in r["layers"] if la["op"] == "conv")


def test_cli_profile_json(unet_onnx: tuple[DiffusionModel, Path], capsys: pytest.CaptureFixture) -> None:
    from edgediff.cli import main

    assert main(["profile", str(unet_onnx[1]), "--device", "rpi5-cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runtime"] == "estimate:rpi5-cpu" and data["estimated"] is True
    assert {"name", "op", "ms", "share"} <= set(data["layers"][0])


def _third_party_export(tmp_path: Path, dynamic_axes: dict[str, dict[int, str]]) -> tuple[DiffusionModel, Path]:
    """A tiny UNet exported outside edgediff: TorchScript exporter on the bare diffusers module, as
    pipelines ship it (the UNet's own call, tuple output)."""
    from edgediff.testing import export_third_party_onnx

    model = _tiny_unet()
    ex = model.example_inputs(1)
    path = export_third_party_onnx(model.denoiser, tmp_path / "third_party.onnx", (ex["sample"], ex["timestep"]),
                                   output_name="out_sample", dynamic_axes=dynamic_axes, opset=None)
    return model, path


def test_third_party_export_layers_add_up_to_the_models_macs(tmp_path: Path) -> None:
    """A UNet exported outside edgediff (TorchScript exporter on the bare diffusers module, dynamic
    batch and spatial axes, as pipelines ship them): every MAC is counted and lands on a module."""
    from edgediff.profiling.graph import onnx_ops

    model, path = _third_party_export(tmp_path, {"sample": {0: "batch", 2: "height", 3: "width"},
                                                 "timestep": {0: "batch"}})
    from edgediff.profiling import graph

    graph.DYNAMIC_DIMS.update(height=16, width=16)  # the size the torch count runs at
    try:
        ops = onnx_ops(path)
    finally:
        graph.DYNAMIC_DIMS.clear()
    assert not [o.node for o in ops if o.op in ("Conv", "Gemm", "MatMul", "Einsum") and not o.macs and not o.shape_only]
    assert sum(o.macs for o in ops) == _torch_macs(model)
    assert not [o.node for o in ops if o.macs and o.name in ("", "unet")]  # no MACs on the root module


def test_measured_layers_of_a_third_party_export_add_up_to_the_models_macs(tmp_path: Path) -> None:
    """ORT fuses a resnet's conv2 with the residual Add and names the fused node after the Add:
    the measured profile still counts that conv's MACs (at the resnet), so the layers add up."""
    from edgediff.profiling.run import profile

    model, path = _third_party_export(tmp_path, {"sample": {0: "batch"}, "timestep": {0: "batch"}})
    res = profile(path, runtime="ort", warmup=1, repeats=2)
    assert res["macs"] == _torch_macs(model)
    assert res["macs_unattributed"] == 0
    assert sum(la.get("macs", 0) for la in res["layers"]) == res["macs"]
    root = [la for la in res["layers"] if la["name"] in ("unet", "(root)")]
    assert sum(la.get("macs", 0) for la in root) == 0  # no conv work charged to the root module
