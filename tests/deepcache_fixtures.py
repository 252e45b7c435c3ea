"""Shared by the DeepCache backend tests: a model with a recorded sampler and a cache schedule.

Import it in a test module: `from deepcache_fixtures import cached`.
"""

from __future__ import annotations

from edgediff import passes
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext


def cached(model: DiffusionModel, sampler: str = "dpmpp-2m", steps: int = 5, interval: int = 2,
           depth: int = 0) -> DiffusionModel:
    """`model` with the sampling pass (sampler, steps) and the cache pass (depth, interval) applied."""
    run, opts = passes.get("sampling")
    m = run(model.clone(), opts(sampler=sampler, steps=steps), PassContext())
    run_c, opts_c = passes.get("cache")
    return run_c(m, opts_c(depth=depth, interval=interval, check_samples=0), PassContext())
