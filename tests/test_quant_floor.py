"""Outliers and the quality floor: SmoothQuant migration, per-layer sensitivity, min_psnr_db."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgediff import quality
from edgediff.artifact import load_artifact, write_artifact
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext, get, make_options
from edgediff.quant import sensitivity as sens
from edgediff.quant.smooth import find_pairs, smooth

FAST_CALIB = {"n_samples": 4, "steps": 8, "interval": 2}
# the floor's and the sweep's protocols, small enough for CI
FLOOR = {"floor_samples": 4, "floor_steps": 6, "sensitivity_samples": 2, "sensitivity_steps": 4}


def _run(name: str, model: DiffusionModel, opts: dict, ctx: PassContext) -> DiffusionModel:
    fn, _ = get(name)
    ctx.metrics = {}
    return fn(model.clone(), make_options(name, opts), ctx)


def _inject_outliers(model: DiffusionModel, factor: float = 1000.0, out_gain: float = 5.0) -> DiffusionModel:
    """Two input channels of every attention's projections 1000x larger than the rest, with the
    projections' weights divided by as much (the float function of the attention is unchanged);
    the attentions' output projections are amplified so that attention matters in this random
    model. Per-tensor int8 on the projections' input then rounds every normal channel to ~0."""
    m = model.clone()
    with torch.no_grad():
        for mod in m.denoiser.modules():
            if type(mod).__name__ == "Attention":
                c = [1, 5]
                mod.group_norm.weight[c] *= factor
                mod.group_norm.bias[c] *= factor
                for lin in (mod.to_q, mod.to_k, mod.to_v):
                    lin.weight[:, c] /= factor
                mod.to_out[0].weight *= out_gain
    return m


@pytest.fixture
def outlier_model(tiny_unet: DiffusionModel, tmp_path: Path) -> tuple[DiffusionModel, DiffusionModel, PassContext]:
    ctx = PassContext(cache_dir=tmp_path / "cache")
    model = _inject_outliers(tiny_unet)
    return model, _run("calib", model, FAST_CALIB, ctx), ctx


def _psnr(q: DiffusionModel, ref: torch.Tensor) -> float:
    return quality.psnr_vs(quality.final_samples(q, 4, 6, with_correction=False), ref)


def test_plain_w8a8_collapses_on_outliers_and_the_floor_restores_it(outlier_model, tmp_path: Path) -> None:
    model, cal, ctx = outlier_model
    ref = quality.final_samples(model, 4, 6, with_correction=False)
    plain = _run("quant", cal, {}, ctx)
    assert _psnr(plain, ref) < 25  # the collapse the floor must catch
    assert "quality_floor" not in ctx.metrics

    q = _run("quant", cal, {"min_psnr_db": 30.0, **FLOOR}, ctx)
    fl = ctx.metrics["quality_floor"]
    assert fl["psnr_before_db"] < 25 and fl["held"] is True and fl["psnr_after_db"] >= 30
    assert _psnr(q, ref) >= 30  # the same protocol, measured from outside the pass
    raised = fl["raised"]
    assert 0 < len(raised) < fl["units"] // 4
    assert all(".attentions." in n for n in raised)  # the injected layers (or their attentions), not others
    # kept in float: plain modules in the model, absent from QuantParams; the rest stays quantized
    qp = q.extras["quant"]["layers"]
    for n in raised:
        assert n not in qp
        if not n.endswith(".processor"):
            assert type(q.denoiser.get_submodule(n)) in (nn.Linear, nn.Conv2d)
    assert ctx.metrics["quantized_layers"] == len([k for k in qp if ":" not in k])
    cost = fl["cost"]
    assert cost["estimated"] is True and cost["device"] == "rpi5-cpu"
    assert set(cost["layers"]) == set(raised)
    w = sum(q.denoiser.get_submodule(n).weight.numel() for n in raised if not n.endswith(".processor"))
    assert cost["extra_weight_bytes"] == w * 3  # float32 instead of int8
    assert cost["extra_ms_per_call"] > 0
    assert fl["sensitivity"]["psnr_db_only_this_quantized"]

    # the artifact keeps the mixed model, and the int8 ONNX export runs the float layers in float
    write_artifact(q, tmp_path / "art", {"passes": []})
    back = load_artifact(tmp_path / "art")
    x = q.example_inputs(batch=1, seed=3)
    with torch.no_grad():
        a, b = q.module().eval()(**x), back.module().eval()(**x)
    assert torch.equal(a, b)
    import onnxruntime as ort
    from edgediff.exporters.onnx import build_onnx

    proto, rep = build_onnx(q, "int8")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: x[i.name].numpy().astype(np.float32) for i in sess.get_inputs() if i.name in x}
    got = torch.from_numpy(sess.run(None, feed)[0])
    assert float((got - a).abs().max()) < 0.05 * float(a.abs().max())


