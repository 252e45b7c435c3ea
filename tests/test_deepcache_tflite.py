"""TFLite bundles with DeepCache's two entry points: export -o DIR, torch-free generate on LiteRT, verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from deepcache_fixtures import cached, check_cached_loop, close, export_cached, micro_unet

from edgediff.passes import PassContext
from edgediff.runtime.bundle import MANIFEST, read_bundle
from edgediff.runtime.generate import run_bundle
from edgediff.sampling import SamplerConfig, sample_model

pytest.importorskip("litert_torch", reason="TFLite bundles are converted by litert-torch")
pytest.importorskip("ai_edge_litert.interpreter", reason="TFLite bundles run on LiteRT")


def test_cached_tflite_bundle_two_entries_generate_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgediff.cli import main

    m, rc, rep, out = export_cached(micro_unet(), tmp_path, "tflite", "b", capsys)
    assert rc == 0
    assert rep["bundle"] and set(rep["components"]) == {"unet", "unet_shallow"}
    man = json.loads((out / MANIFEST).read_text())
    assert man["target"] == "tflite" and man["cache"]["full_steps"] == [0, 2, 4]
    full, shallow = man["components"]["unet"], man["components"]["unet_shallow"]
    assert full["path"] == "unet/model.tflite" and shallow["role"] == "denoiser_shallow"
    assert full["outputs"] == ["cached_feature", "out_sample"] and shallow["outputs"] == ["out_sample"]
    assert set(shallow["inputs"]) == {"sample", "timestep", "cached_feature"}
    assert shallow["inputs"]["cached_feature"]["shape"][1:] == m.extras["cache"]["feature_shape"]
    assert shallow["ops"] < full["ops"]  # the deep blocks are not in the shallow file

    # the torch-free loop on LiteRT == the PyTorch cached sampler, also with torch blocked
    check_cached_loop(out, m, "litert", tmp_path / "nt.npy", SamplerConfig("dpmpp-2m", 5))

    npy = tmp_path / "x.npy"
    assert main(["generate", str(out), "--samples", "2", "--save-npy", str(npy), "--json"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert (g["denoiser_calls_full"], g["denoiser_calls_shallow"]) == (3, 2) and g["ms_per_image"] > 0
    assert np.load(npy).shape == (2, 1, 8, 8)

    assert main(["verify", str(tmp_path / "art"), str(out), "--samples", "2", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["verified"] and v["exit_code"] == 0 and v["runtime"].startswith("litert")
    assert (v["denoiser_calls_full"], v["denoiser_calls_shallow"]) == (3, 2) and v["reference_calls_shallow"] == 2
    assert v["psnr_db"] > 60 and v["max_abs_err"] < 1e-4


def test_a_broken_tflite_component_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A bundle whose .tflite is not a model: generate names the file, exit 2 (no conversion needed)."""
    from edgediff.cli import main

    b = tmp_path / "b"
    (b / "unet").mkdir(parents=True)
    (b / "scheduler").mkdir()
    (b / "unet" / "model.tflite").write_bytes(b"not a flatbuffer")
    (b / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    man = {"format": "edgediff-bundle", "version": 1, "target": "tflite", "sampler": "DDIMScheduler", "steps": 2,
           "components": {"unet": {"path": "unet/model.tflite", "role": "denoiser"}}, "cache": None,
           "signature": {"sample_shape": [1, 8, 8]}, "scheduler": {"path": "scheduler/scheduler_config.json"}}
    (b / MANIFEST).write_text(json.dumps(man))
    assert read_bundle(b).target == "tflite"
    assert main(["generate", str(b), "--samples", "1", "--save-npy", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "model.tflite" in err and "LiteRT" in err


@pytest.mark.slow
def test_int8_cached_tflite_bundle_full_integer(tmp_path: Path) -> None:
    from edgediff.bundle import export_bundle
    from edgediff.passes import get, make_options
    from edgediff.verify import TOLERANCES, verify

    q = micro_unet()
    ctx = PassContext(cache_dir=tmp_path / "cache")
    for name, opts in (("calib", {"n_samples": 4, "steps": 8, "interval": 2}),  # W8A8 with output requantization
                       ("quant", {"weight_bits": 8, "act_bits": 8, "split_shortcut": True, "calib_limit": 16,
                                  "weight_init": "minmax", "act_init": "minmax"})):
        fn, _ = get(name)
        q = fn(q.clone(), make_options(name, opts), ctx)
    q = cached(q, steps=4)
    rep = export_bundle(q, tmp_path / "b", "tflite", "int8")
    assert set(rep["components"]) == {"unet", "unet_shallow"}
    man = read_bundle(tmp_path / "b").manifest
    for name in ("unet", "unet_shallow"):
        c = man["components"][name]
        assert c["int8"]["layout"] == "full-integer" and c["integer_macs_share"] > 0.5, (name, c)
        assert c["inputs"]["sample"]["dtype"] == "float32"  # the float interface is restored
    x, stats = run_bundle(tmp_path / "b", samples=2, seed=0, threads=1)
    assert (stats["denoiser_calls_full"], stats["denoiser_calls_shallow"]) == (2, 2)
    ref = sample_model(q, 2, seed=0, cfg=SamplerConfig("dpmpp-2m", 4)).numpy()
    assert float(np.abs(x - ref).max()) < 0.25  # int8 kernels vs the fake-quant simulation: close, not equal
    v = verify(q, tmp_path / "b", samples=2)
    assert v["verified"] and v["precision"] == "int8" and v["tolerance"] == TOLERANCES["int8"]
    assert v["exit_code"] in (0, 4) and v["denoiser_calls_shallow"] == 2


@pytest.mark.slow
def test_class_conditional_cached_tflite_bundle(tmp_path: Path) -> None:
    from edgediff.bundle import export_bundle

    m = cached(micro_unet(classes=3), sampler="ddim", steps=4, interval=3)
    export_bundle(m, tmp_path / "b", "tflite", "fp32")
    man = read_bundle(tmp_path / "b").manifest
    assert man["components"]["unet_shallow"]["inputs"]["class_labels"]["dtype"] == "int32"
    x, stats = run_bundle(tmp_path / "b", samples=4, seed=1, threads=1)
    assert (stats["denoiser_calls_full"], stats["denoiser_calls_shallow"]) == (2, 2)
    close(x, sample_model(m, 4, seed=1, cfg=SamplerConfig("ddim", 4)).numpy())
