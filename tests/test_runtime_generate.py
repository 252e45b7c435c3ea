"""Torch-free generation: a bundle runs on onnxruntime with torch blocked, and equals the PyTorch sampler."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgediff import passes
from edgediff.bundle import export_bundle
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext
from edgediff.sampling import SamplerConfig, sample_model

pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")


def _close(x: np.ndarray, ref: np.ndarray) -> None:
    # float32 runtimes vs torch: 1e-4 of the samples' scale (random test weights give large values)
    np.testing.assert_allclose(x, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)

_CHILD = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from edgediff.runtime import generate_bundle
res = generate_bundle(sys.argv[1], samples=3, seed=5, threads=1, save_npy=sys.argv[2])
res["torch_modules"] = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps(res))
"""


def test_generate_bundle_without_torch_equals_pytorch(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    run, cls = passes.get("cache")
    m = run(tiny_unet.clone(), cls(depth=0, interval=2, check_samples=0), PassContext())
    export_bundle(m, tmp_path / "b", sampler="dpmpp-2m", steps=5)
    npy = tmp_path / "x.npy"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "b"), str(npy)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["torch_imported"] is False and res["torch_modules"] == ["torch"]  # only the blocking None
    assert res["sampler"] == "dpmpp-2m" and res["steps"] == 5
    assert (res["denoiser_calls_full"], res["denoiser_calls_shallow"]) == (3, 2)
    for key in ("seconds", "ms_per_image", "component_ms", "peak_rss_mb"):
        assert key in res
    x = np.load(npy)
    ref = sample_model(m, 3, seed=5, cfg=SamplerConfig("dpmpp-2m", 5)).numpy()
    assert x.shape == (3, 1, 16, 16) and x.dtype == np.float32
    _close(x, ref)


def test_runtime_package_imports_no_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgediff.runtime, edgediff.runtime.generate, edgediff.runtime.bundle, edgediff.runtime.schedulers\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_cli_generate_bundle_equals_generate_artifact(tiny_unet: DiffusionModel, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff.artifact import write_artifact
    from edgediff.cli import main

    def cli(*args: str) -> dict:
        capsys.readouterr()
        try:
            main([*args, "--json"])
        except SystemExit as e:
            assert not e.code, capsys.readouterr().err[-2000:]
        out = capsys.readouterr().out
        return json.loads(out)

    run_s, cls_s = passes.get("sampling")
    run_c, cls_c = passes.get("cache")
    m = run_c(run_s(tiny_unet.clone(), cls_s(sampler="dpmpp-2m", steps=4), PassContext()),
              cls_c(interval=2, check_samples=0), PassContext())
    write_artifact(m, tmp_path / "art", {"recipe": {"name": "t"}})
    assert cli("export", str(tmp_path / "art"), "--target", "onnx", "-o", str(tmp_path / "b"))["bundle"]
    outs = {}
    for name, src in (("art", tmp_path / "art"), ("bundle", tmp_path / "b")):
        rep = cli("generate", str(src), "--samples", "3", "--seed", "1", "--save-npy", str(tmp_path / f"{name}.npy"))
        # both default to the artifact's recorded sampler, steps and cache schedule
        assert rep["steps"] == 4 and rep["denoiser_calls_full"] == 2 and rep["denoiser_calls_shallow"] == 2
        outs[name] = np.load(tmp_path / f"{name}.npy")
    _close(outs["bundle"], outs["art"])
