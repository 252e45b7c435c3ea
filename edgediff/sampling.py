"""PyTorch-side sampling: diffusers' own scheduler objects driving any denoiser, with edgediff's hooks.

A `Denoiser` is anything callable as `denoiser(x, t, cond) -> model output` on float32 torch
tensors, t of shape (B,) in the scheduler's timestep units, cond None / a tensor / a dict of
named inputs (InputSignature.conditioning): the PyTorch model (`TorchDenoiser`), an ONNX
Runtime session, a LiteRT interpreter, the OpenCL runtime.

The loop is exactly a diffusers pipeline's:

    scheduler.set_timesteps(steps)                     (mu for dynamically shifted flow models)
    x = randn((n, *shape), generator=Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        on_step(i, t, x_in)                            hook: calibration capture, progress
        out = denoiser(x_in, t, cond)                  batched; learned variance split off
        out = correction(out)                          hook: PTQD, in eps space
        x = scheduler.step(out, t, x, generator=g, eta=eta).prev_sample

All randomness (initial noise, stochastic steps) comes from that one generator and is drawn
for the whole set of samples at once, so batching the denoiser calls does not change the result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from edgediff import schedulers
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.schedule import NoiseSchedule

SAMPLERS = tuple(schedulers.SHORT_NAMES)
Cond = torch.Tensor | dict[str, torch.Tensor] | None


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor: ...


class EpsCorrection(Protocol):
    """Adjusts the model's noise estimate at step t, and the variance it adds (PTQD).

    A correction with `space` other than "eps" (PTQD on flow models: "velocity") is applied to
    the model output itself.
    """

    def correct(self, eps: torch.Tensor, t: int) -> torch.Tensor: ...

    def variance_offset(self, t: int) -> float:
        """Variance of the residual noise left in the corrected eps at step t, in eps units;
        the sampler scales it by the squared factor of eps in x_{t-1} and takes it out of sigma^2."""
        ...


class TorchDenoiser:
    """Runs a DiffusionModel's PyTorch module in inference mode (cond: tensor or dict of named inputs)."""

    def __init__(self, model: DiffusionModel, use_cache: bool = True) -> None:
        self.module = model.module().eval()
        self.num_classes = model.signature.num_classes
        self.has_cond = model.signature.cond_shape is not None
        # an artifact with a DeepCache schedule runs full and shallow calls (edgediff.deepcache)
        self.cache: Any = None
        cache = model.extras.get("cache") if use_cache else None
        if cache:
            from edgediff.deepcache import CachedDenoiser

            self.cache = CachedDenoiser(self._invoke, self.module, int(cache["depth"]), cache)

    def _invoke(self, module: Any, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        t = t.float()
        if isinstance(cond, dict):
            return module(x, t, **cond)
        if self.num_classes and not self.has_cond:
            # class-conditional models take labels as `cond` (int64)
            return module(x, t, None, cond)
        return module(x, t, cond)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        if self.cache is not None:
            return self.cache(x, t, cond)
        return self._invoke(self.module, x, t, cond)


@dataclass
class SamplerConfig:
    """sampler: None for the model's own scheduler, else a short name (SAMPLERS) or a diffusers class."""

    sampler: str | None = None
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 64
    # "linspace": the pipeline sets sigmas linspace(1, 1/steps, steps) itself (FluxPipeline and kin), not the
    # scheduler's own spacing; None: the scheduler's
    sigmas: str | None = None

    def __post_init__(self) -> None:
        if self.sampler:
            schedulers.resolve(self.sampler)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise BadInput(f"steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise BadInput(f"eta must be >= 0, got {self.eta}")
        if self.batch_size < 1:
            raise BadInput(f"batch_size must be >= 1, got {self.batch_size}")


def image_seq_len(sample_shape: tuple[int, ...], patch_size: int = 2) -> int:
    """Tokens the transformer sees (for dynamic shifting): packed (tokens, C) or (C, H, W) in patches."""
    if len(sample_shape) == 2:
        return int(sample_shape[0])
    return int((sample_shape[-2] // patch_size) * (sample_shape[-1] // patch_size))


def _flux_mu(cfg: dict[str, Any], seq: int) -> float:
    from edgediff.runtime.schedulers import calculate_shift  # torch-free: one home for the numpy runtime and here

    return calculate_shift(cfg, seq)


def make_scheduler(schedule: NoiseSchedule, sampler: str | None, steps: int,
                   sample_shape: tuple[int, ...] | None = None, sigmas: str | None = None) -> Any:
    """The diffusers scheduler that sample() drives, with its timesteps set (sigmas: SamplerConfig.sigmas)."""
    sch = schedule.make_scheduler(sampler)
    kw: dict[str, Any] = {}
    if sigmas == "linspace" and "sigmas" in inspect.signature(sch.set_timesteps).parameters \
            and not getattr(sch.config, "use_flow_sigmas", False):
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)  # as FluxPipeline.__call__ passes them
    if getattr(sch.config, "use_dynamic_shifting", False):
        if sample_shape is None:
            raise BadInput(f"{type(sch).__name__} uses dynamic shifting: the sample shape is needed to set mu")
        kw["mu"] = _flux_mu(dict(sch.config), image_seq_len(tuple(sample_shape)))
    try:
        sch.set_timesteps(steps, **kw)
    except (ValueError, TypeError) as e:
        raise BadInput(f"{type(sch).__name__}: cannot set {steps} steps ({e})") from None
    return sch


def init_sigma(sch: Any) -> float:
    """The scheduler's init_noise_sigma (flow-matching schedulers have none: 1)."""
    return float(getattr(sch, "init_noise_sigma", 1.0))


def sampler_name(schedule: NoiseSchedule, sampler: str | None) -> str:
    """What reports print: the diffusers class that runs (plus the short name asked for)."""
    if not sampler:
        return schedule.class_name
    cls, _ = schedulers.resolve(sampler)
    return cls if cls == sampler else f"{sampler} ({cls})"


def recorded_sampling(model: DiffusionModel, sampler: str | None = None, steps: int | None = None,
                      eta: float | None = None) -> tuple[str | None, int | None, float | None]:
    """Fill what the caller left unset from the sampling the artifact records (extras["sampling"],
    written by the sampling and distill.steps passes), so a model calibrated, cached or distilled
    for a schedule is generated and verified with it. The recorded steps and eta apply only with
    the recorded sampler (another sampler keeps its own default); unset stays None."""
    rec = model.extras.get("sampling") or {}
    if not rec:
        return sampler, steps, eta
    if sampler is not None and sampler != rec.get("sampler"):
        return sampler, steps, eta
    steps = steps if steps is not None else (int(rec["steps"]) if rec.get("steps") else None)
    eta = eta if eta is not None else (float(rec["eta"]) if rec.get("eta") is not None else None)
    return rec.get("sampler"), steps, eta


def _slice(cond: Cond, i: int, j: int) -> Cond:
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[i:j] for k, v in cond.items()}
    return cond[i:j]


def _batched(denoiser: Denoiser, x: torch.Tensor, t: float, cond: Cond, bs: int) -> torch.Tensor:
    outs = []
    for i in range(0, len(x), bs):
        xb = x[i : i + bs]
        tb = torch.full((len(xb),), float(t))
        outs.append(denoiser(xb, tb, _slice(cond, i, i + bs)))
    return torch.cat(outs)


def _t_value(t: torch.Tensor) -> int | float:
    v = float(t)
    return int(v) if v == int(v) and not t.is_floating_point() else v


def _ddpm_like_sigma(sch: Any, t: int, eta: float) -> tuple[float, float, float, float] | None:
    """(sigma, a_t, a_prev, kind) of DDPM/DDIM steps, for PTQD's variance absorption; None for others."""
    name = type(sch).__name__
    if name not in ("DDPMScheduler", "DDIMScheduler"):
        return None
    ac = sch.alphas_cumprod
    prev = int(sch.previous_timestep(t)) if hasattr(sch, "previous_timestep") else \
        t - sch.config.num_train_timesteps // sch.num_inference_steps
    a_t = float(ac[t])
    # past t = 0: DDIM's final_alpha_cumprod, DDPM's one (getattr's default would be evaluated eagerly)
    a_prev = float(ac[prev]) if prev >= 0 else float(sch.final_alpha_cumprod if hasattr(sch, "final_alpha_cumprod")
                                                     else sch.one)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    if name == "DDIMScheduler":
        return eta * var**0.5, a_t, a_prev, 0.0
    if sch.config.variance_type != "fixed_small" or t <= 0:
        return None
    return float(sch._get_variance(t)) ** 0.5, a_t, a_prev, 1.0


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    sample_shape: tuple[int, ...],
    n: int,
    seed: int = 0,
    cfg: SamplerConfig | None = None,
    cond: Cond = None,
    correction: EpsCorrection | None = None,
    on_step: Callable[[int, Any, torch.Tensor], None] | None = None,
    return_trajectory: bool = False,
    progress: Any = None,
    description: str = "sampling",
    stats: dict[str, Any] | None = None,
    packed_grid: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[Any, torch.Tensor]]]:
    """Generate `n` samples; returns the final samples (and the (t, x_in) trajectory if asked).

    on_step(i, t, x_in) is called before each denoiser call with exactly what the denoiser is
    given (scale_model_input applied), e.g. to collect calibration data; the trajectory holds
    the same. `progress` is an optional rich Progress; `stats` (a dict) receives
    sampler / steps / denoiser_calls. packed_grid: see initial_latents.
    """
    cfg = cfg or SamplerConfig()
    if n < 1:
        raise BadInput(f"number of samples must be >= 1, got {n}")
    sch = make_scheduler(schedule, cfg.sampler, cfg.steps, sample_shape, cfg.sigmas)
    g = torch.Generator().manual_seed(seed)
    x = initial_latents(tuple(sample_shape), n, g, packed_grid) * init_sigma(sch)
    kw = schedulers.step_kwargs(sch, g, cfg.eta)
    timesteps = list(sch.timesteps)
    learned = str(getattr(sch.config, "variance_type", "") or "").startswith("learned")
    traj: list[tuple[Any, torch.Tensor]] = []
    name = sampler_name(schedule, cfg.sampler)
    task = progress.add_task(f"{description} ({name}, {n} samples)", total=len(timesteps)) if progress else None
    calls = 0
    begin = getattr(getattr(denoiser, "cache", None), "begin", None)
    if begin is not None:  # DeepCache: a non-uniform schedule depends on the run's step count
        begin(len(timesteps))
    for i, t in enumerate(timesteps):
        if task is not None:
            progress.advance(task)
        tv = _t_value(t)
        x_in = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        if on_step is not None:
            on_step(i, tv, x_in)
        if return_trajectory:
            traj.append((tv, x_in.clone()))
        out = _batched(denoiser, x_in, float(t), cond, cfg.batch_size)
        calls += 1
        if out.shape[1] == 2 * x.shape[1] and not learned and out.dim() == x.dim():
            out = out[:, : x.shape[1]]  # learned-variance models (DiT, PixArt): the second half is the variance
        ptqd = None
        if correction is not None and getattr(correction, "space", "eps") != "eps":
            out = correction.correct(out, tv).to(out.dtype)  # fitted on the model's own output (flow velocity)
        elif correction is not None:
            eps, _ = schedule.to_eps_x0(out, x_in, tv)
            eps = correction.correct(eps, tv)
            out = schedule.from_eps(eps, x_in, tv).to(out.dtype)
        if correction is not None:
            ptqd = _ddpm_like_sigma(sch, int(tv), cfg.eta) if schedule.family == "discrete" else None
        if ptqd is not None and ptqd[0] > 0:
            x = _step_ptqd(sch, out, t, x, g, kw, ptqd, correction.variance_offset(tv))  # type: ignore[union-attr]
        else:
            x = sch.step(out, t, x, **kw).prev_sample
    if task is not None:
        progress.remove_task(task)
    if stats is not None:
        stats.update({"sampler": name, "steps": cfg.steps, "denoiser_calls": calls, "timesteps": len(timesteps)})
        cache = getattr(denoiser, "cache", None)
        if cache is not None:  # DeepCache: how many of the calls were full / shallow
            stats.update({"denoiser_calls_full": cache.calls["full"], "denoiser_calls_shallow": cache.calls["shallow"]})
    if return_trajectory:
        return x, traj
    return x


