"""Pipelines as input and as bundles: a tiny SD-1.x pipeline folder loads with its components, exports in
optimum's ONNX layout, and generates text-to-image on onnxruntime without torch, equal to diffusers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import SEQ, cli_json, tiny_ddpm, tiny_sd  # noqa: F401

from edgediff.bundle import export_bundle
from edgediff.errors import BadInput
from edgediff.loaders import load_model
from edgediff.testing import cli_without_torch

ort = pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    from edgediff.cli import main

    capsys.readouterr()
    rc = main([*args, "--json"])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if out.strip() else {})


@pytest.fixture(scope="module")
def sd_bundle(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("bundles") / "sd"
    export_bundle(load_model(tiny_sd), out, steps=6)
    return out


def _diffusers(folder: Path, bundle: Path, prompt: str, n: int, seed: int, steps: int, guidance: float,
               output_type: str, negative: str | None = None) -> np.ndarray:
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    cfg = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)  # the bundle's (PNDM for SD-1.x)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed), output_type=output_type).images
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def test_pipeline_folder_is_a_pipeline_with_components(tiny_sd: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    m = load_model(tiny_sd)
    assert m.signature.cond_shape == (SEQ, 32)  # from the tokenizer and text encoder, not the default 77
    assert m.extras["pipeline"]["class"] == "StableDiffusionPipeline"
    rc, info = _cli(capsys, "info", str(tiny_sd))
    assert rc == 0 and info["kind"] == "pipeline"
    comps = info["components"]
    assert set(comps) == {"unet", "text_encoder", "tokenizer", "vae", "scheduler"}
    for name in ("unet", "text_encoder", "vae"):
        assert comps[name]["params"] > 0 and comps[name]["size_bytes"] > 0
    assert comps["text_encoder"]["macs"] > 0 and comps["vae"]["macs_decode"] > comps["vae"]["macs_encode"] > 0
    assert comps["unet"]["macs"] == info["macs"]


def test_onnx_bundle_has_optimums_layout_and_io_names(tiny_sd: Path, sd_bundle: Path,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    for rel in ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/model.onnx", "unet/model.onnx",
                "vae_decoder/model.onnx", "vae_encoder/model.onnx", "tokenizer/tokenizer.json", "tokenizer/vocab.json",
                "tokenizer/merges.txt", "unet/config.json", "vae_decoder/config.json", "text_encoder/config.json",
                "edgediff_bundle.json"):
        assert (sd_bundle / rel).is_file(), rel

    def io(name: str) -> tuple[dict, list]:
        g = onnx.load(str(sd_bundle / name / "model.onnx")).graph
        ins = {i.name: ([d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim], i.type.tensor_type.elem_type)
               for i in g.input}
        return ins, [o.name for o in g.output]

    # optimum's documented ONNX Stable Diffusion I/O (exporters/onnx/model_configs.py)
    ins, outs = io("text_encoder")
    assert list(ins) == ["input_ids"] and ins["input_ids"][1] == onnx.TensorProto.INT32
    assert ins["input_ids"][0] == ["batch_size", "sequence_length"] and outs == ["last_hidden_state", "pooler_output"]
    ins, outs = io("unet")
    assert list(ins) == ["sample", "timestep", "encoder_hidden_states"] and outs == ["out_sample"]
    assert all(isinstance(ins["sample"][0][i], str) for i in (0, 2, 3))  # dynamic batch, H and W
    # the UNet graph runs at another latent size, equal to PyTorch there
    m = load_model(tiny_sd)
    x, ehs = torch.randn(1, 4, 16, 24), torch.randn(1, SEQ, 32)
    sess = ort.InferenceSession(str(sd_bundle / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": x.numpy(), "timestep": np.full((1,), 500.0, np.float32),
                          "encoder_hidden_states": ehs.numpy()})[0]
    with torch.no_grad():
        want = m.module()(x, torch.full((1,), 500.0), ehs).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    ins, outs = io("vae_decoder")
    assert list(ins) == ["latent_sample"] and outs == ["sample"]
    assert all(isinstance(d, str) for i, d in enumerate(ins["latent_sample"][0]) if i != 1)  # dynamic batch, H, W
    ins, outs = io("vae_encoder")
    assert list(ins) == ["sample"] and outs == ["latent_parameters"]
    index = json.loads((sd_bundle / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "vae" not in index
    assert {"text_encoder", "tokenizer", "unet", "scheduler", "vae_decoder", "vae_encoder"} <= set(index)
    mf = json.loads((sd_bundle / "edgediff_bundle.json").read_text())
    assert mf["kind"] == "pipeline" and mf["source_hash"]
    roles = {c["role"] for c in mf["components"].values()}
    assert roles == {"denoiser", "text_encoder", "vae_decoder", "vae_encoder", "tokenizer"}
    assert mf["pipeline"]["vae_scaling_factor"] == pytest.approx(0.18215) and mf["pipeline"]["default_guidance"] == 7.5
    assert mf["scheduler"]["class"] == "PNDMScheduler" and not mf["sampler_note"]  # the pipeline's own, ported
    rc, info = _cli(capsys, "info", str(sd_bundle))
    assert rc == 0 and info["kind"] == "bundle"
    # graph MACs at the pipeline's shapes equal the PyTorch count of each component
    _, src = _cli(capsys, "info", str(tiny_sd))
    assert info["components"]["vae_decoder"]["macs"] == src["components"]["vae"]["macs_decode"]
    assert info["components"]["text_encoder"]["macs"] == src["components"]["text_encoder"]["macs"]


def test_generate_from_the_bundle_without_torch_equals_diffusers(tiny_sd: Path, sd_bundle: Path,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    npy, png = tmp_path / "lat.npy", tmp_path / "img.png"
    args = ["--threads", "1", "generate", str(sd_bundle), "--prompt", "a red cat", "--negative-prompt", "the dog",
            "--seed", "3", "--steps", "6", "--samples", "2", "--guidance", "5", "-o", str(png), "--save-npy", str(npy),
            "--json"]
    rc, rep, torch_modules, err = cli_without_torch(args)
    assert rc == 0 and torch_modules == ["torch"], err[-2000:]  # nothing imported torch
    # PNDM (PLMS) runs 7 timesteps for 6 steps, x2 with guidance
    assert rep["torch_imported"] is False and rep["classifier_free_guidance"] and rep["denoiser_calls"] == 14
    for key in ("text_encoder", "denoiser", "vae_decoder", "tokenizer", "scheduler"):
        assert rep["component_ms"][key] >= 0
    assert rep["ms_per_image"] > 0 and rep["peak_rss_mb"] > 0
    from PIL import Image

    assert Image.open(png).size == (2 * 18, 18)  # two 16x16 RGB images in a grid with borders
    want = _diffusers(tiny_sd, sd_bundle, "a red cat", 2, 3, 6, 5.0, "latent", negative="the dog")
    got = np.load(npy)
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)


def test_images_equal_diffusers_and_low_memory_is_the_same(tiny_sd: Path, sd_bundle: Path) -> None:  # noqa: F811
    from edgediff.runtime.pipeline import run_pipeline

    want = _diffusers(tiny_sd, sd_bundle, "the dog", 2, 1, 6, 7.5, "np")  # (N, H, W, 3) in [0, 1]
    _, img, st = run_pipeline(sd_bundle, "the dog", samples=2, seed=1, threads=1)
    _, img_low, st_low = run_pipeline(sd_bundle, "the dog", samples=2, seed=1, threads=1, low_memory=True)
    got = ((img + 1) / 2).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(img_low, img)
    assert st["guidance"] == 7.5 and st_low["low_memory"] and st["steps"] == 6  # the pipeline's default guidance


def test_generate_at_another_size_on_dynamic_hw_equals_diffusers(tiny_sd: Path, sd_bundle: Path,  # noqa: F811
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    import diffusers

    from edgediff.runtime.pipeline import run_pipeline

    # 32x24 pixels: latents 16x12 through the bundle's dynamic-H/W UNet and VAE decoder
    _, img, st = run_pipeline(sd_bundle, "the dog", samples=2, seed=1, steps=4, threads=1, height=32, width=24)
    assert img.shape == (2, 3, 32, 24)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None,
                                                             requires_safety_checker=False)
    cfg = json.loads((sd_bundle / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("the dog", height=32, width=24, num_inference_steps=4, num_images_per_prompt=2,
                generator=torch.Generator().manual_seed(1), output_type="np").images
    np.testing.assert_allclose(((img + 1) / 2).transpose(0, 2, 3, 1), want, atol=1e-4, rtol=0)
    png = tmp_path / "x.png"
    # not a multiple of the VAE's 2; latents 17 not a multiple of the UNet's 2; below 1
    for bad in (["--height", "31"], ["--height", "34"], ["--width", "0"]):
        rc, _ = cli_json(capsys, "generate", str(sd_bundle), "--prompt", "a", "--steps", "1", "-o", str(png), *bad)
        assert rc == 2, bad
    rc, _ = cli_json(capsys, "generate", str(sd_bundle), "--prompt", "a", "--steps", "1", "--samples", "1", "-o", str(png),
                     "--height", "32", "--width", "24")
    from PIL import Image

    assert rc == 0 and Image.open(png).size == (24 + 2, 32 + 2)  # the CLI passes the size through (grid border 1)
    rc, _ = cli_json(capsys, "generate", str(tiny_sd), "--prompt", "a", "--steps", "1", "-o", str(png), "--height", "32")
    assert rc == 2  # the PyTorch generate has no --height


def test_runtime_tokenizer_equals_transformers(tiny_sd: Path, sd_bundle: Path) -> None:  # noqa: F811
    from transformers import CLIPTokenizer

    from edgediff.pipelines import PROMPTS
    from edgediff.runtime.tokenizer import BundleTokenizer

    ref = CLIPTokenizer.from_pretrained(str(tiny_sd / "tokenizer"))
    tok = BundleTokenizer(sd_bundle / "tokenizer" / "tokenizer.json", SEQ, ref.pad_token_id)
    prompts = [*PROMPTS, "A  RED\tCat!!  the dog's", "the " * 40]
    want = ref(prompts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(tok(prompts), want)


def test_denoiser_only_pipeline_bundle(tiny_ddpm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    rc, rep = _cli(capsys, "export", str(tiny_ddpm), "--target", "onnx", "-o", str(tmp_path / "b"))
    assert rc == 0 and rep["kind"] == "pipeline" and set(rep["components"]) == {"unet"}
    rc, g = _cli(capsys, "generate", str(tmp_path / "b"), "--samples", "2", "--steps", "3",
                 "--save-npy", str(tmp_path / "x.npy"))
    assert rc == 0 and g["denoiser_calls"] == 3 and np.load(tmp_path / "x.npy").shape == (2, 1, 16, 16)
    rc, _ = _cli(capsys, "generate", str(tmp_path / "b"), "--prompt", "a cat", "--save-npy", str(tmp_path / "y.npy"))
    assert rc == 2  # no text encoder: a clear refusal


def test_broken_pipeline_folders_are_bad_input(tiny_sd: Path, tmp_path: Path) -> None:  # noqa: F811
    from edgediff.pipelines import pipeline_of

    bad = tmp_path / "p"
    shutil.copytree(tiny_sd, bad)
    idx = json.loads((bad / "model_index.json").read_text())
    idx["text_encoder"] = ["transformers", "SomethingElse"]
    (bad / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(BadInput, match="not supported"):
        pipeline_of(load_model(bad)).load("text_encoder")
    shutil.rmtree(bad / "vae")
    with pytest.raises(BadInput, match="missing"):
        pipeline_of(load_model(bad)).load("vae")


def test_profile_bundle_per_component_and_per_image(sd_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, res = _cli(capsys, "--threads", "1", "profile", str(sd_bundle))
    assert rc == 0 and res["kind"] == "bundle" and res["runtime"] == "ort" and not res["estimated"]
    comps = res["components"]
    assert set(comps) == {"unet", "text_encoder", "vae_decoder", "vae_encoder"}
    assert res["calls_per_image"] == {"unet": 12, "text_encoder": 2, "vae_decoder": 1}  # 6 steps x CFG
    assert all(c["total_ms"] > 0 and c["macs"] > 0 for c in comps.values())
    want = sum(c["total_ms"] * c["calls_per_image"] for c in comps.values())
    assert res["total_ms"] == pytest.approx(want, rel=1e-3)
    assert any(la["name"].startswith("vae_decoder/") for la in res["layers"])
    rc, est = _cli(capsys, "profile", str(sd_bundle), "--device", "a17pro-gpu")
    assert rc == 0 and est["estimated"] and est["components"]["unet"]["total_ms"] > 0


def test_a_manifest_naming_a_denoiser_folder_outside_the_bundle_is_refused(sd_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from edgediff.errors import BadInput
    from edgediff.runtime.bundle import MANIFEST, read_bundle
    from edgediff.runtime.generate import sample_shape_for

    copy = tmp_path / "b"
    shutil.copytree(sd_bundle, copy)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text(json.dumps({"block_out_channels": [1]}))
    mf = json.loads((copy / MANIFEST).read_text())
    mf.setdefault("pipeline", {})["denoiser"] = "../outside"
    (copy / MANIFEST).write_text(json.dumps(mf))
    with pytest.raises(BadInput, match="leaves its folder"):
        sample_shape_for(read_bundle(copy), 32, 24)


def test_pipeline_images_are_held_to_the_least_precise_component() -> None:
    from edgediff.pipelines.verify import loosest_precision

    assert loosest_precision(["fp32", "int8", "fp16"]) == "int8"
    assert loosest_precision(["fp32", "fp16"]) == "fp16"
    assert loosest_precision(["fp32"]) == "fp32"
    assert loosest_precision(["fp32", "w4"]) == "w4"  # unknown: the loosest, never a tighter tolerance
