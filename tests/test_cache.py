"""DeepCache: full/shallow entry points, the cache pass, the cached sampler schedule, artifacts."""

from __future__ import annotations

import pytest
import torch

from edgediff import passes
from edgediff.deepcache import CachedDenoiser, FullEntry, ShallowEntry, full_steps
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample_model


def _cache(model: DiffusionModel, **opts: int) -> DiffusionModel:
    run, opts_cls = passes.get("cache")
    return run(model.clone(), opts_cls(**{"check_samples": 0, **opts}), PassContext())


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_cond_unet"])
def test_shallow_call_with_its_own_feature_equals_the_full_model(fixture: str, request: pytest.FixtureRequest) -> None:
    model: DiffusionModel = request.getfixturevalue(fixture)
    mod = model.module().eval()
    inputs = model.example_inputs(2)
    with torch.no_grad():
        ref = mod(**inputs)
        out, feat = FullEntry(mod, 0)(**inputs)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        shallow = ShallowEntry(mod, 0)(**inputs, feature=feat)
        torch.testing.assert_close(shallow, ref, atol=1e-5, rtol=1e-5)
        # and the shallow call really reads the feature: another feature, another output
        other = ShallowEntry(mod, 0)(**inputs, feature=torch.zeros_like(feat))
    assert (other - ref).abs().max() > 1e-3
    # stubs are restored: the plain forward is the plain forward again
    with torch.no_grad():
        torch.testing.assert_close(mod(**inputs), ref, atol=0, rtol=0)


def test_cache_pass_records_schedule_and_shallow_macs(tiny_unet: DiffusionModel) -> None:
    m = _cache(tiny_unet, depth=0, interval=3)
    rec = m.extras["cache"]
    assert rec["depth"] == 0 and rec["interval"] == 3
    assert 0 < rec["macs_shallow"] < rec["macs_full"]
    assert rec["feature_shape"][0] > 0
    assert "cache" not in tiny_unet.extras  # the input model is untouched


def test_cache_pass_rejects_bad_depth_and_non_unets(tiny_unet: DiffusionModel, tiny_dit: DiffusionModel) -> None:
    with pytest.raises(BadInput, match="depth 5 out of range"):
        _cache(tiny_unet, depth=5)
    with pytest.raises(BadInput, match="DeepCache needs"):
        _cache(tiny_dit)
    with pytest.raises(BadInput, match="interval"):
        passes.make_options("cache", {"interval": 0})


def test_cached_sampler_follows_the_schedule_per_chunk(tiny_unet: DiffusionModel) -> None:
    m = _cache(tiny_unet, depth=0, interval=3)
    stats: dict = {}
    cfg = SamplerConfig("ddim", 7, batch_size=2)
    a = sample_model(m, 4, seed=1, cfg=cfg, stats=stats)
    assert stats["denoiser_calls_full"] == len(full_steps(7, 3)) == 3
    assert stats["denoiser_calls_shallow"] == 4
    # each batch chunk keeps its own feature: chunking does not change the samples
    b = sample_model(m, 4, seed=1, cfg=SamplerConfig("ddim", 7, batch_size=4))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # the cache changes the result (it is not silently off), interval 1 does not
    plain = sample_model(m, 4, seed=1, cfg=cfg, denoiser=TorchDenoiser(m, use_cache=False))
    assert (a - plain).abs().max() > 1e-4
    every = _cache(tiny_unet, depth=0, interval=1)
    torch.testing.assert_close(sample_model(every, 4, seed=1, cfg=cfg), plain, atol=1e-5, rtol=0)


def test_cached_denoiser_restarts_on_a_new_run(tiny_unet: DiffusionModel) -> None:
    m = _cache(tiny_unet, depth=0, interval=2)
    d = TorchDenoiser(m)
    assert isinstance(d.cache, CachedDenoiser)
    cfg = SamplerConfig("ddim", 4)
    first = sample_model(m, 2, seed=0, cfg=cfg, denoiser=d)
    again = sample_model(m, 2, seed=0, cfg=cfg, denoiser=d)  # same object: the schedule restarts at step 0
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert d.cache.calls == {"full": 2, "shallow": 2}


def test_cache_schedule_survives_the_artifact(tiny_unet: DiffusionModel, tmp_path) -> None:
    from edgediff.artifact import load_artifact, write_artifact

    m = _cache(tiny_unet, depth=0, interval=4)
    write_artifact(m, tmp_path / "a", {"recipe": {"name": "t"}})
    back = load_artifact(tmp_path / "a")
    assert back.extras["cache"]["interval"] == 4
    assert TorchDenoiser(back).cache is not None


