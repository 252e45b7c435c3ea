"""A pipeline as a TFLite bundle: one .tflite per component (text encoder, UNet, VAE decoder) + tokenizer +
scheduler + manifest; generated torch-free on LiteRT equal to diffusers' StableDiffusionPipeline (its own PNDM
scheduler), verified per component and on images, profiled per component. litert-torch conversion is slow here
(~70 s for the three files of the tiny pipeline): one fp32 bundle for the fast tests, int8 marked slow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import (  # noqa: F401
    SEQ,
    build_tiny_flux,
    build_tiny_pixart,
    build_tiny_sd3_clip,
    build_tiny_sd3_t5,
    build_tiny_sdxl,
    cli_json,
    tiny_sd,
)

from edgediff.bundle import export_bundle
from edgediff.loaders import load_model
from edgediff.testing import cli_without_torch

pytest.importorskip("litert_torch", reason="TFLite bundles are converted with litert-torch")
pytest.importorskip("ai_edge_litert.interpreter", reason="TFLite bundles run on LiteRT")


@pytest.fixture(scope="module")
def tfl_bundle(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("bundles") / "sd-tflite"
    export_bundle(load_model(tiny_sd), out, target="tflite", steps=6)
    return out


def _diffusers_latents(folder: Path, bundle: Path, prompt: str, n: int, seed: int, steps: int, guidance: float,
                       negative: str | None = None, call: dict | None = None, **kw: object) -> np.ndarray:
    """The diffusers pipeline of the folder (its model_index class) with the bundle's scheduler, latents out;
    `kw` for from_pretrained, `call` for the pipeline call."""
    import diffusers

    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is diffusers.StableDiffusionPipeline else {}
    pipe = cls.from_pretrained(str(folder), **extra, **kw)
    cfg = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    pipe.set_progress_bar_config(disable=True)
    neg = {"negative_prompt": negative} if negative is not None else {}  # PixArt's default is "", not None
    out = pipe(prompt, **neg, num_inference_steps=steps, guidance_scale=guidance,
               num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed), output_type="latent",
               **(call or {})).images
    return out.numpy()


def test_tflite_bundle_layout_and_manifest(tfl_bundle: Path, tiny_sd: Path,  # noqa: F811
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    mf = json.loads((tfl_bundle / "edgediff_bundle.json").read_text())
    assert mf["target"] == "tflite" and mf["kind"] == "pipeline" and mf["source_hash"]
    roles = {n: c["role"] for n, c in mf["components"].items()}
    assert roles == {"unet": "denoiser", "text_encoder": "text_encoder", "vae_decoder": "vae_decoder",
                     "vae_encoder": "vae_encoder", "tokenizer": "tokenizer"}
    # the pipeline's own scheduler (PNDM/PLMS) now has a numpy port: no substitute sampler
    assert mf["scheduler"]["class"] == "PNDMScheduler" and not mf["sampler_note"]
    rec = mf["pipeline"]
    assert rec["text_encoder"] == "text_encoder" and rec["vae_decoder"] == "vae_decoder"
    assert rec["vae_encoder"] == "vae_encoder" and "encoding" not in rec
    assert rec["tokenizer_config"]["max_length"] == SEQ and rec["default_guidance"] == 7.5
    for f in ("tokenizer/tokenizer.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "scheduler/scheduler_config.json", "model_index.json"):
        assert (tfl_bundle / f).is_file(), f

    def io(name: str) -> tuple[dict, list]:
        it = Interpreter(model_path=str(tfl_bundle / name / "model.tflite"))
        r = it.get_signature_runner("serving_default")
        ins = {k: (list(v["shape"]), np.dtype(v["dtype"]).name) for k, v in r.get_input_details().items()}
        return ins, sorted(r.get_output_details())

    assert io("text_encoder") == ({"input_ids": ([1, SEQ], "int32")}, ["last_hidden_state", "pooler_output"])
    assert io("vae_decoder") == ({"latent_sample": ([1, 4, 8, 8], "float32")}, ["sample"])
    # image-to-image's encoder: the Gaussian's mean and log-variance, as the ONNX bundle's vae_encoder
    assert io("vae_encoder") == ({"sample": ([1, 3, 16, 16], "float32")}, ["latent_parameters"])
    ins, outs = io("unet")
    assert ins["sample"] == ([1, 4, 8, 8], "float32") and ins["encoder_hidden_states"] == ([1, SEQ, 32], "float32")
    assert outs == ["out_sample"]
    for name in ("unet", "text_encoder", "vae_decoder", "vae_encoder"):
        c = mf["components"][name]
        assert c["precision"] == "fp32" and c["size_bytes"] == (tfl_bundle / c["path"]).stat().st_size > 0
    # info: MACs per component from the .tflite files equal the PyTorch counts of the folder
    rc, info = cli_json(capsys, "info", str(tfl_bundle))
    _, src = cli_json(capsys, "info", str(tiny_sd))
    assert rc == 0 and info["target"] == "tflite"
    assert info["components"]["unet"]["macs"] == src["components"]["unet"]["macs"]
    assert info["components"]["text_encoder"]["macs"] == src["components"]["text_encoder"]["macs"]
    assert info["components"]["vae_decoder"]["macs"] == src["components"]["vae"]["macs_decode"]


def test_generate_on_litert_without_torch_equals_diffusers(tfl_bundle: Path, tiny_sd: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    npy, png = tmp_path / "lat.npy", tmp_path / "img.png"
    opts = "--prompt|a red cat|--negative-prompt|the dog|--seed|3|--steps|6|--samples|3|--guidance|5".split("|")
    rc, rep, torch_modules, err = cli_without_torch(["--threads", "1", "generate", str(tfl_bundle), *opts,
                                                     "-o", str(png), "--save-npy", str(npy), "--json"])
    assert rc == 0 and torch_modules == ["torch"], err[-2000:]  # nothing imported torch
    assert rep["runtime"] == "litert" and rep["torch_imported"] is False
    assert rep["denoiser_calls"] == 14 and rep["steps"] == 6  # PLMS: 7 timesteps for 6 steps, x2 with guidance
    for key in ("text_encoder", "denoiser", "vae_decoder", "tokenizer", "scheduler"):
        assert rep["component_ms"][key] >= 0
    from PIL import Image

    assert Image.open(png).size == (2 * 18, 2 * 18)  # three 16x16 images in a 2x2 grid
    # 3 samples with guidance: 6 rows per step through the batch-1 files (chunked by the runtime)
    want = _diffusers_latents(tiny_sd, tfl_bundle, "a red cat", 3, 3, 6, 5.0, negative="the dog")
    np.testing.assert_allclose(np.load(npy), want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)


def test_verify_and_profile_recognise_the_tflite_bundle(tfl_bundle: Path, tiny_sd: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(tiny_sd), str(tfl_bundle), "--samples", "2",
                       "--steps", "3")
    assert rc == 0 and res["verified"] and res["runtime"] == "litert", res.get("reason")
    assert set(res["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert all(c["psnr_db"] > 80 for c in res["components"].values())
    assert res["psnr_images_db"] > 80 and res["denoiser_calls"] == 8
    rc, prof = cli_json(capsys, "--threads", "1", "profile", str(tfl_bundle))
    assert rc == 0 and prof["kind"] == "bundle"
    assert {c["runtime"] for c in prof["components"].values()} == {"tflite"}
    assert prof["calls_per_image"] == {"unet": 12, "text_encoder": 2, "vae_decoder": 1}  # 6 steps x 2
    assert {"unet", "text_encoder", "vae_decoder"} <= {la["name"].split("/")[0] for la in prof["layers"]}


@pytest.mark.slow
def test_int8_and_fp16_tflite_bundles(tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "t"\n[[pass]]\nname = "calib"\nmethod = "ptq4dm"\nn_samples = 4\nsteps = 6\ncount = 32\n'
                      '[[pass]]\nname = "quant"\nweight_init = "minmax"\nact_init = "minmax"\n')
    src = tmp_path / "sd"
    shutil.copytree(tiny_sd, src)
    rc, _ = cli_json(capsys, "--threads", "1", "compress", str(src), "--recipe", str(recipe), "-o", str(tmp_path / "art"))
    assert rc == 0
    rc, rep = cli_json(capsys, "export", str(tmp_path / "art"), "--target", "tflite", "--precision", "int8",
                       "-o", str(tmp_path / "b8"))
    assert rc == 0 and rep["kind"] == "pipeline"
    mf = json.loads((tmp_path / "b8" / "edgediff_bundle.json").read_text())
    assert mf["components"]["unet"]["precision"] == "int8" and mf["components"]["text_encoder"]["precision"] == "fp32"
    assert mf["components"]["unet"]["weight_dtypes"].get("int8")
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(tmp_path / "art"), str(tmp_path / "b8"),
                       "--samples", "2", "--steps", "4")
    assert rc == 0 and res["verified"] and "quantization simulation" in res["reference"], res.get("reason")
    assert res["psnr_db"] >= 25.0
    rc, rep = cli_json(capsys, "export", str(src), "--target", "tflite", "--precision", "fp16", "-o", str(tmp_path / "b16"))
    assert rc == 0
    mf = json.loads((tmp_path / "b16" / "edgediff_bundle.json").read_text())
    assert {c["precision"] for c in mf["components"].values() if c.get("precision")} == {"fp16"}
    assert mf["components"]["vae_decoder"]["weight_dtypes"].get("float16")
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(src), str(tmp_path / "b16"), "--samples", "2",
                       "--steps", "4")
    assert rc == 0 and res["verified"], res.get("reason")


def test_tflite_bundle_has_a_fixed_size(tfl_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = cli_json(capsys, "generate", str(tfl_bundle), "--prompt", "a", "--steps", "1", "-o", str(tmp_path / "x.png"),
                     "--height", "32")
    assert rc == 2 and not (tmp_path / "x.png").exists()
    from edgediff.errors import BadInput
    from edgediff.runtime.pipeline import run_pipeline

    with pytest.raises(BadInput, match="fixed size"):
        run_pipeline(tfl_bundle, "a", steps=1, width=24)


def test_several_encoders_keep_the_penultimate_states_and_the_projection() -> None:
    """What an SDXL / SD3 encoder's .tflite returns (before conversion): of the hidden states only the one the
    runtime combines (optimum's last hidden_states.N = diffusers' hidden_states[-2]), the projection as text_embeds."""
    from edgediff.exporters.bundle_tflite import TextEncoderCall, encoder_outputs
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=3,
                         max_position_embeddings=8, projection_dim=12)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8), dtype=torch.int32)
    for cls, head in ((CLIPTextModel, ["last_hidden_state", "pooler_output"]),
                      (CLIPTextModelWithProjection, ["text_embeds", "last_hidden_state"])):
        te = cls(cfg).eval()
        assert encoder_outputs(te, several=True) == [*head, "hidden_states.2"]
        assert encoder_outputs(te, several=False) == ["last_hidden_state", "pooler_output"]
        with torch.no_grad():
            got = TextEncoderCall(te, encoder_outputs(te, several=True))(ids)
            want = te(ids.long(), output_hidden_states=True)
        torch.testing.assert_close(got["hidden_states.2"], want.hidden_states[-2], rtol=0, atol=0)
        torch.testing.assert_close(got[head[0] if cls is CLIPTextModelWithProjection else "pooler_output"],
                                   want.text_embeds if cls is CLIPTextModelWithProjection else want.pooler_output)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sdxl", "sd3", "sd3-t5"])
def test_several_text_encoders_in_a_tflite_bundle(kind: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """SDXL (CLIP + CLIP with projection, text_embeds + time_ids), SD3 with its two CLIPs, and SD3 with its T5 too:
    every encoder as a .tflite, combined by the runtime as the ONNX bundle's (manifest `encoding`,
    `text_encoder_kinds`), torch-free equal to diffusers."""
    build = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3_clip, "sd3-t5": build_tiny_sd3_t5}[kind]
    folder = build(tmp_path / kind)
    kw = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    b = tmp_path / "b"
    rc, rep = cli_json(capsys, "export", str(folder), "--target", "tflite", "-o", str(b))
    assert rc == 0 and rep["kind"] == "pipeline"
    mf = json.loads((b / "edgediff_bundle.json").read_text())
    rec = mf["pipeline"]
    encoders = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if kind == "sd3-t5" else [])
    assert rec["encoding"] == kind.split("-")[0] and rec["text_encoders"] == encoders
    assert rec["text_encoder_kinds"] == {n: "t5" if n == "text_encoder_3" else "clip" for n in encoders}
    if kind == "sd3-t5":
        assert mf["components"]["text_encoder_3"]["outputs"] == ["last_hidden_state"]
    comps = mf["components"]
    assert comps["text_encoder_2"]["role"] == "text_encoder_2" and comps["text_encoder_2"]["path"].endswith(".tflite")
    assert comps["text_encoder_2"]["outputs"] == ["hidden_states.1", "last_hidden_state", "text_embeds"]
    assert comps["vae_encoder"]["path"] == "vae_encoder/model.tflite"
    den = comps[rec["denoiser"]]["inputs"]
    extra = {"text_embeds", "time_ids"} if kind == "sdxl" else {"pooled_projections"}
    assert extra <= set(den) and all(v["shape"][0] == 1 for v in den.values())
    npy = tmp_path / "x.npy"
    for neg in ([None, "the dog"] if kind == "sdxl" else [None]):  # SDXL: forced zeros, then an encoded negative
        opts = ["--threads", "1", "generate", str(b), "--prompt", "a red cat", "--samples", "2", "--seed", "1",
                "--steps", "3", "--guidance", "5", "--save-npy", str(npy), "--json"]
        rc, gen, torch_modules, err = cli_without_torch(opts + (["--negative-prompt", neg] if neg else []))
        assert rc == 0 and torch_modules == ["torch"] and gen["runtime"] == "litert", err[-2000:]
        assert {"text_encoder", "text_encoder_2"} <= set(gen["component_ms"])
        want = _diffusers_latents(folder, b, "a red cat", 2, 1, 3, 5.0, negative=neg, **kw)
        np.testing.assert_allclose(np.load(npy), want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(folder), str(b), "--samples", "2", "--steps", "3")
    assert rc == 0 and res["verified"] and res["runtime"] == "litert", res.get("reason")
    assert {*encoders, "vae_decoder", "vae_encoder"} <= set(res["components"])
    assert res["psnr_images_db"] > 80


@pytest.mark.slow
def test_pixart_masked_t5_in_a_tflite_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PixArt's T5 takes the attention mask and the transformer the same mask as encoder_attention_mask (manifest
    `encoding: pixart`); torch-free on LiteRT equal to PixArtAlphaPipeline (no caption cleaning, no binning)."""
    folder = build_tiny_pixart(tmp_path / "pixart")
    b = tmp_path / "b"
    rc, _ = cli_json(capsys, "export", str(folder), "--target", "tflite", "-o", str(b))
    assert rc == 0
    mf = json.loads((b / "edgediff_bundle.json").read_text())
    assert mf["pipeline"]["encoding"] == "pixart" and mf["pipeline"]["text_encoder_kinds"] == {"text_encoder": "t5"}
    assert set(mf["components"]["text_encoder"]["inputs"]) == {"input_ids", "attention_mask"}
    assert "encoder_attention_mask" in mf["components"][mf["pipeline"]["denoiser"]]["inputs"]
    npy = tmp_path / "x.npy"
    rc, gen, torch_modules, err = cli_without_torch(["--threads", "1", "generate", str(b), "--prompt", "A Red cat ",
                                                     "--samples", "2", "--seed", "1", "--steps", "3", "--guidance",
                                                     "4.5", "--save-npy", str(npy), "--json"])
    assert rc == 0 and torch_modules == ["torch"] and gen["runtime"] == "litert", err[-2000:]
    want = _diffusers_latents(folder, b, "A Red cat ", 2, 1, 3, 4.5,
                              call={"use_resolution_binning": False, "clean_caption": False})
    np.testing.assert_allclose(np.load(npy), want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)


