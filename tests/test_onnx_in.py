"""ONNX-in: a denoiser shipped only as .onnx, described by an adapter, compressed with our calibration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgediff.errors import BadInput
from edgediff.loaders import LoadOptions, load_model
from edgediff.testing import export_third_party_onnx


@pytest.fixture(scope="module")
def demo_model() -> object:
    return load_model("demo")


@pytest.fixture
def onnx_model(demo_model, tmp_path: Path) -> Path:
    """The demo UNet (trained: a random net amplifies every rounding difference between two
    int8 runtimes into noise) exported as a third-party graph."""
    path = tmp_path / "unet.onnx"
    export_third_party_onnx(demo_model.denoiser, path, (torch.randn(2, 1, 16, 16), torch.tensor([10, 500])),
                            input_names=("x", "t"), output_name="eps")
    (tmp_path / "adapter.toml").write_text(
        'sample_shape = [1, 16, 16]\ninputs = ["x", "t"]\nsample = "x"\ntime = "t"\n\n'
        '[scheduler]\n_class_name = "DDIMScheduler"\nnum_train_timesteps = 1000\n')
    return path


def _load(path: Path) -> object:
    return load_model(path, LoadOptions(adapter=path.parent / "adapter.toml"))


def test_graph_is_normalized_and_matches_the_module(onnx_model: Path, demo_model) -> None:
    from edgediff.sampling import TorchDenoiser

    m = _load(onnx_model)
    assert m.arch == "OnnxGraph"
    assert m.schedule.class_name == "DDIMScheduler"
    inp = demo_model.example_inputs(3, seed=1)
    got = TorchDenoiser(m)(inp["sample"], inp["timestep"])
    want = TorchDenoiser(demo_model)(inp["sample"], inp["timestep"])
    assert float((got - want).abs().max()) < 1e-4
    from edgediff.metrics import macs, params

    # counted from the graph's initializers and nodes (a graph has no torch parameters)
    assert abs(params(m.denoiser) - params(demo_model.denoiser)) < 0.01 * params(demo_model.denoiser)
    assert abs(macs(m) - macs(demo_model)) < 0.05 * macs(demo_model)


def test_compress_w8a8_export_and_verify(onnx_model: Path, tmp_path: Path) -> None:
    """calib trajectories run the graph in onnxruntime; quantize_static gets our points; the
    artifact reloads; int8 ONNX and OpenVINO exports verify on their runtimes."""
    from edgediff.exporters import get_backend

    from edgediff.artifact import load_artifact, write_artifact
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import PassSpec, Recipe
    from edgediff.verify import verify

    m = _load(onnx_model)
    recipe = Recipe("t", passes=[PassSpec("calib", {"method": "qdiff", "n_samples": 4, "steps": 10, "interval": 2}),
                                 PassSpec("quant", {})])
    q, records = run_recipe(m, recipe, cache_dir=tmp_path / "cache")
    assert records[-1].metrics["quantizer"] == "ort" and records[-1].metrics["points"] == 20
    write_artifact(q, tmp_path / "art", {})
    art = load_artifact(tmp_path / "art")
    out = tmp_path / "q.onnx"
    rep = get_backend("onnx").export(art, out, "int8")
    assert rep["qdq_pairs"] > 10
    assert records[-1].metrics["split_convs"] >= 4  # the decoder's shortcut-concat convs, one scale per half
    r = verify(art, out, steps=5, samples=2)
    assert r["verified"] and r["exit_code"] == 0, r
    assert r["psnr_db"] > 60  # the export is the quantized graph itself
    # the float export is the source graph, unchanged by quantization
    f32 = tmp_path / "f.onnx"
    get_backend("onnx").export(art, f32, "fp32")
    import onnxruntime as ort

    feed = {"sample": np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32),
            "timestep": np.array([300.0], np.float32)}
    a = ort.InferenceSession(str(f32)).run(None, feed)[0]
    b = ort.InferenceSession(str(out)).run(None, feed)[0]
    assert 1e-4 < float(np.abs(a - b).max()) < 0.5  # really quantized, still close
    from edgediff.onnx_source import psnr_vs_source

    assert psnr_vs_source(art, samples=2, steps=5) > 30  # only convs/matmuls quantized: close to fp32
    pytest.importorskip("openvino", reason="OpenVINO is optional: pip install 'edgediff[openvino]'")
    ov_out = tmp_path / "q.xml"
    get_backend("openvino").export(art, ov_out, "int8")
    r2 = verify(art, ov_out, steps=5, samples=2)
    assert r2["verified"] and r2["psnr_db"] > 25, r2


def test_pruning_a_graph_is_refused(onnx_model: Path, tmp_path: Path) -> None:
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import PassSpec, Recipe

    m = _load(onnx_model)
    with pytest.raises(BadInput, match="prune.diff.*ONNX-only"):
        run_recipe(m, Recipe("t", passes=[PassSpec("prune.diff", {})]), cache_dir=tmp_path / "c")


@pytest.mark.parametrize("text,field", [
    ('inputs = ["x", "t"]\nsample = "x"\ntime = "t"\n', "sample_shape"),
    ('sample_shape = [1, 16, 16]\ninputs = ["x", "q"]\nsample = "x"\ntime = "q"\n', "inputs"),
    ('sample_shape = [1, 8, 8]\ninputs = ["x", "t"]\nsample = "x"\ntime = "t"\n', "sample_shape"),
    ('sample_shape = [1, 16, 16]\ninputs = ["x", "t"]\nsample = "y"\ntime = "t"\n', "sample"),
    ('sample_shape = [1, 16, 16]\ninputs = ["x", "t"]\nsample = "x"\ntime = "t"\ntime_kind = "minutes"\n', "time_kind"),
    ('sample_shape = [1, 16, 16]\ninputs = ["x", "t", "c"]\nsample = "x"\ntime = "t"\n', "cond.c"),
    ('sample_shape = [1, -16, 16]\ninputs = ["x", "t"]\nsample = "x"\ntime = "t"\n', "sample_shape"),
    ('sample_shape = [1, 16, 16]\ninputs = ["x", "t"]\nsample = "x"\ntime = "t"\nscheduler_config = "../s.json"\n',
     "scheduler_config"),
    ('sample_shape = [1, 16, 16]\ninputs = ["x", "t"]\nsample = "x"\ntime = "t"\nbogus = 1\n', "bogus"),
])
def test_bad_adapters_name_the_field(onnx_model: Path, text: str, field: str) -> None:
    (onnx_model.parent / "adapter.toml").write_text(text)
    with pytest.raises(BadInput) as e:
        _load(onnx_model)
    msg = str(e.value)
    assert "adapter.toml" in msg and field in msg and "\n" not in msg


def test_cli_onnx_needs_an_adapter_and_compresses(onnx_model: Path, tmp_path: Path) -> None:
    env_run = [sys.executable, "-m", "edgediff"]
    r = subprocess.run(env_run + ["info", str(onnx_model), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # an .onnx file is still an exported file for `info`
    r = subprocess.run(env_run + ["compress", str(onnx_model), "--recipe", "w8a8", "-o", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--adapter" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "a").exists()
    manifest_before = onnx_model.read_bytes()
    r = subprocess.run(env_run + ["compress", str(onnx_model), "--adapter", str(onnx_model.parent / "adapter.toml"),
                                  "--recipe", str(_small_recipe(tmp_path)), "-o", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert onnx_model.read_bytes() == manifest_before  # the input is never modified
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["arch"] == "OnnxGraph"
    assert (tmp_path / "a" / "model" / "denoiser.onnx").is_file()


def _small_recipe(tmp_path: Path) -> Path:
    p = tmp_path / "small.toml"
    p.write_text('name = "small"\n[[pass]]\nname = "calib"\nmethod = "qdiff"\nn_samples = 4\nsteps = 10\ninterval = 2\n'
                 '[[pass]]\nname = "quant"\n')
    return p


def test_graph_artifact_exports_to_fpga(onnx_model: Path, tmp_path: Path) -> None:
    """An ONNX-in artifact's quantized graph is the FPGA project's QDQ source (split convs included)."""
    import shutil

    from edgediff.exporters import get_backend

    from edgediff.pipeline import run_recipe
    from edgediff.recipe import PassSpec, Recipe

    q, _ = run_recipe(_load(onnx_model), Recipe("t", passes=[
        PassSpec("calib", {"method": "qdiff", "n_samples": 2, "steps": 4, "interval": 2}), PassSpec("quant", {})]),
        cache_dir=tmp_path / "cache")
    rep = get_backend("fpga").export(q, tmp_path / "proj", "int8")
    assert rep["source"].startswith("the quantized ONNX graph")
    assert rep["layers_total"] > 30 and rep["array_macs_share"] > 0.99
    if shutil.which("g++"):
        assert rep["verified"] and rep["layers_bit_exact"] == rep["layers_total"], rep
    else:
        assert rep["verified"] is False
