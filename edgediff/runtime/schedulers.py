"""numpy ports of diffusers' schedulers, built from a diffusers scheduler config dict.

They follow diffusers' arithmetic step by step (float32 schedules made the way torch makes
them, the same timestep spacings, sigma conversions and solver updates), so a bundle
generates what the PyTorch pipeline generates; tests compare each one with diffusers per
step. Only what inference needs is ported: `set_timesteps`, `scale_model_input`, `step`
and `init_noise_sigma`. Stochastic steps draw from a `TorchGenerator` in the order
diffusers draws from a torch generator.

Not ported (a BadInput names the option): learned variances, dynamic shifting (ported for
FlowMatchEuler only), beta/exponential sigmas, SDE variants of DPM-Solver, custom timesteps. Dynamic thresholding of
x0 (`thresholding`) is ported for DDIM, DDPM, LCM, DPM-Solver++ multistep and UniPC.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgediff.errors import BadInput
from edgediff.runtime.rng import TorchGenerator
from edgediff.schedulers import SHORT_NAMES

F32 = np.float32


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(..., dtype=float32): float32 step, filled from both ends."""
    if steps == 1:
        return np.array([start], dtype=F32)
    s, e = F32(start), F32(end)
    step = F32((e - s) / F32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    out = np.where(i < half, s + step * i.astype(F32), e - step * (steps - 1 - i).astype(F32))
    return out.astype(F32)


def _betas(cfg: dict[str, Any]) -> np.ndarray:
    n = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=F32)
    elif kind == "linear":
        betas = _linspace_f32(b0, b1, n)
    elif kind == "scaled_linear":
        betas = (_linspace_f32(b0**0.5, b1**0.5, n) ** 2).astype(F32)
    elif kind == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=F32)
    else:
        raise BadInput(f"scheduler config: beta_schedule {kind!r} is not supported by the numpy runtime")
    if cfg.get("rescale_betas_zero_snr"):
        ac = np.cumprod(1.0 - betas, dtype=F32)
        s = np.sqrt(ac)
        s0, sT = s[0].copy(), s[-1].copy()
        s = (s - sT) * (s0 / (s0 - sT))
        ab = (s**2).astype(F32)
        alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]]).astype(F32)
        betas = (1 - alphas).astype(F32)
    return betas.astype(F32)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _karras(in_sigmas: np.ndarray, n: int, cfg: dict[str, Any]) -> np.ndarray:
    smin = cfg.get("sigma_min")
    smax = cfg.get("sigma_max")
    smin = float(in_sigmas[-1]) if smin is None else float(smin)
    smax = float(in_sigmas[0]) if smax is None else float(smax)
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _unsupported(cfg: dict[str, Any], name: str, keys: tuple[str, ...]) -> None:
    for k in keys:
        if cfg.get(k):
            raise BadInput(f"scheduler config: {name} option {k}={cfg[k]!r} is not supported by the numpy runtime")


class NumpyScheduler:
    """What every port offers; a subclass sets `timesteps` in set_timesteps."""

    name = ""
    stochastic = False
    unsupported: tuple[str, ...] = ()  # config options the port refuses with a BadInput

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = {k: v for k, v in config.items() if not k.startswith("_")}
        _unsupported(self.config, self.name, self.unsupported)
        self.num_train_timesteps = int(self.config.get("num_train_timesteps", 1000))
        self.prediction_type = self.config.get("prediction_type", "epsilon")
        self.timesteps = np.zeros(0)
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        raise NotImplementedError

    def _index_for_timestep(self, timestep: Any, second_if_repeated: bool = True) -> int:
        hits = np.nonzero(self.timesteps == timestep)[0]
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if (len(hits) > 1 and second_if_repeated) else hits[0])

    def _init_step_index(self, timestep: Any) -> None:
        if self._step_index is None:
            self._step_index = self._index_for_timestep(timestep)

    def _step_at(self, timestep: Any) -> int:
        """The index of this step (found from `timestep` on the first step)."""
        self._init_step_index(timestep)
        assert self._step_index is not None
        return self._step_index

    def _check_steps(self, n: int) -> None:
        if n < 1:
            raise BadInput(f"steps must be >= 1, got {n}")


def _spaced_timesteps(cfg: dict[str, Any], n_train: int, n: int, default: str) -> np.ndarray:
    """DDIM/DDPM/Euler spacing (`n` timesteps over the train range), float64 before casting."""
    spacing = cfg.get("timestep_spacing", default)
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // n
        return (np.arange(0, n) * ratio).round()[::-1].copy() + int(cfg.get("steps_offset", 0))
    if spacing == "trailing":
        ratio = n_train / n
        return np.round(np.arange(n_train, 0, -ratio)) - 1
    raise BadInput(f"scheduler config: timestep_spacing {spacing!r} is not supported")


