"""distill.steps method="consistency": LCM's parameterisation, grid, scheduler and resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgediff import passes
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext
from edgediff.passes.distill import CKPT, consistency_fn, lcm_grid, lcm_schedule
from edgediff.sampling import SamplerConfig, make_scheduler, sample_model
from edgediff.schedule import NoiseSchedule


def _opts(**kw):
    _, cls = passes.get("distill.steps")
    base = dict(method="consistency", start_steps=8, target_steps=2, steps_per_round=4, batch_size=4,
                data="samples", data_pool=8)
    return cls(**{**base, **kw})


def test_consistency_function_is_lcm_schedulers_denoised_and_grid_matches() -> None:
    base = NoiseSchedule.from_config({})
    sch = make_scheduler(lcm_schedule(base, 8), None, 2)
    assert type(sch).__name__ == "LCMScheduler"
    assert {int(t) for t in sch.timesteps} <= set(lcm_grid(1000, 8))
    torch.manual_seed(0)
    z, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = sch.timesteps[0]
    denoised = sch.step(out, t, z, generator=torch.Generator().manual_seed(0)).denoised
    ac = base.alphas_cumprod.float()
    torch.testing.assert_close(consistency_fn("epsilon", out, z, torch.full((2,), int(t)), ac), denoised,
                               atol=1e-5, rtol=1e-4)


def test_options_are_checked() -> None:
    with pytest.raises(BadInput, match="method"):
        _opts(method="lcm-lora")
    with pytest.raises(BadInput, match="consistency needs"):
        _opts(start_steps=2, target_steps=4)


def test_consistency_student_samples_with_lcm_and_resumes(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    run, _ = passes.get("distill.steps")
    whole = run(tiny_unet.clone(), _opts(), PassContext())
    assert whole.schedule.class_name == "LCMScheduler" and whole.extras["sampling"]["steps"] == 2
    assert whole.extras["distill.steps"]["method"] == "consistency"
    assert any(not torch.equal(a, b) for a, b in zip(whole.denoiser.state_dict().values(),
                                                     tiny_unet.denoiser.state_dict().values()))
    stats: dict = {}
    x = sample_model(whole, 2, 0, SamplerConfig(None, 2), stats=stats)
    assert torch.isfinite(x).all() and stats["denoiser_calls"] == 2
    # interrupted after 2 of 4 steps (checkpointed), then resumed: equals the uninterrupted run
    ck = tmp_path / "ck"
    run(tiny_unet.clone(), _opts(steps_per_round=2, checkpoint_dir=str(ck), checkpoint_every=2), PassContext())
    assert (ck / CKPT).is_file()
    resumed = run(tiny_unet.clone(), _opts(checkpoint_dir=str(ck), checkpoint_every=2), PassContext())
    for a, b in zip(resumed.denoiser.state_dict().values(), whole.denoiser.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_consistency_loss_options_weight_and_bound_the_noisy_pairs() -> None:
    from edgediff.passes.distill import HUBER_C, consistency_loss

    ac = NoiseSchedule.from_config({}).alphas_cumprod.float()
    pred, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    t = torch.tensor([10, 999])
    assert consistency_loss(pred, target, t, ac, "l2", "uniform") == pytest.approx(1.0)
    # pseudo-Huber: sqrt(d^2 + c^2) - c
    assert consistency_loss(pred, target, t, ac, "huber", "uniform") == pytest.approx((1 + HUBER_C**2) ** 0.5 - HUBER_C)
    # min-SNR: the low-noise pair keeps weight 1, the t = 999 pair (SNR ~ 4e-5) almost none
    w = consistency_loss(pred, target, t, ac, "l2", "min-snr")
    snr = float(ac[999] / (1 - ac[999]))
    assert w == pytest.approx((1.0 + snr) / 2, rel=1e-4)
    # the first pair of the grid ends at t = 0, where f(z, 0) = z: the boundary anchors the chain
    z = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close(consistency_fn("epsilon", torch.randn_like(z), z, torch.tensor([0]), ac), z)
    with pytest.raises(BadInput, match="loss"):
        _opts(loss="l1")
    with pytest.raises(BadInput, match="weighting"):
        _opts(weighting="snr")