def test_cache_composes_with_quantization(tiny_unet: DiffusionModel) -> None:
    from edgediff.testing import minmax_quantize

    q = _cache(minmax_quantize(tiny_unet), depth=0, interval=2)
    mod = q.module().eval()
    inputs = q.example_inputs(2)
    with torch.no_grad():
        ref = mod(**inputs)
        _, feat = FullEntry(mod, 0)(**inputs)
        torch.testing.assert_close(ShallowEntry(mod, 0)(**inputs, feature=feat), ref, atol=1e-5, rtol=1e-5)
    stats: dict = {}
    x = sample_model(q, 2, seed=0, cfg=SamplerConfig("dpmpp-2m", 6), stats=stats)
    assert torch.isfinite(x).all() and stats["denoiser_calls_shallow"] == 3


def test_fast_recipes_plan_and_fast_runs(tiny_unet: DiffusionModel) -> None:
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import load_recipe

    edge_fast = load_recipe("edge-fast")
    names = [p.name for p in edge_fast.passes]
    # the cache sits before calibration (both entry points calibrated) with its depth and schedule measured
    assert names.index("fuse") < names.index("cache") < names.index("calib") < names.index("quant")
    assert names[0] == "sampling"
    cache_opts = next(p.options for p in edge_fast.passes if p.name == "cache")
    assert cache_opts["depth"] == "auto" and cache_opts["schedule"] == "auto"
    assert edge_fast.passes[0].options["clip_x0"] is True
    for spec in edge_fast.passes:
        passes.make_options(spec.name, spec.options, "edge-fast")
    out, records = run_recipe(tiny_unet, load_recipe("fast"))
    assert out.extras["sampling"] == {"sampler": "dpmpp-2m", "steps": 10, "eta": 0.0, "clip_x0": True}
    rec = out.extras["cache"]
    assert rec["schedule"] == "auto" and rec["steps"] == 10 and rec["full_steps"][0] == 0 and rec["full_steps"][-1] == 9
    cache_rec = next(r for r in records if r.name == "cache")
    assert cache_rec.metrics["calls_full"] == len(rec["full_steps"])
    assert cache_rec.metrics["calls_full"] + cache_rec.metrics["calls_shallow"] == 10
    assert "psnr_vs_uncached_db" in cache_rec.metrics and "one_step_errors" in cache_rec.metrics


def test_calibration_follows_the_recorded_sampler(tiny_unet: DiffusionModel, tmp_path) -> None:
    run_s, cls_s = passes.get("sampling")
    m = run_s(tiny_unet.clone(), cls_s(sampler="dpmpp-2m", steps=4), PassContext())
    run_c, cls_c = passes.get("calib")
    out = run_c(m, cls_c(method="qdiff", n_samples=2, interval=1), PassContext(cache_dir=tmp_path))
    assert out.extras["calib"]["options"]["sampler"] == "dpmpp-2m"
    assert out.extras["calib"]["options"]["steps"] == 4
    assert out.extras["calib"]["count"] == 2 * 4


def test_calibration_key_depends_on_the_cache_schedule(tiny_unet: DiffusionModel) -> None:
    from edgediff.passes.calib import CalibOptions, cache_key

    a, b = _cache(tiny_unet, interval=2), _cache(tiny_unet, interval=3)
    assert cache_key(a, CalibOptions()) != cache_key(b, CalibOptions())


