"""Diffusion-aware PTQ: calibration sets + cache, quant simulation, reconstruction, PTQD, saving."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from edgediff.artifact import load_artifact, write_artifact
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, InputSignature
from edgediff.passes import PassContext, get, make_options
from edgediff.quant.core import QuantAttnProcessor, QuantConv2d
from edgediff.quant_params import QuantParams, strip_quant_wrappers
from edgediff.schedule import NoiseSchedule

FAST_CALIB = {"n_samples": 4, "steps": 8, "interval": 2}


def _ctx(tmp_path: Path) -> PassContext:
    return PassContext(cache_dir=tmp_path / "cache")


def _run(name: str, model: DiffusionModel, opts: dict, ctx: PassContext) -> DiffusionModel:
    fn, _ = get(name)
    ctx.metrics = {}
    return fn(model.clone(), make_options(name, opts), ctx)


def _out(model: DiffusionModel, seed: int = 3) -> torch.Tensor:
    inp = model.example_inputs(batch=2, seed=seed)
    with torch.no_grad():
        return model.module().eval()(**inp)


def _calibrated(model: DiffusionModel, tmp_path: Path, **kw: object) -> tuple[DiffusionModel, PassContext]:
    ctx = _ctx(tmp_path)
    return _run("calib", model, {**FAST_CALIB, **kw}, ctx), ctx


def test_calib_cache_is_reused(tiny_unet: DiffusionModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgediff.passes.calib as calib

    m1, ctx = _calibrated(tiny_unet, tmp_path)
    assert ctx.metrics["generated"] is True
    meta = m1.extras["calib"]
    # qdiff: every 2nd of 8 steps -> 4 steps x 4 samples
    assert meta["count"] == 16 and meta["timesteps"]["distinct"] == 4
    assert set(meta) >= {"key", "method", "count", "options"}  # metadata only, data in the cache
    assert "x" not in meta

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("calibration set regenerated although cached")

    monkeypatch.setattr(calib, "generate", boom)
    m2 = _run("calib", tiny_unet, FAST_CALIB, ctx)
    assert ctx.metrics["generated"] is False
    assert m2.extras["calib"]["key"] == meta["key"]
    # a different option is a different key (and would regenerate)
    with pytest.raises(AssertionError, match="regenerated"):
        _run("calib", tiny_unet, {**FAST_CALIB, "seed": 1}, ctx)


def test_ptq4dm_timesteps_skew_toward_x0(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    m, _ = _calibrated(tiny_unet, tmp_path, method="ptq4dm", count=64, steps=20, mean=0.3, std=0.15)
    ts = m.extras["calib"]["timesteps"]
    assert m.extras["calib"]["count"] == 64
    assert ts["mean"] < 500  # T = 1000: the normal is centred at 0.3 T
    assert ts["distinct"] > 3


def test_calib_conditioning_for_cond_and_class_models(tiny_cond_unet: DiffusionModel, tiny_dit: DiffusionModel,
                                                      tmp_path: Path) -> None:
    from edgediff.passes.calib import load_calibration

    for model, shape in ((tiny_cond_unet, (6, 32)), (tiny_dit, ())):
        m, ctx = _calibrated(model, tmp_path)
        data = load_calibration(m, ctx)
        assert data["cond"].shape[1:] == shape
        assert len(data["cond"]) == len(data["x"])


def test_w8a8_simulation_on_grid_and_close(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    m, ctx = _calibrated(tiny_unet, tmp_path)
    before = copy.deepcopy(tiny_unet.denoiser.state_dict())
    q = _run("quant", m, {"weight_bits": 8, "act_bits": 8}, ctx)
    # the input model is untouched
    for k, v in tiny_unet.denoiser.state_dict().items():
        assert torch.equal(v, before[k])
    ref, out = _out(tiny_unet), _out(q)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.1, rel  # quantized (not identical) but close
    qp = QuantParams.of(q)
    assert qp is not None and qp.weight_bits == 8
    kinds = {lq.kind for lq in qp.layers.values()}
    assert kinds == {"conv", "linear", "matmul_qk", "matmul_av"}
    # shortcut splitting where the up blocks concatenate skip features
    split = [n for n, lq in qp.layers.items() if lq.meta.get("split_at")]
    assert split and all(n.startswith("up_blocks.") for n in split)
    assert all(qp.layers[n].input2 is not None for n in split)
    # strip -> float module whose weights lie exactly on the grid, names match QuantParams
    flat = strip_quant_wrappers(copy.deepcopy(q.denoiser))
    mods = dict(flat.named_modules())
    for name, lq in qp.layers.items():
        if lq.weight is None:
            continue
        w = mods[name].weight.detach()
        qi = lq.weight.quantize(w)
        assert torch.equal(lq.weight.dequantize(qi), w), name
    assert ctx.metrics["quantized_layers"] == len([n for n in qp.layers if ":" not in n])
    # the simulation computes exactly what the stored parameters say (what exporters emit): the
    # integer layers of edgediff.lowering (two int8 parts for a split layer, requantized outputs)
    from edgediff.lowering import lower, run_layer

    name = "up_blocks.1.resnets.0.conv1"
    wrapper, lq = dict(q.denoiser.named_modules())[name], qp.layers[name]
    assert lq.output is not None and lq.output2 is not None
    x = torch.randn(2, wrapper.inner.in_channels, 8, 8) * 2
    ref = run_layer(lower(flat, qp).layers[name], x.numpy())
    with torch.no_grad():
        assert np.array_equal(wrapper(x).numpy(), ref)


def test_w4a8_first_last_8bit_and_reconstruction_helps(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    m, ctx = _calibrated(tiny_unet, tmp_path)
    q = _run("quant", m, {"weight_bits": 4, "act_bits": 8, "reconstruct": True, "iters": 6, "act_iters": 3,
                                "recon_batch": 8}, ctx)
    rec = ctx.metrics["reconstruction"]
    assert rec["blocks"] > 5
    assert rec["blocks_reverted"] == len(rec["reverted"]) and 0 <= rec["rounding_decided_mean"] <= 1
    # per block the kept result is never worse than nearest rounding
    assert rec["mse_after_sum"] <= rec["mse_before_sum"]
    qp = QuantParams.of(q)
    assert qp.layers["conv_in"].weight.bits == 8 and qp.layers["conv_out"].weight.bits == 8
    mid = qp.layers["down_blocks.0.resnets.0.conv1"]
    assert mid.weight.bits == 4
    flat = dict(strip_quant_wrappers(copy.deepcopy(q.denoiser)).named_modules())
    ints = mid.weight.quantize(flat["down_blocks.0.resnets.0.conv1"].weight)
    assert int(ints.min()) >= -8 and int(ints.max()) <= 7


def test_bad_input(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(BadInput, match="n_samples"):
        _run("calib", tiny_unet, {"n_samples": 0}, ctx)
    with pytest.raises(BadInput, match="count"):
        _run("calib", tiny_unet, {"method": "ptq4dm", "count": 0}, ctx)
    m, ctx = _calibrated(tiny_unet, tmp_path)
    for opts, what in (({"weight_bits": 9}, "weight_bits"), ({"act_bits": 1}, "act_bits"),
                       ({"weight_bits": 16}, "weight_bits"), ({"softmax_bits": 0}, "softmax_bits")):
        with pytest.raises(BadInput, match=what):
            _run("quant", m, opts, ctx)
    # quant without a calib pass before it
    with pytest.raises(BadInput, match="calib"):
        _run("quant", tiny_unet, {}, ctx)
    with pytest.raises(BadInput, match="quant"):
        _run("ptqd", m, {}, ctx)
    with pytest.raises(BadInput, match="mp_bits"):
        _run("ptqd", m, {"mp_bits": [12]}, ctx)


class _NoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *a: object) -> torch.Tensor:
        return sample * self.gain


def test_no_quantizable_layers(tmp_path: Path) -> None:
    model = DiffusionModel(_NoLayers(), NoiseSchedule.from_config({}), InputSignature((1, 4, 4)))
    m, ctx = _calibrated(model, tmp_path)
    with pytest.raises(BadInput, match="no quantizable layers"):
        _run("quant", m, {}, ctx)


def test_quant_on_cond_unet_and_dit(tiny_cond_unet: DiffusionModel, tiny_dit: DiffusionModel, tmp_path: Path) -> None:
    for model in (tiny_cond_unet, tiny_dit):
        m, ctx = _calibrated(model, tmp_path)
        q = _run("quant", m, {"weight_bits": 8, "act_bits": 8}, ctx)
        ref, out = _out(model), _out(q)
        assert float((out - ref).norm() / ref.norm()) < 0.15
        assert any(isinstance(x, QuantAttnProcessor) for x in q.denoiser.modules())
        assert ctx.metrics["attention_matmuls"] >= 1


def test_artifact_roundtrip_identical(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    m, ctx = _calibrated(tiny_unet, tmp_path)
    q = _run("quant", m, {"weight_bits": 4, "act_bits": 8}, ctx)
    q = _run("ptqd", q, {"samples": 4, "mixed_precision": True, "mp_bits": [6], "mp_min_snr_db": -1e9}, ctx)
    write_artifact(q, tmp_path / "art", {})
    back = load_artifact(tmp_path / "art")
    assert any(isinstance(x, QuantConv2d) for x in back.denoiser.modules())
    assert any(isinstance(x, QuantAttnProcessor) for x in back.denoiser.modules())
    for seed in (0, 1):
        inp = q.example_inputs(batch=2, seed=seed)
        inp["timestep"] = torch.full((2,), 900.0)  # a low-bit step of the mixed-precision table
        with torch.no_grad():
            a, b = q.module()(**inp), back.module()(**inp)
        assert torch.equal(a, b)
    assert QuantParams.of(back).to_extras().keys() == QuantParams.of(q).to_extras().keys()


def test_ptqd_fit_and_correction(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.passes.ptqd import correction_for, fit

    # the regression recovers a known correlated part
    g = torch.Generator().manual_seed(0)
    e = torch.randn(64, 3, 4, 4, generator=g)
    bias = torch.tensor([0.1, -0.2, 0.05])
    d = 0.07 * e + bias.view(1, 3, 1, 1) + 0.01 * torch.randn(64, 3, 4, 4, generator=g)
    k, b, var = fit(d, e, True)
    assert abs(k - 0.07) < 0.005 and torch.allclose(b, bias, atol=0.005) and abs(var - 1e-4) < 3e-5

    m, ctx = _calibrated(tiny_unet, tmp_path)
    q = _run("quant", m, {"weight_bits": 4, "act_bits": 8}, ctx)
    assert correction_for(q) is None
    p = _run("ptqd", q, {"samples": 4}, ctx)
    corr = correction_for(p)
    assert corr is not None
    # least squares never leaves more than the uncorrected noise (k = 0, bias = 0 is a candidate)
    assert ctx.metrics["fit_residual_mse"] <= ctx.metrics["eps_mse_uncorrected"]
    assert ctx.metrics["eps_mse_corrected"] > 0
    table = p.extras["ptqd"]
    assert len(table["timesteps"]) == 8 and table["bias"].shape == (8, 1)
    eps = torch.randn(2, 1, 16, 16)
    t = int(table["timesteps"][0])
    expect = (eps - table["bias"][0].view(1, 1, 1, 1)) / (1 + float(table["k"][0]))
    assert torch.allclose(corr.correct(eps, t), expect)
    assert corr.variance_offset(t) == pytest.approx(float(table["residual_var"][0]))
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    for sampler in ("ddim", "ddpm"):  # the corrected sampler runs down to t = 0 (no step after it)
        x = sample(TorchDenoiser(p), p.schedule, p.signature.sample_shape, 2, seed=0,
                   cfg=SamplerConfig(sampler, 2, eta=0.5 if sampler == "ddim" else 1.0), correction=corr)
        assert x.shape == (2, *p.signature.sample_shape) and torch.isfinite(x).all()


def test_ptqd_mixed_precision_changes_bits_by_step(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    m, ctx = _calibrated(tiny_unet, tmp_path)
    q = _run("quant", m, {"weight_bits": 8, "act_bits": 8}, ctx)
    p = _run("ptqd", q, {"samples": 4, "mixed_precision": True, "mp_bits": [4], "mp_min_snr_db": -1e9}, ctx)
    bits = p.extras["ptqd"]["act_bits"].tolist()
    assert bits[-1] == 8 and set(bits[:-1]) == {4}  # the last step (t_prev = -1) keeps the base width
    inp = q.example_inputs(batch=2)
    inp["timestep"] = torch.full((2,), float(p.extras["ptqd"]["timesteps"][0]))
    with torch.no_grad():
        a, b = q.module()(**inp), p.module()(**inp)
    assert not torch.equal(a, b)  # 4-bit activations at that step
    strict = _run("ptqd", q, {"samples": 4, "mixed_precision": True, "mp_bits": [4], "mp_min_snr_db": 1e9}, ctx)
    assert set(strict.extras["ptqd"]["act_bits"].tolist()) == {8}


def test_ptqd_recalibrates_ranges_per_width(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    m, ctx = _calibrated(tiny_unet, tmp_path)
    q = _run("quant", m, {"weight_bits": 8, "act_bits": 8}, ctx)
    opts = {"samples": 4, "mixed_precision": True, "mp_bits": [4], "mp_min_snr_db": -1e9}
    same = _run("ptqd", q, {**opts, "mp_recalibrate": False}, ctx)
    same_mse = ctx.metrics["eps_mse_by_width"]
    assert ctx.metrics["recalibrated_widths"] == [] and "width_names" not in same.extras["ptqd"]
    p = _run("ptqd", q, opts, ctx)
    assert ctx.metrics["recalibrated_widths"] == [4]
    # the 8-bit figures are untouched, the 4-bit ones better with their own ranges
    assert ctx.metrics["eps_mse_by_width"][8] == pytest.approx(same_mse[8])
    assert ctx.metrics["eps_mse_by_width"][4] < 0.8 * same_mse[4]
    table = p.extras["ptqd"]
    assert len(table["width_names"]) == table["width_scale"].shape[1] > 0
    # the per-width ranges survive the artifact (re-attached by the restorer)
    write_artifact(p, tmp_path / "art", {"passes": []})
    back = load_artifact(tmp_path / "art")
    inp = p.example_inputs(batch=2)
    inp["timestep"] = torch.full((2,), float(table["timesteps"][0]))
    with torch.no_grad():
        a, b, c = p.module()(**inp), back.module()(**inp), same.module()(**inp)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_builtin_recipes_use_real_option_names() -> None:
    from edgediff.recipe import load_recipe

    for name in ("w8a8", "w4a8", "w4a8-ptqd", "edge", "edge-pruned", "prune-diff"):
        r = load_recipe(name)
        for spec in r.passes:
            make_options(spec.name, spec.options, name)
    # the default recipe's description says what runs
    edge = load_recipe("edge")
    assert "no pruning" in edge.description and not any(p.name.startswith("prune") for p in edge.passes)
    pruned = load_recipe("edge-pruned")
    ft = next(p for p in pruned.passes if p.name == "finetune")
    assert ft.options["trajectories"] > 0 and "trajectories" in pruned.description


def test_composes_with_a_pruned_model(tmp_path: Path) -> None:
    """A UNet with uneven (pruned-like) channel counts goes through calib -> quant -> ptqd."""
    from diffusers import UNet2DModel

    from edgediff.pipeline import run_recipe
    from edgediff.recipe import parse

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                      norm_num_groups=8, attention_head_dim=8).eval()
    # prune output channels of one resnet conv1 (and the matching norm2/conv2 inputs), as structural pruning does
    rb = net.down_blocks[0].resnets[0]
    keep = torch.arange(0, 16, 2)
    rb.conv1 = _sub_conv(rb.conv1, out_idx=keep)
    rb.time_emb_proj = _sub_linear(rb.time_emb_proj, keep)
    rb.norm2 = torch.nn.GroupNorm(4, 8)
    rb.conv2 = _sub_conv(rb.conv2, in_idx=keep)
    model = DiffusionModel(net, NoiseSchedule.from_config({}), InputSignature((1, 16, 16)), "UNet2DModel", dict(net.config))
    recipe = parse('[[pass]]\nname = "calib"\nn_samples = 4\nsteps = 8\ninterval = 2\n'
                   '[[pass]]\nname = "quant"\nweight_bits = 4\nreconstruct = true\niters = 2\nact_iters = 2\n'
                   '[[pass]]\nname = "ptqd"\nsamples = 4\n', "test")
    out, records = run_recipe(model, recipe, cache_dir=tmp_path / "cache")
    assert [r.name for r in records] == ["calib", "quant", "ptqd"]
    qp = QuantParams.of(out)
    assert qp.layers["down_blocks.0.resnets.0.conv1"].weight.scale.shape == (8,)
    write_artifact(out, tmp_path / "art", {})
    back = load_artifact(tmp_path / "art")
    inp = model.example_inputs(batch=1)
    with torch.no_grad():
        assert torch.equal(out.module()(**inp), back.module()(**inp))


def _sub_conv(c: torch.nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> torch.nn.Conv2d:
    w = c.weight.detach()
    b = c.bias.detach() if c.bias is not None else None
    if out_idx is not None:
        w, b = w[out_idx], (b[out_idx] if b is not None else None)
    if in_idx is not None:
        w = w[:, in_idx]
    n = torch.nn.Conv2d(w.shape[1], w.shape[0], c.kernel_size, c.stride, c.padding, bias=b is not None)
    n.weight.data.copy_(w)
    if b is not None:
        n.bias.data.copy_(b)
    return n


def _sub_linear(lin: torch.nn.Linear, out_idx: torch.Tensor) -> torch.nn.Linear:
    n = torch.nn.Linear(lin.in_features, len(out_idx))
    n.weight.data.copy_(lin.weight.detach()[out_idx])
    n.bias.data.copy_(lin.bias.detach()[out_idx])
    return n


def test_ptqd_applies_the_correlated_correction_only_where_k_is_positive() -> None:
    from edgediff.passes.ptqd import fit

    g = torch.Generator().manual_seed(1)
    e = torch.randn(64, 2, 4, 4, generator=g)
    bias = torch.tensor([0.1, -0.3])
    d = -0.05 * e + bias.view(1, 2, 1, 1) + 0.01 * torch.randn(64, 2, 4, 4, generator=g)
    k, b, _ = fit(d, e, True)
    assert abs(k + 0.05) < 0.005  # the plain regression finds the negative gain
    k0, b0, var0 = fit(d, e, True, positive_k_only=True)
    assert k0 == 0.0 and torch.allclose(b0, d.mean((0, 2, 3)), atol=1e-6)
    assert var0 > 0.05**2 * 0.5  # the uncorrected correlated part stays in the residual
    kp, _, _ = fit(-d, -e, False, positive_k_only=True)
    assert kp < 0 or kp == 0.0
    kpos, _, _ = fit(0.05 * e, e, False, positive_k_only=True)
    assert abs(kpos - 0.05) < 1e-4  # positive gains are applied as fitted


def test_recipe_descriptions_match_what_runs() -> None:
    from edgediff.passes import make_options
    from edgediff.recipe import load_recipe

    r = load_recipe("w4a8-ptqd")
    ptqd = next(p for p in r.passes if p.name == "ptqd")
    opts = make_options("ptqd", ptqd.options)
    says_mp_on = "mixed precision" in r.description and "stays off" not in r.description
    assert says_mp_on == bool(opts.mixed_precision)
    assert opts.positive_k_only and "k > 0" in r.description
    # a quality floor is claimed exactly where the quant pass sets one, with its value
    from edgediff.recipe import builtin_names

    for name in builtin_names():
        rec = load_recipe(name)
        for spec in (p for p in rec.passes if p.name == "quant"):
            floor = make_options("quant", spec.options).min_psnr_db
            assert ("quality floor" in rec.description) == bool(floor), name
            if floor:
                assert f"{floor:g} dB quality floor" in rec.description, name


def test_reconstruction_loss_and_two_stages(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    """Loss summed over channels, averaged over batch x H x W; stage 1 runs with float activations,
    stage 2 learns the activation steps with the weights fixed."""
    from edgediff.quant import reconstruct as rc
    from edgediff.quant.core import ActQuantizer

    out, tgt = torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5)
    assert float(rc.recon_loss(out, tgt)) == pytest.approx(3.0)  # C, not C x H x W, per position
    assert float(rc.recon_loss(torch.zeros(2, 7, 6), torch.ones(2, 7, 6))) == pytest.approx(6.0)
    assert rc.ReconConfig().iters >= 1000 and rc.ReconConfig().lr == pytest.approx(1e-3)
    m, ctx = _calibrated(tiny_unet, tmp_path)
    q = _run("quant", m, {"weight_bits": 4, "act_bits": 8}, ctx)
    den = q.denoiser
    name = "down_blocks.0.resnets.0"
    block = den.get_submodule(name)
    seen: list[str] = []
    hooks = [a.register_forward_pre_hook(lambda mod, args: seen.append(mod.mode))
             for a in block.modules() if isinstance(a, ActQuantizer)]
    x = torch.randn(4, 16, 16, 16)
    temb = torch.randn(4, 64) if block.time_emb_proj is not None else None
    with torch.no_grad():
        target = block(x, temb) * 1.01
    stats = rc.reconstruct_block(block, [((x, temb), {})], [target], rc.ReconConfig(iters=5, act_iters=4))
    for h in hooks:
        h.remove()
    n_act = len([a for a in block.modules() if isinstance(a, ActQuantizer)])
    assert seen.count("off") == 5 * n_act  # stage 1: every call with float activations
    assert seen.count("quant") >= 4 * n_act  # stage 2 (and the before/after evaluations) quantized
    assert set(stats) >= {"mse_before", "mse_after", "reverted", "rounding_decided"}
    assert all(a.mode in ("quant", "off") and not a.scale.requires_grad
               for a in block.modules() if isinstance(a, ActQuantizer))


def test_asymmetric_and_split_weight_quantizers() -> None:
    from edgediff.quant.core import WeightQuantizer

    g = torch.Generator().manual_seed(0)
    # skewed rows (mostly positive): a zero point per channel uses the whole 4-bit grid
    w = torch.rand(6, 16, 3, 3, generator=g) * 2 - 0.2
    errs = {}
    for sym in (True, False):
        wq = WeightQuantizer(4, 6, symmetric=sym)
        wq.init(w, "mse")
        errs[sym] = float((wq(w) - w).pow(2).mean())
        tq = wq.tensor_quant()
        q = tq.quantize(wq(w))
        assert tq.signed == sym and int(q.min()) >= tq.qmin and int(q.max()) <= tq.qmax
        assert torch.allclose(tq.dequantize(q), wq(w), atol=1e-6)  # on the grid, zero points included
        if not sym:
            assert (tq.zero_point > 0).any()
    assert errs[False] < 0.7 * errs[True]
    # input halves of very different magnitude (a skip concatenation): each half its own scale
    w2 = torch.cat([torch.randn(6, 8, 3, 3, generator=g), 0.02 * torch.randn(6, 8, 3, 3, generator=g)], 1)
    one, split = WeightQuantizer(4, 6), WeightQuantizer(4, 6, split_at=8)
    one.init(w2, "mse")
    split.init(w2, "mse")
    assert torch.all(split.scale2 < 0.1 * split.scale)
    err = lambda q: float((q(w2)[:, 8:] - w2[:, 8:]).pow(2).mean())  # noqa: E731
    assert err(split) < 0.1 * err(one)
    tq1, tq2 = split.tensor_quant(), split.tensor_quant2()
    assert torch.equal(tq1.dequantize(tq1.quantize(split(w2)[:, :8])), split(w2)[:, :8])
    assert torch.allclose(tq2.dequantize(tq2.quantize(split(w2)[:, 8:])), split(w2)[:, 8:], atol=1e-7)
    # AdaRound keeps to each part's grid
    split.start_adaround(w2)
    hard = split.finish_adaround(w2)
    assert torch.allclose(tq2.dequantize(tq2.quantize(hard[:, 8:])), hard[:, 8:], atol=1e-7)


def test_w4a8_split_weights_through_reconstruction_lowering_and_onnx(tiny_unet: DiffusionModel,
                                                                      tmp_path: Path) -> None:
    import onnxruntime as ort
    from edgediff.exporters.onnx import build_onnx

    from edgediff.lowering import lower_model

    m, ctx = _calibrated(tiny_unet, tmp_path)
    q = _run("quant", m, {"weight_bits": 4, "split_weights": True, "reconstruct": True, "iters": 4,
                          "act_iters": 2, "recon_batch": 8}, ctx)
    assert "shortcut-split(weights too)" in ctx.metrics["method"]
    qp = QuantParams.of(q)
    split = {n: lq for n, lq in qp.layers.items() if lq.weight2 is not None}
    assert split and all(lq.meta.get("split_at") for lq in split.values())
    assert set(split) == {n for n, lq in qp.layers.items() if lq.kind == "conv" and lq.meta.get("split_at")}
    flat = dict(strip_quant_wrappers(copy.deepcopy(q.denoiser)).named_modules())
    for name, lq in split.items():  # each half of the baked weight lies on its own grid
        w = flat[name].weight.detach()
        for cols, tq in lq.weight_parts():
            assert torch.allclose(tq.dequantize(tq.quantize(w[:, cols])), w[:, cols], atol=1e-6), name
        assert not torch.equal(lq.weight.scale, lq.weight2.scale)
    write_artifact(q, tmp_path / "art", {})
    back = load_artifact(tmp_path / "art")
    assert torch.equal(_out(back), _out(q))
    assert QuantParams.of(back).layers[next(iter(split))].weight2 is not None
    # the lowering: one integer part per half, each with its own weight scale
    _, low = lower_model(q)
    name, lq = next(iter(split.items()))
    parts = low.layers[name].parts
    assert len(parts) == 2 and np.allclose(parts[1].weight_scale, lq.weight2.scale.numpy())
    # the ONNX int8 export on onnxruntime's integer kernels computes what the simulation computes;
    # the Q/DQ layout (TensorRT's) keeps float outputs between layers, so it is only close
    x = q.example_inputs(batch=1, seed=3)
    with torch.no_grad():
        ref = q.module().eval()(**x)
    for layout, tol in (("qlinear", 1e-4), ("qdq", 0.15)):
        proto, _ = build_onnx(q, "int8", layout=layout)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {i.name: x[i.name].numpy().astype(np.float32) for i in sess.get_inputs() if i.name in x}
        got = torch.from_numpy(sess.run(None, feed)[0])
        assert float((got - ref).abs().max()) < tol * float(ref.abs().max()), layout
    # a writer with one weight quantization per layer refuses instead of merging the halves
    with pytest.raises(BadInput, match="split_weights"):
        lq.refuse_split_weight("X")


def test_asymmetric_weights_simulated_lowered_and_exported(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    import onnxruntime as ort
    from edgediff.exporters.onnx import build_onnx

    from edgediff.lowering import lower_model

    m, ctx = _calibrated(tiny_unet, tmp_path)
    q = _run("quant", m, {"weight_bits": 4, "weight_symmetric": False}, ctx)
    assert "asymmetric-weights" in ctx.metrics["method"]
    qp = QuantParams.of(q)
    mid = qp.layers["down_blocks.0.resnets.0.conv1"]
    assert not mid.weight.signed and not mid.weight.symmetric
    assert qp.layers["conv_in"].weight.symmetric and qp.layers["conv_out"].weight.symmetric  # 8-bit edges
    flat = dict(strip_quant_wrappers(copy.deepcopy(q.denoiser)).named_modules())
    ints = mid.weight.quantize(flat["down_blocks.0.resnets.0.conv1"].weight)
    assert int(ints.min()) >= 0 and int(ints.max()) <= 15
    write_artifact(q, tmp_path / "art", {})
    assert torch.equal(_out(load_artifact(tmp_path / "art")), _out(q))
    # lowered as q - z: symmetric int8 integers with the same scale, exactly
    _, low = lower_model(q)
    part = low.layers["down_blocks.0.resnets.0.conv1"].parts[0]
    w = flat["down_blocks.0.resnets.0.conv1"].weight.detach().numpy()
    assert np.allclose(part.float_weight(), w, atol=1e-6) and part.weight_bits == 5
    assert int(np.abs(part.weight).max()) <= 15
    x = q.example_inputs(batch=1, seed=3)
    with torch.no_grad():
        ref = q.module().eval()(**x)
    proto, _ = build_onnx(q, "int8")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: x[i.name].numpy().astype(np.float32) for i in sess.get_inputs() if i.name in x}
    got = torch.from_numpy(sess.run(None, feed)[0])
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    # 8-bit asymmetric weights do not fit int8 once centred: refused, not exported symmetric
    q8 = _run("quant", m, {"weight_bits": 8, "weight_symmetric": False, "first_last_bits": 8}, ctx)
    with pytest.raises(BadInput, match="at most 7 bits"):
        build_onnx(q8, "int8")
