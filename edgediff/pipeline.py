"""The pass manager: runs a recipe over a DiffusionModel, timing and recording each pass."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgediff import __version__, metrics, passes, quality
from edgediff.artifact import write_artifact
from edgediff.model import DiffusionModel
from edgediff.recipe import Recipe


@dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "seconds": round(self.seconds, 3), "metrics": self.metrics}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_stats(model: DiffusionModel) -> dict[str, int]:
    mod = model.module()
    return {"params": metrics.params(mod), "macs": metrics.macs(model), "size_bytes": metrics.size_bytes(mod)}


def onnx_nodes(model: DiffusionModel) -> int | None:
    """Nodes in the model's fp32 ONNX graph (what a runtime executes), or None if it does not export."""
    from edgediff.exporters.onnx import build_onnx

    try:
        proto, _ = build_onnx(model, "fp32")
    except Exception:  # noqa: BLE001 - counting is informative; a model that does not export is still run
        return None
    return len(proto.graph.node)


def plan(model: DiffusionModel, recipe: Recipe) -> list[tuple[str, dict[str, Any], Any]]:
    """Check a recipe against a model before any work: every pass's options, then the ordering
    rules the passes declared at registration. Returns [(name, raw options, options dataclass)]."""
    planned = [(spec.name, spec.options, passes.make_options(spec.name, spec.options, recipe.source))
               for spec in recipe.passes]
    from edgediff.onnx_source import check_pass
    from edgediff.pipelines.compress import targets

    on = targets(model, recipe)  # a pipeline's other components take their own passes
    for spec, parts in zip(recipe.passes, on):
        if parts is None:
            check_pass(model, spec.name)
    already = set(model.extras) | set(model.provenance.get("passes", []))
    passes.check_order([name for (name, _, _), parts in zip(planned, on) if parts is None], already,
                       f"recipe {recipe.name!r}")
    return planned


def run_recipe(model: DiffusionModel, recipe: Recipe, seed: int = 0, progress: Any = None,
               cache_dir: Path | None = None, log: Any = None, data: Any = None,
               original: DiffusionModel | None = None) -> tuple[DiffusionModel, list[PassRecord]]:
    """Run every pass of `recipe` in order. Passes get a clone: the input model is never modified.

    `data` reaches every pass as `ctx.data` (a caller's own images, e.g. the demo's digits);
    `original` is `ctx.original` (teacher/reference; default: the input model).
    """
    planned = plan(model, recipe)
    from edgediff.pipelines.compress import run_component_pass, targets

    on = targets(model, recipe)
    records: list[PassRecord] = []
    original = original if original is not None else model
    current = model.clone()
    for i, (name, raw, opts) in enumerate(planned):
        run, _ = passes.get(name)
        ctx = passes.PassContext(seed=seed + i, progress=progress, original=original, data=data, graph_nodes=onnx_nodes,
                                 log=log or (lambda m: None), **({"cache_dir": cache_dir} if cache_dir else {}))
        seed_everything(seed + i)
        t0 = time.perf_counter()
        if on[i] is not None:  # a component's pass: its state goes into the denoiser's extras
            current = run_component_pass(current, name, opts, on[i], ctx)
            records.append(PassRecord(name, {**raw, "component": recipe.passes[i].component},
                                      time.perf_counter() - t0, ctx.metrics))
            continue
        current = run(current, opts, ctx)
        dt = time.perf_counter() - t0
        current.provenance.setdefault("passes", []).append(name)
        records.append(PassRecord(name, raw, dt, ctx.metrics))
    return current, records


def manifest_of(model: DiffusionModel, result: DiffusionModel, recipe: Recipe, seed: int, records: list[PassRecord],
                before: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of an artifact made by running `recipe` on `model` (giving `result`)."""
    return {
        "edgediff_version": __version__,
        "source": model.provenance.get("source"),
        "source_sha256": model.provenance.get("source_sha256"),
        "recipe": recipe.to_dict(),
        "seed": seed,
        "schedule": model.schedule.to_config(),
        "passes": [r.to_dict() for r in records],
        "metrics": {"before": before or model_stats(model), "after": model_stats(result)},
        **(extra or {}),
    }


def compress(model: DiffusionModel, recipe: Recipe, out: Path, seed: int = 0, progress: Any = None,
             force: bool = False, files: dict[str, bytes | str] | None = None,
             extra_manifest: dict[str, Any] | None = None, data: Any = None,
             log: Any = None) -> tuple[DiffusionModel, dict[str, Any]]:
    """Run a recipe and write the artifact atomically; returns the model and its manifest."""
    before = model_stats(model)
    result, records = run_recipe(model, recipe, seed, progress, log=log, data=data)
    extra = dict(extra_manifest or {})
    if quality.is_quantized(result):
        # a quantizing recipe ends with the simulation measured against the original model
        # (the original's samples go into the artifact for verify, see edgediff.quality)
        extra["quality"] = quality.attach(model, result)
    from edgediff.pipelines.parts import records as component_records

    if component_records(result.extras):  # per-component cost and quality, and the whole pipeline's images
        from edgediff.pipelines.compress import report

        extra["components"] = report(model, result)
    manifest = manifest_of(model, result, recipe, seed, records, before, extra)
    write_artifact(result, out, manifest, files=files, force=force)
    return result, manifest
