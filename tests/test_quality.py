"""Quality against the original fp32 model: stored reference samples, reload, floor, verify and compress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgediff import quality
from edgediff.artifact import load_artifact, write_artifact
from edgediff.model import DiffusionModel
from edgediff.testing import minmax_quantize

FAST = {"steps": 3, "samples": 2}


def _ruined(model: DiffusionModel) -> DiffusionModel:
    bad = model.clone()
    with torch.no_grad():
        bad.denoiser.conv_out.inner.weight.mul_(4.0) if hasattr(bad.denoiser.conv_out, "inner") \
            else bad.denoiser.conv_out.weight.mul_(4.0)
    return bad


def test_attach_records_original_samples_and_the_floor_flags_a_ruined_model(tiny_unet) -> None:
    q = minmax_quantize(tiny_unet)
    s = quality.attach(tiny_unet, q, **FAST)
    rec = q.extras["quality"]
    assert rec["original_samples"].shape == (2, 1, 16, 16)
    assert rec["protocol"]["steps"] == 3 and s["psnr_vs_original_db"] == rec["simulation_psnr_db"]
    assert s["psnr_vs_original_db"] > 20 and s["quality_warning"] is None
    # the stored samples are the original's under the protocol
    again = quality.final_samples(tiny_unet, 2, 3)
    assert torch.equal(again, rec["original_samples"])
    bad = _ruined(q)
    got = quality.final_samples(bad, 2, 3)
    r = quality.vs_original(bad, got, 2, 3, None, 0)
    assert r["psnr_vs_original_db"] < 25 and "floor 25 dB" in r["quality_warning"]
    assert "stored in the artifact" in r["original_reference"]
    assert quality.vs_original(bad, got, 2, 3, None, 0, floor=-100.0)["quality_warning"] is None


def test_stored_samples_survive_the_artifact_and_other_settings_need_the_source(tiny_unet, tmp_path: Path) -> None:
    q = minmax_quantize(tiny_unet)
    quality.attach(tiny_unet, q, **FAST)
    write_artifact(q, tmp_path / "art", {})
    back = load_artifact(tmp_path / "art")
    got = quality.final_samples(back, 2, 3)
    r = quality.vs_original(back, got, 2, 3, None, 0)
    assert r["psnr_vs_original_db"] is not None and "stored" in r["original_reference"]
    # other settings: the source ("test") is not a path here, so it cannot be measured, loudly
    other = quality.vs_original(back, quality.final_samples(back, 2, 4), 2, 4, None, 0)
    assert other["psnr_vs_original_db"] is None and "not measured" in other["quality_warning"]
    # the original handed over (the demo has it in memory) always works
    given = quality.vs_original(back, quality.final_samples(back, 2, 4), 2, 4, None, 0, original=tiny_unet)
    assert given["psnr_vs_original_db"] > 20 and given["quality_warning"] is None


def test_original_reloaded_from_source_path_when_unchanged(tiny_unet, tmp_path: Path) -> None:
    tiny_unet.denoiser.save_pretrained(tmp_path / "src")
    from edgediff.loaders import load_model

    original = load_model(tmp_path / "src")
    q = minmax_quantize(original)
    quality.attach(original, q, **FAST)
    got = quality.final_samples(q, 2, 4)
    r = quality.vs_original(q, got, 2, 4, None, 0)
    assert r["psnr_vs_original_db"] is not None and "reloaded" in r["original_reference"]
    (tmp_path / "src" / "config.json").write_text((tmp_path / "src" / "config.json").read_text() + " ")
    r2 = quality.vs_original(q, got, 2, 4, None, 0)
    assert r2["psnr_vs_original_db"] is None and "changed since compression" in r2["quality_warning"]


def test_verify_reports_psnr_vs_original_and_warns_under_the_floor(tiny_unet, tmp_path: Path, capsys) -> None:
    from edgediff.exporters import get_backend

    from edgediff.cli import main
    from edgediff.verify import verify

    # a model ruined before quantization: the simulation and the export agree with each other
    bad = minmax_quantize(_ruined(tiny_unet))
    quality.attach(tiny_unet, bad, **FAST)
    write_artifact(bad, tmp_path / "bad", {})
    out = tmp_path / "bad.onnx"
    get_backend("onnx").export(bad, out, "int8")
    # the export matches its (ruined) artifact, yet it is far from the original model
    r = verify(bad, out, **FAST)
    assert r["verified"] is True and r["psnr_db"] > 15
    assert r["psnr_vs_original_db"] < 25 and r["quality_warning"]
    capsys.readouterr()
    main(["verify", str(tmp_path / "bad"), str(out), "--steps", "3", "--samples", "2", "--json",
          "--min-quality-db", "10"])
    res = capsys.readouterr()
    data = json.loads(res.out)
    assert data["min_quality_db"] == 10.0
    lines = [ln for ln in res.err.splitlines() if ln.startswith("warning:")]
    assert (len(lines) == 1) == (data["psnr_vs_original_db"] < 10)


def test_compress_of_a_quantizing_recipe_reports_the_simulation_figure(tiny_unet, tmp_path: Path) -> None:
    from edgediff.pipeline import compress
    from edgediff.recipe import parse

    recipe = parse('name = "t"\n[[pass]]\nname = "calib"\nn_samples = 4\nsteps = 8\ninterval = 2\n'
                   '[[pass]]\nname = "quant"\n', "t.toml")
    result, manifest = compress(tiny_unet, recipe, tmp_path / "art")
    qrec = manifest["quality"]
    assert qrec["psnr_vs_original_db"] == result.extras["quality"]["simulation_psnr_db"]
    assert qrec["protocol"] == quality.PROTOCOL
    back = load_artifact(tmp_path / "art")
    assert back.extras["quality"]["original_samples"].shape == (16, 1, 16, 16)
    # a float-only recipe carries no such record
    plain, m2 = compress(tiny_unet, parse('name = "f"\n[[pass]]\nname = "fp16"\n', "f.toml"), tmp_path / "f")
    assert "quality" not in m2 and "quality" not in plain.extras


@pytest.mark.parametrize("floor", [25.0])
def test_warning_text_names_the_figure_and_the_floor(floor: float) -> None:
    w = quality.warning_for(12.34, floor, "export")
    assert w is not None and "12.3 dB" in w and "floor 25 dB" in w
    assert quality.warning_for(30.0, floor, "export") is None
    assert "not measured (why)" in (quality.warning_for(None, floor, "export", "why") or "")


def test_psnr_uses_the_references_range_so_latent_scale_models_are_not_negative() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 4, 8, 8, generator=g) * 3  # latent-like: spans ~20 units
    x = ref + 0.3 * torch.randn(ref.shape, generator=g)  # 10% noise relative to the signal
    from edgediff.metrics import psnr

    assert psnr(x, ref) < 20  # the old fixed range of 2 understates by 20 log10(range / 2)
    r = quality.data_range(ref)
    assert r == pytest.approx(float(ref.max() - ref.min()))
    assert quality.psnr_vs(x, ref) == pytest.approx(psnr(x, ref) + 20 * torch.log10(torch.tensor(r / 2)).item())
    # an image-space reference spanning [-1, 1] keeps the fixed-range figure
    img = torch.linspace(-1, 1, 256).view(1, 1, 16, 16)
    assert quality.psnr_vs(img * 0.99, img) == pytest.approx(psnr(img * 0.99, img))
    assert quality.data_range(torch.zeros(2, 3)) == 2.0
