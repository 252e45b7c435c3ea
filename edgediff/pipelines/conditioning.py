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
from edgediff.pipelines.encode import GuidedDenoiser, encode_conditioning
from edgediff.pipelines.prompts import prompts_for


@dataclass
class PromptConditioning:
    prompts: list[str]
    cond: Any  # (n, seq, hidden): the prompts' encoder states (a dict by input name for SDXL)
    uncond: Any  # (n, seq, hidden): the empty prompt's
    scale: float | None  # guidance scale; None: no classifier-free guidance

    def wrap(self, denoiser: Any) -> Any:
        """The sampler's denoiser with guidance (unchanged without it)."""
        return GuidedDenoiser(denoiser, self.uncond, self.cond, self.scale) if self.scale else denoiser

    def both(self, xs: torch.Tensor, ts: torch.Tensor, cs: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Calibration points as the guided calls see them: each (x, t) with its prompt and with the empty prompt."""
        from edgediff.model import cond_cat

        if not self.scale:
            return xs, ts, cs
        if isinstance(self.uncond, dict):  # named inputs (SDXL)
            u: Any = {k: v[:1].expand(len(xs), *v.shape[1:]) for k, v in self.uncond.items()}
        else:
            u = self.uncond[:1].expand(len(cs), *self.uncond.shape[1:])
        return torch.cat([xs, xs]), torch.cat([ts, ts]), cond_cat([cs, u])

    def record(self) -> dict[str, Any]:
        return {"source": "prompts", "prompts": len(set(self.prompts)), "guidance": self.scale}


def prompt_conditioning(model: DiffusionModel, n: int, seed: int = 0) -> PromptConditioning | None:
    """Encoded prompts (+ guidance) for n samples of a text pipeline's denoiser; None for other models."""
    pipe = pipeline_of(model)
    if pipe is None or not pipe.has("text_encoder") or not pipe.has("tokenizer"):
        return None
    user = (model.extras.get("pipeline") or {}).get("prompts")
    base = prompts_for(n + seed, user)[seed:]  # `seed` shifts which prompts a run starts from
    c, u = encode_conditioning(pipe, base)  # by input name (SDXL: text_embeds, time_ids too)
    if set(c) == {"encoder_hidden_states"}:
        c, u = c["encoder_hidden_states"], u["encoder_hidden_states"]
    g = pipe.default_guidance
    return PromptConditioning(base, c, u, float(g) if g and g > 1.0 else None)


def takes_prompts(model: DiffusionModel) -> bool:
    """Whether the model is a text pipeline's denoiser (its conditioning comes from prompts), without loading anything."""
    comps = (model.extras.get("pipeline") or {}).get("components") or {}
    return any(c.get("kind") == "text_encoder" for c in comps.values()) and any(
        c.get("kind") == "tokenizer" for c in comps.values())


def prompts_key(model: DiffusionModel) -> str:
    """What the calibration cache key must include for a text pipeline (its prompts and guidance)."""
    rec = model.extras.get("pipeline") or {}
    return f"{rec.get('path')}|{rec.get('default_guidance')}|{rec.get('prompts')}" if rec else ""
