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
from pipeline_fixtures import SEQ, cli_json, tiny_sd  # noqa: F401

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
                       negative: str | None = None) -> np.ndarray:
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    cfg = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    return out.numpy()


def test_tflite_bundle_layout_and_manifest(tfl_bundle: Path, tiny_sd: Path,  # noqa: F811
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    mf = json.loads((tfl_bundle / "edgediff_bundle.json").read_text())
    assert mf["target"] == "tflite" and mf["kind"] == "pipeline" and mf["source_hash"]
    roles = {n: c["role"] for n, c in mf["components"].items()}
    assert roles == {"unet": "denoiser", "text_encoder": "text_encoder", "vae_decoder": "vae_decoder",
                     "tokenizer": "tokenizer"}
    # the pipeline's own scheduler (PNDM/PLMS) now has a numpy port: no substitute sampler
    assert mf["scheduler"]["class"] == "PNDMScheduler" and not mf["sampler_note"]
    rec = mf["pipeline"]
    assert rec["text_encoder"] == "text_encoder" and rec["vae_decoder"] == "vae_decoder" and rec["vae_encoder"] is None
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
    ins, outs = io("unet")
    assert ins["sample"] == ([1, 4, 8, 8], "float32") and ins["encoder_hidden_states"] == ([1, SEQ, 32], "float32")
    assert outs == ["out_sample"]
    for name in ("unet", "text_encoder", "vae_decoder"):
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
    assert set(res["components"]) == {"text_encoder", "unet", "vae_decoder"}
    assert all(c["psnr_db"] > 80 for c in res["components"].values())
    assert res["psnr_images_db"] > 80 and res["denoiser_calls"] == 8
    rc, prof = cli_json(capsys, "--threads", "1", "profile", str(tfl_bundle))
    assert rc == 0 and prof["kind"] == "bundle"
    assert {c["runtime"] for c in prof["components"].values()} == {"tflite"}
    assert prof["calls_per_image"] == {"unet": 12, "text_encoder": 2, "vae_decoder": 1}  # 6 steps x 2
    assert {la["name"].split("/")[0] for la in prof["layers"]} == {"unet", "text_encoder", "vae_decoder"}


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