def _x0_from(prediction_type: str, out: np.ndarray, sample: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from a discrete-time model output at alpha_cumprod a."""
    sa, sb = F32(a**0.5), F32((1 - a) ** 0.5)
    if prediction_type == "epsilon":
        return (sample - sb * out) / sa, out
    if prediction_type == "sample":
        return out, (sample - sa * out) / sb
    if prediction_type == "v_prediction":
        return sa * sample - sb * out, sa * out + sb * sample
    raise BadInput(f"scheduler config: prediction_type {prediction_type!r} is not supported")


class _Discrete(NumpyScheduler):
    thresholds = False  # ports that apply diffusers' dynamic thresholding to x0 (`thresholding`)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if not self.thresholds:
            _unsupported(self.config, self.name, ("thresholding",))
        self.betas = _betas(self.config)
        self.alphas_cumprod = np.cumprod((1.0 - self.betas).astype(F32), dtype=F32)

    def _set_spaced(self, num_inference_steps: int) -> None:
        """DDIM's and DDPM's integer timesteps ("leading" spacing by default)."""
        self._check_steps(num_inference_steps)
        if num_inference_steps > self.num_train_timesteps:
            raise BadInput(f"steps ({num_inference_steps}) cannot exceed num_train_timesteps ({self.num_train_timesteps})")
        self.num_inference_steps = num_inference_steps
        spacing = self.config.get("timestep_spacing", "leading")
        ts = _spaced_timesteps(self.config, self.num_train_timesteps, num_inference_steps, "leading")
        self.timesteps = (ts.round() if spacing == "linspace" else ts).astype(np.int64)

    def _clip(self, x0: np.ndarray, default: bool) -> np.ndarray:
        """thresholding, else clip_sample (on by default for DDIM/DDPM, off for LCM), as diffusers orders them."""
        if self.config.get("thresholding"):
            return self._threshold(x0)
        if self.config.get("clip_sample", default):
            r = float(self.config.get("clip_sample_range", 1.0))
            x0 = np.clip(x0, -r, r)
        return x0

    def _threshold(self, x0: np.ndarray) -> np.ndarray:
        """diffusers' dynamic thresholding: per sample s = the ratio-quantile of |x0|, clamped to
        [1, sample_max_value]; x0 -> clip(x0, -s, s) / s (sample_max_value 1: clip_sample on x0)."""
        flat = x0.reshape(x0.shape[0], -1).astype(F32)
        q = np.quantile(np.abs(flat), float(self.config.get("dynamic_thresholding_ratio", 0.995)), axis=1)
        sv = np.minimum(np.maximum(q, 1.0), float(self.config.get("sample_max_value", 1.0))).astype(F32)[:, None]
        return (np.clip(flat, -sv, sv) / sv).reshape(x0.shape).astype(F32)


class DDIM(_Discrete):
    name = "DDIMScheduler"
    thresholds = True

    def __init__(self, config: dict[str, Any], eta: float = 0.0) -> None:
        super().__init__(config)
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        set_one = self.config.get("set_alpha_to_one", True)
        self.final_alpha_cumprod = F32(1.0) if set_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._set_spaced(num_inference_steps)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        assert self.num_inference_steps is not None, "call set_timesteps first"
        t = int(timestep)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
        x0, eps = _x0_from(self.prediction_type, model_output, sample, a_t)
        x0 = self._clip(x0, True)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var**0.5
        direction = F32((1 - a_prev - std**2) ** 0.5) * eps
        prev = F32(a_prev**0.5) * x0 + direction
        if self.eta > 0:
            if generator is None:
                raise ValueError("DDIM with eta > 0 needs a generator")
            prev = prev + F32(std) * generator.randn(model_output.shape)
        return prev.astype(F32)


class DDPM(_Discrete):
    name = "DDPMScheduler"
    thresholds = True
    stochastic = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.variance_type = self.config.get("variance_type", "fixed_small")
        if self.variance_type in ("learned", "learned_range"):
            raise BadInput(f"scheduler config: DDPMScheduler variance_type {self.variance_type!r} "
                           "is not supported by the numpy runtime")

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._set_spaced(num_inference_steps)

    def _prev(self, t: int) -> int:
        idx = int(np.nonzero(self.timesteps == t)[0][0])
        return int(self.timesteps[idx + 1]) if idx + 1 < len(self.timesteps) else -1

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        t = int(timestep)
        prev_t = self._prev(t)
        a_t = F32(self.alphas_cumprod[t])
        a_prev = F32(self.alphas_cumprod[prev_t]) if prev_t >= 0 else F32(1.0)
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        cur_a = F32(a_t / a_prev)
        cur_b = F32(1) - cur_a
        x0, _ = _x0_from(self.prediction_type, model_output, sample, float(a_t))
        x0 = self._clip(x0, True)
        c0 = F32(a_prev**0.5 * cur_b / b_t)
        ct = F32(cur_a**0.5 * b_prev / b_t)
        prev = c0 * x0 + ct * sample
        if t > 0:
            if generator is None:
                raise ValueError("DDPM needs a generator")
            noise = generator.randn(model_output.shape)
            var = max(float(b_prev / b_t * cur_b), 1e-20)
            if self.variance_type == "fixed_small":
                scale = var**0.5
            elif self.variance_type == "fixed_small_log":
                scale = math.exp(0.5 * math.log(var))
            elif self.variance_type == "fixed_large":
                scale = float(cur_b) ** 0.5
            elif self.variance_type == "fixed_large_log":
                scale = math.log(float(cur_b)) ** 0.5
            else:
                raise BadInput(f"scheduler config: DDPMScheduler variance_type {self.variance_type!r} is not supported")
            prev = prev + F32(scale) * noise
        return prev.astype(F32)


class _Sigma(_Discrete):
    """Schedulers that work in sigma space over the discrete alphas_cumprod."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if self.config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = F32(2**-24)
        self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(F32)
        self.sigmas = np.zeros(0, dtype=F32)

    def _final_sigma(self) -> float:
        kind = self.config.get("final_sigmas_type", "zero")
        if kind == "sigma_min":
            a0 = self.alphas_cumprod[0]
            return float(((1 - a0) / a0) ** 0.5)
        if kind == "zero":
            return 0.0
        raise BadInput(f"scheduler config: final_sigmas_type {kind!r} is not supported")

    def _euler_timesteps(self, n: int) -> np.ndarray:
        """Euler's and Euler-ancestral's float timesteps ("linspace" spacing by default)."""
        self._check_steps(n)
        self.num_inference_steps = n
        spacing = self.config.get("timestep_spacing", "linspace")
        if spacing == "linspace":
            return np.linspace(0, self.num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
        return _spaced_timesteps(self.config, self.num_train_timesteps, n, spacing).astype(np.float32)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, sigma: float, who: str = "",
                  sample_prediction: bool = True) -> np.ndarray:
        """x0 from the model output at `sigma` (Euler-type; `who` names the scheduler in the error)."""
        if sample_prediction and self.prediction_type in ("original_sample", "sample"):
            return model_output
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        raise BadInput(f"scheduler config: {who}prediction_type {self.prediction_type!r} is not supported")


class Euler(_Sigma):
    name = "EulerDiscreteScheduler"
    unsupported = ("use_exponential_sigmas", "use_beta_sigmas")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if self.config.get("timestep_type", "discrete") == "continuous" and self.prediction_type == "v_prediction":
            raise BadInput("scheduler config: EulerDiscreteScheduler continuous v-prediction timesteps are not supported")

    @property
    def init_noise_sigma(self) -> float:
        m = float(np.max(self.sigmas))
        if self.config.get("timestep_spacing", "linspace") in ("linspace", "trailing"):
            return m
        return float((F32(m) ** 2 + 1) ** 0.5)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        ts = self._euler_timesteps(n)
        sig = np.array(self.train_sigmas)
        log_sigmas = np.log(sig)
        interp = self.config.get("interpolation_type", "linear")
        if interp == "linear":
            sigmas = np.interp(ts, np.arange(0, len(sig)), sig)
        elif interp == "log_linear":
            sigmas = np.exp(_linspace_f32(float(np.log(sig[-1])), float(np.log(sig[0])), n + 1))
        else:
            raise BadInput(f"scheduler config: interpolation_type {interp!r} is not supported")
        if self.config.get("use_karras_sigmas"):
            sigmas = _karras(sigmas, n, self.config)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(F32)
        self.timesteps = ts.astype(np.float32)
        self._step_index = None

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(F32)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        i = self._step_at(timestep)
        sigma = self.sigmas[i]
        sigma_hat = sigma  # s_churn = 0 as in the pipelines
        x0 = self._denoised(model_output, sample, sigma_hat)
        derivative = (sample - x0) / sigma_hat
        dt = self.sigmas[i + 1] - sigma_hat
        self._step_index = i + 1
        return (sample + derivative * dt).astype(F32)


class EulerAncestral(Euler):
    name = "EulerAncestralDiscreteScheduler"
    stochastic = True

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        ts = self._euler_timesteps(n)
        sig = np.array(self.train_sigmas)
        sigmas = np.interp(ts, np.arange(0, len(sig)), sig)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = ts.astype(np.float32)
        self._step_index = None

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        i = self._step_at(timestep)
        sigma = self.sigmas[i]
        x0 = self._denoised(model_output, sample, sigma, "EulerAncestral ", sample_prediction=False)
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        s_down = (s_to**2 - s_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (s_down - sigma)
        if generator is None:
            raise ValueError("EulerAncestral needs a generator")
        prev = prev + generator.randn(model_output.shape) * s_up
        self._step_index = i + 1
        return prev.astype(F32)


def _multistep_timesteps(cfg: dict[str, Any], last: int, n_train: int, n: int) -> np.ndarray:
    """DPM-Solver++/UniPC spacing: `n` integer timesteps below `last` (lambda-clipped end)."""
    spacing = cfg.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + int(cfg.get("steps_offset", 0))
    if spacing == "trailing":
        ratio = n_train / n
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
    raise BadInput(f"scheduler config: timestep_spacing {spacing!r} is not supported")


class _Multistep(_Sigma):
    """Shared by DPM-Solver++ multistep and UniPC: timestep spacing, Karras sigmas, x0 form."""

    def _alpha_sigma(self, sigma: float) -> tuple[float, float]:
        if self.config.get("use_flow_sigmas"):
            return 1 - sigma, sigma
        a = 1 / (sigma**2 + 1) ** 0.5
        return a, sigma * a

    def _lam(self, sigma: float) -> float:
        a, s = self._alpha_sigma(float(sigma))
        return math.log(a) - math.log(s)

    def _step_h(self, sigma_t: float, sigma_s0: float) -> tuple[float, float, float, float, float]:
        """(alpha_t, sigma_t, sigma_s0, lambda_s0, h) of the step sigma_s0 -> sigma_t (h = inf into sigma 0)."""
        a_t, s_t = self._alpha_sigma(sigma_t)
        a_s0, s_s0 = self._alpha_sigma(sigma_s0)
        lam_t = math.log(a_t) - math.log(s_t) if s_t > 0 else math.inf
        lam_s0 = math.log(a_s0) - math.log(s_s0)
        return a_t, s_t, s_s0, lam_s0, lam_t - lam_s0

    thresholds = True

    def _x0(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        assert self._step_index is not None
        sigma = float(self.sigmas[self._step_index])
        a, s = self._alpha_sigma(sigma)
        pt = self.prediction_type
        if pt == "epsilon":
            x0 = (sample - F32(s) * model_output) / F32(a)
        elif pt == "sample":
            x0 = model_output
        elif pt == "v_prediction":
            x0 = F32(a) * sample - F32(s) * model_output
        elif pt == "flow_prediction":
            x0 = sample - F32(sigma) * model_output
        else:
            raise BadInput(f"scheduler config: prediction_type {pt!r} is not supported")
        return self._threshold(x0) if self.config.get("thresholding") else x0



class DPMSolverMultistep(_Multistep):
    name = "DPMSolverMultistepScheduler"
    unsupported = ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_dynamic_shifting")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if self.config.get("variance_type") in ("learned", "learned_range"):
            raise BadInput(f"scheduler config: {self.name} with learned variance is not supported by the numpy runtime")
        algo = self.config.get("algorithm_type", "dpmsolver++")
        if algo != "dpmsolver++":
            raise BadInput(f"scheduler config: DPMSolverMultistepScheduler algorithm_type {algo!r} is not supported "
                           "by the numpy runtime (dpmsolver++ is)")
        self.order = int(self.config.get("solver_order", 2))
        if self.order not in (1, 2, 3):
            raise BadInput(f"scheduler config: solver_order {self.order} is not supported")
        self.solver_type = self.config.get("solver_type", "midpoint")
        if self.solver_type not in ("midpoint", "heun"):
            self.solver_type = "midpoint"  # diffusers maps the DEIS/UniPC names onto midpoint
        ac = self.alphas_cumprod.astype(F32)
        self.lambda_t = (np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))).astype(F32)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        n = num_inference_steps
        cfg = self.config
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], float(cfg.get("lambda_min_clipped", -math.inf)), side="left"))
        last = self.num_train_timesteps - clipped_idx
        ts = _multistep_timesteps(cfg, last, self.num_train_timesteps, n)
        sig = np.array(self.train_sigmas)
        log_sigmas = np.log(sig)
        if cfg.get("use_karras_sigmas"):
            sigmas = _karras(np.flip(sig).copy(), n, cfg)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.get("beta_schedule", "linear") != "squaredcos_cap_v2":
                ts = ts.round()
        elif cfg.get("use_flow_sigmas"):
            alphas = np.linspace(1, 1 / self.num_train_timesteps, n + 1)
            s = 1.0 - alphas
            shift = float(cfg.get("flow_shift", 1.0))
            sigmas = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
            ts = (sigmas * self.num_train_timesteps).copy()
        else:
            sigmas = np.interp(ts, np.arange(0, len(sig)), sig)
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(F32)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = len(ts)
        self.model_outputs: list[np.ndarray | None] = [None] * self.order
        self.lower_order_nums = 0
        self._step_index = None

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        i = self._step_at(timestep)
        n = len(self.timesteps)
        cfg = self.config
        lower_final = i == n - 1 and (cfg.get("euler_at_final", False) or (cfg.get("lower_order_final", True) and n < 15)
                                      or cfg.get("final_sigmas_type", "zero") == "zero")
        lower_second = i == n - 2 and cfg.get("lower_order_final", True) and n < 15
        m = self._x0(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [m]
        a_t, sg_t, sg_s0, lam_s0, h = self._step_h(float(self.sigmas[i + 1]), float(self.sigmas[i]))
        emh = math.exp(-h)  # exp(-inf) = 0 at the final zero sigma
        if self.order == 1 or self.lower_order_nums < 1 or lower_final:
            x = F32(sg_t / sg_s0) * sample - F32(a_t * (emh - 1.0)) * m
        elif self.order == 2 or self.lower_order_nums < 2 or lower_second:
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            assert m0 is not None and m1 is not None
            lam_s1 = self._lam(float(self.sigmas[i - 1]))
            r0 = (lam_s0 - lam_s1) / h
            d1 = F32(1.0 / r0) * (m0 - m1)
            if self.solver_type == "midpoint":
                x = F32(sg_t / sg_s0) * sample - F32(a_t * (emh - 1.0)) * m0 - F32(0.5 * a_t * (emh - 1.0)) * d1
            else:
                x = F32(sg_t / sg_s0) * sample - F32(a_t * (emh - 1.0)) * m0 + F32(a_t * ((emh - 1.0) / h + 1.0)) * d1
        else:
            m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
            assert m0 is not None and m1 is not None and m2 is not None
            lam_s1 = self._lam(float(self.sigmas[i - 1]))
            lam_s2 = self._lam(float(self.sigmas[i - 2]))
            r0, r1 = (lam_s0 - lam_s1) / h, (lam_s1 - lam_s2) / h
            d1_0, d1_1 = F32(1.0 / r0) * (m0 - m1), F32(1.0 / r1) * (m1 - m2)
            d1 = d1_0 + F32(r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = F32(1.0 / (r0 + r1)) * (d1_0 - d1_1)
            x = (F32(sg_t / sg_s0) * sample - F32(a_t * (emh - 1.0)) * m0 + F32(a_t * ((emh - 1.0) / h + 1.0)) * d1
                 - F32(a_t * ((emh - 1.0 + h) / h**2 - 0.5)) * d2)
        if self.lower_order_nums < self.order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        return np.asarray(x, dtype=F32)


class UniPC(_Multistep):
    name = "UniPCMultistepScheduler"
    unsupported = ("use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting", "use_flow_sigmas", "solver_p")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if not self.config.get("predict_x0", True):
            raise BadInput("scheduler config: UniPCMultistepScheduler predict_x0=false is not supported by the numpy runtime")
        self.order = int(self.config.get("solver_order", 2))
        st = self.config.get("solver_type", "bh2")
        self.solver_type = st if st in ("bh1", "bh2") else "bh2"
        self.disable_corrector = list(self.config.get("disable_corrector", []) or [])

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        n = num_inference_steps
        cfg = self.config
        ts = _multistep_timesteps(cfg, self.num_train_timesteps, self.num_train_timesteps, n)
        sig = np.array(self.train_sigmas)
        if cfg.get("use_karras_sigmas"):
            log_sigmas = np.log(sig)
            sigmas = _karras(np.flip(sig).copy(), n, cfg)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas]).round()
            last = float(sigmas[-1]) if cfg.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
        else:
            sigmas = np.interp(ts, np.arange(0, len(sig)), sig)
            last = self._final_sigma()
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = len(ts)
        self.model_outputs: list[np.ndarray | None] = [None] * self.order
        self.lower_order_nums = 0
        self.last_sample: np.ndarray | None = None
        self.this_order = 1
        self._step_index = None

    def _coeffs(self, h: float, rks: list[float], order: int) -> tuple[float, float, np.ndarray, np.ndarray]:
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        fact = 1
        b_h = hh if self.solver_type == "bh1" else math.expm1(hh)
        r = np.array(rks + [1.0])
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(r ** (i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        return h_phi_1, b_h, np.stack(rows), np.array(b)

    def _differences(self, m0: np.ndarray, lam_s0: float, h: float, at: int,
                     order: int) -> tuple[list[float], list[np.ndarray]]:
        """UniPC's r_k and D1_k over the previous model outputs (the step ends at sigma index `at`)."""
        rks, d1s = [], []
        for k in range(1, order):
            mk = self.model_outputs[-(k + 1)]
            assert mk is not None
            rk = (self._lam(float(self.sigmas[at - k])) - lam_s0) / h
            rks.append(rk)
            d1s.append((mk - m0) / F32(rk))
        return rks, d1s

    def _predict(self, sample: np.ndarray, order: int) -> np.ndarray:
        i = self._step_index
        assert i is not None
        m0 = self.model_outputs[-1]
        assert m0 is not None
        a_t, s_t, s_s0, lam_s0, h = self._step_h(float(self.sigmas[i + 1]), float(self.sigmas[i]))
        if math.isinf(h):
            # final step to sigma 0 (first order there): the phi terms collapse to x_t = x0 estimate
            return (F32(s_t / s_s0) * sample + F32(a_t) * m0).astype(F32)
        rks, d1s = self._differences(m0, lam_s0, h, i, order)
        h_phi_1, b_h, rr, b = self._coeffs(h, rks, order)
        x = F32(s_t / s_s0) * sample - F32(a_t * h_phi_1) * m0
        if d1s:
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(rr[:-1, :-1], b[:-1])
            res = sum(F32(rh) * d for rh, d in zip(rhos, d1s))
            x = x - F32(a_t * b_h) * res
        return x.astype(F32)

    def _correct(self, model_t: np.ndarray, last_sample: np.ndarray, this_sample: np.ndarray, order: int) -> np.ndarray:
        i = self._step_index
        assert i is not None
        m0 = self.model_outputs[-1]
        assert m0 is not None
        a_t, s_t, s_s0, lam_s0, h = self._step_h(float(self.sigmas[i]), float(self.sigmas[i - 1]))
        rks, d1s = self._differences(m0, lam_s0, h, i - 1, order)
        h_phi_1, b_h, rr, b = self._coeffs(h, rks, order)
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(rr, b)
        x = F32(s_t / s_s0) * last_sample - F32(a_t * h_phi_1) * m0
        corr = sum(F32(rh) * d for rh, d in zip(rhos[:-1], d1s)) if d1s else 0
        x = x - F32(a_t * b_h) * (corr + F32(rhos[-1]) * (model_t - m0))
        return x.astype(F32)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        i = self._step_at(timestep)
        use_corr = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        m = self._x0(model_output, sample)
        if use_corr:
            assert self.last_sample is not None
            sample = self._correct(m, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [m]
        if self.config.get("lower_order_final", True):
            order = min(self.order, len(self.timesteps) - i)
        else:
            order = self.order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predict(sample, self.this_order)
        if self.lower_order_nums < self.order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        return prev


class LCM(_Discrete):
    name = "LCMScheduler"
    thresholds = True
    stochastic = True

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", **config}
        super().__init__(cfg)
        set_one = self.config.get("set_alpha_to_one", True)
        self.final_alpha_cumprod = F32(1.0) if set_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        n = num_inference_steps
        orig = int(self.config.get("original_inference_steps", 50))
        if orig > self.num_train_timesteps:
            raise BadInput(f"scheduler config: original_inference_steps {orig} exceeds num_train_timesteps")
        k = self.num_train_timesteps // orig
        origin = np.asarray(list(range(1, orig + 1))) * k - 1
        if len(origin) // n < 1 or n > orig:
            raise BadInput(f"LCM steps ({n}) cannot exceed original_inference_steps ({orig})")
        origin = origin[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[idx].astype(np.int64)
        self.num_inference_steps = n
        self._step_index = None

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        i = self._step_at(timestep)
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
        sd = 0.5
        st = t * float(self.config.get("timestep_scaling", 10.0))
        c_skip = sd**2 / (st**2 + sd**2)
        c_out = st / (st**2 + sd**2) ** 0.5
        x0, _ = _x0_from(self.prediction_type, model_output, sample, a_t)
        x0 = self._clip(x0, False)
        denoised = F32(c_out) * x0 + F32(c_skip) * sample
        self._step_index = i + 1
        if i != self.num_inference_steps - 1:
            if generator is None:
                raise ValueError("LCM needs a generator")
            noise = generator.randn(model_output.shape)
            return (F32(a_prev**0.5) * denoised + F32((1 - a_prev) ** 0.5) * noise).astype(F32)
        return denoised.astype(F32)


def calculate_shift(config: dict[str, Any], image_seq_len: int) -> float:
    """mu of a dynamically shifted flow schedule, as diffusers' calculate_shift: linear in the image token count
    between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) of the scheduler config."""
    b0, b1 = float(config.get("base_image_seq_len", 256)), float(config.get("max_image_seq_len", 4096))
    s0, s1 = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    m = (s1 - s0) / (b1 - b0)
    return image_seq_len * m + (s0 - m * b0)


class FlowMatchEuler(NumpyScheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler; set_timesteps takes the pipeline's own `sigmas` (FluxPipeline:
    linspace(1, 1/N, N)) and, with use_dynamic_shifting, `mu` (calculate_shift of the image token count)."""

    name = "FlowMatchEulerDiscreteScheduler"
    unsupported = ("use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling", "invert_sigmas")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        n = self.num_train_timesteps
        self.shift = float(self.config.get("shift", 1.0))
        ts = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
        s = ts / F32(n)
        if not self.config.get("use_dynamic_shifting"):  # diffusers shifts the training sigmas only then
            s = (F32(self.shift) * s / (F32(1) + F32(self.shift - 1) * s)).astype(F32)
        self.sigma_min, self.sigma_max = float(s[-1]), float(s[0])
        self.sigmas = s

    def set_timesteps(self, num_inference_steps: int, sigmas: Any = None, mu: float | None = None) -> None:
        self._check_steps(num_inference_steps)
        n = num_inference_steps
        self.num_inference_steps = n
        nt = self.num_train_timesteps
        dynamic = bool(self.config.get("use_dynamic_shifting"))
        if dynamic and mu is None:
            raise BadInput(f"{self.name}: use_dynamic_shifting needs mu (from the image token count) to set timesteps")
        if sigmas is None:
            ts = np.linspace(self.sigma_max * nt, self.sigma_min * nt, n)
            sigmas = ts / nt
        else:  # float32 as diffusers casts given sigmas; the shift below then stays float32 as there
            sigmas = np.array(sigmas).astype(F32)
            if len(sigmas) != n:
                raise BadInput(f"{self.name}: {len(sigmas)} sigmas for {n} steps")
        if dynamic:
            assert mu is not None
            if self.config.get("time_shift_type", "exponential") == "linear":
                sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        term = self.config.get("shift_terminal")
        if term:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - float(term)))
        if self.config.get("use_karras_sigmas"):
            sigmas = _karras(sigmas, n, self.config)
        sig32 = sigmas.astype(F32)
        self.timesteps = (sig32 * F32(nt)).astype(F32)
        self.sigmas = np.concatenate([sig32, np.zeros(1, dtype=F32)])
        self._step_index = None

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        i = self._step_at(timestep)
        dt = self.sigmas[i + 1] - self.sigmas[i]
        self._step_index = i + 1
        return (sample + dt * model_output).astype(F32)


class PNDM(_Discrete):
    """diffusers' PNDMScheduler: F-PNDM (Runge-Kutta warm-up over 4 x 3 half steps, then the 4th-order linear
    multistep PLMS), or PLMS alone with `skip_prk_steps` (Stable Diffusion 1.x's config: crowsonkb's PLMS,
    the first step taken twice). The state (`ets`, `counter`, `cur_sample`, `cur_model_output`) evolves
    as diffusers' does, so one `step` call per timestep of `timesteps` gives the same samples."""

    name = "PNDMScheduler"
    pndm_order = 4

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise BadInput(f"scheduler config: PNDMScheduler prediction_type {self.prediction_type!r} is not supported")
        self.skip_prk = bool(self.config.get("skip_prk_steps", False))
        self.final_alpha_cumprod = F32(1.0) if self.config.get("set_alpha_to_one", False) else self.alphas_cumprod[0]
        self.prk_timesteps = np.zeros(0, np.int64)
        self._reset()

    def _reset(self) -> None:
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_model_output: Any = 0
        self.cur_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        n, nt = num_inference_steps, self.num_train_timesteps
        self.num_inference_steps = n
        spacing = self.config.get("timestep_spacing", "leading")
        if spacing == "linspace":
            ts = np.linspace(0, nt - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (nt // n)).round() + int(self.config.get("steps_offset", 0))
        elif spacing == "trailing":
            ts = np.round(np.arange(nt, 0, -nt / n))[::-1].astype(np.int64) - 1
        else:
            raise BadInput(f"scheduler config: timestep_spacing {spacing!r} is not supported")
        if self.skip_prk:
            self.prk_timesteps = np.zeros(0, np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            prk = np.array(ts[-self.pndm_order:]).repeat(2) + np.tile(np.array([0, nt // n // 2]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy().astype(np.int64)
            plms = ts[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self._reset()

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: TorchGenerator | None = None) -> np.ndarray:
        assert self.num_inference_steps is not None, "call set_timesteps first"
        if self.counter < len(self.prk_timesteps) and not self.skip_prk:
            return self._step_prk(model_output.astype(F32), int(timestep), sample.astype(F32))
        return self._step_plms(model_output.astype(F32), int(timestep), sample.astype(F32))

    def _step_prk(self, out: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        assert self.num_inference_steps is not None
        diff = 0 if self.counter % 2 else self.num_train_timesteps // self.num_inference_steps // 2
        prev_t = t - diff
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        k = self.counter % 4
        if k == 0:
            self.cur_model_output = self.cur_model_output + F32(1 / 6) * out
            self.ets.append(out)
            self.cur_sample = sample
        elif k in (1, 2):
            self.cur_model_output = self.cur_model_output + F32(1 / 3) * out
        else:
            out = self.cur_model_output + F32(1 / 6) * out
            self.cur_model_output = 0
        cur = self.cur_sample if self.cur_sample is not None else sample
        prev = self._prev_sample(cur, t, prev_t, out)
        self.counter += 1
        return prev

    def _step_plms(self, out: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        assert self.num_inference_steps is not None
        if not self.skip_prk and len(self.ets) < 3:
            raise ValueError("PNDM's PLMS steps run after 12 Runge-Kutta steps (call step once per timestep)")
        ratio = self.num_train_timesteps // self.num_inference_steps
        prev_t = t - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(out)
        else:  # the first timestep again: a second-order correction of the first step
            prev_t, t = t, t + ratio
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            out = (out + e[-1]) / F32(2)
            assert self.cur_sample is not None
            sample, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            out = (F32(3) * e[-1] - e[-2]) / F32(2)
        elif len(e) == 3:
            out = (F32(23) * e[-1] - F32(16) * e[-2] + F32(5) * e[-3]) / F32(12)
        else:
            out = F32(1 / 24) * (F32(55) * e[-1] - F32(59) * e[-2] + F32(37) * e[-3] - F32(9) * e[-4])
        prev = self._prev_sample(sample, t, prev_t, out)
        self.counter += 1
        return prev

    def _prev_sample(self, sample: np.ndarray, t: int, prev_t: int, out: np.ndarray) -> np.ndarray:
        """PNDM's formula (9): x_{t-d} from x_t and the combined noise estimate, in float32 as diffusers."""
        a_t = F32(self.alphas_cumprod[t])
        a_prev = F32(self.alphas_cumprod[prev_t]) if prev_t >= 0 else F32(self.final_alpha_cumprod)
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        if self.prediction_type == "v_prediction":
            out = F32(a_t ** F32(0.5)) * out + F32(b_t ** F32(0.5)) * sample
        sample_coeff = F32((a_prev / a_t) ** F32(0.5))
        denom = F32(a_t * b_prev ** F32(0.5) + (a_t * b_t * a_prev) ** F32(0.5))
        return (sample_coeff * sample - (a_prev - a_t) * out / denom).astype(F32)


SCHEDULERS: dict[str, type[NumpyScheduler]] = {
    c.name: c for c in (DDIM, DDPM, Euler, EulerAncestral, DPMSolverMultistep, UniPC, LCM, FlowMatchEuler, PNDM)
}


# --sampler short names -> (diffusers class, config overrides): the ported subset of the
# PyTorch side's table, read from it (edgediff.schedulers imports no torch at module level)
SAMPLER_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    k: v for k, v in SHORT_NAMES.items() if v[0] in SCHEDULERS
}


def preset_config(base: dict[str, Any], sampler: str) -> dict[str, Any]:
    """The scheduler config for `sampler` over a model's own schedule config (what diffusers'
    `Scheduler.from_config(base, **overrides)` would hold: the base keys, the preset's on top)."""
    key = sampler.strip()
    if key.lower() in SAMPLER_PRESETS:
        cls, over = SAMPLER_PRESETS[key.lower()]
    elif key in SCHEDULERS:
        cls, over = key, {}
    else:
        raise BadInput(f"sampler {sampler!r} has no numpy port; expected one of {', '.join(SAMPLER_PRESETS)} "
                       f"or {', '.join(sorted(SCHEDULERS))}")
    # like diffusers' from_config: keys the base only had by default do not carry over to another class
    defaulted = set(base.get("_use_default_values") or ()) if cls != base.get("_class_name") else set()
    cfg = {k: v for k, v in base.items() if not k.startswith("_") and k not in defaulted}
    cfg.update(over)
    cfg["_class_name"] = cls
    return cfg


def from_config(config: dict[str, Any], class_name: str | None = None, **kwargs: Any) -> NumpyScheduler:
    """The port of the scheduler `config` describes (`_class_name`, or `class_name` given)."""
    name = class_name or config.get("_class_name")
    if name not in SCHEDULERS:
        raise BadInput(f"scheduler {name!r} has no numpy port; ported: {', '.join(sorted(SCHEDULERS))}")
    return SCHEDULERS[name](dict(config), **kwargs)
