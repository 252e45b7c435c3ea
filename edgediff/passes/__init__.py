"""Pass registry: name -> (run function, options dataclass, ordering rules), imported lazily.

A pass is `run(model: DiffusionModel, opts: Options, ctx: PassContext) -> DiffusionModel`
with its options as a dataclass. It must not modify its input (the pass manager hands it a
clone) and must not import the CLI, the demo or any backend (tests/test_architecture.py).
A pass module registers itself with `@register("name", Options, requires=..., must_precede=...)`;
`_MODULES` says which module defines which pass so that only what a recipe uses is imported.
Ordering rules are checked by `check_order` when a recipe is planned, before any pass runs.
A pass that attaches state in `model.extras[name]` can register a restorer that re-applies it
when an artifact is loaded, and a sampling correction (PTQD's) that the samplers and the
verifier apply without naming the pass. See docs/architecture.md, "Adding a pass".
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgediff.artifact import register_restorer as register_artifact_restorer
from edgediff.errors import BadInput
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
    "sampling": "edgediff.passes.sampling",
    "cache": "edgediff.passes.cache",
    "distill.steps": "edgediff.passes.distill",
}

_REGISTRY: dict[str, tuple[Callable[..., DiffusionModel], type]] = {}
_RESTORERS: dict[str, Callable[[DiffusionModel], DiffusionModel]] = {}
_CORRECTIONS: dict[str, Callable[[DiffusionModel], Any]] = {}


@dataclass(frozen=True)
class OrderRule:
    """`requires`: passes that must have run before (earlier in the recipe, or on the input model);
    `must_precede`: passes that may only come after this one."""

    requires: tuple[str, ...] = ()
    must_precede: tuple[str, ...] = ()


_ORDER: dict[str, OrderRule] = {}


def _default_cache_dir() -> Path:
    from edgediff.safety import cache_dir

    return cache_dir()  # ~/.cache/edgediff, or a temp folder when HOME is read-only


@dataclass
class PassContext:
    """What the pass manager gives each pass: seed, a cache dir, progress and a metrics sink."""

    seed: int = 0
    cache_dir: Path = field(default_factory=lambda: _default_cache_dir())
    progress: Any = None  # a rich.progress.Progress, or None when quiet
    metrics: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: None
    # the model as it entered the pipeline (teacher for distillation, reference for scoring)
    original: DiffusionModel | None = None
    # data the caller supplies for data-driven passes (the demo's digits, a user's images), or None
    data: Any = None
    # nodes of the model's exported graph, or None when it does not export (the pipeline supplies an
    # ONNX count; passes report graph sizes without importing a backend)
    graph_nodes: Callable[[DiffusionModel], int | None] | None = None

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


def register(name: str, options: type, requires: tuple[str, ...] = (),
             must_precede: tuple[str, ...] = ()) -> Callable[[Callable[..., DiffusionModel]], Callable[..., DiffusionModel]]:
    """Register a pass under `name` with its options dataclass and ordering rules."""
    unknown = [n for n in (*requires, *must_precede) if n not in _MODULES]
    if unknown:
        raise ValueError(f"pass {name!r}: ordering rule names unknown pass(es) {unknown}")

    def deco(fn: Callable[..., DiffusionModel]) -> Callable[..., DiffusionModel]:
        _REGISTRY[name] = (fn, options)
        _ORDER[name] = OrderRule(tuple(requires), tuple(must_precede))
        return fn
    return deco


Restorer = Callable[[DiffusionModel], DiffusionModel]


def register_restorer(name: str) -> Callable[[Restorer], Restorer]:
    def deco(fn: Restorer) -> Restorer:
        _RESTORERS[name] = fn
        return fn
    return deco


def register_correction(name: str) -> Callable[[Callable[[DiffusionModel], Any]], Callable[[DiffusionModel], Any]]:
    """Register `fn(model) -> correction | None`: what the sampler applies for the state pass `name` attached."""
    def deco(fn: Callable[[DiffusionModel], Any]) -> Callable[[DiffusionModel], Any]:
        _CORRECTIONS[name] = fn
        return fn
    return deco


def known_passes() -> list[str]:
    return sorted(_MODULES)


def get(name: str) -> tuple[Callable[..., DiffusionModel], type]:
    """(run, Options) for a pass; BadInput if unknown. Importing its module registers it."""
    if name not in _MODULES:
        raise BadInput(f"unknown pass {name!r}; known passes: {', '.join(known_passes())}")
    if name not in _REGISTRY:
        importlib.import_module(_MODULES[name])
    if name not in _REGISTRY:
        raise RuntimeError(f"{_MODULES[name]} does not register pass {name!r}")
    return _REGISTRY[name]


def order_rule(name: str) -> OrderRule:
    get(name)
    return _ORDER[name]


def check_order(names: list[str], already: set[str] | frozenset[str] = frozenset(), where: str = "recipe") -> None:
    """BadInput when the pass sequence `names` breaks a pass's declared ordering rules.

    `already`: passes whose state the input model carries (its extras and provenance).
    """
    for i, name in enumerate(names):
        rule = order_rule(name)
        before = set(names[:i]) | set(already)
        for req in rule.requires:
            if req not in before:
                raise BadInput(f"{where}: pass {name!r} needs {req!r} before it (put a `{req}` pass earlier)")
        for later in rule.must_precede:
            if later in names[:i] or later in already:
                raise BadInput(f"{where}: pass {name!r} must run before {later!r}, which "
                               + ("comes earlier in the recipe" if later in names[:i] else "the input model has had"))


def make_options(name: str, values: dict[str, Any], where: str = "recipe") -> Any:
    """Build a pass's options dataclass from a dict, rejecting unknown keys and wrong types."""
    _, opts_cls = get(name)
    fields = {f.name: f for f in dataclasses.fields(opts_cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise BadInput(f"{where}: pass {name!r} has no option(s) {', '.join(sorted(unknown))}; "
                       f"it takes {', '.join(fields) or 'none'}")
    for k, v in values.items():  # inf/nan never make sense as a step count, ratio or rate
        if isinstance(v, float) and not math.isfinite(v):
            raise BadInput(f"{where}: pass {name!r}: option {k} = {v} is not a finite number")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > 1e12:
            raise BadInput(f"{where}: pass {name!r}: option {k} = {v} is out of range")
    try:
        return opts_cls(**values)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadInput(f"{where}: bad options for pass {name!r}: {e}") from None
    except BadInput as e:
        if where in str(e):
            raise
        raise BadInput(f"{where}: pass {name!r}: {e}") from None


def restore_extras(model: DiffusionModel) -> DiffusionModel:
    """Re-apply pass state from model.extras after loading an artifact."""
    for name in list(model.extras):
        if name in _MODULES:
            get(name)  # importing the pass module registers its restorer
        if name in _RESTORERS:
            model = _RESTORERS[name](model)
    return model


def sampling_correction(model: DiffusionModel) -> Any:
    """The correction a pass attached to `model` for the sampler to apply (PTQD's), or None."""
    for name in list(model.extras):
        if name in _MODULES:
            get(name)
        if name in _CORRECTIONS:
            corr = _CORRECTIONS[name](model)
            if corr is not None:
                return corr
    return None


# the artifact layer re-applies pass state on load through this (it never imports the passes)
register_artifact_restorer(restore_extras)
