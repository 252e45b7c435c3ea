"""Real conditioning for the passes of a text-to-image pipeline's denoiser.

Calibration (and any pass that samples trajectories) gets prompts — the built-in list, or the
user's (`compress --prompts FILE`, kept in extras["pipeline"]["prompts"]) — encoded by the
pipeline's own tokenizer and text encoder, and samples with classifier-free guidance at the
pipeline's default scale, as the deployed pipeline does. Each guided denoiser call runs a
conditional and an unconditional ("" prompt) row, so the calibration points are both.
Random N(0, 1) encoder states remain only for denoisers without a text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from edgediff.model import DiffusionModel
from edgediff.pipelines.components import pipeline_of
from edgediff.pipelines.encode import GuidedDenoiser, guided_conditioning
from edgediff.pipelines.prompts import prompts_for


@dataclass
class PromptConditioning:
    prompts: list[str]
    cond: torch.Tensor  # (n, seq, hidden): the prompts' encoder states
    uncond: torch.Tensor  # (n, seq, hidden): the empty prompt's
    scale: float | None  # guidance scale; None: no classifier-free guidance

    def wrap(self, denoiser: Any) -> Any:
        """The sampler's denoiser with guidance (unchanged without it)."""
        return GuidedDenoiser(denoiser, self.uncond, self.cond, self.scale) if self.scale else denoiser

    def both(self, xs: torch.Tensor, ts: torch.Tensor, cs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Calibration points as the guided calls see them: each (x, t) with its prompt and with the empty prompt."""
        if not self.scale:
            return xs, ts, cs
        u = self.uncond[:1].expand(len(cs), *self.uncond.shape[1:])
        return torch.cat([xs, xs]), torch.cat([ts, ts]), torch.cat([cs, u])

    def record(self) -> dict[str, Any]:
        return {"source": "prompts", "prompts": len(set(self.prompts)), "guidance": self.scale}


def prompt_conditioning(model: DiffusionModel, n: int, seed: int = 0) -> PromptConditioning | None:
    """Encoded prompts (+ guidance) for n samples of a text pipeline's denoiser; None for other models."""
    pipe = pipeline_of(model)
    if pipe is None or not pipe.has("text_encoder") or not pipe.has("tokenizer"):
        return None
    user = (model.extras.get("pipeline") or {}).get("prompts")
    base = prompts_for(n + seed, user)[seed:]  # `seed` shifts which prompts a run starts from
    c, u = guided_conditioning(pipe, base)
    g = pipe.default_guidance
    return PromptConditioning(base, c, u, float(g) if g and g > 1.0 else None)


def prompts_key(model: DiffusionModel) -> str:
    """What the calibration cache key must include for a text pipeline (its prompts and guidance)."""
    rec = model.extras.get("pipeline") or {}
    return f"{rec.get('path')}|{rec.get('default_guidance')}|{rec.get('prompts')}" if rec else ""