def test_smoothquant_migrates_outliers_keeps_the_float_function_and_fixes_w8a8(outlier_model) -> None:
    model, cal, ctx = outlier_model
    ref = quality.final_samples(model, 4, 6, with_correction=False)
    q = _run("quant", cal, {"smooth": True}, ctx)
    st = ctx.metrics["smoothing"]
    norms = {r["norm"] for r in st["smoothed"]}
    assert len(norms) == 4 and all(n.endswith(".group_norm") for n in norms) and not st["reverted"]
    for r in st["smoothed"]:
        assert r["outlier_ratio_before"] > 500 and r["outlier_ratio_after"] < 5
        assert sorted(x.rsplit(".", 1)[1] for x in r["layers"]) == ["to_k", "to_q", "to_v"]
    assert "smoothquant(alpha=0.5)" in ctx.metrics["method"]
    assert _psnr(q, ref) > 35


def test_smoothing_reverts_a_norm_whose_output_has_another_consumer() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.la = nn.LayerNorm(8), nn.Linear(8, 8)
            self.b, self.lb = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(x)
            return self.la(self.a(x)) + self.lb(h) + h  # b's output is also added: not foldable

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.a.weight[3] = 200.0
        net.b.weight[2] = 200.0
    x = torch.randn(16, 8)
    before = net(x).detach().clone()
    calls = lambda: iter([lambda: net(x)])  # noqa: E731
    assert find_pairs(net, calls) == {"a": ["la"], "b": ["lb"]}
    st = smooth(net, calls, lambda: net(x).detach().clone())
    assert [r["norm"] for r in st["smoothed"]] == ["a"] and [r["norm"] for r in st["reverted"]] == ["b"]
    assert torch.allclose(net(x), before, rtol=1e-5, atol=1e-4)
    assert float(net.a.weight[3].detach()) < 200.0 and float(net.b.weight[2].detach()) == 200.0


class _Unit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from edgediff.quant.core import ActQuantizer

        self.q = ActQuantizer(8)

    def act_quantizers(self) -> list:
        return [self.q]


def test_raise_until_keeps_the_fewest_most_sensitive_units() -> None:
    us = {f"u{i}": _Unit() for i in range(9)}
    cost = {f"u{i}": 3.0 if i in (2, 7) else 0.1 for i in range(9)}  # u2, u7 hurt most

    def psnr_of() -> float:
        return 40.0 - sum(c for n, c in cost.items() if us[n].q.mode == "quant")

    order = sorted(us, key=lambda n: -cost[n])
    kept, p, tried = sens.raise_until(order, sens.toggler(us), psnr_of, 38.0)
    assert kept == ["u2", "u7"] and p >= 38.0
    assert [us[n].q.mode for n in ("u2", "u7", "u0")] == ["off", "off", "quant"]  # left in the returned state
    assert len(tried) <= 5  # doubling then bisection, not one run per unit
    kept, p, _ = sens.raise_until(order, sens.toggler(us), psnr_of, 39.95, max_units=3)
    assert len(kept) == 3 and p < 39.95  # the cap wins: returned below the floor (the pass says so)


def test_floor_options_are_checked(tiny_unet: DiffusionModel) -> None:
    for bad in ({"min_psnr_db": -1.0}, {"min_psnr_db": True}, {"smooth_alpha": 1.5}, {"floor_steps": 0},
                {"min_psnr_db": 30.0, "floor_device": "toaster"}):
        with pytest.raises(BadInput):
            make_options("quant", bad).validate()


def test_cli_min_psnr_needs_a_quant_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgediff.cli import main

    assert main(["compress", "demo", "--recipe", "fp16", "--min-psnr", "30", "-o", str(tmp_path / "o")]) == 2
    assert "--min-psnr needs a recipe with a quant pass" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
