"""Noise schedules (the forward process) shared by training, calibration and samplers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from edgediff.errors import BadInput

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class NoiseSchedule:
    """Discrete-time DDPM forward process: betas over `num_train_timesteps` steps."""

    betas: torch.Tensor
    prediction_type: str = "epsilon"
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = self.betas.to(torch.float64)
        if self.prediction_type not in PREDICTION_TYPES:
            raise BadInput(f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None = None) -> NoiseSchedule:
        """Build from a diffusers scheduler config (DDPMScheduler/DDIMScheduler keys)."""
        cfg = dict(cfg or {})
        n = int(cfg.get("num_train_timesteps", 1000))
        kind = cfg.get("beta_schedule", "linear")
        b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            def abar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
        else:
            raise BadInput(f"unsupported beta_schedule {kind!r} (linear, scaled_linear, squaredcos_cap_v2)")
        keep = {"num_train_timesteps": n, "beta_schedule": kind, "beta_start": b0, "beta_end": b1}
        return cls(betas=betas, prediction_type=cfg.get("prediction_type", "epsilon"), config=keep)

    def to_config(self) -> dict[str, Any]:
        out = dict(self.config) or {"num_train_timesteps": self.num_train_timesteps}
        out["prediction_type"] = self.prediction_type
        if not self.config:
            out["trained_betas"] = self.betas.tolist()
        return out

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) sample for integer timesteps t of shape (B,)."""
        a = self.alphas_cumprod.to(x0.device)[t.long()].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training target for the model's prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a = self.alphas_cumprod.to(x0.device)[t.long()].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def to_eps_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the model output at integer step t into (eps, x0) whatever the prediction type."""
        a = float(self.alphas_cumprod[t])
        sa, s1 = a**0.5, (1 - a) ** 0.5
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x_t - s1 * eps) / sa
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x_t - sa * x0) / s1
        else:
            x0 = sa * x_t - s1 * out
            eps = sa * out + s1 * x_t
        return eps, x0
