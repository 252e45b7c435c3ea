"""A class-conditional DiT pipeline (DiTPipeline) as a bundle: generated torch-free equal to diffusers' DiTPipeline
(guidance on the latent channels with the null class), class names from its id2label, verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import cli_json, tiny_dit_pipeline  # noqa: F401

from edgediff.bundle import export_bundle
from edgediff.loaders import load_model

pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")

_cli = cli_json


def test_dit_pipeline_bundle_equals_diffusers_and_verifies(tiny_dit_pipeline: Path, tmp_path: Path,  # noqa: F811
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from diffusers import DiTPipeline

    from edgediff.runtime.pipeline import run_pipeline

    m = load_model(tiny_dit_pipeline)
    assert m.signature.num_classes == 1000 and m.extras["pipeline"]["default_guidance"] == 4.0
    export_bundle(m, tmp_path / "b", steps=4)
    assert (tmp_path / "b" / "transformer" / "model.onnx").is_file() and (tmp_path / "b" / "vae_decoder").is_dir()
    _, img, st = run_pipeline(tmp_path / "b", ["kitty", "7"], samples=2, seed=3, threads=1)
    assert st["class_labels"] == [1, 7] and st["classifier_free_guidance"] and st["denoiser_calls"] == 8
    pipe = DiTPipeline.from_pretrained(str(tiny_dit_pipeline))
    pipe.set_progress_bar_config(disable=True)
    want = pipe([1, 7], guidance_scale=4.0, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                output_type="np").images
    np.testing.assert_allclose(((img + 1) / 2).transpose(0, 2, 3, 1), np.asarray(want), atol=1e-4, rtol=0)
    rc, res = _cli(capsys, "--threads", "1", "verify", str(tiny_dit_pipeline), str(tmp_path / "b"), "--samples", "2")
    assert rc == 0 and res["verified"] and set(res["components"]) == {"transformer", "vae_decoder", "vae_encoder"}
    assert res["psnr_db"] > 80 and res["guidance"] == 4.0
    rc, _ = _cli(capsys, "generate", str(tmp_path / "b"), "--prompt", "no such class", "-o", str(tmp_path / "x.png"))
    assert rc == 2
