"""TFLite (LiteRT) and Core ML backends: conversion, runtime / structural checks, bad input.

Conversions take 10-60 s each on this machine, so the default suite converts a few times
(module-scoped fixtures share the files); other model kinds and precisions are marked slow.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from edgediff.exporters import (
    coreml,  # noqa: E402
    get_backend,
    target_of,
    tflite,  # noqa: E402
)

from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel, InputSignature
from edgediff.quant_params import QuantParams
from edgediff.sampling import TorchDenoiser
from edgediff.schedule import NoiseSchedule
from edgediff.testing import minmax_quantize


def _tiny_unet() -> DiffusionModel:
    """Same model as conftest's tiny_unet, built here so module-scoped fixtures can use it."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8, attention_head_dim=8).eval()
    return DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((1, 16, 16)), "UNet2DModel", dict(m.config),
                          {"source": "test"})


def _cond(inp: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return inp.get("encoder_hidden_states", inp.get("class_labels"))


@pytest.fixture(scope="module")
def unet() -> DiffusionModel:
    return _tiny_unet()


@pytest.fixture(scope="module")
def unet_w8a8(unet: DiffusionModel) -> DiffusionModel:
    return minmax_quantize(unet)


@pytest.fixture(scope="module")
def fp32_tflite(unet: DiffusionModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tfl") / "m.tflite"
    rep = get_backend("tflite").export(unet, out, "fp32")
    return out, rep


@pytest.fixture(scope="module")
def int8_tflite(unet_w8a8: DiffusionModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tfl8") / "m.tflite"
    rep = get_backend("tflite").export(unet_w8a8, out, "int8")
    return out, rep


@pytest.fixture(scope="module")
def fp16_mlpackage(unet: DiffusionModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cml") / "m.mlpackage"
    rep = get_backend("coreml").export(unet, out, "fp16")
    return out, rep


# ------------------------------------------------------------------------------------------ tflite


def test_tflite_fp32_matches_pytorch_and_runs_on_gpu_delegate_ops(unet, fp32_tflite) -> None:
    out, rep = fp32_tflite
    assert target_of(out) == "tflite"
    assert rep["size_bytes"] == out.stat().st_size > 0
    assert sorted(rep["inputs"]) == ["sample", "timestep"] and list(rep["outputs"]) == ["out"]
    assert rep["inputs"]["sample"] == {"shape": [1, 1, 16, 16], "dtype": "float32"}
    # GroupNorm rewritten so no BROADCAST_TO is left; attention is BATCH_MATMUL + SOFTMAX
    assert rep["groupnorms_rewritten"] > 0
    assert rep["gpu_delegate"]["all_ops_supported"], rep["gpu_delegate"]["cpu_fallback_ops"]
    assert "BROADCAST_TO" not in rep["ops"] and rep["ops"]["BATCH_MATMUL"] > 0 and rep["ops"]["SOFTMAX"] > 0
    info = get_backend("tflite").info(out)
    assert info["precision"] == "fp32" and info["weight_dtypes"] == {"float32": info["weight_dtypes"]["float32"]}
    den = get_backend("tflite").load_denoiser(out)
    ref = TorchDenoiser(unet)
    inp = unet.signature.example_inputs(3, seed=4)  # batch 3 through a batch-1 file: split + stacked
    got, want = den(inp["sample"], inp["timestep"]), ref(inp["sample"], inp["timestep"])
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4


def test_tflite_int8_uses_the_artifacts_scales(unet, unet_w8a8, int8_tflite) -> None:
    out, rep = int8_tflite
    qp = QuantParams.of(unet_w8a8)
    assert rep["int8"]["layers"]["conv"] + rep["int8"]["layers"].get("linear", 0) == len(qp.layers)
    info = get_backend("tflite").info(out)
    assert info["precision"] == "int8" and info["weight_dtypes"].get("int8", 0) > 0
    # the converter folds conv_in's input quantizer into `sample`; the exporter restores float32 I/O
    assert rep["int8"]["float_inputs_restored"] == ["serving_default_sample"]
    assert info["inputs"]["sample"]["dtype"] == "float32" and info["outputs"]["out"]["dtype"] == "float32"
    assert rep["gpu_delegate"]["all_ops_supported"], rep["gpu_delegate"]["cpu_fallback_ops"]
    # the int8 weights in the file are exactly round(w / scale) of the artifact, per channel
    it = tflite._interpreter(out)
    name = "down_blocks.0.resnets.0.conv1"  # (conv_in, with one input channel, becomes a depthwise conv)
    lq = qp.layers[name]
    want = lq.weight.quantize(unet_w8a8.denoiser.get_submodule(name).inner.weight.detach())
    found = False
    for d in it.get_tensor_details():
        if d["dtype"] == np.int8 and tuple(d["shape"]) == (want.shape[0], *want.shape[2:], want.shape[1]):
            try:
                q = it.get_tensor(d["index"])
            except ValueError:
                continue
            scales = d["quantization_parameters"]["scales"]
            if len(scales) == want.shape[0] and np.allclose(scales, lq.weight.scale.numpy(), rtol=1e-6):
                assert np.array_equal(q, want.permute(0, 2, 3, 1).numpy())  # OHWI in TFLite
                found = True
    assert found, f"{name}'s int8 weights with the artifact's scales are not in the file"
    # output close to the PyTorch simulation, and further from float than the simulation is not
    den = get_backend("tflite").load_denoiser(out)
    inp = unet.signature.example_inputs(2, seed=7)
    sim = TorchDenoiser(unet_w8a8)(inp["sample"], inp["timestep"])
    got = den(inp["sample"], inp["timestep"])
    assert float((got - sim).abs().max()) < 0.1 * float(sim.abs().max())


def test_verify_runs_the_sampler_through_litert(unet, fp32_tflite) -> None:
    from edgediff import verify
    res = verify.verify(unet, fp32_tflite[0], steps=4, samples=2)
    assert res["target"] == "tflite" and res["verified"] is True and res["exit_code"] == 0
    assert res["psnr_db"] > 60


def test_tflite_bad_input(unet, fp32_tflite, tmp_path: Path) -> None:
    be = get_backend("tflite")
    with pytest.raises(BadInput, match="quantization parameters"):
        be.export(unet, tmp_path / "a.tflite", "int8")
    with pytest.raises(BadInput, match="already exists"):
        be.export(unet, fp32_tflite[0], "fp32")
    with pytest.raises(BadInput, match=r"\.tflite"):
        be.export(unet, tmp_path / "a.onnx", "fp32")
    with pytest.raises(BadInput, match="unknown option"):
        be.export(unet, tmp_path / "a.tflite", "fp32", palettize=4)
    with pytest.raises(BadInput, match="precision"):
        be.export(unet, tmp_path / "a.tflite", "int4")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(BadInput, match="bad.tflite"):
        be.load_denoiser(bad)
    assert not (tmp_path / "a.tflite").exists() and list(tmp_path.iterdir()) == [bad]


def test_missing_packages_exit_3_naming_the_extra(unet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import litert_torch -> ImportError
    with pytest.raises(Unavailable, match=r'pip install -e "\.\[tflite\]"'):
        get_backend("tflite").export(unet, tmp_path / "a.tflite", "fp32")
    assert get_backend("tflite").available()[0] is False
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(Unavailable, match=r'pip install -e "\.\[coreml\]"'):
        get_backend("coreml").export(unet, tmp_path / "a.mlpackage", "fp16")
    ok, why = get_backend("coreml").available()
    assert not ok and ".[coreml]" in why
    assert not list(tmp_path.iterdir())


def test_cli_export_bad_input_exit_codes(tmp_path: Path) -> None:
    from edgediff.cli import main

    assert main(["export", "demo", "--target", "tflite", "--precision", "int8", "-o", str(tmp_path / "a.tflite")]) == 2
    assert main(["export", "demo", "--target", "coreml", "--precision", "int8", "-o", str(tmp_path / "a.mlpackage")]) == 2
    assert main(["export", "demo", "--target", "coreml", "--palettize", "5", "-o", str(tmp_path / "b.mlpackage")]) == 2
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ coreml


def test_coreml_fp16_package_structure(unet, fp16_mlpackage) -> None:
    out, rep = fp16_mlpackage
    assert target_of(out) == "coreml" and out.is_dir()
    n_attn = sum(1 for m in unet.denoiser.modules() if type(m).__name__ == "Attention")
    assert rep["frontend"] == "torch.export" and rep["attention_rewritten"] == n_attn == 4
    info = get_backend("coreml").info(out)
    assert info["format"] == "mlprogram" and info["precision"] == "fp16"
    assert info["inputs"] == {"sample": {"shape": [1, 1, 16, 16], "dtype": "float32"},
                              "timestep": {"shape": [1], "dtype": "float32"}}
    assert info["outputs"]["out"]["dtype"] == "float32"
    # ANE attention: two einsums per head on (B, C, 1, S) tensors (4 attentions x 4 heads x 2)
    assert info["ops"]["einsum"] == 32 and info["ops"]["softmax"] == 16
    assert info["weight_dtypes"].get("float16", 0) > 0 and "float32" not in info["weight_dtypes"]
    chk = get_backend("coreml").check(out, unet)
    assert chk["ok"], chk["problems"]


def test_ane_attention_matches_diffusers(unet) -> None:
    """The split-einsum processor computes the same attention (checked in PyTorch, any OS)."""
    import copy

    den = copy.deepcopy(unet.denoiser)
    assert coreml.ane_attention(den) == 4
    inp = unet.signature.example_inputs(2, seed=3)
    with torch.no_grad():
        a = unet.denoiser(inp["sample"], inp["timestep"]).sample
        b = den(inp["sample"], inp["timestep"]).sample
    assert float((a - b).abs().max()) < 1e-5
    # one head (attention_head_dim=None, as in the ddpm-cifar10 config): the no-slice path
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    one = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                      norm_num_groups=4, attention_head_dim=None).eval()
    assert all(m.heads == 1 for m in one.modules() if type(m).__name__ == "Attention")
    ane = copy.deepcopy(one)
    coreml.ane_attention(ane)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 300.0)
    with torch.no_grad():
        assert float((one(x, t).sample - ane(x, t).sample).abs().max()) < 1e-5


def test_coreml_verify_on_linux_is_structural_and_exit_3(unet, fp16_mlpackage) -> None:
    if platform.system() == "Darwin":
        pytest.skip("on macOS Core ML runs; see test_coreml_verify_runs_on_macos")
    be = get_backend("coreml")
    ok, why = be.runtime_available(fp16_mlpackage[0])
    assert not ok and "macOS" in why
    with pytest.raises(Unavailable, match="macOS"):
        be.load_denoiser(fp16_mlpackage[0])
    from edgediff import verify
    res = verify.verify(unet, fp16_mlpackage[0], steps=2, samples=2)
    assert res["verified"] is False and res["exit_code"] == 3 and "macOS" in res["reason"]
    assert res["check"]["ok"] and res["check"]["precision"] == "fp16"


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML prediction needs macOS")
def test_coreml_verify_runs_on_macos(unet, fp16_mlpackage) -> None:
    from edgediff import verify
    res = verify.verify(unet, fp16_mlpackage[0], steps=4, samples=2)
    assert res["verified"] is True and res["psnr_db"] > 30


def test_coreml_bad_input(unet, fp16_mlpackage, tmp_path: Path) -> None:
    be = get_backend("coreml")
    with pytest.raises(BadInput, match="quantization parameters"):
        be.export(unet, tmp_path / "a.mlpackage", "int8")
    with pytest.raises(BadInput, match="already exists"):
        be.export(unet, fp16_mlpackage[0], "fp16")
    with pytest.raises(BadInput, match="mlpackage"):
        be.export(unet, tmp_path / "a.tflite", "fp16")
    with pytest.raises(BadInput, match="palettize"):
        be.export(unet, tmp_path / "a.mlpackage", "fp16", palettize=5)
    with pytest.raises(BadInput, match="unknown option"):
        be.export(unet, tmp_path / "a.mlpackage", "fp16", kernels="int8")
    bad = tmp_path / "bad.mlpackage"
    bad.mkdir()
    with pytest.raises(BadInput, match="bad.mlpackage"):
        be.info(bad)
    assert list(tmp_path.iterdir()) == [bad]


# ------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_tflite_fp16_weights(unet, tmp_path: Path) -> None:
    out = tmp_path / "h.tflite"
    rep = get_backend("tflite").export(unet, out, "fp16")
    assert rep["weight_dtypes"].get("float16", 0) > 0 and rep["gpu_delegate"]["all_ops_supported"]
    fp32 = get_backend("tflite").export(unet, tmp_path / "f.tflite", "fp32")
    assert rep["size_bytes"] < 0.7 * fp32["size_bytes"]
    den = get_backend("tflite").load_denoiser(out)
    inp = unet.signature.example_inputs(2, seed=1)
    want = TorchDenoiser(unet)(inp["sample"], inp["timestep"])
    assert float((den(inp["sample"], inp["timestep"]) - want).abs().max()) < 1e-2 * float(want.abs().max()) + 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_cond_unet", "tiny_dit"])
def test_tflite_conditioned_models(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue(fixture)
    out = tmp_path / "m.tflite"
    rep = get_backend("tflite").export(model, out, "fp32", batch=2)
    assert sorted(rep["inputs"]) == sorted(tflite.input_names(model.signature))
    den = get_backend("tflite").load_denoiser(out)
    inp = model.signature.example_inputs(3, seed=2)
    want = TorchDenoiser(model)(inp["sample"], inp["timestep"], _cond(inp))
    got = den(inp["sample"], inp["timestep"], _cond(inp))
    assert float((got - want).abs().max()) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_cond_unet", "tiny_dit"])
def test_coreml_conditioned_models(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue(fixture)
    out = tmp_path / "m.mlpackage"
    get_backend("coreml").export(model, out, "fp16")
    chk = get_backend("coreml").check(out, model)
    assert chk["ok"], chk["problems"]


@pytest.mark.slow
def test_coreml_int8_and_palettized_weights(unet, unet_w8a8, tmp_path: Path) -> None:
    be = get_backend("coreml")
    rep8 = be.export(unet_w8a8, tmp_path / "q.mlpackage", "int8")
    n = len(QuantParams.of(unet_w8a8).layers)
    assert rep8["weights"] == "int8" and rep8["int8"]["scales_as_artifact"] == n and rep8["int8"]["regridded"] == 0
    rep4 = be.export(unet, tmp_path / "p.mlpackage", "fp16", palettize=4)
    assert rep4["weights"] == "palettized"
    fp16 = be.export(unet, tmp_path / "h.mlpackage", "fp16")
    assert rep8["size_bytes"] < fp16["size_bytes"] and rep4["size_bytes"] < rep8["size_bytes"]
    assert be.check(tmp_path / "q.mlpackage", unet)["ok"]


@pytest.mark.slow
def test_tflite_int8_with_quantized_attention_matmuls(unet_w8a8, tmp_path: Path) -> None:
    """QuantParams with ':qk'/':av' entries (as the quant pass writes them) convert and run."""
    from edgediff.quant_params import LayerQuant, TensorQuant

    model = unet_w8a8.clone()
    qp = QuantParams.of(model)
    attn = [n for n, m in model.denoiser.named_modules() if type(m).__name__ == "Attention"]

    def tq(scale: float, signed: bool = True) -> TensorQuant:
        return TensorQuant(8, torch.tensor(scale), torch.tensor(0), None, signed)

    for a in attn:
        qp.layers[f"{a}:qk"] = LayerQuant(f"{a}:qk", "matmul_qk", input=tq(0.05), input2=tq(0.05))
        qp.layers[f"{a}:av"] = LayerQuant(f"{a}:av", "matmul_av", input=tq(1 / 255, signed=False), input2=tq(0.05))
    model.extras["quant"] = qp.to_extras()
    out = tmp_path / "a.tflite"
    rep = get_backend("tflite").export(model, out, "int8")
    assert rep["int8"]["layers"]["attention"] == len(attn)
    assert rep["ops"]["BATCH_MATMUL"] == 2 * len(attn) and rep["gpu_delegate"]["all_ops_supported"]
    inp = model.signature.example_inputs(2, seed=1)
    got = get_backend("tflite").load_denoiser(out)(inp["sample"], inp["timestep"])
    assert got.shape == inp["sample"].shape and torch.isfinite(got).all()


def test_coreml_weight_scales_compared_with_the_artifact(unet, unet_w8a8) -> None:
    """Core ML's max|w|/qmax scales equal min-max QuantParams; a searched scale is reported as re-gridded."""
    from edgediff.exporters.onnx import float_denoiser

    den = float_denoiser(unet_w8a8)
    qp = QuantParams.of(unet_w8a8)
    agree = coreml.int8_scale_agreement(den, qp)
    assert agree == {"dtype": "int8", "layers": len(qp.layers), "scales_as_artifact": len(qp.layers),
                     "regridded_by_coreml": [], "regridded": 0}
    qp.layers["conv_in"].weight.scale = qp.layers["conv_in"].weight.scale * 1.5  # as if clipped by a search
    agree = coreml.int8_scale_agreement(den, qp)
    assert agree["regridded_by_coreml"] == ["conv_in"] and agree["scales_as_artifact"] == len(qp.layers) - 1
    q4 = minmax_quantize(unet, bits=4)
    a4 = coreml.int8_scale_agreement(float_denoiser(q4), QuantParams.of(q4))
    assert a4["dtype"] == "int4" and a4["regridded"] == 0


def test_tflite_int8_shortcut_split_layers(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    """Real calib + quant passes with shortcut splitting: the halves' different scales convert.

    An int8 CONCATENATION needs one scale for both inputs; split layers are written as two
    layers on the halves plus ADD, each half quantized with its own (the artifact's) scale.
    """
    from edgediff.passes import PassContext, get, make_options

    ctx = PassContext(cache_dir=tmp_path / "cache")
    model = tiny_unet
    for name, opts in (("calib", {"n_samples": 4, "steps": 8, "interval": 2}),
                       # float layer outputs: the TFLite export keeps float kernels (exporters/tflite.py
                       # FULL_INTEGER), so an artifact with output requantization would not match it
                       ("quant", {"weight_bits": 8, "act_bits": 8, "split_shortcut": True, "calib_limit": 16,
                                  "weight_init": "minmax", "act_init": "minmax", "quant_output": False})):
        fn, _ = get(name)
        ctx.metrics = {}
        model = fn(model.clone(), make_options(name, opts), ctx)
    qp = QuantParams.of(model)
    split = sorted(n for n, lq in qp.layers.items() if lq.meta.get("split_at"))
    assert split
    out = tmp_path / "s.tflite"
    rep = get_backend("tflite").export(model, out, "int8")
    assert rep["int8"]["split_layers"]["layers"] == split
    assert rep["gpu_delegate"]["all_ops_supported"]
    # each half's input scale of the artifact is on an int8 tensor of the file
    it = tflite._interpreter(out)
    scales = [d["quantization"][0] for d in it.get_tensor_details() if d["dtype"] == np.int8]
    for n in split:
        for tq in (qp.layers[n].input, qp.layers[n].input2):
            assert any(abs(s - float(tq.scale)) <= 1e-6 * float(tq.scale) for s in scales), n
    # LiteRT runs it close to the PyTorch simulation
    inp = model.signature.example_inputs(2, seed=1)
    got = get_backend("tflite").load_denoiser(out)(inp["sample"], inp["timestep"])
    with torch.no_grad():
        ref = TorchDenoiser(model)(inp["sample"], inp["timestep"])
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.05, rel
