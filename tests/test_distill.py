"""distill.steps: the two-teacher-steps target, the rounds, the resulting scheduler, resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgediff import passes
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext
from edgediff.passes.distill import _coef, _ddim, _target, grid
from edgediff.sampling import SamplerConfig, make_scheduler, sample_model


def _opts(**kw):
    _, cls = passes.get("distill.steps")
    base = dict(start_steps=4, target_steps=2, steps_per_round=4, batch_size=4, data="samples", data_pool=8)
    return cls(**{**base, **kw})


def test_grids_nest_and_match_ddim_trailing() -> None:
    for s in (2, 4, 8):
        assert grid(1000, 2 * s)[::2] == grid(1000, s)
    from edgediff.passes.distill import ddim_trailing
    from edgediff.schedule import NoiseSchedule

    sch = make_scheduler(ddim_trailing(NoiseSchedule.from_config({})), None, 4)
    assert [int(t) for t in sch.timesteps] == grid(1000, 4)


def test_target_makes_one_student_step_land_on_two_teacher_steps() -> None:
    from edgediff.schedule import NoiseSchedule

    ac = NoiseSchedule.from_config({}).alphas_cumprod.float()
    torch.manual_seed(0)
    z = torch.randn(3, 1, 4, 4)
    t, t_mid, t_end = torch.tensor([999, 499, 249]), torch.tensor([874, 374, 124]), torch.tensor([749, 249, -1])
    z_end = _ddim("epsilon", torch.randn_like(z), _ddim("epsilon", torch.randn_like(z), z, t, t_mid, ac, None),
                  t_mid, t_end, ac, None)
    al, sg = _coef(ac, t)
    al_e, sg_e = _coef(ac, t_end)
    x_tilde = (z_end - sg_e / sg * z) / (al_e - sg_e / sg * al)
    for pred in ("epsilon", "v_prediction", "sample"):
        out = _target(pred, x_tilde, z, al, sg)
        torch.testing.assert_close(_ddim(pred, out, z, t, t_end, ac, None), z_end, atol=1e-4, rtol=1e-4)


def test_options_are_checked(tiny_unet: DiffusionModel, tiny_dit: DiffusionModel) -> None:
    with pytest.raises(BadInput, match="power of two"):
        _opts(start_steps=12, target_steps=4)
    with pytest.raises(BadInput, match="must divide"):
        passes.get("distill.steps")[0](tiny_unet.clone(), _opts(start_steps=6, target_steps=3), PassContext())
    with pytest.raises(BadInput, match="steps_per_round"):
        _opts(steps_per_round=0)


def test_distill_produces_a_ddim_trailing_student(tiny_unet: DiffusionModel) -> None:
    run, _ = passes.get("distill.steps")
    out = run(tiny_unet.clone(), _opts(start_steps=8, target_steps=2), PassContext())
    assert out.extras["sampling"]["steps"] == 2 and out.extras["distill.steps"]["rounds"] == 2
    assert out.schedule.class_name == "DDIMScheduler" and out.schedule.config["timestep_spacing"] == "trailing"
    changed = any(not torch.equal(a, b) for a, b in zip(out.denoiser.state_dict().values(),
                                                         tiny_unet.denoiser.state_dict().values()))
    assert changed
    stats: dict = {}
    x = sample_model(out, 2, 0, SamplerConfig(None, 2), stats=stats)
    assert torch.isfinite(x).all() and stats["denoiser_calls"] == 2


def test_distill_resumes_mid_round_and_after_rounds(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    run, _ = passes.get("distill.steps")
    whole = run(tiny_unet.clone(), _opts(steps_per_round=4), PassContext())
    # an interrupted run: 2 of 4 steps checkpointed (the running round), then the rerun continues
    part_dir = tmp_path / "ck"
    from edgediff.passes.distill import CKPT

    run(tiny_unet.clone(), _opts(steps_per_round=2, checkpoint_dir=str(part_dir), checkpoint_every=2), PassContext())
    assert (part_dir / CKPT).is_file()
    (part_dir / "distill_2.safetensors").unlink()  # as if it stopped before the round finished
    resumed = run(tiny_unet.clone(), _opts(steps_per_round=4, checkpoint_dir=str(part_dir), checkpoint_every=2),
                  PassContext())
    for a, b in zip(resumed.denoiser.state_dict().values(), whole.denoiser.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # a finished round is loaded, not retrained
    again = run(tiny_unet.clone(), _opts(steps_per_round=4, checkpoint_dir=str(part_dir)), PassContext())
    for a, b in zip(again.denoiser.state_dict().values(), resumed.denoiser.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
