"""The pass manager: runs a recipe over a DiffusionModel, timing and recording each pass."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgediff import __version__, metrics, passes
from edgediff.artifact import write_artifact
from edgediff.errors import NotBuiltYet
from edgediff.model import DiffusionModel
from edgediff.recipe import Recipe


@dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "options": self.options, "seconds": round(self.seconds, 3), "metrics": self.metrics}
        if self.skipped:
            d["skipped"] = self.skipped
        return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_stats(model: DiffusionModel) -> dict[str, int]:
    mod = model.module()
    return {"params": metrics.params(mod), "macs": metrics.macs(model), "size_bytes": metrics.size_bytes(mod)}


def run_recipe(model: DiffusionModel, recipe: Recipe, seed: int = 0, progress: Any = None,
               skip_missing: bool = False, cache_dir: Path | None = None,
               log: Any = None) -> tuple[DiffusionModel, list[PassRecord]]:
    """Run every pass of `recipe` in order. Passes get a clone: the input model is never modified.

    With skip_missing, passes that are not built yet are recorded as skipped instead of failing
    (the demo uses this so it runs with whatever exists).
    """
    # validate every pass's options before any work is done
    planned = []
    for spec in recipe.passes:
        try:
            planned.append((spec, passes.make_options(spec.name, spec.options, recipe.source)))
        except NotBuiltYet:
            if not skip_missing:
                raise NotBuiltYet(f"recipe {recipe.name!r} needs pass {spec.name!r}, which is not built yet") from None
            planned.append((spec, None))
    records: list[PassRecord] = []
    original = model
    current = model.clone()
    for i, (spec, opts) in enumerate(planned):
        if opts is None:
            records.append(PassRecord(spec.name, spec.options, 0.0, skipped="not built yet"))
            continue
        run, _ = passes.get(spec.name)
        ctx = passes.PassContext(seed=seed + i, progress=progress, original=original,
                                 log=log or (lambda m: None), **({"cache_dir": cache_dir} if cache_dir else {}))
        seed_everything(seed + i)
        t0 = time.perf_counter()
        current = run(current, opts, ctx)
        dt = time.perf_counter() - t0
        current.provenance.setdefault("passes", []).append(spec.name)
        records.append(PassRecord(spec.name, spec.options, dt, ctx.metrics))
    return current, records


def compress(model: DiffusionModel, recipe: Recipe, out: Path, seed: int = 0, progress: Any = None,
             force: bool = False, skip_missing: bool = False, files: dict[str, bytes | str] | None = None,
             extra_manifest: dict[str, Any] | None = None) -> tuple[DiffusionModel, dict[str, Any]]:
    """Run a recipe and write the artifact atomically; returns the model and its manifest."""
    before = model_stats(model)
    result, records = run_recipe(model, recipe, seed, progress, skip_missing)
    after = model_stats(result)
    manifest = {
        "edgediff_version": __version__,
        "source": model.provenance.get("source"),
        "source_sha256": model.provenance.get("source_sha256"),
        "recipe": recipe.to_dict(),
        "seed": seed,
        "schedule": model.schedule.to_config(),
        "passes": [r.to_dict() for r in records],
        "metrics": {"before": before, "after": after},
        **(extra_manifest or {}),
    }
    write_artifact(result, out, manifest, files=files, force=force)
    return result, manifest
