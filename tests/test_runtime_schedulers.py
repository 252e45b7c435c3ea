"""The numpy scheduler ports and RNG against diffusers and torch (the runtime itself never imports torch)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from edgediff.errors import BadInput
from edgediff.runtime.rng import TorchGenerator
from edgediff.runtime.schedulers import from_config

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

CASES = [
    ("DDIMScheduler", {}, 10),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction", **SD_BETAS}, 7),
    ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": False, "steps_offset": 1}, 12),
    ("DDPMScheduler", {}, 10),
    ("DDPMScheduler", {"variance_type": "fixed_large", "timestep_spacing": "linspace"}, 8),
    ("EulerDiscreteScheduler", {}, 10),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, **SD_BETAS}, 9),
    ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"}, 6),
    ("EulerAncestralDiscreteScheduler", {}, 10),
    ("DPMSolverMultistepScheduler", {}, 10),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, 10),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, **SD_BETAS, "prediction_type": "v_prediction"}, 20),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "solver_type": "heun"}, 16),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 6),
    ("UniPCMultistepScheduler", {}, 10),
    ("UniPCMultistepScheduler", {"solver_order": 3}, 12),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 9),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, 8),
    # dynamic thresholding of x0 (sample_max_value 1: clip_sample for pixel-space models)
    ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.0}, 10),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}, 8),
    ("UniPCMultistepScheduler", {"thresholding": True, "sample_max_value": 1.0}, 10),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 1.5}, 10),
    ("LCMScheduler", {"thresholding": True, "sample_max_value": 1.0}, 4),
    ("LCMScheduler", {}, 4),
    ("LCMScheduler", {"prediction_type": "v_prediction", "original_inference_steps": 30}, 6),
    ("FlowMatchEulerDiscreteScheduler", {}, 10),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 8),
    # SD-1.x's own: PLMS with skip_prk_steps, steps_offset 1, final alpha from step 0
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False, **SD_BETAS}, 10),
    ("PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 7),
    ("PNDMScheduler", {}, 10),  # F-PNDM: 12 Runge-Kutta half steps, then PLMS
    ("PNDMScheduler", {"timestep_spacing": "linspace", "set_alpha_to_one": True}, 6),
]


def _fake_model(x: np.ndarray, t: float, i: int) -> np.ndarray:
    # smooth in x and t, different each step, so every solver term is exercised
    return (0.7 * np.tanh(x) + 0.05 * np.cos(0.01 * float(t) + i)).astype(np.float32)


@pytest.mark.parametrize("cls,extra,steps", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_scheduler_port_matches_diffusers_per_step(cls: str, extra: dict, steps: int) -> None:
    ref = getattr(diffusers, cls)(**extra)
    cfg = dict(ref.config)
    cfg["_class_name"] = cls
    port = from_config(cfg)
    ref.set_timesteps(steps)
    port.set_timesteps(steps)
    np.testing.assert_allclose(port.timesteps.astype(np.float64), ref.timesteps.numpy().astype(np.float64), atol=1e-4, rtol=1e-5)
    ref_sigma = float(getattr(ref, "init_noise_sigma", 1.0))  # flow matching: pipelines draw unscaled noise
    assert abs(port.init_noise_sigma - ref_sigma) < 1e-4 * max(1.0, ref_sigma)
    tg = torch.Generator().manual_seed(3)
    ng = TorchGenerator(3)
    x = (torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(1)) * ref_sigma).numpy()
    for i, t in enumerate(ref.timesteps):
        # both get diffusers' current sample, so each step is compared on its own
        xin_ref = ref.scale_model_input(torch.from_numpy(x), t).numpy() if hasattr(ref, "scale_model_input") else x
        xin = port.scale_model_input(x, port.timesteps[i])
        np.testing.assert_allclose(xin, xin_ref, atol=1e-5, rtol=1e-5)
        out = _fake_model(xin_ref, float(t), i)
        kw = {"generator": tg} if "generator" in ref.step.__code__.co_varnames else {}
        nxt_ref = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), **kw).prev_sample.numpy()
        nxt = port.step(out, port.timesteps[i], x, generator=ng)
        assert nxt.dtype == np.float32
        err = float(np.abs(nxt - nxt_ref).max())
        assert err <= 1e-5 * max(1.0, float(np.abs(nxt_ref).max())), f"step {i} (t={t}): max abs err {err}"
        x = nxt_ref


def test_ddim_eta_draws_like_diffusers() -> None:
    ref = diffusers.DDIMScheduler()
    port = from_config({**ref.config, "_class_name": "DDIMScheduler"}, eta=0.5)
    ref.set_timesteps(5)
    port.set_timesteps(5)
    tg, ng = torch.Generator().manual_seed(9), TorchGenerator(9)
    x = np.ones((1, 1, 4, 4), np.float32)
    for i, t in enumerate(ref.timesteps):
        out = _fake_model(x, float(t), i)
        a = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.5, generator=tg).prev_sample.numpy()
        b = port.step(out, port.timesteps[i], x, generator=ng)
        np.testing.assert_allclose(b, a, atol=1e-5)
        x = a


def test_unknown_scheduler_and_unported_options_are_bad_input() -> None:
    with pytest.raises(BadInput, match="no numpy port"):
        from_config({"_class_name": "KDPM2DiscreteScheduler"})
    with pytest.raises(BadInput, match="algorithm_type"):
        from_config({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(BadInput, match="thresholding"):
        from_config({"_class_name": "EulerDiscreteScheduler", "thresholding": True})


SHAPES = [(1,), (3,), (15,), (16,), (17,), (31,), (2, 1, 16, 16), (5, 3, 7), (64, 1, 16, 16)]


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**33 + 5])
def test_torch_generator_port_matches_torch_randn(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ng = TorchGenerator(seed)
    for shape in SHAPES:  # one stream: the serial path's cached value and the word order must line up
        a = torch.randn(shape, generator=g).numpy()
        b = ng.randn(shape)
        assert b.shape == a.shape and b.dtype == np.float32
        if int(np.prod(shape)) < 16:
            np.testing.assert_array_equal(b, a)  # double-precision path: exact
        else:
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)  # AVX2 float32 log/sincos: a few ulps


def test_torch_generator_seed_matters() -> None:
    assert not np.allclose(TorchGenerator(0).randn(32), TorchGenerator(1).randn(32))


def test_sampler_names_match_the_pytorch_side() -> None:
    from edgediff import schedulers
    from edgediff.runtime.schedulers import SAMPLER_PRESETS, SCHEDULERS

    ported = {k: v for k, v in schedulers.SHORT_NAMES.items() if v[0] in SCHEDULERS}
    assert SAMPLER_PRESETS == ported
