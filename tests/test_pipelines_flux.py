"""Flux pipelines: `generate --prompt` samples as FluxPipeline does (noise drawn unpacked (B, C, 2h, 2w) then
packed 2x2, the pipeline's own sigmas linspace(1, 1/N, N) with the dynamic shift), so a seed gives FluxPipeline's
latents; the VAE decodes the unpacked latents. The ONNX bundle (transformer with img_ids/txt_ids/guidance, CLIP +
T5, VAE) generates without torch what FluxPipeline generates, and verifies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import build_tiny_flux, cli_json

from edgediff.loaders import load_model
from edgediff.testing import cli_without_torch

PROMPT = "A red cat on the dog"


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "flux")


def test_packed_noise_is_fluxpipeline_prepare_latents() -> None:
    """initial_latents with a token grid draws what FluxPipeline.prepare_latents draws for the same generator (a
    non-square grid too); without one, plain randn of the shape."""
    import diffusers

    from edgediff.sampling import initial_latents, unpack_latents

    for h, w in ((4, 4), (3, 5)):
        want, _ = diffusers.FluxPipeline.prepare_latents(
            type("P", (), {"vae_scale_factor": 8, "_pack_latents": staticmethod(diffusers.FluxPipeline._pack_latents),
                           "_prepare_latent_image_ids": staticmethod(
                               diffusers.FluxPipeline._prepare_latent_image_ids)})(),
            2, 4, 16 * h, 16 * w, torch.float32, "cpu", torch.Generator().manual_seed(7))
        got = initial_latents((h * w, 16), 2, torch.Generator().manual_seed(7), (h, w))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        plain = torch.randn((2, h * w, 16), generator=torch.Generator().manual_seed(7))
        assert not torch.equal(got, plain)  # the layout matters: a packed draw is not randn of the packed shape
        assert torch.equal(initial_latents((h * w, 16), 2, torch.Generator().manual_seed(7)), plain)
        assert unpack_latents(got, (h, w)).shape == (2, 4, 2 * h, 2 * w)
        torch.testing.assert_close(unpack_latents(got, (h, w)),
                                   diffusers.FluxPipeline._unpack_latents(want, 16 * h, 16 * w, 8), atol=0, rtol=0)


def test_pipeline_sigmas_read_from_the_class() -> None:
    from edgediff.pipelines.components import pipeline_sigmas

    assert pipeline_sigmas("FluxPipeline") == "linspace"
    assert pipeline_sigmas("StableDiffusion3Pipeline") is None and pipeline_sigmas("PixArtAlphaPipeline") is None
    assert pipeline_sigmas("NoSuchPipeline") is None and pipeline_sigmas(None) is None


def test_generate_latents_equal_fluxpipeline(flux: Path, tmp_path: Path) -> None:
    """Same prompt, seed and steps: edgediff generate's final latents (saved unpacked) equal FluxPipeline's
    output_type="latent" unpacked; the PNG is the VAE decode of them."""
    import diffusers

    from edgediff.generate import generate

    m = load_model(flux)
    pipe = diffusers.FluxPipeline.from_pretrained(str(flux))
    h, w = next(s.value for s in m.signature.extra if s.name == "img_ids")
    height, width = 2 * h * pipe.vae_scale_factor, 2 * w * pipe.vae_scale_factor
    rep = generate(m, samples=2, seed=3, steps=3, prompt=PROMPT, save_npy=tmp_path / "x.npy",
                   output=tmp_path / "x.png")
    got = np.load(tmp_path / "x.npy")
    with torch.no_grad():
        lat = pipe([PROMPT] * 2, num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                   output_type="latent", height=height, width=width).images
        want = pipe._unpack_latents(lat, height, width, pipe.vae_scale_factor).numpy()
    assert got.shape == want.shape == (2, 4, 2 * h, 2 * w)
    assert np.abs(got - want).max() < 1e-5 * max(1.0, float(np.abs(want).max())), np.abs(got - want).max()
    assert rep["decoded"] == "vae" and (tmp_path / "x.png").is_file()
    # the other seed gives other latents: the comparison above is not between two constants
    generate(m, samples=2, seed=4, steps=3, prompt=PROMPT, save_npy=tmp_path / "y.npy")
    assert np.abs(np.load(tmp_path / "y.npy") - want).max() > 1e-2


@pytest.mark.parametrize("cfg", [{"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0},
                                 {"use_dynamic_shifting": True, "time_shift_type": "linear", "base_image_seq_len": 64},
                                 {"shift": 3.0}])
def test_numpy_flowmatch_euler_with_sigmas_and_mu_equals_diffusers(cfg: dict) -> None:
    """The numpy FlowMatchEuler with FluxPipeline's sigmas and mu (calculate_shift of the token count) and without
    them: timesteps and every step equal diffusers' within 1e-5; dynamic shifting without mu is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from edgediff.errors import BadInput
    from edgediff.runtime.schedulers import FlowMatchEuler, calculate_shift

    full = dict(FlowMatchEulerDiscreteScheduler(**cfg).config)
    for seq, n, linspace in ((1024, 4, True), (4096, 7, False), (256, 1, True)):
        mu = calculate_shift(full, seq) if cfg.get("use_dynamic_shifting") else None
        sigmas = np.linspace(1.0, 1 / n, n) if linspace else None
        d = FlowMatchEulerDiscreteScheduler.from_config(full)
        d.set_timesteps(n, sigmas=sigmas, mu=mu)
        e = FlowMatchEuler(full)
        e.set_timesteps(n, sigmas=sigmas, mu=mu)
        np.testing.assert_allclose(e.timesteps, d.timesteps.numpy(), atol=1e-4, rtol=0)
        g = torch.Generator().manual_seed(seq)
        x = torch.randn(2, 16, 8, generator=g)
        xe = x.numpy().copy()
        for t, te in zip(d.timesteps, e.timesteps):
            o = torch.randn(2, 16, 8, generator=g)
            x = d.step(o, t, x).prev_sample
            xe = e.step(o.numpy(), te, xe)
            assert np.abs(xe - x.numpy()).max() <= 1e-5
    if cfg.get("use_dynamic_shifting"):
        with pytest.raises(BadInput, match="mu"):
            FlowMatchEuler(full).set_timesteps(4)


