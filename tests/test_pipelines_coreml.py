"""A pipeline as a Core ML bundle in Apple's ml-stable-diffusion Resources layout (TextEncoder, Unet, VAEDecoder
.mlpackage + vocab.json/merges.txt, the input names and shapes its Swift package feeds). Core ML predicts on
macOS only: generate/verify/profile answer exit 3 with the reason, verify with a structural check of every package.
The conversion of the tiny pipeline's three packages takes ~1.5 min here: that test is slow; the refusals are fast."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import SEQ, build_tiny_sdxl, cli_json, tiny_ddpm, tiny_sd  # noqa: F401

pytest.importorskip("coremltools", reason="Core ML bundles are written with coremltools")
pytestmark = pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS Core ML predicts: exit 3 is Linux's answer")


def test_apple_unet_layout_is_the_denoiser_on_transposed_states(tiny_sd: Path) -> None:  # noqa: F811
    from edgediff.exporters.bundle_coreml import AppleUnet

    from edgediff.loaders import load_model
    from edgediff.model import DenoiserModule

    m = load_model(tiny_sd)
    wrapper = DenoiserModule(m.module(), m.signature).eval()
    ex = m.signature.example_inputs(batch=2)
    apple = ex["encoder_hidden_states"].transpose(1, 2).unsqueeze(2)  # what the Swift package's toHiddenStates feeds
    assert apple.shape == (2, 32, 1, SEQ)
    with torch.no_grad():
        want = wrapper(ex["sample"], ex["timestep"], encoder_hidden_states=ex["encoder_hidden_states"])
        got = AppleUnet(wrapper)(ex["sample"], ex["timestep"], apple)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_coreml_bundle_refuses_what_apples_layout_does_not_hold(tiny_ddpm: Path, tmp_path: Path,  # noqa: F811
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, rep = cli_json(capsys, "export", str(tiny_ddpm), "--target", "coreml", "-o", str(tmp_path / "b"))
    assert rc == 3 and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_coreml_bundle_resources_and_exit_3(tiny_sd: Path, tmp_path: Path,  # noqa: F811
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff.exporters.bundle_coreml import check_bundle
    from edgediff.exporters.coreml import coreml_info

    out = tmp_path / "cml"
    rc, rep = cli_json(capsys, "export", str(tiny_sd), "--target", "coreml", "-o", str(out))
    assert rc == 0 and rep["kind"] == "pipeline" and rep["target"] == "coreml"
    res = out / "Resources"
    for f in ("TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage"):
        assert (res / f / "Manifest.json").is_file(), f
    for f in ("vocab.json", "merges.txt"):
        assert (res / f).read_bytes() == (out / "tokenizer" / f).read_bytes()  # the pipeline tokenizer's BPE
    te, unet, dec = (coreml_info(res / f"{n}.mlpackage") for n in ("TextEncoder", "Unet", "VAEDecoder"))
    assert te["inputs"] == {"input_ids": {"shape": [1, SEQ], "dtype": "float32"}}
    assert set(te["outputs"]) == {"last_hidden_state", "pooled_outputs"}
    assert te["outputs"]["last_hidden_state"]["shape"] in ([], [1, SEQ, 32])
    # guidance: the package's batched [uncond; cond] call, states in its (B, D, 1, S) layout
    assert unet["inputs"] == {"sample": {"shape": [2, 4, 8, 8], "dtype": "float32"},
                              "timestep": {"shape": [2], "dtype": "float32"},
                              "encoder_hidden_states": {"shape": [2, 32, 1, SEQ], "dtype": "float32"}}
    assert list(unet["outputs"]) == ["out"]
    assert dec["inputs"] == {"z": {"shape": [1, 4, 8, 8], "dtype": "float32"}} and list(dec["outputs"]) == ["image"]
    enc = coreml_info(res / "VAEEncoder.mlpackage")  # Encoder.swift: one image input, mean + log-variance out
    assert enc["inputs"] == {"x": {"shape": [1, 3, 16, 16], "dtype": "float32"}}
    assert enc["outputs"] == {"latent": {"shape": [1, 8, 8, 8], "dtype": "float32"}}
    mf = json.loads((out / "edgediff_bundle.json").read_text())
    assert mf["target"] == "coreml" and mf["pipeline"]["vae_decoder"] == "vae_decoder"
    assert {c["role"] for c in mf["components"].values()} == {"denoiser", "text_encoder", "vae_decoder", "vae_encoder",
                                                               "tokenizer"}
    chk = check_bundle(out)
    assert chk["ok"], chk["problems"]
    rc, ver = cli_json(capsys, "verify", str(tiny_sd), str(out))
    assert rc == 3 and ver["verified"] is False and "macOS" in ver["reason"]
    assert ver["structural"]["ok"]
    assert set(ver["structural"]["packages"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    rc, gen = cli_json(capsys, "generate", str(out), "--prompt", "a red cat", "--steps", "2", "-o", str(tmp_path / "x.png"))
    assert rc == 3 and not (tmp_path / "x.png").exists()
    rc, _ = cli_json(capsys, "profile", str(out))
    assert rc == 3
    rc, info = cli_json(capsys, "info", str(out))
    assert rc == 0 and info["target"] == "coreml"
    # a package renamed away from Apple's name is a structural problem
    (res / "Unet.mlpackage").rename(res / "UnetX.mlpackage")
    mf["components"]["unet"]["path"] = "Resources/UnetX.mlpackage"
    (out / "edgediff_bundle.json").write_text(json.dumps(mf))
    chk = check_bundle(out)
    assert not chk["ok"] and any("Apple's package reads Unet" in p for p in chk["problems"])


def test_sdxl_text_encoders_and_unet_in_apples_xl_layout(tmp_path: Path) -> None:
    """TextEncoderXL.swift reads hidden_embeds (the penultimate layer's states) and pooled_outputs (the projection of
    a CLIPTextModelWithProjection); the XL Unet takes text_embeds and time_ids beside the transposed states."""
    from edgediff.exporters.bundle_coreml import AppleUnet, _TextEncoder

    from edgediff.loaders import load_model
    from edgediff.model import DenoiserModule
    from edgediff.pipelines import pipeline_of

    folder = build_tiny_sdxl(tmp_path / "sdxl")
    m = load_model(folder)
    pipe = pipeline_of(m)
    assert pipe is not None
    ids = torch.randint(0, 100, (1, SEQ))
    for name in ("text_encoder", "text_encoder_2"):
        te = pipe.load(name)
        with torch.no_grad():
            hidden, pooled = _TextEncoder(te, xl=True)(ids.float())
            want = te(ids, output_hidden_states=True)
        torch.testing.assert_close(hidden, want.hidden_states[-2], rtol=0, atol=0)
        torch.testing.assert_close(pooled, want.text_embeds if name == "text_encoder_2" else want.pooler_output,
                                   rtol=0, atol=0)
    wrapper = DenoiserModule(m.module(), m.signature).eval()
    ex = m.signature.example_inputs(batch=2)
    apple = ex["encoder_hidden_states"].transpose(1, 2).unsqueeze(2)
    with torch.no_grad():
        want = wrapper(ex["sample"], ex["timestep"], encoder_hidden_states=ex["encoder_hidden_states"],
                       text_embeds=ex["text_embeds"], time_ids=ex["time_ids"])
        got = AppleUnet(wrapper)(ex["sample"], ex["timestep"], apple, text_embeds=ex["text_embeds"],
                                 time_ids=ex["time_ids"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_chunk_unet_halves_the_weights_and_hands_over_every_tensor(tmp_path: Path) -> None:
    """--chunk-unet's split (Apple's UnetChunk1/2) on a small ML Program whose weights the frontend puts first:
    two programs of about half the bytes each; the second takes the first's outputs and the inputs it reads."""
    import coremltools as ct
    import numpy as np
    from edgediff.exporters.bundle_coreml import RESOURCES, _chunked

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(6))

        def forward(self, sample: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            h = sample
            for c in self.convs:
                h = torch.relu(c(h)) + sample * scale  # `sample` and `scale` read on both sides of any cut
            return h

    ex = (torch.randn(1, 8, 8, 8), torch.ones(1, 8, 1, 1))
    src = torch.export.export(Net().eval(), ex).run_decompositions({})
    ml = ct.convert(src, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17, skip_model_load=True,
                    compute_precision=ct.precision.FLOAT32, outputs=[ct.TensorType(name="out", dtype=np.float32)])
    (tmp_path / RESOURCES).mkdir()
    rec = _chunked(ml, tmp_path)
    one, two = rec["chunks"]
    assert [c["path"] for c in rec["chunks"]] == ["Resources/UnetChunk1.mlpackage", "Resources/UnetChunk2.mlpackage"]
    assert 0.3 < one["size_bytes"] / rec["size_bytes"] < 0.7  # not the 2 KB / everything cut of the hoisted weights
    assert set(rec["inputs"]) == {"sample", "scale"} and rec["outputs"] == ["out"]
    assert set(two["inputs"]) <= set(one["outputs"]) | {"sample", "scale"} and set(one["outputs"]) <= set(two["inputs"])


def test_chunk_unet_is_for_core_ml_bundles(tiny_sd: Path, tmp_path: Path,  # noqa: F811
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = cli_json(capsys, "export", str(tiny_sd), "--target", "tflite", "--chunk-unet", "-o", str(tmp_path / "b"))
    assert rc == 2 and not (tmp_path / "b").exists()
    rc, _ = cli_json(capsys, "export", str(tiny_sd), "--target", "coreml", "--chunk-unet", "-o", str(tmp_path / "u.mlpackage"))
    assert rc == 2 and not (tmp_path / "u.mlpackage").exists()


@pytest.mark.slow
def test_sdxl_coreml_bundle_with_chunked_unet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SDXL in StableDiffusionXL+Resources.swift's layout: TextEncoder, TextEncoder2, UnetChunk1 + UnetChunk2,
    VAEDecoder, VAEEncoder, vocab/merges; structurally checked, exit 3 for prediction."""
    from edgediff.exporters.bundle_coreml import check_bundle

    folder = build_tiny_sdxl(tmp_path / "sdxl")
    out = tmp_path / "cml"
    rc, rep = cli_json(capsys, "export", str(folder), "--target", "coreml", "--chunk-unet", "-o", str(out))
    assert rc == 0 and rep["kind"] == "pipeline"
    res = out / "Resources"
    assert sorted(p.name for p in res.iterdir()) == [
        "TextEncoder.mlpackage", "TextEncoder2.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage",
        "VAEDecoder.mlpackage", "VAEEncoder.mlpackage", "merges.txt", "vocab.json"]
    chk = check_bundle(out)
    assert chk["ok"], chk["problems"]
    unet = chk["packages"]["unet"]
    assert unet["inputs"]["encoder_hidden_states"]["shape"] == [2, 64, 1, SEQ]
    assert unet["inputs"]["time_ids"]["shape"] == [2, 6] and unet["inputs"]["text_embeds"]["shape"] == [2, 32]
    sizes = [c["size_bytes"] for c in unet["chunks"]]
    assert min(sizes) > 0.3 * sum(sizes), sizes
    assert set(chk["packages"]["text_encoder_2"]["outputs"]) == {"hidden_embeds", "pooled_outputs"}
    rc, ver = cli_json(capsys, "verify", str(folder), str(out))
    assert rc == 3 and ver["structural"]["ok"]
    import shutil

    shutil.rmtree(res / "UnetChunk2.mlpackage")  # half a UNet is a structural problem, not a crash
    mf = json.loads((out / "edgediff_bundle.json").read_text())
    mf["components"]["unet"]["chunks"][1]["path"] = "Resources/UnetChunk1.mlpackage"
    (out / "edgediff_bundle.json").write_text(json.dumps(mf))
    chk = check_bundle(out)
    assert not chk["ok"] and any("UnetChunk2" in p for p in chk["problems"])
