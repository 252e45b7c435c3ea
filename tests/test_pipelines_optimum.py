"""optimum's ORTStableDiffusionPipeline (and ORTStableDiffusionXLPipeline) loads an edgediff ONNX bundle unchanged
and generates what edgediff's torch-free runtime generates (same prompt, seed, steps, guidance, the bundle's
scheduler).

optimum-onnx (<= 0.1.0) pins transformers < 4.58, which cannot sit beside this project's transformers; the
test runs optimum in-process when it imports, or in another interpreter named by EDGEDIFF_OPTIMUM_PYTHON
(a venv with optimum[onnxruntime]), and skips with that reason otherwise. The bundle includes compressed
components (int8 text encoder and VAE decoder), which optimum runs as plain ONNX graphs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pipeline_fixtures import cli_json, tiny_sd  # noqa: F401

pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")

# run by the interpreter that has optimum: load the bundle, generate one image, save it (NHWC in [0, 1])
SCRIPT = r"""
import importlib.util as u, sys
find = u.find_spec
# torchao beside an older diffusers breaks diffusers' import (diffusers' quantizers); optimum needs none of it
u.find_spec = lambda n, *a, **k: None if n.split(".")[0] == "torchao" else find(n, *a, **k)
import numpy as np, torch
import optimum.onnxruntime as ort_pipes
pipe = getattr(ort_pipes, sys.argv[7]).from_pretrained(sys.argv[1])
out = pipe(sys.argv[3], num_inference_steps=int(sys.argv[4]), guidance_scale=float(sys.argv[5]), output_type="np",
           generator=torch.Generator().manual_seed(int(sys.argv[6])))
np.save(sys.argv[2], np.asarray(out.images, dtype=np.float32))
"""


def _optimum_python() -> str | None:
    import importlib.util

    if importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.onnxruntime") is not None:
        return sys.executable
    return os.environ.get("EDGEDIFF_OPTIMUM_PYTHON") or None


@pytest.mark.skipif(_optimum_python() is None, reason=(
    "optimum.onnxruntime is not importable: optimum-onnx (0.1.0, its latest release) requires transformers<4.58 "
    "and constraints.txt pins 5.23.0; set EDGEDIFF_OPTIMUM_PYTHON to the python of a separate venv with "
    "optimum-onnx[onnxruntime] and diffusers (docs/pipelines.md)"))
def test_optimum_ort_pipeline_loads_the_bundle_and_generates_the_same(tiny_sd: Path, tmp_path: Path,  # noqa: F811
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "calib"\ncomponent = "text_encoder"\nn_samples = 4\n[[pass]]\nname = "quant"\n'
                      'component = "text_encoder"\n[[pass]]\nname = "calib"\ncomponent = "vae_decoder"\nn_samples = 2\n'
                      'steps = 3\n[[pass]]\nname = "quant"\ncomponent = "vae_decoder"\n')
    rc, _ = cli_json(capsys, "--threads", "1", "compress", str(tiny_sd), "--recipe", str(recipe), "-o",
                     str(tmp_path / "art"))
    assert rc == 0
    bundle = tmp_path / "b"
    rc, _ = cli_json(capsys, "--threads", "1", "export", str(tmp_path / "art"), "--target", "onnx", "-o", str(bundle))
    assert rc == 0
    _same_images(bundle, "ORTStableDiffusionPipeline", tmp_path)


@pytest.mark.skipif(_optimum_python() is None, reason=(
    "optimum.onnxruntime is not importable: optimum-onnx (0.1.0, its latest release) requires transformers<4.58 "
    "and constraints.txt pins 5.23.0; set EDGEDIFF_OPTIMUM_PYTHON to the python of a separate venv with "
    "optimum-onnx[onnxruntime] and diffusers (docs/pipelines.md)"))
def test_optimum_sdxl_pipeline_loads_the_sdxl_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline_fixtures import build_tiny_sdxl

    folder = build_tiny_sdxl(tmp_path / "sdxl")
    rc, _ = cli_json(capsys, "--threads", "1", "export", str(folder), "--target", "onnx", "-o", str(tmp_path / "b"))
    assert rc == 0
    _same_images(tmp_path / "b", "ORTStableDiffusionXLPipeline", tmp_path)


def _same_images(bundle: Path, cls: str, tmp_path: Path) -> None:
    """optimum's `cls` on the bundle generates what edgediff's torch-free runtime generates."""
    py = _optimum_python()
    assert py is not None
    prompt, steps, guidance, seed = "a red cat", 4, 7.5, 0
    out = tmp_path / "optimum.npy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([py, "-c", SCRIPT, str(bundle), str(out), prompt, str(steps), str(guidance), str(seed), cls],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    from edgediff.runtime.pipeline import run_pipeline

    _, img, _ = run_pipeline(bundle, prompt, samples=1, seed=seed, steps=steps, guidance=guidance)
    assert img is not None
    ours = np.clip(img / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    theirs = np.load(out)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