def test_cache_aware_finetune_lowers_the_shallow_error_and_keeps_full_calls(tiny_unet: DiffusionModel) -> None:
    run_s, cls_s = passes.get("sampling")
    m = run_s(tiny_unet.clone(), cls_s(sampler="ddim", steps=4), PassContext())
    run, cls = passes.get("cache")
    ctx = PassContext()
    out = run(m.clone(), cls(depth=0, interval=2, check_samples=0, train_steps=60, train_lr=2e-3, train_batch=8,
                             train_trajectories=8, train_ema=0.0), ctx)
    tr = ctx.metrics["training"]
    assert tr["train_steps"] == 60 and tr["shallow_loss_last"] < 0.7 * tr["shallow_loss_first"]
    assert any(not torch.equal(a, b) for a, b in zip(out.denoiser.state_dict().values(), m.denoiser.state_dict().values()))
    # held out (another seed's trajectory): a shallow call reading the previous step's feature is closer
    # to the untrained model's full output than before training
    from edgediff.sampling import sample

    _, traj = sample(TorchDenoiser(m, use_cache=False), m.schedule, tuple(m.signature.sample_shape), 4, 7,
                     SamplerConfig("ddim", 4), return_trajectory=True)
    (t0, x0), (t1, x1) = traj[0], traj[1]
    ta, tb = torch.full((4,), float(t0)), torch.full((4,), float(t1))

    def shallow_err(model: DiffusionModel) -> float:
        mod = model.module().eval()
        with torch.no_grad():
            _, feat = FullEntry(mod, 0)(x0, ta)
            return float((ShallowEntry(mod, 0)(x1, tb, feature=feat) - teacher(x1, tb)).pow(2).mean())

    teacher = m.module().eval()
    assert shallow_err(out) < shallow_err(m)
    with pytest.raises(BadInput, match="train_lr"):
        cls(train_lr=0.0)
    with pytest.raises(BadInput, match="train_batch"):
        cls(train_batch=0)


# ---------------------------------------------------------------- non-uniform and measured schedules


def _three_block_unet() -> DiffusionModel:
    """UNet2DModel with three blocks: skip depths 0 and 1."""
    from diffusers import UNet2DModel

    from edgediff.model import InputSignature
    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1,
                    down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=4)
    return DiffusionModel(m.eval(), NoiseSchedule(), InputSignature((1, 8, 8)), arch="UNet2DModel",
                          config=dict(m.config))


def test_schedule_rules() -> None:
    from edgediff.runtime.cache_schedule import (
        centred_full_steps,
        full_steps_for,
        rescale_full_steps,
        uniform_full_steps,
    )

    assert uniform_full_steps(10, 4) == [0, 4, 8]
    assert uniform_full_steps(10, 4, last=True) == [0, 4, 8, 9]
    for steps, k, c in ((10, 5, 0.5), (50, 10, 0.3), (20, 6, 0.8), (7, 3, 0.5)):
        full = centred_full_steps(steps, k, c)
        assert len(full) == k and full[0] == 0 and full[-1] == steps - 1 and full == sorted(set(full))
    # denser around the centre than at the ends
    full = centred_full_steps(50, 10, 0.5, 2.0)
    gaps = [b - a for a, b in zip(full, full[1:])]
    assert min(gaps[3:6]) < min(gaps[0], gaps[-1])
    assert rescale_full_steps([0, 3, 9], 10, 19) == [0, 6, 18]
    rec = {"interval": 3, "schedule": "auto", "steps": 10, "full_steps": [0, 3, 9]}
    assert full_steps_for(rec, 10) == [0, 3, 9] and full_steps_for(rec, 19) == [0, 6, 18]
    assert full_steps_for({"interval": 3}, 7) == [0, 3, 6] == full_steps_for(3, 7)  # records from before schedules
    assert full_steps_for({"interval": 2, "schedule": "centred", "steps": 10, "full_steps": [0, 9]}, 20) == \
        centred_full_steps(20, 10)


def test_budget_schedule_keeps_the_cheap_shallow_steps() -> None:
    from edgediff.passes.cache import budget_full_steps, schedule_error

    steps = 6
    # reusing a feature is cheap early, dear late, dearer the staler it is
    errs = {(j, i): 0.01 * i * (i - j) for i in range(steps) for j in range(i)}
    full = budget_full_steps(errs, steps, budget=0.035, max_gap=3)
    assert full[0] == 0 and full[-1] == steps - 1
    total, _ = schedule_error(full, errs, steps)
    assert total <= 0.035
    assert full == [0, 2, 3, 4, 5]  # step 1 (0.01) and then nothing else fits: step 2 from 0 would add 0.04
    assert budget_full_steps(errs, steps, budget=0.0, max_gap=3) == list(range(steps))
    # the gap limit holds even with an unlimited budget
    full = budget_full_steps(errs, steps, budget=1e9, max_gap=1)
    assert max(b - a for a, b in zip(full, full[1:])) <= 2