def test_onnx_bundle_generates_fluxpipeline_images_without_torch(flux: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """export --target onnx writes the whole Flux pipeline (CLIP pooled + T5 states, the transformer taking img_ids,
    txt_ids and guidance, the VAE); `generate BUNDLE --prompt` with torch blocked gives FluxPipeline's latents and
    images for the same seed (guidance embedded: one transformer call per step); verify passes (exit 0)."""
    pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")
    import diffusers

    b = tmp_path / "b"
    rc, man = cli_json(capsys, "export", str(flux), "--target", "onnx", "-o", str(b))
    assert rc == 0, man
    rec = json.loads((b / "edgediff_bundle.json").read_text())["pipeline"]
    assert rec["encoding"] == "flux" and rec["sigmas"] == "linspace" and rec["packed_grid"] == [32, 32]
    rc, res, torch_mods, err = cli_without_torch(["--threads", "1", "generate", str(b), "--prompt", PROMPT,
                                                  "--samples", "2", "--seed", "5", "--steps", "3", "--guidance", "4.0",
                                                  "--save-npy", str(tmp_path / "x.npy"), "-o", str(tmp_path / "x.png"),
                                                  "--json"])
    assert rc == 0, err[-2000:]
    assert res["torch_imported"] is False and torch_mods == ["torch"] and res["denoiser_calls"] == 3
    assert not res["classifier_free_guidance"] and res["guidance"] == 4.0 and (tmp_path / "x.png").is_file()
    pipe = diffusers.FluxPipeline.from_pretrained(str(flux))
    _, height, width = rec["image_shape"]
    with torch.no_grad():
        lat = pipe([PROMPT] * 2, num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                   guidance_scale=4.0, output_type="latent", height=height, width=width).images
        want = pipe._unpack_latents(lat, height, width, pipe.vae_scale_factor).numpy()
    got = np.load(tmp_path / "x.npy")
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(flux), str(b), "--samples", "2", "--steps", "3")
    assert rc == 0 and res["verified"], res.get("reason")
    assert {"text_encoder", "text_encoder_2", "vae_decoder"} <= set(res["components"])


@pytest.mark.slow
def test_compressed_flux_int8_bundle_generates_without_torch_and_verifies(flux: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The default recipe compresses the Flux transformer (calibrated on prompts through CLIP + T5); its int8 ONNX
    bundle generates with torch blocked and verifies against the quantization simulation (exit 0)."""
    pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")
    art, b = tmp_path / "art", tmp_path / "b8"
    rc, _ = cli_json(capsys, "--threads", "1", "compress", str(flux), "-o", str(art))
    assert rc == 0
    rc, _ = cli_json(capsys, "export", str(art), "--target", "onnx", "--precision", "int8", "-o", str(b))
    assert rc == 0
    assert json.loads((b / "edgediff_bundle.json").read_text())["components"]["transformer"]["precision"] == "int8"
    rc, res, _, err = cli_without_torch(["--threads", "1", "generate", str(b), "--prompt", PROMPT, "--steps", "3",
                                         "-o", str(tmp_path / "i8.png"), "--json"])
    assert rc == 0 and res["torch_imported"] is False and (tmp_path / "i8.png").is_file(), err[-2000:]
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(art), str(b), "--samples", "2", "--steps", "3")
    assert rc == 0 and res["verified"] and "quantization simulation" in res["reference"], res.get("reason")
    assert "psnr_vs_original_db" in res
