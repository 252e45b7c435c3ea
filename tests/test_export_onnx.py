"""ONNX backend: fp32/fp16/int8 files that pass the checker, run in onnxruntime and match PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from edgediff.exporters import get_backend
from edgediff.exporters import onnx as eo

from edgediff.errors import BadInput
from edgediff.quant_params import QuantParams
from edgediff.sampling import TorchDenoiser
from edgediff.testing import minmax_quantize


def _const(m: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer or a Constant node's value."""
    for i in m.graph.initializer:
        if i.name == name:
            return onnx.numpy_helper.to_array(i)
    node = next(n for n in m.graph.node if n.op_type == "Constant" and n.output[0] == name)
    return onnx.numpy_helper.to_array(node.attribute[0].t)


def _cond(inp: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return inp.get("encoder_hidden_states", inp.get("class_labels"))


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_cond_unet", "tiny_dit"])
def test_fp32_matches_pytorch_with_dynamic_batch(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue(fixture)
    out = tmp_path / "m.onnx"
    rep = get_backend("onnx").export(model, out, "fp32")
    assert rep["size_bytes"] == out.stat().st_size and rep["checker"] == "passed"
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == eo.OPSET
    assert [i.name for i in m.graph.input] == eo.input_names(model.signature)
    assert [o.name for o in m.graph.output] == ["out"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in m.graph.input)
    den = get_backend("onnx").load_denoiser(out)
    ref = TorchDenoiser(model)
    for batch in (1, 3):  # traced at batch 2: other batch sizes prove the axis is dynamic
        inp = model.signature.example_inputs(batch, seed=5)
        got = den(inp["sample"], inp["timestep"], _cond(inp))
        want = ref(inp["sample"], inp["timestep"], _cond(inp))
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-4


def test_node_names_keep_module_paths(tiny_unet, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    get_backend("onnx").export(tiny_unet, out, "fp32")
    convs = {eo.module_of(n.name) for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"}
    real = {n for n, m in tiny_unet.denoiser.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs == real


def test_fp16_is_half_inside_float_outside(tiny_unet, tmp_path: Path) -> None:
    out = tmp_path / "m16.onnx"
    rep = get_backend("onnx").export(tiny_unet, out, "fp16")
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    halves = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) > 10
    assert get_backend("onnx").info(out)["precision"] == "fp16"
    inp = tiny_unet.example_inputs(2, seed=3)
    got = get_backend("onnx").load_denoiser(out)(inp["sample"], inp["timestep"])
    want = TorchDenoiser(tiny_unet)(inp["sample"], inp["timestep"])
    err = float((got - want).abs().max())
    assert 0 < err < 2e-2  # really computed in half precision, and close
    assert rep["size_bytes"] < 0.75 * get_backend("onnx").export(tiny_unet, tmp_path / "m32.onnx", "fp32")["size_bytes"]


def test_int8_qdq_from_quant_params(tiny_unet, tmp_path: Path) -> None:
    q = minmax_quantize(tiny_unet)
    qp = QuantParams.of(q)
    out = tmp_path / "q.onnx"
    rep = get_backend("onnx").export(q, out, "int8")
    m = onnx.load(str(out))
    inits = {i.name: i for i in m.graph.initializer}
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    weight_dq = [n for n in dq if n.input[0] in inits]
    assert len(weight_dq) == len(qp.layers) == rep["weights_int8"]
    for n in weight_dq:
        w = inits[n.input[0]]
        assert w.data_type == onnx.TensorProto.INT8
        assert (_const(m, n.input[2]) == 0).all()  # symmetric weights
        assert next(a.i for a in n.attribute if a.name == "axis") == 0
    # the scales are the artifact's own, not re-calibrated: conv1's weight scale appears verbatim
    conv1 = next(n for n in weight_dq if eo.module_of(n.name) == "down_blocks.0.resnets.0.conv1")
    scale = _const(m, conv1.input[1])
    np.testing.assert_array_equal(scale, qp.layers["down_blocks.0.resnets.0.conv1"].weight.scale.numpy())
    # the integers are the simulation's integers
    w = q.denoiser.get_submodule("down_blocks.0.resnets.0.conv1").inner.weight.detach()
    ints = qp.layers["down_blocks.0.resnets.0.conv1"].weight.quantize(w).numpy()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[conv1.input[0]]), ints)
    # onnxruntime runs it; a random tiny net amplifies the rare rounding flips (see the single-layer
    # test for exactness), so here: bounded error, and really quantized (far from the float model)
    inp = tiny_unet.example_inputs(2, seed=3)
    got = get_backend("onnx").load_denoiser(out)(inp["sample"], inp["timestep"])
    sim = TorchDenoiser(q)(inp["sample"], inp["timestep"])
    flt = TorchDenoiser(tiny_unet)(inp["sample"], inp["timestep"])
    assert float((got - sim).abs().mean()) < 0.05
    assert float((got - flt).abs().max()) > 1e-3


def test_int8_layer_is_exact_in_onnxruntime() -> None:
    """One quantized conv: onnxruntime's Q/DQ arithmetic equals the PyTorch simulation."""
    import io

    import onnxruntime as ort

    from edgediff.quant_params import LayerQuant, TensorQuant

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    ws = conv.weight.detach().flatten(1).abs().amax(1) / 127
    with torch.no_grad():
        conv.weight.copy_(torch.round(conv.weight / ws.view(-1, 1, 1, 1)) * ws.view(-1, 1, 1, 1))
    wq = TensorQuant(8, ws, torch.zeros(16, dtype=torch.int32), 0, True)
    for aq in (TensorQuant(8, torch.tensor(0.03), torch.tensor(0), None, True),
               TensorQuant(8, torch.tensor(0.02), torch.tensor(100), None, False),
               TensorQuant(6, torch.tensor(0.1), torch.tensor(0), None, True)):
        layer = eo._QDQLayer(conv, LayerQuant("c", "conv", wq, aq)).eval()
        x = torch.randn(2, 8, 12, 12) * 2
        buf = io.BytesIO()
        torch.onnx.export(layer, (x,), buf, input_names=["x"], output_names=["y"], opset_version=eo.OPSET, dynamo=False)
        got = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy()})[0]
        sim = torch.nn.functional.conv2d(aq.dequantize(aq.quantize(x)), conv.weight, conv.bias, padding=1)
        np.testing.assert_allclose(got, sim.detach().numpy(), atol=1e-5)


