"""An SD3 pipeline without its text encoders: bundled with its VAE, generated torch-free from precomputed prompt
embeddings (with negatives: classifier-free guidance), equal to edgediff's PyTorch generate of the folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import build_tiny_sd3

pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")

_CHILD = """
import json, sys
sys.modules["torch"] = None
from edgediff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sd3_bundle_from_prompt_embeds_without_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff.cli import main

    folder = build_tiny_sd3(tmp_path / "sd3")
    capsys.readouterr()
    assert main(["export", str(folder), "--cond-shape", "8,24", "--target", "onnx", "-o", str(tmp_path / "b"),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kind"] == "pipeline" and set(rep["components"]) == {"transformer", "vae_decoder", "vae_encoder"}
    g = torch.Generator().manual_seed(0)
    emb = tmp_path / "emb.npz"
    np.savez(emb, encoder_hidden_states=torch.randn(8, 24, generator=g).numpy(),
             pooled_projections=torch.randn(12, generator=g).numpy(),
             negative_encoder_hidden_states=torch.randn(8, 24, generator=g).numpy(),
             negative_pooled_projections=torch.randn(12, generator=g).numpy())
    args = ["--prompt-embeds", str(emb), "--guidance", "5", "--samples", "2", "--seed", "4", "--steps", "4"]
    proc = subprocess.run([sys.executable, "-c", _CHILD, "--threads", "1", "generate", str(tmp_path / "b"), *args,
                           "--save-npy", str(tmp_path / "b.npy"), "-o", str(tmp_path / "b.png"), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert res["torch_imported"] is False and res["conditioning"] == "prompt_embeds" and res["denoiser_calls"] == 8
    assert main(["generate", str(folder), "--cond-shape", "8,24", *args, "--save-npy", str(tmp_path / "t.npy")]) == 0
    want = np.load(tmp_path / "t.npy")
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), want, atol=1e-4 * max(1.0, float(np.abs(want).max())),
                               rtol=0)
    np.savez(tmp_path / "bad.npz", encoder_hidden_states=np.zeros((3, 8, 24), np.float32))
    assert main(["generate", str(tmp_path / "b"), "--prompt-embeds", str(tmp_path / "bad.npz"),
                 "--save-npy", str(tmp_path / "x.npy")]) == 2


def test_verify_an_embeddings_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle without text encoders verifies with the same precomputed embeddings on both sides; a changed
    transformer is exit 4."""
    from edgediff.cli import main

    folder = build_tiny_sd3(tmp_path / "sd3")
    assert main(["export", str(folder), "--cond-shape", "8,24", "--target", "onnx", "-o", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    args = ["--threads", "1", "verify", str(folder), str(tmp_path / "b"), "--cond-shape", "8,24", "--samples", "2",
            "--steps", "3", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["verified"] and res["conditioning"].startswith("prompt embeddings") and res["psnr_images_db"] > 80
    assert set(res["components"]) == {"transformer", "vae_decoder", "vae_encoder"} and res["denoiser_calls"] == 6
    from diffusers import SD3Transformer2DModel

    tr = SD3Transformer2DModel.from_pretrained(str(folder / "transformer"))
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tr.save_pretrained(str(folder / "transformer"))
    assert main(args) == 4
    res = json.loads(capsys.readouterr().out)
    assert res["exit_code"] == 4 and res["components"]["transformer"]["max_abs_err"] > 1e-3
