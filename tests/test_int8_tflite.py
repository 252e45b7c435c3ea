"""TFLite full-integer int8: the lowering written into the .tflite (exporters.tflite.integerize).

One conversion per module (tens of seconds): a tiny UNet through the real calib + quant passes
with output quantization and shortcut splitting, exported int8.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from edgediff.exporters import get_backend, tflite

from edgediff.errors import BadInput
from edgediff.lowering import lower_model
from edgediff.model import DiffusionModel
from edgediff.quant_params import QuantParams
from edgediff.sampling import TorchDenoiser


def _quantized_tiny(tmp: Path) -> DiffusionModel:
    from diffusers import UNet2DModel

    from edgediff.model import InputSignature
    from edgediff.passes import PassContext, get, make_options
    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8, attention_head_dim=8).eval()
    model = DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((1, 16, 16)), "UNet2DModel",
                           dict(m.config), {"source": "test"})
    ctx = PassContext(cache_dir=tmp / "cache")
    for name, opts in (("calib", {"n_samples": 4, "steps": 8, "interval": 2}),
                       ("quant", {"weight_bits": 8, "act_bits": 8, "split_shortcut": True, "calib_limit": 16,
                                  "weight_init": "minmax", "act_init": "minmax"})):
        fn, _ = get(name)
        ctx.metrics = {}
        model = fn(model.clone(), make_options(name, opts), ctx)
    return model


@pytest.fixture(scope="module")
def full_int(tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffusionModel, Path, dict]:
    tmp = tmp_path_factory.mktemp("tflint")
    model = _quantized_tiny(tmp)
    out = tmp / "q.tflite"
    from edgediff.exporters import tflite_convert

    real = tflite_convert.integerize

    def keep(data: bytes, low):  # the converted float twins, before integerize, for the matching tests
        (tmp / "float_twins.tflite").write_bytes(data)
        return real(data, low)

    with mock.patch.object(tflite_convert, "integerize", keep):
        rep = get_backend("tflite").export(model, out, "int8")
    return model, out, rep


def test_every_lowered_layer_becomes_an_int8_kernel(full_int) -> None:
    model, out, rep = full_int
    qp = QuantParams.of(model)
    assert qp is not None and any(lq.meta.get("split_at") for lq in qp.layers.values())
    assert rep["int8"]["layout"] == "full-integer"
    done = rep["int8"]["integerized"]
    assert done["not_found"] == [] and done["float_output_layers"] == ["conv_out"]
    _, low = lower_model(model)
    # the replaced float weights are not left in the file (4 bytes each vs 1 for the int8 copy)
    assert done["float_bytes_dropped"] >= 3 * sum(p.weight.size for lay in low.layers.values() for p in lay.parts)
    parts = sum(len(lay.parts) for lay in low.layers.values())
    assert sum(done["integer_ops"].values()) == parts - 1  # every part but conv_out's float output
    info = get_backend("tflite").info(out)
    assert info["integer_macs_share"] >= 0.9, info["float_mac_ops"]
    # what stays float: the attention matmuls (float on int8-grid operands) and conv_out
    assert {o["op"] for o in info["float_mac_ops"]} <= {"BATCH_MATMUL", "CONV_2D"}
    assert [o["name"] for o in info["float_mac_ops"] if o["op"] == "CONV_2D"] == ["conv_out"]
    # the file's interface stays float32
    assert info["inputs"]["sample"]["dtype"] == "float32" and info["outputs"]["out"]["dtype"] == "float32"
    # no QUANTIZE/DEQUANTIZE whose output nothing reads (P.V writes to_out's int8 directly)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(out))
    ops = it._get_ops_details()
    read = {i for o in ops for i in o["inputs"]} | {d["index"] for d in it.get_output_details()}
    assert not [o["index"] for o in ops if o["op_name"] in ("QUANTIZE", "DEQUANTIZE") and o["outputs"][0] not in read]
    assert done.get("dead_ops_removed", 0) >= 1


def test_int8_ops_carry_the_lowered_integers(full_int) -> None:
    """int8 in / int8 weights / int32 bias / int8 out, with the lowering's scales and integers."""
    model, out, _ = full_int
    _, low = lower_model(model)
    it = tflite._interpreter(out)
    det = {d["index"]: d for d in it.get_tensor_details()}
    want = {}
    for lay in low.layers.values():
        for p in lay.parts:
            if p.output is not None and lay.kind == "conv" and p.weight.shape[1] > 1:
                want[p.weight.transpose(0, 2, 3, 1).tobytes()] = p
    seen = 0
    for o in it._get_ops_details():
        if o["op_name"] not in ("CONV_2D", "FULLY_CONNECTED"):
            continue
        x, w = det[o["inputs"][0]], det[o["inputs"][1]]
        if w["dtype"] != np.int8:
            continue
        y = det[o["outputs"][0]]
        assert x["dtype"] == np.int8 and y["dtype"] == np.int8, o
        if o["op_name"] != "CONV_2D":
            continue
        p = want.get(it.get_tensor(w["index"]).tobytes())
        assert p is not None, "an int8 conv whose weights are not the lowering's"
        a, b = p.input.as_int8(), p.output.as_int8()
        assert x["quantization"] == (pytest.approx(a.scale, rel=1e-6), a.zero_point)
        assert y["quantization"] == (pytest.approx(b.scale, rel=1e-6), b.zero_point)
        np.testing.assert_allclose(w["quantization_parameters"]["scales"], p.weight_scale, rtol=1e-6)
        if p.bias is not None:
            bias = det[o["inputs"][2]]
            assert bias["dtype"] == np.int32
            np.testing.assert_array_equal(it.get_tensor(bias["index"]), p.bias)
        seen += 1
    assert seen == len(want)


