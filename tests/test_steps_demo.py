"""The demo's fast composition and its one time table (ms per call and per image, interleaved)."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgediff.exporters import get_backend

from edgediff import passes
from edgediff.demo import job
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext
from edgediff.testing import minmax_quantize


def _fast(model: DiffusionModel) -> DiffusionModel:
    run_s, opts_s = passes.get("sampling")
    run_c, opts_c = passes.get("cache")
    # DDIM (clipped x0): on random weights, DPM-Solver++'s unclipped x0 at high noise amplifies int8
    # rounding flips into different samples; the trained demo runs DPM-Solver++ (tested in the demo)
    m = run_s(model.clone(), opts_s(sampler="ddim", steps=4), PassContext())
    return run_c(m, opts_c(depth=0, interval=2, check_samples=0), PassContext())


@pytest.fixture
def demo_parts(tiny_unet: DiffusionModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(job, "TIME_REPS", 2)
    comp = minmax_quantize(tiny_unet)
    fast = _fast(comp)
    (tmp_path / "exports").mkdir()
    exports = []
    for prec in ("fp32", "int8"):
        path = tmp_path / "exports" / f"onnx-{prec}.onnx"
        get_backend("onnx").export(comp, path, prec)
        # the time table reads only which exports ran on their runtime (verify is tested elsewhere)
        exports.append({"target": "onnx", "precision": prec, "status": "exported",
                        "path": str(Path("exports") / path.name), "verify": {"verified": True}})
    exports.append({"target": "fpga", "precision": "int8", "status": "exported", "path": "exports/fpga-int8",
                    "verify": {"verified": True}})
    return {"original": tiny_unet, "comp": comp, "fast": fast, "exports": exports, "root": tmp_path}


def test_fast_bundle_is_exported_and_verified_with_its_schedule(demo_parts: dict) -> None:
    rec = job._export_fast(demo_parts["fast"], demo_parts["root"] / "exports", True, 2, 0, None, lambda s: None)
    assert rec["status"] == "exported" and rec["fast"] and rec["precision"] == "int8"
    v = rec["verify"]
    assert v["verified"] and v["exit_code"] == 0 and v["steps"] == 4 and v["cache"]["interval"] == 2
    assert rec["samples_png"][:4] == b"\x89PNG"


def test_time_table_rows_per_runtime_and_per_image_arithmetic(demo_parts: dict) -> None:
    d = demo_parts
    d["exports"].append(job._export_fast(d["fast"], d["root"] / "exports", True, 1, 0, None, lambda s: None))
    tim = job._time_table(d["original"], d["comp"], d["fast"], d["exports"], d["root"], 5, (2, 2), lambda s: None)
    got = {(r["runtime"], r["config"], r["precision"]) for r in tim["rows"]}
    assert {("pytorch", "original fp32", "fp32"), ("onnx", "original fp32", "fp32"), ("onnx", "compressed fp32", "fp32"),
            ("onnx", "compressed int8", "int8"), ("onnx", "fast schedule", "int8")} <= got
    assert "fpga" in tim["notes"] and not any(r["runtime"] == "fpga" for r in tim["rows"])
    b = tim["batch"]
    for r in tim["rows"]:
        assert r["ms_per_call"] > 0
        want = r["ms_per_call"] / b * r["calls_full"] + (r["ms_per_call_shallow"] or 0) / b * r["calls_shallow"]
        assert r["ms_per_image"] == pytest.approx(want, rel=1e-3, abs=1e-3)
        if r["config"] == "original fp32":
            assert r["speedup_vs_original"] == 1.0 and (r["calls_full"], r["calls_shallow"]) == (5, 0)
        if r["config"] == "fast schedule":
            assert (r["calls_full"], r["calls_shallow"]) == (2, 2) and r["ms_per_call_shallow"] > 0
    summary = {"rows": [], "passes": [], "exports": [], "timing": tim, "steps": 5, "samples": 1, "seed": 0,
               "recipe": {"name": "edge"}, "wall_seconds": 1.0,
               "fast": {"sampler": "dpmpp-2m", "steps": 4, "calls_full": 2, "calls_shallow": 2}}
    html = job.render(summary, [])
    assert "Time per denoiser call and per image" in html and "fast schedule" in html
    from rich.console import Console

    con = Console(width=80, record=True)
    con.print(job.summary_table(summary))
    text = con.export_text()
    assert "fast schedule" in text and "2/2" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_fast_composition_calibrates_on_its_own_schedule(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import PassSpec, Recipe, load_recipe

    demo = Recipe("edge-like", "", [PassSpec("fuse", {"pack_qkv": False}),
                                    PassSpec("calib", {"method": "qdiff", "n_samples": 2, "interval": 1}),
                                    PassSpec("quant", {"weight_bits": 8, "act_bits": 8, "min_psnr_db": 30.0})])
    composed = job.fast_recipe(demo, load_recipe("fast"))
    names = [p.name for p in composed.passes]
    assert names == ["fuse", "sampling", "cache", "calib", "quant"]
    assert composed.passes[-1].options["min_psnr_db"] == 0.0 and demo.passes[-1].options["min_psnr_db"] == 30.0
    out, records = run_recipe(tiny_unet, composed, cache_dir=tmp_path)
    assert records[-1].name == "quant" and records[-1].metrics["quantized_layers"] > 0
    opts = out.extras["calib"]["options"]
    # calibrated along DPM-Solver++ 10-step cached trajectories, not the model's own DDIM
    assert (opts["sampler"], opts["steps"]) == ("dpmpp-2m", 10) and out.extras["cache"]["schedule"] == "auto"
    assert out.extras["calib"]["count"] == 2 * 10 and "quant" in out.extras
    # without a calib pass the fast passes go last
    plain = job.fast_recipe(Recipe("p", "", [PassSpec("fuse")]), load_recipe("fast"))
    assert [p.name for p in plain.passes] == ["fuse", "sampling", "cache"]


def test_fast_row_samples_with_the_compositions_own_schedule(tiny_unet: DiffusionModel) -> None:
    import torch

    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample, sample_model

    run_s, opts_s = passes.get("sampling")
    m = run_s(tiny_unet.clone(), opts_s(sampler="dpmpp-2m", steps=4, clip_x0=True), PassContext())
    run_c, opts_c = passes.get("cache")
    m = run_c(m, opts_c(depth=0, interval=2, check_samples=0), PassContext())
    x, cfg, calls = job.sample_fast(m, 3, 1, default_steps=25)
    assert (cfg.sampler, cfg.steps) == ("dpmpp-2m", 4) and calls == (2, 2)
    # the clip_x0 of the sampling pass lives in the composition's schedule: the row uses it
    torch.testing.assert_close(x, sample_model(m, 3, 1, SamplerConfig("dpmpp-2m", 4)), atol=0, rtol=0)
    unclipped = sample(TorchDenoiser(m), tiny_unet.schedule, m.signature.sample_shape, 3, 1, SamplerConfig("dpmpp-2m", 4))
    assert (x - unclipped).abs().max() > 1e-3
