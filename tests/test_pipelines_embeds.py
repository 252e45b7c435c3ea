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