def test_litert_int8_layers_are_bit_exact(full_int) -> None:
    """Every int8 kernel of the file, fed its own int8 input, writes exactly what the lowering's
    reference kernel (float32 requantization, round half even) computes: XNNPACK QS8 and the
    simulation do the same integer arithmetic."""
    from ai_edge_litert.interpreter import Interpreter

    from edgediff.lowering import run_part

    model, out, _ = full_int
    _, low = lower_model(model)
    by_weight = {}
    for lay in low.layers.values():
        for p in lay.parts:
            w = p.weight.transpose(0, 2, 3, 1) if lay.kind == "conv" else p.weight
            by_weight[w.tobytes()] = (lay, p)
            if lay.kind == "conv" and p.weight.shape[1] == 1:  # conv_in (1 channel): DEPTHWISE [1, kh, kw, O]
                by_weight[p.weight.transpose(1, 2, 3, 0).tobytes()] = (lay, p)
    it = Interpreter(model_path=str(out), experimental_preserve_all_tensors=True, num_threads=1)
    it.allocate_tensors()
    inp = model.signature.example_inputs(1, seed=3)
    it.get_signature_runner("serving_default")(sample=inp["sample"].numpy(), timestep=inp["timestep"].numpy())
    det = {d["index"]: d for d in it.get_tensor_details()}
    checked = 0
    for o in it._get_ops_details():
        if o["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") \
                or det[o["inputs"][1]]["dtype"] != np.int8:
            continue
        lay, p = by_weight[it.get_tensor(o["inputs"][1]).tobytes()]
        q_x = it.get_tensor(o["inputs"][0]).astype(np.int64) - (p.input.as_int8().zero_point - p.input.zero_point)
        q_y = it.get_tensor(o["outputs"][0]).astype(np.int64) - (p.output.as_int8().zero_point - p.output.zero_point)
        if lay.kind == "conv":  # NHWC in the file (a 1-channel input reads the same either way)
            q_x, q_y = q_x.transpose(0, 3, 1, 2), q_y.transpose(0, 3, 1, 2)
            if lay.geometry["stride"] != (1, 1):  # the converter writes asymmetric padding as PAD + VALID conv
                lay = dataclasses.replace(lay, geometry={**lay.geometry, "padding": (0, 0)})
        want = run_part(lay, p, q_x)
        assert np.array_equal(want, q_y), (lay.name, int(np.abs(want - q_y).max()))
        checked += 1
    assert checked == sum(len(lay.parts) for lay in low.layers.values()) - 1  # all but conv_out


def test_litert_output_close_to_the_simulation(full_int) -> None:
    """End to end the float ops between the kernels (GroupNorm, SiLU, softmax) round differently
    in LiteRT and torch, which flips a quantizer's rounding now and then: close, not exact."""
    model, out, _ = full_int
    den = get_backend("tflite").load_denoiser(out)
    inp = model.signature.example_inputs(2, seed=3)
    with torch.no_grad():
        sim = TorchDenoiser(model)(inp["sample"], inp["timestep"])
    got = den(inp["sample"], inp["timestep"])
    err = float((got - sim).pow(2).mean())
    psnr = 10 * np.log10(float(sim.abs().max()) ** 2 / max(err, 1e-30))
    assert psnr > 35, psnr


