"""Samplers: exact on an oracle denoiser, deterministic under a seed, independent of batching."""

from __future__ import annotations

import pytest
import torch

from edgediff.errors import BadInput
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample, timesteps_for
from edgediff.schedule import NoiseSchedule


class Oracle:
    """The exact noise predictor for a data distribution concentrated on one image `c`."""

    def __init__(self, schedule: NoiseSchedule, c: torch.Tensor) -> None:
        self.ac, self.c, self.calls = schedule.alphas_cumprod, c, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        a = self.ac[t.long()].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.c) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_oracle_denoiser_recovers_the_data_point(sampler: str, eta: float) -> None:
    sched = NoiseSchedule.from_config({})
    c = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    oracle = Oracle(sched, c)
    x = sample(oracle, sched, (1, 4, 4), 3, seed=1, cfg=SamplerConfig(sampler, 10, eta))
    torch.testing.assert_close(x, c.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    assert oracle.calls == 10


def test_timesteps_are_descending_and_within_range() -> None:
    ts = timesteps_for(NoiseSchedule.from_config({}), 50)
    assert len(ts) == 50 and ts == sorted(ts, reverse=True) and ts[-1] == 0 and ts[0] < 1000


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_deterministic_and_batch_independent(tiny_unet, sampler: str) -> None:
    d = TorchDenoiser(tiny_unet)
    kw = dict(schedule=tiny_unet.schedule, sample_shape=(1, 16, 16), n=4)
    a = sample(d, seed=3, cfg=SamplerConfig(sampler, 5, batch_size=4), **kw)
    b = sample(d, seed=3, cfg=SamplerConfig(sampler, 5, batch_size=1), **kw)
    c = sample(d, seed=4, cfg=SamplerConfig(sampler, 5), **kw)
    # batched kernels differ in float rounding only (~1e-5); batch-dependent noise would differ by O(1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not torch.allclose(a, c, atol=1e-2)
    torch.testing.assert_close(a, sample(d, seed=3, cfg=SamplerConfig(sampler, 5, batch_size=4), **kw), atol=0, rtol=0)


def test_eta_changes_ddim_and_conditioning_is_passed(tiny_cond_unet) -> None:
    d = TorchDenoiser(tiny_cond_unet)
    cond = torch.randn(2, 6, 32)
    kw = dict(schedule=tiny_cond_unet.schedule, sample_shape=(4, 8, 8), n=2, seed=0)
    a = sample(d, cfg=SamplerConfig("ddim", 4, 0.0), cond=cond, **kw)
    b = sample(d, cfg=SamplerConfig("ddim", 4, 1.0), cond=cond, **kw)
    c = sample(d, cfg=SamplerConfig("ddim", 4, 0.0), cond=cond * 0, **kw)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_class_conditional_dit(tiny_dit) -> None:
    d = TorchDenoiser(tiny_dit)
    x = sample(d, tiny_dit.schedule, (4, 8, 8), 2, 0, SamplerConfig("ddim", 3), cond=torch.tensor([1, 7]))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_bad_sampler_options() -> None:
    with pytest.raises(BadInput, match="unknown scheduler"):
        SamplerConfig("eulerx")
    with pytest.raises(BadInput, match="unknown scheduler"):
        SamplerConfig("UNet2DModel")
    SamplerConfig("euler")  # short names and diffusers class names both resolve
    SamplerConfig("KDPM2DiscreteScheduler")
    with pytest.raises(BadInput):
        SamplerConfig("ddim", steps=0)


def test_schedules() -> None:
    lin = NoiseSchedule.from_config({"beta_schedule": "linear"})
    sl = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    cos = NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    for s in (lin, sl, cos):
        ac = s.alphas_cumprod
        assert (ac[1:] < ac[:-1]).all() and 0 < ac[-1] < ac[0] < 1
    with pytest.raises(BadInput):
        NoiseSchedule.from_config({"beta_schedule": "weird"})
    # v-prediction: eps/x0 recovered exactly from a consistent (x_t, v)
    v = NoiseSchedule.from_config({"prediction_type": "v_prediction"})
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = torch.tensor([300, 300])
    xt = v.add_noise(x0, eps, t)
    e2, x02 = v.to_eps_x0(v.target(x0, eps, t), xt, 300)
    torch.testing.assert_close(e2, eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(x02, x0, atol=1e-5, rtol=0)
