"""Compressing and verifying a pipeline: calibration on prompts encoded by the pipeline's own text encoder with
classifier-free guidance; verify of a pipeline bundle per component and on final images, with its exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import cli_json, tiny_sd  # noqa: F401

from edgediff.bundle import export_bundle
from edgediff.loaders import load_model

pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")

_cli = cli_json


def test_calibration_conditioning_is_encoded_prompts_with_guidance(tiny_sd: Path, tmp_path: Path) -> None:  # noqa: F811
    from edgediff.passes.calib import CalibOptions, generate
    from edgediff.pipelines import PROMPTS, pipeline_of, use_prompts
    from edgediff.pipelines.encode import encode_prompts

    m = load_model(tiny_sd)
    pipe = pipeline_of(m)
    data = generate(m, CalibOptions(method="ptq4dm", n_samples=3, steps=4, count=10))
    assert data["x"].shape[0] == 20 and data["cond"].shape == (20, 16, 32)  # each point with and without its prompt
    want = encode_prompts(pipe, list(PROMPTS[:3]) + [""])
    torch.testing.assert_close(data["traj_cond"], want[:3])  # the trajectories' conditioning: the prompts
    rows = {tuple(r.flatten()[:8].tolist()) for r in data["cond"]}
    assert tuple(want[3].flatten()[:8].tolist()) in rows  # the empty prompt's states are calibration points too
    # the trajectories are guided: they differ from the unguided sampler's on the same prompts
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    plain = sample(TorchDenoiser(m), m.schedule, m.signature.sample_shape, 3, seed=0, cfg=SamplerConfig(None, 4),
                   cond=want[:3])
    assert not torch.allclose(data["traj_x"][-1], plain, atol=1e-3)
    # --prompts FILE replaces the built-in list
    f = tmp_path / "p.txt"
    f.write_text("# mine\nthe red dog\n\nat the cat\n")
    use_prompts(m, f)
    data2 = generate(m, CalibOptions(method="ptq4dm", n_samples=2, steps=4, count=4))
    torch.testing.assert_close(data2["traj_cond"], encode_prompts(pipe, ["the red dog", "at the cat"]))


def test_verify_pipeline_bundle_per_component_and_images(tiny_sd: Path, tmp_path: Path,  # noqa: F811
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    export_bundle(load_model(tiny_sd), tmp_path / "b", steps=4)
    rc, res = _cli(capsys, "--threads", "1", "verify", str(tiny_sd), str(tmp_path / "b"), "--samples", "2")
    assert rc == 0 and res["verified"] and res["exit_code"] == 0, res.get("reason")
    assert set(res["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert all(c["psnr_db"] > 80 for c in res["components"].values())
    assert res["psnr_images_db"] > 80 and res["guidance"] == 7.5 and res["denoiser_calls"] == 10  # PLMS: 5 timesteps, x2
    # a pipeline whose VAE differs from the bundle's: the VAE components fail, exit 4
    other = tmp_path / "other"
    shutil.copytree(tiny_sd, other)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(other / "vae"))
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    vae.save_pretrained(str(other / "vae"))
    rc, bad = _cli(capsys, "--threads", "1", "verify", str(other), str(tmp_path / "b"), "--samples", "2")
    assert rc == 4 and bad["exit_code"] == 4 and "vae_decoder" in bad["reason"]
    assert bad["components"]["text_encoder"]["psnr_db"] > 80  # the other components still match


def test_int8_pipeline_end_to_end(tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "t"\n[[pass]]\nname = "calib"\nmethod = "ptq4dm"\nn_samples = 4\nsteps = 6\ncount = 32\n'
                      '[[pass]]\nname = "quant"\nweight_init = "minmax"\nact_init = "minmax"\n')
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe dog\n")
    src = tmp_path / "sd"
    shutil.copytree(tiny_sd, src)
    rc, _ = _cli(capsys, "--threads", "1", "compress", str(src), "--recipe", str(recipe), "--prompts", str(prompts),
                 "-o", str(tmp_path / "art"))
    assert rc == 0
    for rel in ("model_index.json", "text_encoder/config.json", "tokenizer/tokenizer.json", "vae/config.json"):
        assert (tmp_path / "art" / "pipeline" / rel).is_file(), rel  # the artifact carries the other components
    calib = json.loads((tmp_path / "art" / "extras" / "calib.json").read_text())
    assert calib["count"] == 64  # 32 points, each with and without its prompt
    rc, rep = _cli(capsys, "--threads", "1", "export", str(tmp_path / "art"), "--target", "onnx", "--precision", "int8",
                   "-o", str(tmp_path / "b8"))
    assert rc == 0 and rep["kind"] == "pipeline"
    mf = json.loads((tmp_path / "b8" / "edgediff_bundle.json").read_text())
    assert mf["components"]["unet"]["precision"] == "int8" and mf["components"]["text_encoder"]["precision"] == "fp32"
    rc, res = _cli(capsys, "--threads", "1", "verify", str(tmp_path / "art"), str(tmp_path / "b8"), "--samples", "2",
                   "--steps", "4")
    assert rc == 0 and res["verified"] and "quantization simulation" in res["reference"], res.get("reason")
    assert res["prompts"] == ["a red cat", "the dog"]  # the artifact keeps the prompts it was calibrated on
    assert res["psnr_db"] >= 25.0 and "psnr_vs_original_db" in res
    shutil.rmtree(src)  # the artifact stands alone: it still exports as a whole pipeline
    rc, rep = _cli(capsys, "export", str(tmp_path / "art"), "--target", "onnx", "-o", str(tmp_path / "b32"))
    assert rc == 0 and {"text_encoder", "vae_decoder", "tokenizer"} <= set(rep["components"])


def test_single_file_verify_of_a_pipeline_uses_its_prompts_with_guidance(tiny_sd: Path, tmp_path: Path,  # noqa: F811
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff import quality
    from edgediff.pipelines import PROMPTS, pipeline_of
    from edgediff.pipelines.encode import encode_prompts, pipeline_latents

    m = load_model(tiny_sd)
    pipe = pipeline_of(m)
    assert pipe is not None
    torch.testing.assert_close(quality.conditioning(m, 3, 0), encode_prompts(pipe, list(PROMPTS[:3])))
    # verify's (and the stored original samples') sampling is the pipeline's: prompts, guidance 7.5
    want = pipeline_latents(pipe, m, list(PROMPTS[:2]), 0, None, 4, 7.5)
    torch.testing.assert_close(quality.final_samples(m, 2, 4), want)
    rc, _ = _cli(capsys, "--threads", "1", "export", str(tiny_sd), "--target", "onnx", "-o", str(tmp_path / "u.onnx"))
    assert rc == 0
    rc, res = _cli(capsys, "--threads", "1", "verify", str(tiny_sd), str(tmp_path / "u.onnx"), "--samples", "2",
                   "--steps", "4")
    assert rc == 0 and res["verified"] and res["psnr_db"] > 60, res.get("reason")
    assert res["conditioning"] == "prompts+guidance"  # verify's own sampling, not only the stored samples'
