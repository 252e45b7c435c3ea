"""DDPM and DDIM samplers that drive any denoiser behind a small call interface.

A `Denoiser` is anything callable as `denoiser(x_t, t, cond) -> model output` on float32
torch tensors with t of shape (B,): the PyTorch model (`TorchDenoiser`), or later an ONNX
Runtime session, a LiteRT interpreter, the OpenCL runtime. Samplers are deterministic
under a seed: all randomness (initial noise, DDPM/DDIM noise) comes from one generator and
is drawn for the whole set of samples at once, so batching the denoiser calls does not
change the result.

`EpsCorrection` lets a pass (PTQD) adjust each noise estimate and the sampler's variance
wherever the model runs, exported or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.schedule import NoiseSchedule

SAMPLERS = ("ddim", "ddpm")


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...


class EpsCorrection(Protocol):
    """Adjusts the model's noise estimate at step t, and the variance it adds (PTQD)."""

    def correct(self, eps: torch.Tensor, t: int) -> torch.Tensor: ...

    def variance_offset(self, t: int) -> float:
        """Variance of the residual noise left in the corrected eps at step t, in eps units;
        the sampler scales it by the squared factor of eps in x_{t-1} and takes it out of sigma^2."""
        ...


class TorchDenoiser:
    """Runs a DiffusionModel's PyTorch module in inference mode."""

    def __init__(self, model: DiffusionModel) -> None:
        self.module = model.module().eval()
        self.num_classes = model.signature.num_classes

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            # class-conditional models take labels as `cond` (int64)
            return self.module(x, t.float(), None, cond)
        return self.module(x, t.float(), cond)


@dataclass
class SamplerConfig:
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise BadInput(f"unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if self.steps < 1:
            raise BadInput(f"steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise BadInput(f"eta must be >= 0, got {self.eta}")


def timesteps_for(schedule: NoiseSchedule, steps: int) -> list[int]:
    """Evenly spaced integer timesteps, descending (diffusers' 'leading' spacing + offset 0)."""
    n = schedule.num_train_timesteps
    steps = min(steps, n)
    stride = n // steps
    return list(range(0, n, stride))[:steps][::-1]


def initial_noise(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


def _batched(denoiser: Denoiser, x: torch.Tensor, t: int, cond: torch.Tensor | None, bs: int) -> torch.Tensor:
    outs = []
    for i in range(0, len(x), bs):
        xb = x[i : i + bs]
        tb = torch.full((len(xb),), float(t))
        cb = cond[i : i + bs] if cond is not None else None
        outs.append(denoiser(xb, tb, cb))
    return torch.cat(outs)


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    sample_shape: tuple[int, ...],
    n: int,
    seed: int = 0,
    cfg: SamplerConfig | None = None,
    cond: torch.Tensor | None = None,
    correction: EpsCorrection | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    return_trajectory: bool = False,
    progress: Any = None,
    description: str = "sampling",
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Generate `n` samples; returns the final x_0 (and the (t, x_t) trajectory if asked).

    on_step(i, t, x_t) is called before each denoiser call, e.g. to collect calibration data.
    `progress` is an optional rich Progress that gets one task advancing per step.
    """
    cfg = cfg or SamplerConfig()
    if n < 1:
        raise BadInput(f"number of samples must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *sample_shape, generator=g)
    ts = timesteps_for(schedule, cfg.steps)
    ac = schedule.alphas_cumprod
    traj: list[tuple[int, torch.Tensor]] = []
    task = progress.add_task(f"{description} ({cfg.sampler.upper()}, {n} samples)", total=len(ts)) if progress else None
    for i, t in enumerate(ts):
        if task is not None:
            progress.advance(task)
        if on_step is not None:
            on_step(i, t, x)
        if return_trajectory:
            traj.append((t, x.clone()))
        out = _batched(denoiser, x, t, cond, cfg.batch_size)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned-variance models (DiT): the second half is the variance
        eps, x0 = schedule.to_eps_x0(out, x, t)
        if correction is not None:
            eps = correction.correct(eps, t)
            x0 = (x - (1 - float(ac[t])) ** 0.5 * eps) / float(ac[t]) ** 0.5
        x0 = x0.clamp(-1, 1)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = float(ac[t])
        a_prev = float(ac[t_prev]) if t_prev >= 0 else 1.0
        if cfg.sampler == "ddim":
            sigma = cfg.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        else:  # DDPM posterior variance for the (possibly strided) step
            sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        if correction is not None and sigma > 0:
            # PTQD: the residual quantization noise already adds variance; take it out of sigma^2.
            # c_eps: how an error in eps reaches x_{t-1} through x0 (and, for DDIM, the direction term)
            c_x0 = ((1 - a_t) / a_t) ** 0.5
            if cfg.sampler == "ddim":
                c_eps = max(1 - a_prev - sigma**2, 0.0) ** 0.5 - a_prev**0.5 * c_x0
            else:
                c_eps = a_prev**0.5 * (1 - a_t / a_prev) / (1 - a_t) * c_x0
            sigma = max(sigma**2 - c_eps**2 * correction.variance_offset(t), 0.0) ** 0.5
        if cfg.sampler == "ddim":
            # recompute eps from the clipped x0 so that DDIM stays consistent
            eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
            dir_xt = max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
            x = a_prev**0.5 * x0 + dir_xt
        else:
            # posterior mean of q(x_prev | x_t, x0)
            c0 = a_prev**0.5 * (1 - a_t / a_prev) / (1 - a_t)
            ct = (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t)
            x = c0 * x0 + ct * x
        if sigma > 0 and t_prev >= 0:
            x = x + sigma * torch.randn(x.shape, generator=g)
    if task is not None:
        progress.remove_task(task)
    if return_trajectory:
        return x, traj
    return x
