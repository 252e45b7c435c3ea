"""`edgediff generate` in PyTorch: JSON keys, the .npy equals a diffusers loop from the documented noise, CFG."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from pipeline_fixtures import tiny_sd  # noqa: F401

from edgediff.cli import main


@pytest.fixture
def unet_dir(tiny_unet, tmp_path: Path) -> Path:
    d = tmp_path / "unet"
    tiny_unet.denoiser.save_pretrained(d)
    (d / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    return d


def test_generate_json_png_npy_equal_a_diffusers_loop(unet_dir: Path, tmp_path: Path, tiny_unet, capsys) -> None:
    png, npy = tmp_path / "g.png", tmp_path / "g.npy"
    assert main(["generate", str(unet_dir), "--seed", "5", "--samples", "3", "--steps", "4", "-o", str(png),
                 "--save-npy", str(npy), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for k in ("sampler", "steps", "denoiser_calls", "seconds", "ms_per_image"):
        assert k in rep
    assert rep["sampler"] == "EulerDiscreteScheduler" and rep["steps"] == 4 and rep["denoiser_calls"] == 4
    assert rep["seconds"] > 0 and rep["ms_per_image"] == pytest.approx(rep["seconds"] * 1000 / 3, rel=1e-2)
    x = np.load(npy)
    assert x.shape == (3, 1, 16, 16) and x.dtype == np.float32
    from PIL import Image

    assert Image.open(png).size == (2 * 18, 2 * 18)  # 2x2 grid of 16x16 tiles with a 1-pixel border
    # the same numbers from a plain diffusers loop starting at the documented initial noise
    sch = diffusers.EulerDiscreteScheduler()
    sch.set_timesteps(4)
    z = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(5)) * sch.init_noise_sigma
    g = torch.Generator().manual_seed(5)
    torch.randn((3, 1, 16, 16), generator=g)
    with torch.inference_mode():
        for t in sch.timesteps:
            out = tiny_unet.denoiser(sch.scale_model_input(z, t), t).sample
            z = sch.step(out, t, z, generator=g).prev_sample
    assert float(np.abs(x - z.numpy()).max()) < 1e-4


def test_generate_with_sampler_override_and_bad_inputs(unet_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", str(unet_dir), "--samples", "1", "--steps", "3", "--sampler", "heun",
                 "--save-npy", str(tmp_path / "h.npy"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sampler"].startswith("heun") and rep["denoiser_calls"] == 5  # Heun: 2 calls per step but the last
    assert main(["generate", str(unet_dir), "--sampler", "nope", "--save-npy", str(tmp_path / "x.npy")]) == 2
    assert main(["generate", str(unet_dir), "--sampler", "flow-euler", "--save-npy", str(tmp_path / "x.npy")]) == 2
    assert main(["generate", str(unet_dir)]) == 2  # nothing to write
    assert main(["generate", str(unet_dir), "--prompt", "a cat", "-o", str(tmp_path / "x.png")]) == 2
    assert "flow" in capsys.readouterr().err


def test_generate_cfg_with_prompt_embeds(tiny_cond_unet, tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "c"
    tiny_cond_unet.denoiser.save_pretrained(d)
    emb = torch.randn(77, 32, generator=torch.Generator().manual_seed(1))
    f = tmp_path / "emb.safetensors"
    save_file({"encoder_hidden_states": emb, "negative_encoder_hidden_states": torch.zeros(77, 32)}, str(f))
    outs = {}
    for g in ("1", "7.5"):
        npy = tmp_path / f"c{g}.npy"
        assert main(["generate", str(d), "--samples", "2", "--steps", "3", "--sampler", "ddim", "--guidance", g,
                     "--prompt-embeds", str(f), "--save-npy", str(npy), "-o", str(tmp_path / "c.png"),
                     "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        outs[g] = np.load(npy)
        assert rep["classifier_free_guidance"] == (g != "1")
        assert rep["denoiser_calls"] == (6 if g != "1" else 3)
        assert rep["png"].startswith("latents")  # 4-channel latents without a VAE
    assert outs["1"].shape == (2, 4, 8, 8) and not np.allclose(outs["1"], outs["7.5"])
    bad = tmp_path / "bad.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(5, 7)}, str(bad))
    assert main(["generate", str(d), "--prompt-embeds", str(bad), "--save-npy", str(tmp_path / "b.npy")]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


def test_generate_prompt_on_a_pipeline_folder_equals_diffusers(tiny_sd: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    """--prompt on a PyTorch pipeline folder: its own text encoder, CFG at the given scale, the same
    latents as StableDiffusionPipeline from the same seed; the PNG is the VAE-decoded image."""
    from diffusers import StableDiffusionPipeline

    npy, png = tmp_path / "p.npy", tmp_path / "p.png"
    assert main(["generate", str(tiny_sd), "--prompt", "a red cat", "--negative-prompt", "the dog", "--seed", "3",
                 "--samples", "2", "--steps", "3", "--guidance", "5.0", "--save-npy", str(npy), "-o", str(png),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["classifier_free_guidance"] and rep["decoded"] == "vae" and "a red cat" in rep["conditioning"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a red cat", negative_prompt="the dog", num_inference_steps=3, guidance_scale=5.0,
                num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert np.abs(np.load(npy) - want.numpy()).max() < 1e-4
    # a bare denoiser has no text encoder: exit 2 pointing to --prompt-embeds
    bare = tmp_path / "bare"
    pipe.unet.save_pretrained(bare)
    assert main(["generate", str(bare), "--prompt", "x", "--save-npy", str(tmp_path / "b.npy")]) == 2
    assert "--prompt-embeds" in capsys.readouterr().err