def _step_ptqd(sch: Any, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor, g: torch.Generator,
               kw: dict[str, Any], ptqd: tuple[float, float, float, float], var_offset: float) -> torch.Tensor:
    """A DDPM/DDIM step whose added noise has its variance reduced by the residual quantization noise.

    PTQD: the corrected eps still carries residual noise of variance `var_offset` (eps units), which
    reaches x_prev with factor c_eps; that much is taken out of sigma^2 so the total stays on schedule.
    """
    sigma, a_t, a_prev, is_ddpm = ptqd
    c_x0 = ((1 - a_t) / a_t) ** 0.5
    if is_ddpm:
        c_eps = a_prev**0.5 * (1 - a_t / a_prev) / (1 - a_t) * c_x0
    else:
        c_eps = max(1 - a_prev - sigma**2, 0.0) ** 0.5 - a_prev**0.5 * c_x0
    new_sigma = max(sigma**2 - c_eps**2 * var_offset, 0.0) ** 0.5
    if not is_ddpm:
        z = torch.randn(out.shape, generator=g, dtype=out.dtype)
        return sch.step(out, t, x, **{**kw, "generator": None, "variance_noise": z * (new_sigma / sigma)}).prev_sample
    # DDPMScheduler draws its own noise from g: replay the same draw to swap sigma for new_sigma
    peek = torch.Generator().set_state(g.get_state())
    prev = sch.step(out, t, x, **kw).prev_sample
    z = torch.randn(out.shape, generator=peek, dtype=out.dtype)
    return prev + (new_sigma - sigma) * z


