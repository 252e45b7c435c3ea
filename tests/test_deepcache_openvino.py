"""OpenVINO bundles with DeepCache's two entry points: two IRs, the torch-free loop on OpenVINO, verify, profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from deepcache_fixtures import cached, check_cached_loop, close, export_cached
from edgediff.exporters import get_backend
from pipeline_fixtures import tiny_sd  # noqa: F401 - the fixture, used by name

from edgediff.model import DiffusionModel
from edgediff.runtime.bundle import MANIFEST, read_bundle
from edgediff.runtime.generate import run_bundle
from edgediff.sampling import SamplerConfig, sample_model

pytest.importorskip("openvino", reason="OpenVINO is an optional runtime: pip install 'edgediff[openvino]'")


def test_cached_openvino_bundle_two_irs_generate_verify_profile(tiny_unet: DiffusionModel, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from edgediff.cli import main

    m, rc, rep, out = export_cached(tiny_unet, tmp_path, "openvino", "b", capsys)
    assert rc == 0
    assert rep["bundle"] and set(rep["components"]) == {"unet", "unet_shallow"}
    man = json.loads((out / MANIFEST).read_text())
    assert man["target"] == "openvino" and man["cache"]["full_steps"] == [0, 2, 4]
    full, shallow = man["components"]["unet"], man["components"]["unet_shallow"]
    assert full["path"] == "unet/openvino_model.xml" and shallow["path"] == "unet_shallow/openvino_model.xml"
    assert (out / "unet" / "openvino_model.bin").is_file() and not list(out.rglob("*.onnx"))
    assert full["format"] == "openvino" and shallow["role"] == "denoiser_shallow"
    assert shallow["ir_nodes"] < full["ir_nodes"]  # the deep blocks are not in the shallow IR
    assert set(shallow["inputs"]) == {"sample", "timestep", "cached_feature"}

    # the torch-free loop on OpenVINO == the PyTorch cached sampler, also with torch blocked
    check_cached_loop(out, m, "openvino", tmp_path / "nt.npy", SamplerConfig("dpmpp-2m", 5))

    npy = tmp_path / "x.npy"
    assert main(["generate", str(out), "--samples", "2", "--save-npy", str(npy), "--json"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert (g["denoiser_calls_full"], g["denoiser_calls_shallow"]) == (3, 2) and g["runtime"] == "openvino"
    assert np.load(npy).shape == (2, 1, 16, 16)

    assert main(["verify", str(tmp_path / "art"), str(out), "--samples", "2", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["verified"] and v["exit_code"] == 0 and v["runtime"].startswith("openvino")
    assert (v["denoiser_calls_full"], v["denoiser_calls_shallow"]) == (3, 2) and v["reference_calls_shallow"] == 2
    assert v["psnr_db"] > 60 and v["max_abs_err"] < 1e-4

    from edgediff.pipelines.profile import profile_bundle

    prof = profile_bundle(out, warmup=1, repeats=2, threads=1)
    c = prof["components"]
    assert c["unet"]["runtime"] == c["unet_shallow"]["runtime"] == "openvino"
    assert (c["unet"]["calls_per_image"], c["unet_shallow"]["calls_per_image"]) == (3, 2)
    # each figure is rounded to 4 decimals on its own
    assert prof["per_image_ms"] == pytest.approx(c["unet"]["ms_per_image"] + c["unet_shallow"]["ms_per_image"],
                                                 abs=1e-3)


@pytest.mark.slow
def test_single_ir_of_a_cached_artifact_points_to_the_bundle(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    rep = get_backend("openvino").export(cached(tiny_unet), tmp_path / "u.xml", "fp32").to_dict()
    assert rep["cache"].startswith("not exported") and "|openvino|" in rep["cache"] and "-o DIR" in rep["cache"]


@pytest.mark.slow
def test_int8_cached_openvino_bundle_runs_fake_quantize(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.bundle import export_bundle, verify_bundle
    from edgediff.testing import minmax_quantize
    from edgediff.verify import TOLERANCES

    q = cached(minmax_quantize(tiny_unet), sampler="ddim", steps=4)
    export_bundle(q, tmp_path / "b", "openvino", "int8")
    man = read_bundle(tmp_path / "b").manifest
    assert all(man["components"][n]["fake_quantize"] > 0 for n in ("unet", "unet_shallow"))
    # both IRs' int8 kernels vs the quantization simulation, single calls and the cached sampler loop
    # (measured: the same 27.7 dB / 0.061 as the ONNX int8 bundle of this model on onnxruntime)
    v = verify_bundle(q, tmp_path / "b", TOLERANCES, samples=2)
    assert v["exit_code"] == 0 and v["runtime"].startswith("openvino") and "simulation" in v["reference"]
    assert (v["denoiser_calls_full"], v["denoiser_calls_shallow"]) == (2, 2)
    assert v["max_abs_err"] < 0.1 and v["psnr_db"] > 25


@pytest.mark.slow
def test_fp16_bundle_stores_half_weights(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.bundle import export_bundle

    m = cached(tiny_unet)
    export_bundle(m, tmp_path / "a", "openvino", "fp32")
    export_bundle(m, tmp_path / "h", "openvino", "fp16")
    for name in ("unet", "unet_shallow"):
        a = (tmp_path / "a" / name / "openvino_model.bin").stat().st_size
        assert (tmp_path / "h" / name / "openvino_model.bin").stat().st_size < 0.55 * a
    x, _ = run_bundle(tmp_path / "h", samples=2, seed=0, threads=1)
    ref = sample_model(m, 2, seed=0, cfg=SamplerConfig("dpmpp-2m", 5)).numpy()
    err = float(np.abs(x - ref).max())
    assert 0 < err < 0.05 * max(1.0, float(np.abs(ref).max()))  # weights really rounded to half, and close


def test_a_broken_ir_component_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgediff.cli import main

    b = tmp_path / "b"
    (b / "unet").mkdir(parents=True)
    (b / "scheduler").mkdir()
    (b / "unet" / "openvino_model.xml").write_text("<net>not an IR")
    (b / "unet" / "openvino_model.bin").write_bytes(b"")
    (b / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    man = {"format": "edgediff-bundle", "version": 1, "target": "openvino", "sampler": "DDIMScheduler", "steps": 2,
           "components": {"unet": {"path": "unet/openvino_model.xml", "role": "denoiser"}}, "cache": None,
           "signature": {"sample_shape": [1, 8, 8]}, "scheduler": {"path": "scheduler/scheduler_config.json"}}
    (b / MANIFEST).write_text(json.dumps(man))
    assert main(["generate", str(b), "--samples", "1", "--save-npy", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "openvino_model.xml" in err and "IR" in err


@pytest.mark.slow
def test_cross_attention_cached_openvino_bundle(tiny_cond_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.bundle import export_bundle

    m = cached(tiny_cond_unet, sampler="ddim", steps=4, interval=3)
    export_bundle(m, tmp_path / "b", "openvino", "fp32")
    assert set(read_bundle(tmp_path / "b").manifest["components"]["unet_shallow"]["inputs"]) >= {
        "encoder_hidden_states", "cached_feature"}
    x, stats = run_bundle(tmp_path / "b", samples=2, seed=0, threads=1)
    assert (stats["denoiser_calls_full"], stats["denoiser_calls_shallow"]) == (2, 2)
    with torch.inference_mode():
        ref = sample_model(m, 2, seed=0, cfg=SamplerConfig("ddim", 4)).numpy()
    close(x, ref)


@pytest.mark.slow
def test_text_to_image_pipeline_bundle_on_openvino(tiny_sd: Path, tmp_path: Path,  # noqa: F811
                                                    capsys: pytest.CaptureFixture) -> None:
    """Every ONNX graph of a pipeline bundle (text encoder, UNet, VAE) as an IR, and the prompt-driven loop on it."""
    from edgediff.cli import main

    out = tmp_path / "b"
    assert main(["export", str(tiny_sd), "--target", "openvino", "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    man = json.loads((out / MANIFEST).read_text())
    runs = {n: c for n, c in man["components"].items() if c.get("role") != "tokenizer"}
    assert {"text_encoder", "unet", "vae_decoder"} <= set(runs)
    assert all(c["path"].endswith("openvino_model.xml") for c in runs.values()) and not list(out.rglob("*.onnx"))
    assert main(["verify", str(tiny_sd), str(out), "--samples", "2", "--steps", "3", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["exit_code"] == 0 and v["runtime"] == "openvino" and v["psnr_db"] > 60
