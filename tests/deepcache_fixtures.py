"""Shared by the DeepCache backend tests: a model with a recorded sampler and a cache schedule.

Import them in a test module: `from deepcache_fixtures import cached, micro_unet`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgediff import passes
from edgediff.model import DiffusionModel, InputSignature
from edgediff.passes import PassContext


def cached(model: DiffusionModel, sampler: str = "dpmpp-2m", steps: int = 5, interval: int = 2,
           depth: int = 0) -> DiffusionModel:
    """`model` with the sampling pass (sampler, steps) and the cache pass (depth, interval) applied."""
    run, opts = passes.get("sampling")
    m = run(model.clone(), opts(sampler=sampler, steps=steps), PassContext())
    run_c, opts_c = passes.get("cache")
    return run_c(m, opts_c(depth=depth, interval=interval, check_samples=0), PassContext())


def export_cached(model: DiffusionModel, tmp_path: Path, target: str, out_name: str,
                  capsys: Any) -> tuple[DiffusionModel, int, dict, Path]:
    """`model` with the test schedule's DeepCache written as the artifact tmp_path/art and exported by
    the CLI (`export ART --target T -o OUT --json`): (the cached model, exit code, JSON report, OUT)."""
    from edgediff.artifact import write_artifact
    from edgediff.cli import main

    m = cached(model)
    write_artifact(m, tmp_path / "art", {"source": "test"})
    out = tmp_path / out_name
    rc = main(["export", str(tmp_path / "art"), "--target", target, "-o", str(out), "--json"])
    return m, rc, json.loads(capsys.readouterr().out), out


def micro_unet(classes: int = 0) -> DiffusionModel:
    """The smallest UNet with a skip branch to cache (two blocks, 8x8): conversion is slow here."""
    from diffusers import UNet2DModel

    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=4, attention_head_dim=4, num_class_embeds=classes or None).eval()
    sig = InputSignature((1, 8, 8), num_classes=classes or None)
    return DiffusionModel(m, NoiseSchedule.from_config({}), sig, "UNet2DModel", dict(m.config), {"source": "test"})


def torch_free_run(bundle: Path, npy: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The bundle's sampler loop (3 samples, seed 0, 1 thread) in a child process where torch cannot be
    imported: (its samples, {"torch": imported?, "calls": [full, shallow]})."""
    child = ("import sys, json; sys.modules['torch'] = None\n"
             "from edgediff.runtime.generate import run_bundle\n"
             "x, st = run_bundle(sys.argv[1], samples=3, seed=0, threads=1)\n"
             "import numpy as np; np.save(sys.argv[2], x)\n"
             "print(json.dumps({'torch': st['torch_imported'], 'calls': [st['denoiser_calls_full'], "
             "st['denoiser_calls_shallow']]}))")
    proc = subprocess.run([sys.executable, "-c", child, str(bundle), str(npy)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(npy), json.loads(proc.stdout.strip().splitlines()[-1])


def close(x: np.ndarray, ref: np.ndarray) -> None:
    """A runtime's float32 samples after a whole sampler loop vs torch's: 1e-4 of the samples' scale."""
    np.testing.assert_allclose(x, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)


def check_cached_loop(bundle: Path, model: DiffusionModel, runtime: str, npy: Path, cfg: Any) -> np.ndarray:
    """The torch-free bundle loop (3 samples, seed 0, 1 thread) in `runtime` equals the PyTorch cached
    sampler under `cfg` (3 full + 2 shallow calls at 5 steps, N=2), differs from the uncached loop, and
    gives the same samples with torch blocked; returns the samples."""
    from edgediff.runtime.generate import run_bundle
    from edgediff.sampling import sample_model

    x, stats = run_bundle(bundle, samples=3, seed=0, threads=1)
    assert stats["runtime"] == runtime
    assert (stats["denoiser_calls_full"], stats["denoiser_calls_shallow"]) == (3, 2)
    close(x, sample_model(model, 3, seed=0, cfg=cfg).numpy())
    plain, st = run_bundle(bundle, samples=3, seed=0, threads=1, cache=False)
    assert st["denoiser_calls_shallow"] == 0 and np.abs(plain - x).max() > 1e-4  # the cache changes the samples
    y, child = torch_free_run(bundle, npy)
    assert child == {"torch": False, "calls": [3, 2]}
    np.testing.assert_array_equal(y, x)
    return x