@pytest.mark.slow
def test_int8_text_encoder_and_vae_parts_in_a_tflite_bundle(tiny_sd: Path, tmp_path: Path,  # noqa: F811
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe's W8A8 text encoder and VAE decoder (and fp16 VAE encoder) ship in the TFLite bundle at their own
    precision: every lowered layer integerized (int8-in/int8-out FULLY_CONNECTED / CONV_2D), each part verified
    against its simulation."""
    from test_pipelines_components import RECIPE  # the per-component recipe: W8A8 text encoder + VAE decoder

    src = tmp_path / "sd"
    shutil.copytree(tiny_sd, src)
    (tmp_path / "r.toml").write_text(RECIPE)
    rc, _ = cli_json(capsys, "--threads", "1", "compress", str(src), "--recipe", str(tmp_path / "r.toml"),
                     "-o", str(tmp_path / "art"))
    assert rc == 0
    rc, rep = cli_json(capsys, "export", str(tmp_path / "art"), "--target", "tflite", "-o", str(tmp_path / "b"))
    assert rc == 0
    comps = json.loads((tmp_path / "b" / "edgediff_bundle.json").read_text())["components"]
    assert [comps[n]["precision"] for n in ("unet", "text_encoder", "vae_decoder", "vae_encoder")] == [
        "fp32", "int8", "int8", "fp16"]
    for name, op in (("text_encoder", "FULLY_CONNECTED"), ("vae_decoder", "CONV_2D")):
        integ = comps[name]["int8"]["integerized"]
        assert integ["not_found"] == [] and integ["integer_ops"][op] > 0, (name, integ)
        assert comps[name]["weight_dtypes"]["int8"] >= 10
    assert comps["vae_encoder"]["weight_dtypes"].get("float16")
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(tmp_path / "art"), str(tmp_path / "b"),
                       "--samples", "2", "--steps", "4")
    assert res["verified"] and res["components"]["text_encoder"]["precision"] == "int8"
    # the images pass through the int8 VAE decoder: held to int8's tolerance, not the fp32 UNet's
    assert res["tolerance_precision"] == "int8" and rc == 0 and res["exit_code"] == 0, res.get("reason")
    for name in ("text_encoder", "vae_decoder"):  # vs the part's simulation, held to the int8 tolerance
        assert res["components"][name]["psnr_db"] >= 25.0, res["components"]
    assert res["components"]["vae_encoder"]["psnr_db"] >= 60.0


def test_flux_pipelines_are_refused_before_any_conversion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Flux (CLIP pooled + T5 on packed latents) has no torch-free loop: exit 2 with the reason, no file written,
    and before litert-torch converts anything (the check runs first)."""
    import time

    folder = build_tiny_flux(tmp_path / "flux")
    t0 = time.perf_counter()
    from edgediff.cli import main

    capsys.readouterr()
    rc = main(["export", str(folder), "--target", "tflite", "-o", str(tmp_path / "b")])
    said = capsys.readouterr()
    assert rc == 2 and not (tmp_path / "b").exists()
    assert "Flux pipelines are not bundled" in said.err + said.out
    assert time.perf_counter() - t0 < 60  # a denoiser conversion alone takes minutes here