def test_litert_denoiser_feeds_by_index_like_the_bundle_entry(full_int, tmp_path: Path) -> None:
    """LiteRTDenoiser sets tensors by index and invokes (the bundle's LiteRTEntry): the signature
    runner is never called, and the output is the runner's, row for row over a padded batch."""
    from ai_edge_litert.interpreter import SignatureRunner

    model, out, _ = full_int
    inp = model.signature.example_inputs(3, seed=5)
    ref_it = tflite.open_interpreter(out)
    runner = ref_it.get_signature_runner(tflite.SIGNATURE)
    ref = np.concatenate([runner(sample=inp["sample"][i:i + 1].numpy(), timestep=inp["timestep"][i:i + 1].numpy())
                          [tflite.OUTPUT_NAME] for i in range(3)])
    den = tflite.LiteRTDenoiser(out)
    with mock.patch.object(SignatureRunner, "__call__", side_effect=AssertionError("signature runner called")):
        got = den(inp["sample"], inp["timestep"])
    assert den.batch == 1 and den.entry.calls == 3
    assert np.array_equal(got.numpy(), ref)
    with pytest.raises(BadInput, match="no such file"):
        tflite.LiteRTDenoiser(tmp_path / "missing.tflite")


def test_integerize_leaves_unknown_ops_float(full_int) -> None:
    """An op whose weights are not the lowering's is not touched (nothing is guessed)."""
    model, out, _ = full_int
    _, low = lower_model(model)
    data = out.read_bytes()
    low.layers = {}  # nothing to recognise
    new, rep = tflite.integerize(data, low)
    assert rep["integer_ops"] == {} and rep["quantize_ops"] == 0 and len(new) > 0


def test_full_integer_needs_8_bit_outputs(full_int) -> None:
    model, _, _ = full_int
    qp = QuantParams.of(model)
    ok, why = tflite.full_integer_ok(qp)
    assert ok, why
    name = next(n for n, lq in qp.layers.items() if lq.output is not None)
    qp.layers[name].output.bits = 6
    ok, why = tflite.full_integer_ok(qp)
    assert not ok and name in why
    for lq in qp.layers.values():
        lq.output = lq.output2 = None
    assert tflite.full_integer_ok(qp)[0] is False


def test_coreml_w8a8_places_the_artifacts_activation_scales(full_int, tmp_path: Path) -> None:
    """Core ML int8 of an 8-bit-activation artifact: int8 quantize/dequantize with the artifact's
    input scales before every lowered conv/linear (a split layer: one pair per half); prediction stays
    macOS-only (verify: verified false, exit 3)."""
    import platform

    from edgediff.exporters import coreml

    from edgediff import verify

    model, _, _ = full_int
    _, low = lower_model(model)
    out = tmp_path / "q.mlpackage"
    rep = get_backend("coreml").export(model, out, "int8")
    act = rep["int8"]["activations"]
    split = sorted(n for n, lay in low.layers.items() if lay.split)
    assert split and rep["int8"]["activation_dtype"] == "int8" and act["split_layers_fp16_input"] == []
    assert sorted(act["split_layers_qdq_halves"]) == split
    assert act["layers"] == len(low.layers) and act["not_found"] == 0
    assert coreml.activation_quant_ops(out) > 0 and rep["ops"]["quantize"] == rep["ops"]["dequantize"]
    # a split layer's conv reads the concatenation of its two halves, each dequantized from int8
    ops = coreml._mil_ops(coreml._load_spec(out))
    prod = {o.name: op for op in ops for o in op.outputs}

    def srcs(op, key):
        return [prod.get(b.name) for b in op.inputs[key].arguments] if key in op.inputs else []

    halves = [op for op in ops if op.type == "concat" and len(srcs(op, "values")) == 2
              and all(p is not None and p.type == "dequantize" for p in srcs(op, "values"))]
    assert sum(1 for op in ops if op.type == "conv" and srcs(op, "x") and srcs(op, "x")[0] in halves) == len(split)
    assert rep["weight_dtypes"].get("constexpr_affine_dequantize", 0) > 0  # int8 weights
    with pytest.raises(BadInput, match="activations=int8 needs --precision int8"):
        get_backend("coreml").export(model, tmp_path / "w.mlpackage", "fp16", activations="int8")
    if platform.system() != "Darwin":
        res = verify.verify(model, out, steps=2, samples=2)
        assert res["verified"] is False and res["exit_code"] == 3 and "macOS" in res["reason"]
        assert res["check"]["ok"]


def _part_of(low, w_int8: np.ndarray, kind: str):
    for lay in low.layers.values():
        for i, p in enumerate(lay.parts):
            if (lay.kind == "linear") != (kind == "FULLY_CONNECTED"):
                continue
            q = p.weight.transpose(0, 2, 3, 1) if kind == "CONV_2D" else (
                p.weight.transpose(1, 2, 3, 0) if kind == "DEPTHWISE_CONV_2D" else p.weight)
            if q.shape == w_int8.shape and np.array_equal(q, w_int8):
                yield lay.name, i