def test_int8_without_quant_params_is_bad_input(tiny_unet, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="quantization parameters"):
        get_backend("onnx").export(tiny_unet, tmp_path / "q.onnx", "int8")
    assert not (tmp_path / "q.onnx").exists()


def test_existing_output_and_wrong_suffix(tiny_unet, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    with pytest.raises(BadInput, match="already exists"):
        get_backend("onnx").export(tiny_unet, out, "fp32")
    assert out.read_text() == "keep me"
    with pytest.raises(BadInput, match=".onnx"):
        get_backend("onnx").export(tiny_unet, tmp_path / "m.bin", "fp32")


def test_export_does_not_modify_the_model(tiny_unet, tmp_path: Path) -> None:
    q = minmax_quantize(tiny_unet)
    before = {k: v.clone() for k, v in q.denoiser.state_dict().items()}
    get_backend("onnx").export(q, tmp_path / "q.onnx", "int8")
    after = q.denoiser.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_external_data_over_threshold(tiny_unet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a real 2 GB model is too big for a unit test: lower the threshold, same code path
    from edgediff.exporters import onnx_build

    monkeypatch.setattr(onnx_build, "EXTERNAL_DATA_THRESHOLD", 10_000)  # read where build/write_onnx live
    out = tmp_path / "big.onnx"
    rep = get_backend("onnx").export(tiny_unet, out, "fp32")
    assert rep["external_data"] and (tmp_path / "big.onnx.data").is_file()
    assert get_backend("onnx").info(out)["external_data"]
    inp = tiny_unet.example_inputs(1)
    got = get_backend("onnx").load_denoiser(out)(inp["sample"], inp["timestep"])
    assert float((got - TorchDenoiser(tiny_unet)(inp["sample"], inp["timestep"])).abs().max()) < 1e-4


def test_info_and_structural_check(tiny_cond_unet, tmp_path: Path) -> None:
    out = tmp_path / "c.onnx"
    get_backend("onnx").export(tiny_cond_unet, out, "fp32")
    info = get_backend("onnx").info(out)
    assert info["precision"] == "fp32" and info["opset"] == eo.OPSET
    assert info["params"] >= sum(p.numel() for p in tiny_cond_unet.denoiser.parameters()) * 0.9
    chk = get_backend("onnx").check(out, tiny_cond_unet)
    assert chk["ok"], chk["problems"]


def test_quant_pass_artifact_exports_and_verifies(tiny_unet, tmp_path: Path) -> None:
    """The real calib + quant passes (shortcut splits, attention matmuls), saved and reloaded."""
    from edgediff.exporters.tensorrt import trt_compat

    from edgediff.artifact import load_artifact, write_artifact
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import PassSpec, Recipe
    from edgediff.verify import verify

    recipe = Recipe("t", passes=[
        PassSpec("calib", {"method": "ptq4dm", "n_samples": 4, "steps": 5, "count": 16}),
        PassSpec("quant", {"act_symmetric": True, "softmax_bits": 7, "weight_init": "minmax", "act_init": "minmax"})])
    q, _ = run_recipe(tiny_unet, recipe, cache_dir=tmp_path / "cache")
    write_artifact(q, tmp_path / "art", {})
    art = load_artifact(tmp_path / "art")
    qp = QuantParams.of(art)
    assert any(lq.meta.get("split_at") for lq in qp.layers.values())
    out = tmp_path / "q.onnx"
    rep = get_backend("onnx").export(art, out, "int8")
    assert rep["quantized_layers"]["attention"] == 4
    assert trt_compat(onnx.load(str(out))) == []  # symmetric, int8-only: TensorRT takes it
    r = verify(art, out, steps=3, samples=2)
    assert r["verified"] and r["exit_code"] == 0, r
