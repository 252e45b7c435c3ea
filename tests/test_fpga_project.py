"""`edgediff export --target fpga`: QDQ ONNX and QuantParams artifacts -> HLS project, C-sim per layer, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from edgediff.fpga import csim, estimate
from edgediff.fpga.project import BACKEND
from torch import nn

from edgediff.cli import main
from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel

needs_cxx = pytest.mark.skipif(not csim.toolchain()[0], reason=f"no C-simulation toolchain: {csim.toolchain()[1]}")


class Small(nn.Module):
    """Every pattern the array runs: padded/strided/grouped/1x1 conv, attention-like matmuls, linear; plus host ops."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.c3 = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        h = self.c2(h)
        h = self.c3(h * torch.sigmoid(h))  # SiLU: host-side
        t = h.flatten(2).transpose(1, 2)  # (B, 25, 12)
        a = torch.softmax(t @ t.transpose(1, 2), -1)  # activation x activation, softmax host-side
        return self.fc(a @ t)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("fpga-onnx")
    torch.manual_seed(0)
    m = Small().eval()
    fp = d / "float.onnx"
    torch.onnx.export(m, (torch.randn(1, 3, 9, 9),), str(fp), input_names=["x"], output_names=["out"], opset_version=17,
                      dynamo=False)
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": rng.standard_normal((1, 3, 9, 9)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    q = d / "qdq.onnx"
    quantize_static(str(fp), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return {"float": fp, "qdq": q}


@needs_cxx
def test_export_qdq_onnx_every_layer_bit_exact(onnx_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "proj"
    rep = BACKEND.export(onnx_models["qdq"], out, "int8")
    assert rep["verified"] is True and rep["exit_code"] == 0
    kinds = sorted(r["kind"] for r in rep["layers"])
    assert kinds == ["conv", "conv", "conv", "gemm", "matmul", "matmul"]
    for r in rep["layers"]:
        assert r["bit_exact"] is True and r["mismatches"] == 0 and r["outputs"] > 0
        assert r["ort_bit_exact"] is True  # the simulator also equals ONNX Runtime's integer kernel on this layer
        assert r["csim_cycles"] == r["est_pipeline_cycles"] and r["cycle_model_exact"] is True
    host = {h["op"] for h in rep["host_ops"]}
    assert {"Softmax", "Sigmoid"} <= host
    on_disk = json.loads((out / "fpga_project.json").read_text())
    assert on_disk["layers_bit_exact"] == len(on_disk["layers"]) == 6
    for f in ("hls/systolic.cpp", "hls/top.cpp", "hls/tb.cpp", "hls/nonlinear.cpp", "run_hls.tcl", "run_hls.sh",
              "vectors/layers.txt", "build/csim"):
        assert (out / f).exists(), f
    assert "csynth_design" in (out / "run_hls.tcl").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".proj")]  # no temp dir left behind
    # the estimator reads the project and the model alike, and agrees with the C-sim's cycle count
    assert estimate.estimate_onnx(out)["pipeline_cycles"] == rep["csim_cycles"]
    assert estimate.estimate_onnx(onnx_models["qdq"])["pipeline_cycles"] == rep["csim_cycles"]
    zcu = estimate.estimate_onnx(out, device="zcu104")
    assert zcu["fits"] is True and zcu["rows"] == 16
    info = BACKEND.info(out)
    assert info["layers_bit_exact"] == 6 and info["size_bytes"] > 0
    ok, why = BACKEND.runtime_available(out)
    assert not ok and "Vitis" in why
    with pytest.raises(Unavailable):
        BACKEND.load_denoiser(out)