def test_integerize_matches_weights_a_converter_rounded(full_int) -> None:
    """Float filters that are the lowering's within a fraction of a step (a converter that
    rounds differently) still match, and the integers written back are exactly the lowering's."""
    import ai_edge_litert.schema_py_generated as schema
    import flatbuffers

    model, out, _ = full_int
    _, low = lower_model(model)
    data = (out.parent / "float_twins.tflite").read_bytes()
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    sg = m.subgraphs[0]
    kinds = {i: max(c.builtinCode, c.deprecatedBuiltinCode) for i, c in enumerate(m.operatorCodes)}
    BO = schema.BuiltinOperator
    nudged = 0
    for op in sg.operators:
        if kinds[op.opcodeIndex] not in (BO.CONV_2D, BO.DEPTHWISE_CONV_2D, BO.FULLY_CONNECTED):
            continue
        buf = m.buffers[sg.tensors[op.inputs[1]].buffer]
        w = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), np.float32)
        buf.data = np.frombuffer(np.nextafter(w, np.float32(np.inf)).astype(np.float32).tobytes(), np.uint8).copy()
        nudged += 1
    b = flatbuffers.Builder(len(data) + (1 << 20))
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    nudged_data = bytes(b.Output())
    assert nudged_data != data and nudged >= 10
    new, rep = tflite.integerize(nudged_data, low)
    assert rep["not_found"] == [], rep["not_found"]
    assert sum(rep["integer_ops"].values()) == sum(len(lay.parts) for lay in low.layers.values()) - 1  # not conv_out
    # byte matching would have found nothing here; the rewritten file carries the lowering's integers
    m2 = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(new, 0))
    names = {v: k for k, v in vars(BO).items() if not k.startswith("_")}
    sg2, checked = m2.subgraphs[0], 0
    for op in sg2.operators:
        t = sg2.tensors[op.inputs[1]] if len(op.inputs) > 1 else None
        if t is None or t.type != schema.TensorType.INT8 or t.buffer >= len(m2.buffers) or m2.buffers[t.buffer].data is None:
            continue
        c = m2.operatorCodes[op.opcodeIndex]
        kind = names[max(c.builtinCode, c.deprecatedBuiltinCode)]
        w = np.frombuffer(np.asarray(m2.buffers[t.buffer].data, np.uint8).tobytes(), np.int8).reshape(list(t.shape))
        if kind in _LAYOUT_KINDS:
            assert list(_part_of(low, w, kind)), kind
            checked += 1
    assert checked == sum(rep["integer_ops"].values())


_LAYOUT_KINDS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def test_matcher_tells_identical_layers_apart(full_int) -> None:
    """Two layers with identical weights and biases but their own activation scales: each op gets
    its own part (by the converter's tensor name, then by order), never one part twice."""
    from edgediff.exporters.tflite_int8 import _LAYOUTS

    from edgediff.lowering.match import PartMatcher

    model, _, _ = full_int
    _, low = lower_model(model)
    low = copy.deepcopy(low)
    a_name, b_name = "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2"
    a, b = low.layers[a_name].parts[0], low.layers[b_name].parts[0]
    assert a.weight.shape == b.weight.shape and a.input.scale != b.input.scale
    b.weight, b.weight_scale, b.bias = a.weight.copy(), a.weight_scale.copy(), a.bias.copy()
    b.input = a.input  # same accumulator scale, so the float bias is identical too
    w = a.float_weight().transpose(0, 2, 3, 1)
    bias = a.float_bias()
    path = "x._Signature/d.UNet2DModel_inner/d.DownBlock2D_0/d.ResnetBlock2D_0/e._TflFloatTwin_{};2"
    m = PartMatcher(low, _LAYOUTS)
    assert m.match("CONV_2D", w, bias, path.format("conv2")) == (b_name, 0)
    assert m.match("CONV_2D", w, bias, path.format("conv1")) == (a_name, 0)
    assert m.match("CONV_2D", w, bias, path.format("conv1")) is None  # both taken
    m = PartMatcher(low, _LAYOUTS)  # no names: definition order, each part once
    assert [m.match("CONV_2D", w, bias), m.match("CONV_2D", w, bias)] == [(a_name, 0), (b_name, 0)]
    # a bias the converter changed, or weights off the grid, match nothing
    m = PartMatcher(low, _LAYOUTS)
    assert m.match("CONV_2D", w, bias + np.float32(a.acc_scale) * 0.5) is None
    assert m.match("CONV_2D", w + 0.3 * a.weight_scale.reshape(-1, 1, 1, 1), bias) is None
