"""sampling: record the sampler and step count the artifact is meant to be used with.

`model.extras["sampling"] = {"sampler", "steps", "eta"}`. Later passes that sample (calib,
cache, distill.steps) and `generate`, `verify`, bundle export read it as their default
(`sampling_of`), so a model calibrated, cached or distilled for DPM-Solver++ at 10 steps is
also run that way unless the user says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgediff import schedulers
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext, register

KEY = "sampling"
DEFAULT = {"sampler": None, "steps": 50, "eta": 0.0}


@dataclass
class SamplingOptions:
    sampler: str = "dpmpp-2m"  # a short name (edgediff.schedulers.SHORT_NAMES) or a diffusers class
    steps: int = 10
    eta: float = 0.0

    def __post_init__(self) -> None:
        schedulers.resolve(self.sampler)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise BadInput(f"sampling: steps must be a positive integer, got {self.steps!r}")
        if self.eta < 0:
            raise BadInput(f"sampling: eta must be >= 0, got {self.eta}")


def sampling_of(model: DiffusionModel) -> dict[str, Any]:
    """{"sampler", "steps", "eta"} recorded in the artifact (sampler None: the model's own scheduler)."""
    rec = model.extras.get(KEY) or {}
    return {**DEFAULT, **{k: v for k, v in rec.items() if k in DEFAULT}}


@register("sampling", SamplingOptions)
def run(model: DiffusionModel, opts: SamplingOptions, ctx: PassContext) -> DiffusionModel:
    model.extras[KEY] = {"sampler": opts.sampler, "steps": opts.steps, "eta": opts.eta}
    ctx.metrics.update(model.extras[KEY])
    return model
