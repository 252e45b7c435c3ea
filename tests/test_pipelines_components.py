"""Per-component passes of a pipeline: a recipe quantizes the text encoder and the VAE decoder (their own
calibration) and rounds the VAE encoder to fp16; the artifact keeps and reloads them, compress reports each
part against the original, the ONNX bundle ships them int8/fp16, verify checks each at its precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import cli_json, tiny_sd  # noqa: F401

from edgediff.errors import BadInput
from edgediff.loaders import load_model
from edgediff.recipe import parse

pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")

RECIPE = """name = "parts"
[[pass]]
name = "calib"
component = "text_encoder"
n_samples = 6
[[pass]]
name = "quant"
component = "text_encoder"
weight_init = "minmax"
act_init = "minmax"
[[pass]]
name = "calib"
component = "vae_decoder"
n_samples = 3
steps = 4
[[pass]]
name = "quant"
component = "vae_decoder"
[[pass]]
name = "fp16"
component = "vae_encoder"
"""


def test_component_names_and_passes_are_checked(tiny_sd: Path, tmp_path: Path, tiny_unet: object,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff.pipeline import plan
    from edgediff.pipelines.compress import targets

    r = parse(RECIPE, "r.toml")
    assert [p.component for p in r.passes] == ["text_encoder"] * 2 + ["vae_decoder"] * 2 + ["vae_encoder"]
    assert r.to_dict()["passes"][0]["component"] == "text_encoder"
    m = load_model(tiny_sd)
    assert targets(m, r) == [["text_encoder"], ["text_encoder"], ["vae_decoder"], ["vae_decoder"], ["vae_encoder"]]
    both = parse('[[pass]]\nname = "fp16"\ncomponent = "vae"\n[[pass]]\nname = "fp16"\ncomponent = "unet"\n', "v.toml")
    assert targets(m, both) == [["vae_decoder", "vae_encoder"], None]  # the denoiser by its own name
    cases = {'name = "quant"\ncomponent = "text_encoder_9"': "unknown component 'text_encoder_9'",
             'name = "prune.diff"\ncomponent = "vae_decoder"': "acts on the denoiser only",
             'name = "quant"\ncomponent = "vae_decoder"': "needs 'calib' before it",
             'name = "quant"\ncomponent = "text_encoder"\nreconstruct = true': "quant option reconstruct"}
    for body, msg in cases.items():
        with pytest.raises(BadInput, match=msg):
            plan(m, parse(f"[[pass]]\n{body}\n", "bad.toml"))
    with pytest.raises(BadInput, match="not a pipeline"):
        plan(tiny_unet, parse('[[pass]]\nname = "fp16"\ncomponent = "vae"\n', "bad.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pass]]\nname = "fp16"\ncomponent = "safety_checker"\n')
    from edgediff.cli import main

    capsys.readouterr()
    rc = main(["compress", str(tiny_sd), "--recipe", str(bad), "-o", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "safety_checker" in err and not (tmp_path / "a").exists()


def test_compressed_components_reload_export_and_verify(tiny_sd: Path, tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff.pipelines import pipeline_of
    from edgediff.pipelines.parts import part_module, run_part
    from edgediff.quant_params import is_quant_wrapper

    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    art = tmp_path / "art"
    rc, man = cli_json(capsys, "--threads", "1", "compress", str(tiny_sd), "--recipe", str(recipe), "-o", str(art))
    assert rc == 0
    rep = man["components"]
    assert set(rep["parts"]) == {"text_encoder", "vae_decoder", "vae_encoder"}
    te, dec, enc = (rep["parts"][k] for k in ("text_encoder", "vae_decoder", "vae_encoder"))
    assert te["precision"] == dec["precision"] == "int8" and enc["precision"] == "fp16"
    assert dec["size_bytes_after"] < 0.3 * dec["size_bytes_before"] and enc["size_ratio"] == 0.5
    # quantized parts differ from the original (finite PSNR), but not by much
    for row in (te, dec):
        assert 20 < row["psnr_db"] < 100
    assert enc["psnr_db"] > 60 and 20 < rep["final_psnr_db"] < 100 and rep["final_of"] == "images"
    assert [p["options"].get("component") for p in man["passes"]] == ["text_encoder"] * 2 + ["vae_decoder"] * 2 + [
        "vae_encoder"]
    # the artifact keeps the parts as safetensors + JSON and reloads them; the pipeline/ copy stays original
    assert (art / "extras" / "components.safetensors").is_file()
    assert not list(art.rglob("*.bin")) and not list(art.rglob("*.pt"))
    pipe = pipeline_of(load_model(art))
    assert pipe is not None
    vae, vae_o = pipe.load("vae"), pipe.load("vae", original=True)
    assert any(is_quant_wrapper(m) for m in vae.decoder.modules())
    assert not any(is_quant_wrapper(m) for m in vae.encoder.modules())
    assert not any(is_quant_wrapper(m) for m in vae_o.modules())
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = run_part("vae_decoder", part_module("vae_decoder", vae), z)
    assert not torch.allclose(got, run_part("vae_decoder", part_module("vae_decoder", vae_o), z), atol=1e-3)
    src = pipeline_of(load_model(tiny_sd))
    assert src is not None
    w = vae.encoder.conv_in.weight
    torch.testing.assert_close(w, vae_o.encoder.conv_in.weight.half().float())  # fp16-rounded weights
    assert not torch.equal(w, vae_o.encoder.conv_in.weight)
    # the bundle ships each part at its own precision; int8 graphs carry int8 weights
    rc, _ = cli_json(capsys, "--threads", "1", "export", str(art), "--target", "onnx", "-o", str(tmp_path / "b"))
    assert rc == 0
    mf = json.loads((tmp_path / "b" / "edgediff_bundle.json").read_text())
    prec = {k: v["precision"] for k, v in mf["components"].items() if v["role"] != "tokenizer"}
    assert prec == {"unet": "fp32", "text_encoder": "int8", "vae_decoder": "int8", "vae_encoder": "fp16"}
    import onnx

    g = onnx.load(str(tmp_path / "b" / "text_encoder" / "model.onnx"))
    int8 = [i for i in g.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 12  # 2 layers x (q, k, v, out, fc1, fc2)
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(art), str(tmp_path / "b"), "--samples", "2",
                       "--steps", "4")
    assert rc == 0 and res["verified"], res.get("reason")
    comps = res["components"]
    assert comps["vae_decoder"]["precision"] == "int8" and comps["vae_encoder"]["precision"] == "fp16"
    assert comps["vae_decoder"]["psnr_db"] > 60 and comps["text_encoder"]["psnr_db"] > 60  # vs their simulation
    assert "compressed parts" in res["reference"] and np.isfinite(res["psnr_vs_original_db"])
    assert res["psnr_vs_original_db"] < res["psnr_db"]  # the original pipeline's images differ more
