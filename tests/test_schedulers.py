"""Every supported diffusers scheduler: edgediff's sampling equals a plain diffusers loop over the same model.

The model folder carries the scheduler_config.json (read by `_class_name` through load_model),
so this checks the whole path: config -> NoiseSchedule -> diffusers object -> hooks -> samples.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import diffusers
import pytest
import torch

from edgediff.errors import BadInput
from edgediff.loaders import LoadOptions, load_model
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample, sample_model
from edgediff.schedule import NoiseSchedule

N, SEED, STEPS = 3, 11, 6
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
# (diffusers class, scheduler config, sampler steps): each exercises config keys the old DDIM path dropped
CASES = {
    "DDPMScheduler": ({"clip_sample": False, "variance_type": "fixed_small"}, STEPS),
    "DDIMScheduler": ({"clip_sample": False, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                       "prediction_type": "v_prediction", **SD_BETAS}, STEPS),
    "PNDMScheduler": ({"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False, **SD_BETAS}, STEPS),
    "EulerDiscreteScheduler": ({"use_karras_sigmas": True, **SD_BETAS}, STEPS),
    "EulerAncestralDiscreteScheduler": ({"prediction_type": "v_prediction", **SD_BETAS}, STEPS),
    "HeunDiscreteScheduler": ({"prediction_type": "sample", "clip_sample": False}, 4),
    "DPMSolverMultistepScheduler": ({"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True,
                                     **SD_BETAS}, STEPS),
    "UniPCMultistepScheduler": ({"timestep_spacing": "trailing", **SD_BETAS}, STEPS),
    "LCMScheduler": ({"original_inference_steps": 50, **SD_BETAS}, 4),
    "FlowMatchEulerDiscreteScheduler": ({"shift": 3.0}, STEPS),
    "EDMEulerScheduler": ({"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
                           "prediction_type": "v_prediction"}, STEPS),
}


def _folder(tmp_path: Path, unet: torch.nn.Module, sched: dict) -> Path:
    d = tmp_path / "m"
    unet.save_pretrained(d)
    (d / "scheduler_config.json").write_text(json.dumps(sched))
    return d


def plain_loop(unet: torch.nn.Module, cls: str, cfg: dict, steps: int, shape: tuple[int, ...], **set_kw) -> torch.Tensor:
    """What a diffusers pipeline does on CPU, written out: nothing from edgediff."""
    sch = getattr(diffusers, cls).from_config(cfg)
    sch.set_timesteps(steps, **set_kw)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn((N, *shape), generator=g) * getattr(sch, "init_noise_sigma", 1.0)  # flow: none
    params = inspect.signature(sch.step).parameters
    kw = {"generator": g} if "generator" in params else {}
    with torch.inference_mode():
        for t in sch.timesteps:
            x_in = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
            out = unet(x_in, t).sample
            x = sch.step(out, t, x, **kw).prev_sample
    return x


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


@pytest.mark.parametrize("cls", list(CASES))
def test_equals_plain_diffusers_loop(tmp_path: Path, unet: torch.nn.Module, cls: str) -> None:
    extra, steps = CASES[cls]
    cfg = {"_class_name": cls, **extra}
    model = load_model(_folder(tmp_path, unet, cfg))
    assert model.schedule.class_name == cls and model.schedule.config["_class_name"] == cls
    for k, v in extra.items():  # the whole config is kept
        assert model.schedule.config[k] == v or (k == "prediction_type" and model.schedule.prediction_type == v)
    stats: dict = {}
    got = sample_model(model, N, SEED, SamplerConfig(None, steps), stats=stats)
    want = plain_loop(unet, cls, cfg, steps, (2, 8, 8))
    err = float((got - want).abs().max())
    assert err <= 1e-4, f"{cls}: max abs diff {err}"
    plain = getattr(diffusers, cls).from_config(cfg)
    plain.set_timesteps(steps)
    assert stats["sampler"] == cls and stats["denoiser_calls"] == len(plain.timesteps) >= steps
    assert torch.isfinite(got).all() and float(got.abs().max()) > 0


@pytest.mark.parametrize("short,cls,overrides", [
    ("dpmpp-2m-karras", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    ("euler-a", "EulerAncestralDiscreteScheduler", {}),
    ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
])
def test_sampler_override_runs_that_scheduler_on_the_models_config(tmp_path: Path, unet, short, cls, overrides) -> None:
    cfg = {"_class_name": "DDPMScheduler", **SD_BETAS, "prediction_type": "v_prediction"}
    model = load_model(_folder(tmp_path, unet, cfg))
    got = sample_model(model, N, SEED, SamplerConfig(short, STEPS))
    # diffusers' idiom for switching: NewScheduler.from_config(pipe.scheduler.config, **overrides)
    full = {**diffusers.DDPMScheduler.from_config(cfg).config, **overrides}
    want = plain_loop(unet, cls, full, STEPS, (2, 8, 8))
    assert float((got - want).abs().max()) <= 1e-4


def test_dynamic_shift_uses_mu_from_the_token_count(tmp_path: Path, unet) -> None:
    from edgediff.sampling import _flux_mu, image_seq_len

    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_image_seq_len": 4,
           "max_image_seq_len": 64, "base_shift": 0.5, "max_shift": 1.15}
    model = load_model(_folder(tmp_path, unet, cfg))
    got = sample_model(model, N, SEED, SamplerConfig(None, STEPS))
    mu = _flux_mu(cfg, image_seq_len((2, 8, 8)))
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) / 60 * (16 - 4))
    want = plain_loop(unet, "FlowMatchEulerDiscreteScheduler", cfg, STEPS, (2, 8, 8), mu=mu)
    assert float((got - want).abs().max()) <= 1e-4


def test_unknown_scheduler_prediction_or_family_mismatch_is_bad_input(tmp_path: Path, unet) -> None:
    with pytest.raises(BadInput, match="NoSuchScheduler"):
        NoiseSchedule.from_config({"_class_name": "NoSuchScheduler"})
    with pytest.raises(BadInput, match="prediction_type"):
        NoiseSchedule.from_config({"_class_name": "DDIMScheduler", "prediction_type": "x_start"})
    with pytest.raises(BadInput, match="prediction_type"):
        NoiseSchedule.from_config({"_class_name": "EDMEulerScheduler", "prediction_type": "sample"})
    flow = NoiseSchedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(BadInput, match="flow"):
        flow.make_scheduler("ddim")
    bad = tmp_path / "sched.json"
    bad.write_text(json.dumps({"_class_name": "DDPMScheduler", "beta_schedule": "wobbly"}))
    with pytest.raises(BadInput, match="sched.json"):
        load_model(_folder(tmp_path, unet, {}), LoadOptions(scheduler_config=bad))


def test_full_config_kept_and_flow_edm_training_noise() -> None:
    s = NoiseSchedule.from_config({"_class_name": "DDIMScheduler", "steps_offset": 1, "clip_sample": False,
                                   "timestep_spacing": "trailing", "rescale_betas_zero_snr": True})
    c = s.to_config()
    assert c["_class_name"] == "DDIMScheduler" and c["steps_offset"] == 1 and c["clip_sample"] is False
    assert c["timestep_spacing"] == "trailing" and c["rescale_betas_zero_snr"] is True
    assert NoiseSchedule.from_config(c).to_config() == c
    x0, eps, t = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4), torch.tensor([0, 100, 500, 999])
    flow = NoiseSchedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    x, tt, target = flow.training_example(x0, eps, t)
    s_ = tt / 1000
    torch.testing.assert_close(x, (1 - s_.view(-1, 1, 1, 1)) * x0 + s_.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(target, eps - x0)
    assert float(s_[-1]) == pytest.approx(1.0) and float(s_[0]) == pytest.approx(3 * 1e-3 / (1 + 2 * 1e-3), rel=1e-4)
    edm = NoiseSchedule.from_config({"_class_name": "EDMEulerScheduler", "prediction_type": "epsilon"})
    x, tt, target = edm.training_example(x0, eps, t)
    sigma = torch.exp(4 * tt.double()).view(-1, 1, 1, 1)
    # a perfect F recovers x0 through the scheduler's own preconditioning
    sch = edm.make_scheduler()
    for i in range(4):
        d = sch.precondition_outputs((x[i] * (sigma[i] ** 2 + 0.25) ** 0.5).float(), target[i], sigma[i].float())
        torch.testing.assert_close(d, x0[i], atol=1e-4, rtol=1e-4)
    v = NoiseSchedule.from_config({"prediction_type": "v_prediction"})
    for sched in (flow, edm, v):  # PTQD's conversions: output -> (eps, x0) -> output, at the model's own timestep
        x, tt, target = sched.training_example(x0, eps, t)
        for i in range(3):  # not at s = 1 for flow: x0 is not identifiable from eps there
            e, x0_ = sched.to_eps_x0(target[i:i + 1], x[i:i + 1], float(tt[i]))
            torch.testing.assert_close(x0_, x0[i:i + 1], atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(sched.from_eps(e, x[i:i + 1], float(tt[i])), target[i:i + 1], atol=2e-3, rtol=1e-3)


def test_hooks_see_what_the_denoiser_sees_and_correction_applies(tiny_unet) -> None:
    """on_step gets the scaled model input; an EpsCorrection changes the samples."""
    sched = NoiseSchedule.from_config({"_class_name": "EulerDiscreteScheduler"})
    seen, fed = [], []
    den = TorchDenoiser(tiny_unet)

    def rec(x, t, cond=None):
        fed.append((float(t[0]), x.clone()))
        return den(x, t, cond)

    x = sample(rec, sched, (1, 16, 16), 2, 0, SamplerConfig(None, 3), on_step=lambda i, t, xi: seen.append((t, xi)))
    assert len(seen) == len(fed) == 3
    for (t1, a), (t2, b) in zip(seen, fed):
        assert t1 == pytest.approx(t2) and torch.equal(a, b)
    assert float(seen[0][1].std()) < 2  # scaled by 1/sqrt(sigma^2+1), not the raw ~157-sigma noise

    class Halve:
        def correct(self, eps, t):
            return eps * 0.5

        def variance_offset(self, t):
            return 0.1

    y = sample(den, sched, (1, 16, 16), 2, 0, SamplerConfig(None, 3), correction=Halve())
    assert not torch.allclose(x, y)
    ddpm = NoiseSchedule.from_config({"clip_sample": False})
    a = sample(den, ddpm, (1, 16, 16), 2, 0, SamplerConfig("ddpm", 3), correction=Halve())
    b = sample(den, ddpm, (1, 16, 16), 2, 0, SamplerConfig("ddpm", 3),
               correction=type("H0", (Halve,), {"variance_offset": lambda self, t: 0.0})())
    assert not torch.allclose(a, b)  # the residual variance is taken out of the DDPM noise


EDM = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
       "prediction_type": "epsilon"}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}


def test_index_of_inverts_the_model_timestep_in_every_family() -> None:
    idx = torch.tensor([0, 10, 250, 500, 999])
    for cfg in ({"_class_name": "DDPMScheduler"}, FLOW, EDM):
        sched = NoiseSchedule.from_config(cfg)
        got = sched.index_of(sched.timestep_input(idx))
        assert torch.equal(got, idx.double()), cfg["_class_name"]
    c_noise = NoiseSchedule.from_config(EDM).timestep_input(idx)
    assert float(c_noise.max()) < 2  # EDM's timesteps are log(sigma) / 4, not indices


def _pass(name: str, model, opts: dict, tmp_path: Path):
    from edgediff.passes import PassContext, get, make_options

    fn, _ = get(name)
    ctx = PassContext(cache_dir=tmp_path / "cache")
    return fn(model.clone(), make_options(name, opts), ctx), ctx


@pytest.mark.parametrize("cfg", [EDM, FLOW], ids=["edm", "flow"])
def test_ptq4dm_and_ptqd_use_the_schedulers_own_noise_level(tmp_path: Path, tiny_unet, cfg: dict) -> None:
    """ptq4dm draws its normal over the noise process, not over c_noise / sigma values read as
    indices; PTQD fits and corrects at the model's own fractional timesteps (an EDM schedule has
    no alphas; truncating c_noise in [-1.6, 1.1] to an integer merged the steps)."""
    from edgediff.passes.calib import load_calibration
    from edgediff.passes.ptqd import correction_for

    tiny_unet.schedule = NoiseSchedule.from_config(cfg)
    m, _ = _pass("calib", tiny_unet, {"method": "ptq4dm", "n_samples": 4, "steps": 8, "count": 64}, tmp_path)
    from edgediff.passes import PassContext

    data = load_calibration(m, PassContext(cache_dir=tmp_path / "cache"))
    traj_t = data["traj_t"].double()
    steps = {int((traj_t - float(t)).abs().argmin()) for t in data["t"]}
    # mean 0.4 T, std 0.25 T: the points come from several steps on both sides of the middle, and the
    # noisiest step (which every point took when c_noise was read as an index) holds a minority
    assert len(steps) >= 4
    noisiest = int(m.schedule.index_of(traj_t).argmax())
    assert float((data["t"].double() == traj_t[noisiest]).double().mean()) < 0.5
    q, _ = _pass("quant", m, {"weight_bits": 4, "act_bits": 8}, tmp_path)
    p, ctx = _pass("ptqd", q, {"samples": 4, "mixed_precision": True, "mp_bits": [4], "mp_min_snr_db": -1e9},
                   tmp_path)
    table = p.extras["ptqd"]
    assert torch.allclose(table["timesteps"].double(), traj_t)  # every step its own entry, not truncated
    assert not all(float(t).is_integer() for t in table["timesteps"])
    assert all(torch.isfinite(table["snr_db"]))
    corr = correction_for(p)
    assert [corr._i(float(t)) for t in traj_t] == list(range(len(traj_t)))
    assert ctx.metrics["fit_residual_mse"] <= ctx.metrics["eps_mse_uncorrected"]
    # flow: fitted on the velocity (eps is x itself at sigma = 1, and mapping back divides by 1 - sigma)
    assert table["space"] == ("velocity" if cfg is FLOW else "eps")
    x = sample(TorchDenoiser(p), p.schedule, (1, 16, 16), 2, 0, SamplerConfig(None, 8), correction=corr)
    assert torch.isfinite(x).all()