@needs_cxx
def test_cli_export_and_exit_codes(onnx_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p"
    assert main(["export", str(onnx_models["qdq"]), "--target", "fpga", "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers_bit_exact"] == data["layers_total"] == 6
    assert main(["export", str(onnx_models["qdq"]), "--target", "fpga", "-o", str(out)]) == 2  # exists, no --force
    assert main(["export", str(onnx_models["float"]), "--target", "fpga", "-o", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "float-only" in err and "Traceback" not in err
    assert main(["export", str(onnx_models["qdq"]), "--target", "fpga", "--precision", "fp16", "-o",
                 str(tmp_path / "h")]) == 2


def _edit(src: Path, dst: Path, fn) -> Path:  # noqa: ANN001
    import onnx

    m = onnx.load(str(src))
    fn(m)
    onnx.save(m, str(dst))
    return dst


def _conv_node(m, name: str):  # noqa: ANN001, ANN202
    return next(n for n in m.graph.node if n.op_type == "Conv" and name in n.name)


def test_bad_qdq_models_name_the_node(onnx_models: dict[str, Path], tmp_path: Path) -> None:
    from onnx import numpy_helper

    with pytest.raises(BadInput, match="float-only"):
        BACKEND.export(onnx_models["float"], tmp_path / "a", "int8")

    def nonzero_zp(m) -> None:  # noqa: ANN001
        conv = _conv_node(m, "c1")
        dq = next(n for n in m.graph.node if n.output[0] == conv.input[1])
        init = next(i for i in m.graph.initializer if i.name == dq.input[2])
        zp = numpy_helper.to_array(init).copy()
        zp[1] = 3
        init.CopyFrom(numpy_helper.from_array(zp, init.name))

    bad = _edit(onnx_models["qdq"], tmp_path / "zp.onnx", nonzero_zp)
    with pytest.raises(BadInput, match=r"zero points other than zero") as e:
        BACKEND.export(bad, tmp_path / "b", "int8")
    assert "c1" in str(e.value) and str(bad) in str(e.value)

    def float_weight(m) -> None:  # noqa: ANN001
        conv = _conv_node(m, "c2")
        m.graph.initializer.append(numpy_helper.from_array(np.zeros((8, 2, 3, 3), np.float32), "float_w"))
        conv.input[1] = "float_w"

    bad = _edit(onnx_models["qdq"], tmp_path / "fw.onnx", float_weight)
    with pytest.raises(BadInput, match=r"c2.*unsupported QDQ pattern"):
        BACKEND.export(bad, tmp_path / "c", "int8")
    assert not (tmp_path / "c").exists()
    with pytest.raises(BadInput, match="int8 only"):
        BACKEND.export(onnx_models["qdq"], tmp_path / "d", "fp16")
    with pytest.raises(BadInput, match="no such file"):
        BACKEND.export(tmp_path / "missing.onnx", tmp_path / "e", "int8")


def test_without_a_compiler_the_project_is_written_but_not_verified(onnx_models: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(csim, "toolchain", lambda: (False, "no C++ compiler: install g++ (or set CXX)"))
    rep = BACKEND.export(onnx_models["qdq"], tmp_path / "p", "int8", compare_ort=False)
    assert rep["verified"] is False and rep["exit_code"] == 3 and "install g++" in rep["reason"]
    assert all(r["bit_exact"] is None for r in rep["layers"])
    assert (tmp_path / "p" / "fpga_project.json").is_file() and (tmp_path / "p" / "vectors" / "L0000.x.bin").is_file()


# ------------------------------------------------------------------ the artifact path (QuantParams)
def _quantize_by_hand(model: DiffusionModel) -> DiffusionModel:
    """A minimal W8A8 in the QuantParams format (what the quant pass writes): on-grid weights, MinMax inputs."""
    from edgediff.quant_params import LayerQuant, QuantParams, TensorQuant

    m = model.clone()
    mods = {n: mod for n, mod in m.denoiser.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    seen: dict[str, tuple[float, float]] = {}
    hooks = [mod.register_forward_pre_hook(
        lambda _m, a, _n=n: seen.__setitem__(_n, (float(a[0].min()), float(a[0].max())))) for n, mod in mods.items()]
    with torch.no_grad():
        m.module()(**m.example_inputs(batch=2))
    for h in hooks:
        h.remove()
    layers = {}
    for n, mod in mods.items():
        w = mod.weight.detach()
        s_w = w.flatten(1).abs().amax(1).clamp_min(1e-8) / 127
        wq = TensorQuant(8, s_w, torch.zeros_like(s_w, dtype=torch.int32), axis=0)
        with torch.no_grad():
            mod.weight.copy_(wq.dequantize(wq.quantize(w)))  # on the grid
        lo, hi = min(seen[n][0], 0.0), max(seen[n][1], 0.0)
        s_x = max(hi - lo, 1e-8) / 255
        xq = TensorQuant(8, torch.tensor(s_x), torch.tensor(int(round(-lo / s_x))), signed=False)
        layers[n] = LayerQuant(n, "conv" if isinstance(mod, nn.Conv2d) else "linear", wq, xq)
    m.extras["quant"] = QuantParams(8, 8, layers, "by-hand minmax").to_extras()
    return m


@needs_cxx
def test_export_quantparams_model(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    q = _quantize_by_hand(tiny_unet)
    rep = BACKEND.export(q, tmp_path / "proj", "int8")
    n_layers = len(q.extras["quant"]["layers"])
    assert rep["layers_total"] == n_layers and rep["layers_bit_exact"] == n_layers
    assert all(r["requant"] is False for r in rep["layers"])  # QuantParams carry no output scale: int32 out
    assert rep["ort_layers_bit_exact"] == rep["ort_layers_compared"] == n_layers  # ConvInteger / MatMulInteger
    # int32 outputs leave the next unit without an int8 grid: no whole-call program, and the report says why
    assert rep["whole_call"]["program"] is None and "float output" in rep["whole_call"]["reason"]
    assert not BACKEND.runtime_available(tmp_path / "proj")[0]
    with pytest.raises(BadInput, match="no quantization parameters"):
        BACKEND.export(tiny_unet, tmp_path / "x", "int8")


@needs_cxx
def test_export_after_the_edgediff_quant_pass(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    """The real quant pass (shortcut splitting, attention matmuls) with a tiny calibration budget."""
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import parse

    recipe = parse('name = "t"\n[[pass]]\nname = "calib"\nmethod = "ptq4dm"\nn_samples = 4\nsteps = 5\ncount = 16\n'
                   '[[pass]]\nname = "quant"\nweight_init = "minmax"\nact_init = "minmax"\ncalib_limit = 16\n', "test")
    q, _ = run_recipe(tiny_unet, recipe, 0)
    rep = BACKEND.export(q, tmp_path / "proj", "int8")
    names = [r["name"] for r in rep["layers"]]
    assert any(n.endswith(":qk") for n in names) and any(n.endswith(":av") for n in names)  # attention on the array
    assert any("[:" in n for n in names)  # a shortcut-split conv runs as two GEMMs
    assert rep["layers_bit_exact"] == rep["layers_total"] == len(names) and rep["verified"] is True
    assert rep["ort_layers_bit_exact"] == rep["ort_layers_compared"] == len(names)
    # the layers come from the shared int8 lowering through the whole-call program: GroupNorm, SiLU, softmax, adds
    # and upsampling run on the units there, so only the timestep table is left on the host
    assert rep["whole_call"]["bit_exact"] is True and [h["op"] for h in rep["host_ops"]] == ["TimestepTable"]
    assert rep["csim_cycles"] == rep["whole_call"]["array_cycles"]
    # the same model through edgediff's own int8 ONNX export (Transpose'd weights and K^T, Concat of two
    # differently quantized halves before a split conv): the same layers, the same cycles, all bit-exact
    from edgediff.exporters import get_backend

    get_backend("onnx").export(q, tmp_path / "q.onnx", "int8")
    rep2 = BACKEND.export(tmp_path / "q.onnx", tmp_path / "proj2", "int8")
    assert rep2["layers_bit_exact"] == rep2["layers_total"] == len(names) and rep2["verified"] is True
    assert sorted(r["kind"] for r in rep2["layers"]) == sorted(r["kind"] for r in rep["layers"])
    # the same array work; the drain differs where the ONNX graph requantizes (int8 out) and QuantParams do not
    assert rep2["estimate"]["compute_cycles"] == rep["estimate"]["compute_cycles"]


class EinsumAttention(nn.Module):
    """A conv, then single-head attention written with torch.einsum (exported as ONNX Einsum, left in float)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)  # (B, 64, 16)
        a = torch.einsum("bqd,bkd->bqk", self.q(t), self.k(t)).softmax(-1)
        return self.o(torch.einsum("bqk,bkd->bqd", a, self.v(t)))


@needs_cxx
def test_float_einsum_attention_counts_as_host_macs(tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgediff.profiling.graph import onnx_ops

    torch.manual_seed(0)
    fp, q = tmp_path / "f.onnx", tmp_path / "q.onnx"
    torch.onnx.export(EinsumAttention().eval(), (torch.randn(1, 3, 8, 8),), str(fp), input_names=["x"],
                      output_names=["out"], opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(2)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(fp), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    rep = BACKEND.export(q, tmp_path / "proj", "int8", compare_ort=False)
    einsum = [h for h in rep["host_ops"] if h["op"] == "Einsum"]
    assert len(einsum) == 2 and all(h["macs"] == 64 * 64 * 16 for h in einsum)
    array = 64 * 27 * 16 + 4 * 64 * 16 * 16  # the int8 conv and the four linears
    assert rep["array_macs"] == array and rep["host_macs"] >= 2 * 64 * 64 * 16
    assert rep["array_macs_share"] == pytest.approx(array / (array + rep["host_macs"]))
    assert rep["array_macs_share"] < 0.5
    est = estimate.estimate_onnx(tmp_path / "proj")
    assert est["host_macs"] == rep["host_macs"] and est["array_macs_share"] == pytest.approx(rep["array_macs_share"])
    # the profiler's MAC count sees the Einsums too
    assert sorted(o.macs for o in onnx_ops(q) if o.op == "Einsum") == [64 * 64 * 16] * 2