def test_auto_depth_and_schedule_are_measured_and_followed() -> None:
    from edgediff.runtime.cache_schedule import full_steps_for

    run_s, cls_s = passes.get("sampling")
    m = run_s(_three_block_unet(), cls_s(sampler="dpmpp-2m", steps=6), PassContext())
    run, cls = passes.get("cache")
    ctx = PassContext()
    out = run(m.clone(), cls(depth="auto", schedule="auto", interval=3, error_bound=1e9, error_samples=2,
                             check_samples=0), ctx)
    rec = out.extras["cache"]
    table = {r["depth"]: r for r in ctx.metrics["one_step_errors"]}
    assert set(table) == {0, 1} and ctx.metrics["bound_met"]
    # an unlimited budget: as few full calls as the gap allows, first and last full, at the cheapest depth
    assert rec["full_steps"][0] == 0 and rec["full_steps"][-1] == 5 and len(rec["full_steps"]) < 6
    assert rec["depth"] == max(table, key=lambda d: table[d]["macs_per_image_speedup"])
    assert all(v >= 0 for r in table.values() for v in r["error_next_step"].values())
    # the sampler runs exactly the recorded schedule
    stats: dict = {}
    sample_model(out, 2, seed=0, cfg=SamplerConfig("dpmpp-2m", 6), stats=stats)
    assert stats["denoiser_calls_full"] == len(rec["full_steps"])
    # a bound nothing but the uncached run meets: every step full
    ctx = PassContext()
    tight = run(m.clone(), cls(depth="auto", schedule="auto", interval=3, error_bound=1e-9, error_samples=2,
                               check_samples=0), ctx)
    assert tight.extras["cache"]["full_steps"] == list(range(6)) and ctx.metrics["calls_shallow"] == 0
    # another step count than the record's: the recorded steps at the same fractions
    assert full_steps_for(rec, 11)[0] == 0 and full_steps_for(rec, 11)[-1] == 10
    with pytest.raises(BadInput, match="depth"):
        cls(depth="deep")
    with pytest.raises(BadInput, match="schedule"):
        cls(schedule="random")


def test_non_uniform_schedule_is_the_same_in_pytorch_and_the_bundle(tiny_unet: DiffusionModel, tmp_path) -> None:
    from edgediff.bundle import export_bundle
    from edgediff.runtime.generate import run_bundle

    run_s, cls_s = passes.get("sampling")
    m = run_s(tiny_unet.clone(), cls_s(sampler="dpmpp-2m", steps=8), PassContext())
    c = _cache(m, depth=0, interval=3, schedule="centred", centre=0.5)
    rec = c.extras["cache"]
    assert rec["schedule"] == "centred" and rec["full_steps"] != full_steps(8, 3)
    assert rec["full_steps"][0] == 0 and rec["full_steps"][-1] == 7
    stats: dict = {}
    x = sample_model(c, 3, seed=2, cfg=SamplerConfig("dpmpp-2m", 8), stats=stats)
    assert stats["denoiser_calls_full"] == len(rec["full_steps"])
    export_bundle(c, tmp_path / "b", "onnx", "fp32")
    import json

    man = json.loads((tmp_path / "b" / "edgediff_bundle.json").read_text())
    assert man["cache"]["full_steps"] == rec["full_steps"] and man["cache"]["schedule"] == "centred"
    y, st = run_bundle(tmp_path / "b", samples=3, seed=2, threads=1)
    assert st["denoiser_calls_full"] == len(rec["full_steps"]) and st["cache"]["full_steps"] == rec["full_steps"]
    torch.testing.assert_close(torch.from_numpy(y), x, atol=2e-4, rtol=1e-4)


def test_non_uniform_schedule_on_the_opencl_bundle(tiny_unet: DiffusionModel, tmp_path) -> None:
    from edgediff.exporters import get_backend
    from edgediff.kernels import runtime as clrt

    if not clrt.opencl_available()[0]:
        pytest.skip("no OpenCL device")
    run_s, cls_s = passes.get("sampling")
    m = run_s(tiny_unet.clone(), cls_s(sampler="ddim", steps=6), PassContext())
    c = _cache(m, depth=0, interval=3, schedule="centred", centre=0.3)
    full = c.extras["cache"]["full_steps"]
    assert full != full_steps(6, 3)
    get_backend("opencl").export(c, tmp_path / "b", "fp32")
    den = get_backend("opencl").load_denoiser(tmp_path / "b")
    stats: dict = {}
    x_cl = sample_model(c, 2, seed=0, cfg=SamplerConfig("ddim", 6), denoiser=den, stats=stats)
    assert (stats["denoiser_calls_full"], stats["denoiser_calls_shallow"]) == (len(full), 6 - len(full))
    x_pt = sample_model(c, 2, seed=0, cfg=SamplerConfig("ddim", 6))
    assert float((x_cl - x_pt).abs().max()) < 1e-3 * max(1.0, float(x_pt.abs().max()))
