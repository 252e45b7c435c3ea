"""OpenCL bundles with DeepCache: full and shallow schedules over one weights file, driven per sampler step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepcache_fixtures import cached
from edgediff.exporters import get_backend

from edgediff.deepcache import FullEntry, ShallowEntry
from edgediff.model import DiffusionModel
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample_model

pytest.importorskip("pyopencl")
from edgediff.kernels import runtime as clrt  # noqa: E402
from edgediff.kernels.deepcache import CachedOpenCLDenoiser, feature_buffer, shallow_ops  # noqa: E402

needs_cl = pytest.mark.skipif(not clrt.opencl_available()[0], reason="no OpenCL device")


def test_shallow_schedule_is_the_outer_branch(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    m = cached(tiny_unet)
    rep = get_backend("opencl").export(m, tmp_path / "b", "fp32").to_dict()
    meta = json.loads((tmp_path / "b" / "opencl_bundle.json").read_text())
    full, shallow = meta["schedule"]["ops"], meta["schedule_shallow"]["ops"]
    assert rep["cache"]["ops_shallow"] == len(shallow) < len(full) == rep["cache"]["ops_full"]
    assert "not exported" not in str(rep.get("cache"))  # the bundle holds both entry points: no drop note
    names = {op["name"].split(".")[0] + "." + op["name"].split(".")[1] for op in shallow if "blocks." in op["name"]}
    assert names == {"down_blocks.0", "up_blocks.1"}  # depth 0: the outermost block pair only
    assert not any(op["name"].startswith("mid_block") for op in shallow)
    feat = meta["cache"]["feature"]
    info = get_backend("opencl").info(tmp_path / "b")  # `edgediff info BUNDLE`
    assert info["cache"]["interval"] == 2 and info["sampling"] == {"sampler": "dpmpp-2m", "steps": 5, "eta": 0.0}
    assert any(feat in op["in"] for op in shallow) and not any(op["out"] == feat for op in shallow)
    # dead-code elimination keeps order and stops at the given buffer
    ops = [{"name": "a", "in": ["x"], "out": "f"}, {"name": "b", "in": ["f"], "out": "dead"},
           {"name": "c", "in": ["x", "f"], "out": "out"}]
    assert [o["name"] for o in shallow_ops(ops, "f")] == ["c"]
    with pytest.raises(Exception, match="no feature"):
        feature_buffer(ops, 2, 0)


@needs_cl
def test_cached_opencl_bundle_matches_the_cached_pytorch_sampler(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.verify import verify

    m = cached(tiny_unet)
    get_backend("opencl").export(m, tmp_path / "b", "fp32")
    den = get_backend("opencl").load_denoiser(tmp_path / "b")
    assert isinstance(den, CachedOpenCLDenoiser)
    # single calls: full (+ its feature) and shallow fed that feature, against PyTorch's entry points
    x = torch.randn(2, *m.signature.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 500.0])
    mod = m.module().eval()
    with torch.inference_mode():
        want, feat = FullEntry(mod, 0)(x, t)
        want_s = ShallowEntry(mod, 0)(x * 0.5, t, feature=feat)
    got, dev_feat = den.full_call(x, t)
    got_s = den.shallow_call(x * 0.5, t, dev_feat)
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) < 1e-4 * scale and float((got_s - want_s).abs().max()) < 1e-4 * scale
    assert float((got_s - want).abs().max()) > 1e-3  # the shallow call really differs on another input

    # the sampler loop with the schedule: full on steps 0, 2, 4
    stats: dict = {}
    x_cl = sample_model(m, 3, seed=0, cfg=SamplerConfig("dpmpp-2m", 5), denoiser=den, stats=stats)
    assert (stats["denoiser_calls_full"], stats["denoiser_calls_shallow"]) == (3, 2)
    x_pt = sample_model(m, 3, seed=0, cfg=SamplerConfig("dpmpp-2m", 5), denoiser=TorchDenoiser(m))
    assert float((x_cl - x_pt).abs().max()) < 1e-3 * max(1.0, float(x_pt.abs().max()))

    r = verify(m, tmp_path / "b", samples=2)
    assert r["verified"] and r["exit_code"] == 0 and r["cache"]["interval"] == 2
    assert (r["denoiser_calls_full"], r["denoiser_calls_shallow"], r["reference_calls_shallow"]) == (3, 2, 2)


@needs_cl
def test_generate_and_profile_an_opencl_cached_bundle(tiny_unet: DiffusionModel, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    import numpy as np
    from edgediff.kernels.export import profile

    from edgediff.cli import main

    m = cached(tiny_unet, steps=4, interval=3)
    get_backend("opencl").export(m, tmp_path / "b", "fp32")
    npy = tmp_path / "x.npy"
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "b"), "--samples", "2", "--save-npy", str(npy), "--json"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert g["runtime"] == "opencl" and g["steps"] == 4 and g["sampler"].startswith("dpmpp-2m")
    assert (g["denoiser_calls_full"], g["denoiser_calls_shallow"]) == (2, 2) and g["ms_per_image"] > 0
    # the recorded sampling and cache, as the PyTorch generate of the artifact runs them
    want = sample_model(m, 2, seed=0, cfg=SamplerConfig("dpmpp-2m", 4), denoiser=TorchDenoiser(m)).numpy()
    np.testing.assert_allclose(np.load(npy), want, atol=1e-3 * max(1.0, float(np.abs(want).max())), rtol=0)
    prof = profile(tmp_path / "b", warmup=1, repeats=2)
    c = prof["cache"]
    assert 0 < c["shallow_total_ms"] and c["shallow_layers"] and (c["calls_full"], c["calls_shallow"]) == (2, 2)
    assert c["ms_per_image"] == pytest.approx(2 * prof["total_ms"] + 2 * c["shallow_total_ms"])


def test_every_target_holds_both_entry_points_or_says_why(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.exporters import TARGETS
    from edgediff.exporters.base import DEEPCACHE_MISSING

    # tests/test_bundle.py, test_deepcache_tflite/openvino/tensorrt/coreml/fpga.py, this file
    both = {"onnx", "tflite", "openvino", "tensorrt", "coreml", "opencl", "fpga"}
    assert set(DEEPCACHE_MISSING) == set(TARGETS) - both
    assert all(DEEPCACHE_MISSING.values())
    # a single ONNX file of a cached artifact: the note, never a silent drop
    rep = get_backend("onnx").export(cached(tiny_unet), tmp_path / "u.onnx", "fp32").to_dict()
    assert rep["cache"].startswith("not exported") and "-o DIR" in rep["cache"]


@needs_cl
@pytest.mark.slow
def test_int8_cached_opencl_bundle(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.testing import minmax_quantize
    from edgediff.verify import TOLERANCES, verify

    # DDIM: int8 of random test weights under DPM-Solver++ drifts apart with or without the cache
    q = cached(minmax_quantize(tiny_unet), steps=4, sampler="ddim")
    get_backend("opencl").export(q, tmp_path / "b", "int8")
    meta = json.loads((tmp_path / "b" / "opencl_bundle.json").read_text())
    assert meta["cache"]["ops_shallow"] < meta["cache"]["ops_full"]
    assert any(op["op"] == "iconv" for op in meta["schedule_shallow"]["ops"])  # the shallow layers stay integer
    r = verify(q, tmp_path / "b", samples=2)
    assert r["verified"] and r["precision"] == "int8" and r["tolerance"] == TOLERANCES["int8"]
    assert r["exit_code"] == 0 and (r["denoiser_calls_full"], r["denoiser_calls_shallow"]) == (2, 2)


@needs_cl
@pytest.mark.slow
def test_cross_attention_cached_opencl_bundle(tiny_cond_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.verify import verify

    m = cached(tiny_cond_unet, steps=4, sampler="ddim")
    get_backend("opencl").export(m, tmp_path / "b", "fp32")
    r = verify(m, tmp_path / "b", samples=2)  # encoder_hidden_states reach both schedules
    assert r["exit_code"] == 0 and r["psnr_db"] > 60 and (r["denoiser_calls_full"], r["denoiser_calls_shallow"]) == (2, 2)
