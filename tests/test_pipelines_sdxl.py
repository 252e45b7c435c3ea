"""Several text encoders: an SDXL pipeline (CLIPTextModel + CLIPTextModelWithProjection: penultimate hidden states
side by side, pooled text_embeds, time_ids) and an SD3 pipeline (two CLIPs with projection, no T5): prompts
encoded as diffusers' encode_prompt, generate --prompt equal to their diffusers pipelines, calibration on those
prompts with guidance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import build_tiny_sd3_clip, build_tiny_sdxl

from edgediff.loaders import load_model


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("pipelines") / "tiny-sdxl")


def test_sdxl_generate_from_a_prompt_equals_diffusers(tiny_sdxl: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from edgediff.generate import generate

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.set_progress_bar_config(disable=True)
    m = load_model(tiny_sdxl)
    assert m.signature.cond_shape == (16, 64)  # both encoders' widths side by side
    for neg in (None, "the dog"):  # None: the pipeline's forced zeros; else the encoded negative prompt
        want = pipe("a red cat", negative_prompt=neg, num_inference_steps=4, guidance_scale=5.0, num_images_per_prompt=2,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images.numpy()
        rep = generate(m, samples=2, seed=3, steps=4, guidance=5.0, prompt="a red cat", negative_prompt=neg,
                       save_npy=tmp_path / "x.npy")
        assert rep["classifier_free_guidance"] and rep["denoiser_calls"] == 8
        np.testing.assert_allclose(np.load(tmp_path / "x.npy"), want, atol=1e-4, rtol=0)


def test_sdxl_calibrates_on_encoded_prompts_with_guidance(tiny_sdxl: Path) -> None:
    from edgediff.passes.calib import CalibOptions, generate
    from edgediff.pipelines import PROMPTS, pipeline_of
    from edgediff.pipelines.encode import encode_conditioning

    m = load_model(tiny_sdxl)
    pipe = pipeline_of(m)
    assert pipe is not None
    data = generate(m, CalibOptions(method="ptq4dm", n_samples=2, steps=3, count=6))
    c, u = encode_conditioning(pipe, list(PROMPTS[:2]))
    for k in ("encoder_hidden_states", "text_embeds", "time_ids"):
        torch.testing.assert_close(data[f"traj_cond.{k}"], c[k])
    assert data["x"].shape[0] == 12 and bool((data["cond.time_ids"] == torch.tensor([16.0, 16, 0, 0, 16, 16])).all())
    # half the points carry the unconditional branch: diffusers' zeros for an empty negative prompt
    zero_rows = int((data["cond.text_embeds"].abs().sum(1) == 0).sum())
    assert zero_rows == 6 and bool((u["text_embeds"] == 0).all())


def test_sd3_with_two_clips_and_no_t5_generates_as_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from edgediff.generate import generate
    from edgediff.passes.calib import CalibOptions
    from edgediff.passes.calib import generate as calibrate

    folder = build_tiny_sd3_clip(tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    m = load_model(folder)
    assert m.signature.cond_shape == (16 + 256, 48)  # CLIP tokens, then T5's 256 (zeros without it)
    want = pipe("a red cat", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                output_type="latent").images.numpy()
    generate(m, samples=1, seed=1, steps=3, guidance=5.0, prompt="a red cat", save_npy=tmp_path / "x.npy")
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), want, atol=1e-4, rtol=0)
    data = calibrate(m, CalibOptions(method="qdiff", n_samples=2, steps=2, interval=1))
    assert data["cond.pooled_projections"].shape == (8, 32) and data["cond.encoder_hidden_states"].shape == (8, 272, 48)


def test_sdxl_pipeline_latents_are_diffusers(tiny_sdxl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from edgediff.pipelines import pipeline_of
    from edgediff.pipelines.encode import pipeline_latents

    m = load_model(tiny_sdxl)
    pipe = pipeline_of(m)
    assert pipe is not None
    got = pipeline_latents(pipe, m, ["a red cat", "the dog"], 2, None, 3, 5.0)  # what verify and compress sample
    ref = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    ref.set_progress_bar_config(disable=True)
    want = ref(["a red cat", "the dog"], num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(2), output_type="latent").images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


_CHILD = """
import sys
sys.modules["torch"] = None
from edgediff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _diffusers_latents(folder: Path, bundle: Path, neg: str | None, **kw: object) -> np.ndarray:
    import json

    import diffusers

    idx = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, idx["_class_name"])
    pipe = cls.from_pretrained(str(folder), **kw)
    cfg = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)  # the bundle's scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cat", negative_prompt=neg, num_inference_steps=3, guidance_scale=5.0, num_images_per_prompt=2,
                generator=torch.Generator().manual_seed(1), output_type="latent").images.numpy()


def test_sdxl_bundle_generates_without_torch_as_diffusers_and_verifies(tiny_sdxl: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import subprocess
    import sys

    from edgediff.cli import main

    pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")
    b = tmp_path / "b"
    assert main(["--threads", "1", "export", str(tiny_sdxl), "--target", "onnx", "-o", str(b)]) == 0
    mf = json.loads((b / "edgediff_bundle.json").read_text())
    assert mf["pipeline"]["encoding"] == "sdxl" and mf["pipeline"]["text_encoders"] == ["text_encoder", "text_encoder_2"]
    # optimum's SDXL outputs in its order: the projection first, then the states of every layer but the last
    assert mf["components"]["text_encoder_2"]["outputs"] == ["text_embeds", "last_hidden_state", "hidden_states.0",
                                                             "hidden_states.1"]
    for neg in (None, "the dog"):
        args = ["--threads", "1", "generate", str(b), "--prompt", "a red cat", "--samples", "2", "--seed", "1",
                "--steps", "3", "--guidance", "5", "--save-npy", str(tmp_path / "x.npy"), "--json"]
        proc = subprocess.run([sys.executable, "-c", _CHILD, *args, *(["--negative-prompt", neg] if neg else [])],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["torch_imported"] is False
        want = _diffusers_latents(tiny_sdxl, b, neg)
        np.testing.assert_allclose(np.load(tmp_path / "x.npy"), want, atol=1e-4 * max(1.0, float(np.abs(want).max())),
                                   rtol=0)
    capsys.readouterr()
    assert main(["--threads", "1", "verify", str(tiny_sdxl), str(b), "--samples", "2", "--steps", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} <= set(res["components"])
    assert res["psnr_images_db"] > 80


def test_sd3_bundle_with_two_clips_equals_diffusers(tmp_path: Path) -> None:
    from edgediff.bundle import export_bundle
    from edgediff.runtime.pipeline import run_pipeline

    pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")
    folder = build_tiny_sd3_clip(tmp_path / "sd3")
    export_bundle(load_model(folder), tmp_path / "b", steps=3)
    x, img, _ = run_pipeline(tmp_path / "b", "a red cat", samples=2, seed=1, steps=3, guidance=5.0)
    want = _diffusers_latents(folder, tmp_path / "b", None, text_encoder_3=None, tokenizer_3=None)
    assert img is not None and img.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(x, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)
    # a recipe's text encoder part calibrates on ids at its tokenizer's length (not the joint sequence)
    from edgediff.passes.calib import CalibOptions
    from edgediff.pipelines import pipeline_of
    from edgediff.pipelines.compress import calibration_inputs

    m = load_model(folder)
    pipe = pipeline_of(m)
    assert pipe is not None
    assert tuple(calibration_inputs(m, pipe, "text_encoder_2", CalibOptions(n_samples=2)).shape) == (3, 16)
