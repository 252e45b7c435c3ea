"""Pass registry: name -> (run function, options dataclass), imported lazily.

A pass is `run(model: DiffusionModel, opts: Options, ctx: PassContext) -> DiffusionModel`
with its options as a dataclass. It must not modify its input (the pass manager hands it a
clone) and must not import the CLI or any backend. A pass module registers itself with
`@register("name", Options)`; `_MODULES` says which module defines which pass so that only
what a recipe uses is imported. A pass that attaches state in `model.extras[name]` can
register a restorer that re-applies it when an artifact is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput, NotBuiltYet
from edgediff.model import DiffusionModel

_MODULES: dict[str, str] = {
    "fp16": "edgediff.passes.precision",
    "prune.diff": "edgediff.passes.prune_diff",
    "prune.ld": "edgediff.passes.prune_ld",
    "finetune": "edgediff.passes.finetune",
    "calib": "edgediff.passes.calib",
    "quant": "edgediff.passes.quant",
    "ptqd": "edgediff.passes.ptqd",
    "fuse": "edgediff.passes.fuse",
}

_REGISTRY: dict[str, tuple[Callable[..., DiffusionModel], type]] = {}
_RESTORERS: dict[str, Callable[[DiffusionModel], DiffusionModel]] = {}


@dataclass
class PassContext:
    """What the pass manager gives each pass: seed, a cache dir, progress and a metrics sink."""

    seed: int = 0
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "edgediff")
    progress: Any = None  # a rich.progress.Progress, or None when quiet
    metrics: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: None
    # the model as it entered the pipeline (teacher for distillation, reference for scoring)
    original: DiffusionModel | None = None

    def track(self, iterable: Any, description: str, total: int | None = None) -> Any:
        """Iterate with a progress bar when one is attached."""
        if self.progress is None:
            yield from iterable
            return
        task = self.progress.add_task(description, total=total if total is not None else len(iterable))
        try:
            for item in iterable:
                yield item
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)


def register(name: str, options: type) -> Callable[[Callable[..., DiffusionModel]], Callable[..., DiffusionModel]]:
    def deco(fn: Callable[..., DiffusionModel]) -> Callable[..., DiffusionModel]:
        _REGISTRY[name] = (fn, options)
        return fn
    return deco


Restorer = Callable[[DiffusionModel], DiffusionModel]


def register_restorer(name: str) -> Callable[[Restorer], Restorer]:
    def deco(fn: Restorer) -> Restorer:
        _RESTORERS[name] = fn
        return fn
    return deco


def known_passes() -> list[str]:
    return sorted(_MODULES)


def available(name: str) -> bool:
    try:
        get(name)
        return True
    except NotBuiltYet:
        return False


def get(name: str) -> tuple[Callable[..., DiffusionModel], type]:
    """(run, Options) for a pass; BadInput if unknown, NotBuiltYet if its module is missing."""
    if name not in _REGISTRY:
        if name not in _MODULES:
            raise BadInput(f"unknown pass {name!r}; known passes: {', '.join(known_passes())}")
        try:
            importlib.import_module(_MODULES[name])
        except ModuleNotFoundError as e:
            if e.name == _MODULES[name]:
                raise NotBuiltYet(f"pass {name!r} is not built yet") from None
            raise
    if name not in _REGISTRY:
        raise NotBuiltYet(f"pass {name!r} is not built yet")
    return _REGISTRY[name]


def make_options(name: str, values: dict[str, Any], where: str = "recipe") -> Any:
    """Build a pass's options dataclass from a dict, rejecting unknown keys and wrong types."""
    _, opts_cls = get(name)
    fields = {f.name: f for f in dataclasses.fields(opts_cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise BadInput(f"{where}: pass {name!r} has no option(s) {', '.join(sorted(unknown))}; "
                       f"it takes {', '.join(fields) or 'none'}")
    try:
        return opts_cls(**values)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{where}: bad options for pass {name!r}: {e}") from None


def restore_extras(model: DiffusionModel) -> DiffusionModel:
    """Re-apply pass state from model.extras after loading an artifact."""
    for name in list(model.extras):
        if name in _MODULES and name not in _RESTORERS:
            try:
                get(name)
            except NotBuiltYet:
                continue
        if name in _RESTORERS:
            model = _RESTORERS[name](model)
    return model
