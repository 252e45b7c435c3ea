"""`generate` and `verify` default to the sampler, steps and cache schedule the artifact records."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgediff.exporters import get_backend

from edgediff import passes
from edgediff.generate import generate
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext
from edgediff.sampling import recorded_sampling
from edgediff.verify import verify


def _sampled(model: DiffusionModel, sampler: str = "dpmpp-2m", steps: int = 3, cache: int = 0) -> DiffusionModel:
    run, opts = passes.get("sampling")
    m = run(model.clone(), opts(sampler=sampler, steps=steps), PassContext())
    if cache:
        run_c, opts_c = passes.get("cache")
        m = run_c(m, opts_c(depth=0, interval=cache, check_samples=0), PassContext())
    return m


def test_recorded_sampling_fills_only_what_is_unset(tiny_unet: DiffusionModel) -> None:
    m = _sampled(tiny_unet, "unipc", 7)
    assert recorded_sampling(m) == ("unipc", 7, 0.0)
    assert recorded_sampling(m, steps=4) == ("unipc", 4, 0.0)
    # another sampler keeps its own default step count (None), not the recorded one
    assert recorded_sampling(m, "euler") == ("euler", None, None)
    assert recorded_sampling(tiny_unet) == (None, None, None)


def test_generate_defaults_to_the_recorded_schedule_and_cache(tiny_unet: DiffusionModel) -> None:
    m = _sampled(tiny_unet, "dpmpp-2m", 4, cache=2)
    r = generate(m, samples=2)
    assert r["steps"] == 4 and r["sampler"].startswith("dpmpp-2m")
    assert (r["denoiser_calls_full"], r["denoiser_calls_shallow"]) == (2, 2)
    r = generate(m, samples=2, steps=6)  # the recorded sampler, with the steps asked for
    assert r["steps"] == 6 and r["sampler"].startswith("dpmpp-2m")
    assert generate(tiny_unet, samples=1, steps=2)["sampler"] == tiny_unet.schedule.class_name


def test_verify_defaults_to_the_recorded_schedule(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    m = _sampled(tiny_unet, "euler", 3)
    out = tmp_path / "u.onnx"
    get_backend("onnx").export(m, out, "fp32")
    r = verify(m, out, samples=2)
    assert r["steps"] == 3 and r["sampler"].startswith("euler") and r["exit_code"] == 0
    assert verify(tiny_unet, out, samples=1)["steps"] == 20  # no record: the old default


@pytest.mark.slow
def test_verify_of_a_cached_bundle_uses_its_manifest(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.bundle import export_bundle

    m = _sampled(tiny_unet, "dpmpp-2m", 4, cache=2)
    export_bundle(m, tmp_path / "b", "onnx", "fp32")
    r = verify(m, tmp_path / "b", samples=2)
    assert r["steps"] == 4 and r["exit_code"] == 0
    assert r["cache"]["interval"] == 2


def test_cached_artifact_exports_say_what_holds_the_cache(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.cli import main

    m = _sampled(tiny_unet, "ddim", 3, cache=2)
    rep = get_backend("onnx").export(m, tmp_path / "u.onnx", "fp32").to_dict()
    assert "not exported" in rep["cache"] and "-o DIR" in rep["cache"]  # a single file: no silent drop
    assert "cache" not in get_backend("onnx").export(tiny_unet, tmp_path / "v.onnx", "fp32").to_dict()
    # the bundles (-o DIR) that carry both entry points have their own tests (test_bundle.py,
    # test_deepcache_tflite.py, test_deepcache_openvino.py, test_deepcache_tensorrt.py); through the CLI
    # the single-file export of a cached artifact still works and says so
    from edgediff.artifact import write_artifact

    write_artifact(m, tmp_path / "art", {"source": "test"})
    assert main(["export", str(tmp_path / "art"), "--target", "onnx", "-o", str(tmp_path / "u2.onnx")]) == 0


def test_clip_x0_reaches_every_sampler_and_the_bundle_runtime(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    import numpy as np

    from edgediff.artifact import write_artifact
    from edgediff.bundle import export_bundle
    from edgediff.runtime.generate import run_bundle
    from edgediff.sampling import SamplerConfig, make_scheduler, sample_model

    run, opts = passes.get("sampling")
    m = run(tiny_unet.clone(), opts(sampler="dpmpp-2m", steps=4, clip_x0=True), PassContext())
    assert m.extras["sampling"]["clip_x0"] is True
    for s in ("dpmpp-2m", "unipc", "ddim"):
        cfg = make_scheduler(m.schedule, s, 4).config
        assert cfg.thresholding and cfg.sample_max_value == 1.0, s
    assert not make_scheduler(tiny_unet.schedule, "dpmpp-2m", 4).config.thresholding
    x = sample_model(m, 2, 0, SamplerConfig("dpmpp-2m", 4))
    plain = sample_model(tiny_unet, 2, 0, SamplerConfig("dpmpp-2m", 4))
    assert (x - plain).abs().max() > 1e-3  # the clip acts on this model
    write_artifact(m, tmp_path / "art", {"source": "test"})  # the schedule travels with the artifact
    from edgediff.artifact import load_artifact

    assert make_scheduler(load_artifact(tmp_path / "art").schedule, "dpmpp-2m", 4).config.thresholding
    export_bundle(m, tmp_path / "b", "onnx", "fp32")
    xb, _ = run_bundle(tmp_path / "b", samples=2, seed=0, threads=1)
    np.testing.assert_allclose(xb, x.numpy(), atol=1e-4)
    with pytest.raises(Exception, match="clip_x0"):
        opts(clip_x0="yes")