# ---------------------------------------------------------------- back-compat helpers
def timesteps_for(schedule: NoiseSchedule, steps: int, sampler: str | None = None) -> list[int | float]:
    """The timesteps sample() visits (descending), one per denoiser call."""
    return [_t_value(t) for t in make_scheduler(schedule, sampler, steps).timesteps]


def initial_latents(shape: tuple[int, ...], n: int, g: torch.Generator,
                    packed_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """randn((n, *shape)) from g; with packed_grid (h, w) and shape (h*w, 4C), 2x2-packed latent tokens drawn as
    FluxPipeline.prepare_latents draws them: randn((n, C, 2h, 2w)) then packed, so a seed gives its latents."""
    if packed_grid is None or len(shape) != 2 or shape[1] % 4 or packed_grid[0] * packed_grid[1] != shape[0]:
        return torch.randn((n, *shape), generator=g)
    h, w = packed_grid
    c = shape[1] // 4
    x = torch.randn((n, c, 2 * h, 2 * w), generator=g)
    return x.view(n, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, 4 * c)


def packed_grid(model: DiffusionModel) -> tuple[int, int] | None:
    """(h, w) of the token grid of a packed-latent model (its img_ids input's grid: Flux), else None."""
    ids = next((s for s in model.signature.extra if s.name == "img_ids" and s.fill == "grid"), None)
    if ids is None or not ids.value or len(ids.value) != 2:
        return None
    return int(ids.value[0]), int(ids.value[1])


def unpack_latents(x: torch.Tensor, packed_grid: tuple[int, int]) -> torch.Tensor:
    """Packed 2x2 latent tokens (N, h*w, 4C) -> (N, C, 2h, 2w), as FluxPipeline._unpack_latents."""
    h, w = packed_grid
    n, _, c4 = x.shape
    x = x.reshape(n, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c4 // 4, h * 2, w * 2)


def initial_noise(shape: tuple[int, ...], n: int, seed: int, init_noise_sigma: float = 1.0) -> torch.Tensor:
    """The initial noise as diffusers pipelines draw it on CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g) * init_noise_sigma


def sample_model(model: DiffusionModel, n: int, seed: int = 0, cfg: SamplerConfig | None = None,
                 cond: Cond = None, denoiser: Denoiser | None = None, **kw: Any) -> torch.Tensor:
    """sample() with the model's own schedule, shape and example conditioning (when cond is None)."""
    if cond is None:
        cond = model.signature.conditioning(n, seed)
    out = sample(denoiser or TorchDenoiser(model), model.schedule, tuple(model.signature.sample_shape), n, seed, cfg,
                 cond=cond, **kw)
    return out  # type: ignore[return-value]
