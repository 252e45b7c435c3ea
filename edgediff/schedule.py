"""The model's noise schedule: the whole diffusers scheduler config it came with, and its forward process.

`NoiseSchedule.from_config(cfg)` reads `_class_name` (DDPMScheduler when absent, as diffusers'
DDPM pipelines assume) and keeps every key, so an artifact can rebuild exactly the scheduler
the model shipped with. Sampling builds diffusers' own scheduler object from it
(`make_scheduler`); training noise (fine-tuning, pruning losses) and calibration draw from the
same forward process through `training_example`, whatever the family:

  discrete  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t an integer index, abar from the
            scheduler's own betas (beta_schedule, trained_betas, rescale_betas_zero_snr ...).
  flow      x_s = (1 - s) x0 + s eps, s the (shifted) training sigma of index t, the model gets
            timestep s * T and predicts eps - x0.
  edm       x = x0 + s eps, s log-uniform in [sigma_min, sigma_max] over the index; the model gets
            c_in * x and c_noise = log(s) / 4 and predicts F with x0 = c_skip x + c_out F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from edgediff import schedulers
from edgediff.errors import BadInput

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


@dataclass
class NoiseSchedule:
    """A diffusers scheduler config (whole, with `_class_name`) and the forward process it implies.

    `betas` is None for flow and EDM schedules (they have no alphas); prefer from_config.
    """

    betas: torch.Tensor | None = None
    prediction_type: str = "epsilon"
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config = dict(self.config)
        self.config.setdefault("_class_name", schedulers.DEFAULT_CLASS)
        fam = self.family
        if fam == "flow" and self.prediction_type == "epsilon" and "prediction_type" not in self.config:
            self.prediction_type = "flow_prediction"  # FlowMatch configs carry no prediction_type
        allowed = schedulers.PREDICTIONS[fam]
        if self.prediction_type not in allowed:
            raise BadInput(f"unknown prediction_type {self.prediction_type!r} for {self.class_name} "
                           f"({fam} schedule); expected one of {allowed}")
        if fam == "discrete":
            if self.betas is None:
                self.betas = schedulers.build(self.class_name, self.config).betas
            self.betas = self.betas.to(torch.float64)
            self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
            if self.config.get("rescale_betas_zero_snr"):
                self.alphas_cumprod = self.alphas_cumprod.clamp_min(2**-24)  # as diffusers does (abar_T = 0 otherwise)
        else:
            self.betas = None
            self.alphas_cumprod = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ identity
    @property
    def class_name(self) -> str:
        return str(self.config["_class_name"])

    @property
    def family(self) -> str:
        return schedulers.family_of(self.class_name)

    @property
    def num_train_timesteps(self) -> int:
        if self.betas is not None:
            return int(self.betas.shape[0])
        return int(self.config.get("num_train_timesteps", 1000))

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None = None, where: str = "scheduler config") -> NoiseSchedule:
        """Build from a diffusers scheduler config (any class; `_class_name` defaults to DDPMScheduler)."""
        cfg = dict(cfg or {})
        name = str(cfg.get("_class_name") or schedulers.DEFAULT_CLASS)
        try:
            sch = schedulers.build(name, cfg, where)
        except BadInput as e:
            raise BadInput(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None
        full = {k: v for k, v in dict(sch.config).items() if not k.startswith("_")}
        given = {k: v for k, v in cfg.items() if not k.startswith("_")}
        full.update(given)  # keep keys other classes use
        full["_class_name"] = name
        # as diffusers records it: keys filled from the class defaults do not follow a switch of class
        defaults = set(cfg.get("_use_default_values") or ()) | {k for k in full if k not in given and k != "_class_name"}
        full["_use_default_values"] = sorted(defaults)
        fam = schedulers.family_of(name)
        pred = cfg.get("prediction_type") or sch.config.get("prediction_type") or (
            "flow_prediction" if fam == "flow" else "epsilon")
        if fam == "flow" and pred == "flow_prediction":
            full.pop("prediction_type", None)
        betas = sch.betas.to(torch.float64) if fam == "discrete" else None
        try:
            return cls(betas=betas, prediction_type=pred, config=full)
        except BadInput as e:
            raise BadInput(f"{where}: {e}") from None

    def to_config(self) -> dict[str, Any]:
        """The whole scheduler config, `_class_name` first (what artifacts save)."""
        out = {"_class_name": self.class_name}
        out.update({k: v for k, v in self.config.items() if k != "_class_name"})
        if self.family != "flow":
            out["prediction_type"] = self.prediction_type
        return out

    # ------------------------------------------------------------------ sampling
    def make_scheduler(self, sampler: str | None = None) -> Any:
        """A fresh diffusers scheduler: the model's own, or `sampler` (short name or class) on its config.

        A sampler of another family (DDIM on a flow-matching model) is refused: it would sample
        a forward process the model was not trained on.
        """
        name, overrides = (self.class_name, {}) if not sampler else schedulers.resolve(sampler)
        if schedulers.family_of(name) != self.family:
            raise BadInput(f"--sampler {sampler}: {name} is a {schedulers.family_of(name)} scheduler, but this model's "
                           f"schedule ({self.class_name}) is {self.family}; pick a {self.family} sampler")
        if name == self.class_name:
            cfg = {**self.config, **overrides}
        else:  # diffusers' from_config: another class keeps only the keys set explicitly
            skip = set(self.config.get("_use_default_values") or ())
            cfg = {**{k: v for k, v in self.config.items() if k not in skip}, **overrides}
        if self.family != "flow":
            cfg["prediction_type"] = self.prediction_type
        return schedulers.build(name, cfg, f"--sampler {sampler}" if sampler else f"scheduler {self.class_name}")

    # ------------------------------------------------------------------ forward process (training, calibration)
    def _flow_sigma(self, t: torch.Tensor) -> torch.Tensor:
        n = self.num_train_timesteps
        s = (t.double() + 1) / n
        shift = float(self.config.get("shift", 1.0) or 1.0)
        if not self.config.get("use_dynamic_shifting"):
            s = shift * s / (1 + (shift - 1) * s)
        return s

    def _edm_sigma(self, t: torch.Tensor) -> torch.Tensor:
        n = self.num_train_timesteps
        lo, hi = math.log(float(self.config.get("sigma_min", 0.002))), math.log(float(self.config.get("sigma_max", 80.0)))
        return torch.exp(lo + (hi - lo) * t.double() / max(n - 1, 1))

    def _edm_coeffs(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sd = float(self.config.get("sigma_data", 0.5))
        c_in = 1 / (sigma**2 + sd**2) ** 0.5
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return c_in, c_skip, c_out

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t drawn from q(x_t | x_0) at integer indices t of shape (B,) (before any input scaling)."""
        t = t.long()
        if self.family == "discrete":
            a = _view(self.alphas_cumprod.to(t.device)[t], x0)
            return a.sqrt() * x0 + (1 - a).sqrt() * noise
        if self.family == "flow":
            s = _view(self._flow_sigma(t), x0)
            return (1 - s) * x0 + s * noise
        return x0 + _view(self._edm_sigma(t), x0) * noise

    def timestep_input(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the denoiser is given for integer indices t (float32, shape (B,))."""
        t = t.long()
        if self.family == "discrete":
            return t.float()
        if self.family == "flow":
            return (self._flow_sigma(t) * self.num_train_timesteps).float()
        return (0.25 * torch.log(self._edm_sigma(t))).float()

    def index_of(self, t: torch.Tensor) -> torch.Tensor:
        """The training index (in [0, T), float) whose noise level is nearest model timestep t.

        Inverse of timestep_input, in any family: a discrete step is its own index, a flow
        timestep s * T the index of the nearest training sigma (a dynamically shifted sampler's
        sigma included), an EDM c_noise = log(sigma) / 4 the index of the nearest sigma on the
        training grid. Lets "a fraction of T" mean the same noise level whatever the units.
        """
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if self.family == "discrete":
            return t
        grid = self.timestep_input(torch.arange(self.num_train_timesteps)).double()
        return (grid.view(1, -1) - t.view(-1, 1)).abs().argmin(1).double()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training target of the model's output for its prediction type."""
        t = t.long()
        if self.family == "flow":
            return noise - x0
        if self.family == "edm":
            sigma = self._edm_sigma(t)
            _, c_skip, c_out = self._edm_coeffs(sigma)
            x = x0 + _view(sigma, x0) * noise
            return (x0 - _view(c_skip, x0) * x) / _view(c_out, x0)
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a = _view(self.alphas_cumprod.to(t.device)[t], x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def training_example(self, x0: torch.Tensor, noise: torch.Tensor,
                         t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(model input, model timestep, target) for a denoising loss at integer indices t."""
        x = self.add_noise(x0, noise, t)
        if self.family == "edm":
            c_in, _, _ = self._edm_coeffs(self._edm_sigma(t.long()))
            x = x * _view(c_in, x)
        return x, self.timestep_input(t), self.target(x0, noise, t)

    # ------------------------------------------------------------------ prediction conversions (PTQD)
    def _abar_at(self, t: float) -> float:
        """abar at a (possibly fractional: Euler-type schedulers) model timestep, interpolated."""
        ac = self.alphas_cumprod
        t = min(max(float(t), 0.0), float(len(ac) - 1))
        lo = int(math.floor(t))
        hi = min(lo + 1, len(ac) - 1)
        w = t - lo
        return float(ac[lo]) * (1 - w) + float(ac[hi]) * w

    def io_coeffs(self, t: float) -> tuple[float, float]:
        """(a, b) with model input x = a * x0 + b * eps at model timestep t (any family: the
        noise level of the scheduler's own units, fractional t included)."""
        if self.family == "discrete":
            abar = self._abar_at(t)
            return abar**0.5, (1 - abar) ** 0.5
        if self.family == "flow":
            s = float(t) / self.num_train_timesteps
            return 1 - s, s
        sigma = math.exp(4 * float(t))
        c_in = 1 / (sigma**2 + float(self.config.get("sigma_data", 0.5)) ** 2) ** 0.5
        return c_in, c_in * sigma

    def to_eps_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) from the model output at model timestep t, x_t being the denoiser's input."""
        a, b = self.io_coeffs(t)
        if self.family == "flow":
            x0 = x_t - b * out
            return x_t + a * out, x0
        if self.family == "edm":
            sigma = math.exp(4 * float(t))
            _, c_skip, c_out = self._edm_coeffs(torch.tensor(sigma, dtype=torch.float64))
            x = x_t / a
            x0 = float(c_skip) * x + float(c_out) * out
            return (x - x0) / sigma, x0
        if self.prediction_type == "epsilon":
            return out, (x_t - b * out) / a
        if self.prediction_type == "sample":
            return (x_t - a * out) / b, out
        return a * out + b * x_t, a * x_t - b * out

    def from_eps(self, eps: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """The model output that corresponds to noise estimate `eps` at model timestep t (inverse of to_eps_x0)."""
        a, b = self.io_coeffs(t)
        x0 = (x_t - b * eps) / a
        if self.family == "flow":
            return eps - x0
        if self.family == "edm":
            sigma = math.exp(4 * float(t))
            _, c_skip, c_out = self._edm_coeffs(torch.tensor(sigma, dtype=torch.float64))
            return (x0 - float(c_skip) * (x_t / a)) / float(c_out)
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return a * eps - b * x0
