"""Bundles: optimum's layout and I/O names, the manifest, DeepCache's two graphs, CLI dispatch, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgediff import passes
from edgediff.bundle import export_bundle
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext
from edgediff.runtime.bundle import MANIFEST, read_bundle
from edgediff.runtime.generate import run_bundle
from edgediff.sampling import SamplerConfig, sample_model

pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")


def _close(x: np.ndarray, ref: np.ndarray) -> None:
    # float32 runtimes vs torch: 1e-4 of the samples' scale (random test weights give large values)
    np.testing.assert_allclose(x, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)


def _with(model: DiffusionModel, name: str, **opts) -> DiffusionModel:
    run, cls = passes.get(name)
    return run(model.clone(), cls(**opts), PassContext())


def test_denoiser_bundle_layout_and_manifest(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    import onnx

    m = _with(tiny_unet, "sampling", sampler="dpmpp-2m", steps=6)
    rep = export_bundle(m, tmp_path / "b")
    b = tmp_path / "b"
    for f in ("model_index.json", "unet/model.onnx", "scheduler/scheduler_config.json", MANIFEST):
        assert (b / f).is_file(), f
    g = onnx.load(str(b / "unet" / "model.onnx")).graph
    assert [i.name for i in g.input] == ["sample", "timestep"] and [o.name for o in g.output] == ["out_sample"]
    man = json.loads((b / MANIFEST).read_text())
    assert man["sampler"] == "dpmpp-2m" and man["steps"] == 6 and man["cache"] is None
    assert man["components"]["unet"]["precision"] == "fp32" and man["components"]["unet"]["role"] == "denoiser"
    assert man["signature"]["sample_shape"] == [1, 16, 16]
    sched = json.loads((b / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DPMSolverMultistepScheduler" and sched["algorithm_type"] == "dpmsolver++"
    assert rep["bundle"] and rep["size_bytes"] > 0
    with pytest.raises(BadInput, match="already exists"):
        export_bundle(m, b)


def test_bundle_generates_what_pytorch_generates(tiny_cond_unet: DiffusionModel, tmp_path: Path) -> None:
    m = _with(tiny_cond_unet, "sampling", sampler="euler", steps=5)
    export_bundle(m, tmp_path / "b")
    x, stats = run_bundle(tmp_path / "b", samples=3, seed=2, batch_size=2, threads=1)
    ref = sample_model(m, 3, seed=2, cfg=SamplerConfig("euler", 5)).numpy()
    _close(x, ref)
    assert stats["sampler"] == "euler" and stats["steps"] == 5 and stats["denoiser_calls"] == 5
    assert set(stats["component_ms"]) >= {"denoiser", "scheduler"} and stats["ms_per_image"] > 0
    # another sampler on the same bundle runs what PyTorch runs for it
    y, _ = run_bundle(tmp_path / "b", samples=3, seed=2, sampler="ddim", steps=4, threads=1)
    _close(y, sample_model(m, 3, seed=2, cfg=SamplerConfig("ddim", 4)).numpy())


def test_cached_bundle_has_two_graphs_and_matches_the_cached_sampler(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    import onnx

    m = _with(_with(tiny_unet, "sampling", sampler="dpmpp-2m", steps=7), "cache", depth=0, interval=3,
              check_samples=0)
    export_bundle(m, tmp_path / "b")
    full = onnx.load(str(tmp_path / "b" / "unet" / "model.onnx")).graph
    shallow = onnx.load(str(tmp_path / "b" / "unet_shallow" / "model.onnx")).graph
    assert [o.name for o in full.output] == ["out_sample", "cached_feature"]
    assert [i.name for i in shallow.input] == ["sample", "timestep", "cached_feature"]
    assert len(shallow.node) < len(full.node)  # the deep part is not in the shallow graph
    man = read_bundle(tmp_path / "b").manifest
    assert man["cache"]["full_steps"] == [0, 3, 6]
    x, stats = run_bundle(tmp_path / "b", samples=3, seed=0, batch_size=2, threads=1)
    assert (stats["denoiser_calls_full"], stats["denoiser_calls_shallow"]) == (3, 4)
    ref = sample_model(m, 3, seed=0, cfg=SamplerConfig("dpmpp-2m", 7)).numpy()
    _close(x, ref)
    plain, _ = run_bundle(tmp_path / "b", samples=3, seed=0, threads=1, cache=False)
    assert np.abs(plain - x).max() > 1e-4


def test_int8_cached_bundle(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.testing import minmax_quantize

    q = _with(minmax_quantize(tiny_unet), "cache", depth=0, interval=2, check_samples=0)
    rep = export_bundle(q, tmp_path / "b", precision="int8", steps=4)
    assert set(rep["components"]) == {"unet", "unet_shallow"}
    x, stats = run_bundle(tmp_path / "b", samples=2, seed=0, threads=1)
    ref = sample_model(q, 2, seed=0, cfg=SamplerConfig(None, 4)).numpy()
    assert stats["denoiser_calls_shallow"] == 2
    # int8 kernels vs the fake-quant simulation: close, not bit-equal
    assert float(np.abs(x - ref).max()) < 0.25


def test_cli_export_dir_writes_a_bundle(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgediff.artifact import write_artifact
    from edgediff.cli import app

    write_artifact(tiny_unet, tmp_path / "art", {"recipe": {"name": "t"}})
    res = CliRunner().invoke(app, ["export", str(tmp_path / "art"), "--target", "onnx", "-o", str(tmp_path / "b"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert read_bundle(tmp_path / "b").component("denoiser") is not None


def test_bad_bundles_are_bad_input(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="not a bundle"):
        read_bundle(tmp_path)
    export_bundle(tiny_unet, tmp_path / "b", steps=3)
    mf = tmp_path / "b" / MANIFEST
    man = json.loads(mf.read_text())
    man["components"]["unet"]["path"] = "../../etc/passwd"
    mf.write_text(json.dumps(man))
    with pytest.raises(BadInput, match="outside the bundle"):
        read_bundle(tmp_path / "b")
    mf.write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        read_bundle(tmp_path / "b")
    mf.write_text(json.dumps({"format": "edgediff-bundle", "version": 1}))
    with pytest.raises(BadInput, match="missing key"):
        read_bundle(tmp_path / "b")
    assert torch.__version__  # the PyTorch side stays importable alongside


def test_verify_covers_the_cached_schedule(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.verify import verify

    m = _with(tiny_unet, "cache", depth=0, interval=2, check_samples=0)
    export_bundle(m, tmp_path / "b", sampler="dpmpp-2m", steps=5)
    res = verify(m, tmp_path / "b", steps=5, samples=2)
    assert res["verified"] and res["exit_code"] == 0, res
    assert res["denoiser_calls_shallow"] == res["reference_calls_shallow"] == 2
    assert res["psnr_db"] > 60 and res["max_abs_err"] < 1e-3
    # a reference that differs (weights perturbed) is caught
    other = m.clone()
    with torch.no_grad():
        for p in other.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bad = verify(other, tmp_path / "b", steps=5, samples=2)
    assert bad["verified"] and bad["exit_code"] == 4 and "out of tolerance" in bad["reason"]


def test_profile_of_a_cached_bundle_counts_full_and_shallow_calls(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.pipelines.profile import profile_bundle

    m = _with(_with(tiny_unet, "sampling", sampler="dpmpp-2m", steps=5), "cache", depth=0, interval=2,
              check_samples=0)
    export_bundle(m, tmp_path / "b")
    r = profile_bundle(tmp_path / "b", warmup=1, repeats=2, threads=1)
    assert r["calls_per_image"] == {"unet": 3, "unet_shallow": 2}  # full on steps 0, 2, 4
    full, shallow = r["components"]["unet"], r["components"]["unet_shallow"]
    assert 0 < shallow["total_ms"] and shallow["calls_per_image"] == 2
    assert r["per_image_ms"] == pytest.approx(full["ms_per_image"] + shallow["ms_per_image"], rel=1e-3)
