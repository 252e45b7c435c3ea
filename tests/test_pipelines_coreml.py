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
from pipeline_fixtures import SEQ, cli_json, tiny_ddpm, tiny_sd  # noqa: F401

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
    for f in ("TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"):
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
    mf = json.loads((out / "edgediff_bundle.json").read_text())
    assert mf["target"] == "coreml" and mf["pipeline"]["vae_decoder"] == "vae_decoder"
    assert {c["role"] for c in mf["components"].values()} == {"denoiser", "text_encoder", "vae_decoder", "tokenizer"}
    chk = check_bundle(out)
    assert chk["ok"], chk["problems"]
    rc, ver = cli_json(capsys, "verify", str(tiny_sd), str(out))
    assert rc == 3 and ver["verified"] is False and "macOS" in ver["reason"]
    assert ver["structural"]["ok"] and set(ver["structural"]["packages"]) == {"text_encoder", "unet", "vae_decoder"}
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
