"""Core ML packages of a DeepCache artifact: the full and the shallow call as two functions (or two packages).

A cached artifact (extras["cache"], edgediff.deepcache) exports to `NAME.mlpackage` as one
multifunction ML Program (coremltools `MultiFunctionDescriptor` / `save_multifunction`, iOS 18 /
macOS 15 and later):

    function "full"     (default)  sample, timestep[, cond] -> out, cached_feature
    function "shallow"             sample, timestep[, cond], cached_feature -> out

Weights the two functions share are stored once (save_multifunction deduplicates identical
constants), so the package is about the size of the full call alone. An app loads the function
it calls with `MLModelConfiguration.functionName`. For an older deployment target
(`deployment_target="iOS17"`) the two calls are two packages instead: NAME.mlpackage (full) and
NAME_shallow.mlpackage beside it. Either way the schedule (which sampler steps run the full call,
depth, feature shape) is in the package's user metadata under `edgediff.cache`, for the app's
sampler loop to follow. Prediction needs macOS, so here the packages are checked structurally
(both functions' inputs/outputs and the feature's shape), and verify says exit 3.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from edgediff.exporters.base import deepcache_record
from torch import nn

from edgediff.artifact import atomic_dir
from edgediff.deepcache import FullEntry, ShallowEntry, cache_config
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.runtime.bundle import FEATURE_NAME

# exporters/coreml.py calls this module with its converter and reader (so this one does not import it)
OUTPUT_NAME = "out"  # the denoiser output's name in every edgediff Core ML package (exporters/coreml.py)
FULL_FUNCTION = "full"
SHALLOW_FUNCTION = "shallow"
META_KEY = "edgediff.cache"
TARGETS = ("iOS17", "iOS18")  # iOS 18: one multifunction package; iOS 17: two packages


_NAMED = ("sample", "timestep", "encoder_hidden_states", "class_labels")  # what the entries below take by name


def _given(**inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if v is not None}


class _Full(nn.Module):
    """DeepCache's full call with the contract's input names as parameters (torch.export passes them by name)."""

    def __init__(self, wrapper: nn.Module, depth: int) -> None:
        super().__init__()
        self.entry = FullEntry(wrapper, depth)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.entry(**_given(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                   class_labels=class_labels))


class _Shallow(nn.Module):
    """DeepCache's shallow call: the cached feature is one more named input."""

    def __init__(self, wrapper: nn.Module, depth: int) -> None:
        super().__init__()
        self.entry = ShallowEntry(wrapper, depth)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, cached_feature: torch.Tensor | None = None) -> torch.Tensor:
        return self.entry(**_given(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                   class_labels=class_labels), feature=cached_feature)


assert FEATURE_NAME == "cached_feature"  # _Shallow's parameter is the package's input name


def shallow_path(out: Path) -> Path:
    """Where the shallow package of a two-package export goes."""
    return out.with_name(out.stem + "_shallow" + out.suffix)


def _ct() -> Any:
    import coremltools

    return coremltools


def _entries(model: DiffusionModel, precision: str, options: dict[str, Any], target: str,
             build_mlmodel: Callable[..., tuple[Any, dict[str, Any]]]) -> dict[str, tuple[Any, dict]]:
    """{function name: (MLModel, facts)} for the full and the shallow call (`build_mlmodel`: exporters/coreml.py's)."""
    cache = cache_config(model)
    assert cache is not None
    depth = int(cache["depth"])
    kw = {"palettize": options.get("palettize"), "batch": options.get("batch", 1),
          "attention": options.get("attention", "ane"), "activations": options.get("activations"),
          "deployment_target": target}

    def full(wrapper: nn.Module, ex: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        other = sorted(set(ex) - set(_NAMED))
        if other:
            raise BadInput(f"Core ML DeepCache export: the denoiser's inputs {other} are not handled yet "
                           f"(it takes {', '.join(_NAMED)})")
        return _Full(wrapper, depth).eval(), ex

    def shallow(wrapper: nn.Module, ex: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        with torch.no_grad():
            _, feat = FullEntry(wrapper, depth)(**ex)
        return _Shallow(wrapper, depth).eval(), {**ex, FEATURE_NAME: feat}

    return {FULL_FUNCTION: build_mlmodel(model, precision, entry=full, outputs=(OUTPUT_NAME, FEATURE_NAME), **kw),
            SHALLOW_FUNCTION: build_mlmodel(model, precision, entry=shallow, **kw)}


def _record(model: DiffusionModel, target: str) -> dict[str, Any]:
    rec = deepcache_record(model)
    assert rec is not None
    return {**rec, "layout": "multifunction" if target == "iOS18" else "two packages",
            "functions": [FULL_FUNCTION, SHALLOW_FUNCTION] if target == "iOS18" else None, "shallow_package": None}


def _move_into(pkg: Path, tmp: Path) -> None:
    # atomic_dir renames the temp dir itself: move the package's contents up into it
    for p in pkg.iterdir():
        p.rename(tmp / p.name)
    pkg.rmdir()


def _with_meta(src: Path, dst: Path, record: dict[str, Any]) -> None:
    """Save package `src` as `dst` with the schedule in its user metadata."""
    ct = _ct()
    ml = ct.models.MLModel(str(src), skip_model_load=True)
    ml.user_defined_metadata[META_KEY] = json.dumps(record)
    ml.save(str(dst))


def export_cached(model: DiffusionModel, out: Path, precision: str, options: dict[str, Any], force: bool,
                  build_mlmodel: Callable[..., tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """Write the cached export (see the module doc) with exporters/coreml.py's `build_mlmodel`;
    returns the report's extra facts."""
    target = str(options.get("deployment_target") or "iOS18")
    if target not in TARGETS:
        raise BadInput(f"coreml option deployment_target={target!r}: expected one of {', '.join(TARGETS)}")
    entries = _entries(model, precision, options, target, build_mlmodel)
    record = _record(model, target)
    ct = _ct()
    side = shallow_path(out)
    if target != "iOS18":
        record["shallow_package"] = side.name
        if side.exists() and not force:
            raise BadInput(f"{side}: output already exists (pass --force to replace it)")
    with tempfile.TemporaryDirectory(prefix="edgediff-coreml-cache-") as td:
        parts = {}
        for fn, (ml, _) in entries.items():
            parts[fn] = Path(td) / f"{fn}.mlpackage"
            ml.save(str(parts[fn]))
        if target == "iOS18":
            desc = ct.utils.MultiFunctionDescriptor()
            for fn, p in parts.items():
                desc.add_function(str(p), src_function_name="main", target_function_name=fn)
            desc.default_function_name = FULL_FUNCTION
            merged = Path(td) / "merged.mlpackage"
            ct.utils.save_multifunction(desc, str(merged))
            with atomic_dir(out, force=force) as tmp:
                _with_meta(merged, tmp / out.name, record)
                _move_into(tmp / out.name, tmp)
        else:
            with atomic_dir(side, force=force) as tmp:
                _with_meta(parts[SHALLOW_FUNCTION], tmp / side.name, record)
                _move_into(tmp / side.name, tmp)
            try:
                with atomic_dir(out, force=force) as tmp:
                    _with_meta(parts[FULL_FUNCTION], tmp / out.name, record)
                    _move_into(tmp / out.name, tmp)
            except BaseException:
                shutil.rmtree(side, ignore_errors=True)  # never one package of the pair alone
                raise
    facts = entries[FULL_FUNCTION][1]
    facts["shallow"] = {k: v for k, v in entries[SHALLOW_FUNCTION][1].items() if k in ("convert_seconds", "frontend")}
    return {**facts, "cache": record,
            "size_bytes": sum(p.stat().st_size for d in (out, side) if d.exists() for p in d.rglob("*") if p.is_file())}


def cache_record(path: Path) -> dict[str, Any] | None:
    """The schedule a package carries (None: not a cached export)."""
    ct = _ct()
    try:
        raw = ct.models.MLModel(str(path), skip_model_load=True).user_defined_metadata.get(META_KEY)
    except Exception:  # noqa: BLE001 - structural_check reports the unreadable package itself
        return None
    return json.loads(raw) if raw else None


def check_cached(path: Path, record: dict[str, Any], coreml_info: Callable[[Path], dict[str, Any]]) -> list[str]:
    """Problems with a cached export's two entry points: both present, the feature out of the
    full call and into the shallow one with the same shape, `out` from both (`coreml_info`:
    exporters/coreml.py's reader)."""
    problems: list[str] = []
    info = coreml_info(path)
    if record.get("layout") == "multifunction":
        fns = info.get("functions") or {}
        missing = [f for f in (FULL_FUNCTION, SHALLOW_FUNCTION) if f not in fns]
        if missing:
            return [f"{path}: function(s) {missing} missing (has {sorted(fns)})"]
        full, shallow = fns[FULL_FUNCTION], fns[SHALLOW_FUNCTION]
    else:
        side = Path(path).with_name(str(record.get("shallow_package") or shallow_path(Path(path)).name))
        if not side.exists():
            return [f"{side}: the shallow package is missing"]
        full, shallow = info, coreml_info(side)
    feat_out = full["outputs"].get(FEATURE_NAME)
    feat_in = shallow["inputs"].get(FEATURE_NAME)
    if feat_out is None:
        problems.append(f"the full call has no {FEATURE_NAME} output")
    if feat_in is None:
        problems.append(f"the shallow call has no {FEATURE_NAME} input")
    if feat_out and feat_in and feat_out["shape"] != feat_in["shape"]:
        problems.append(f"{FEATURE_NAME}: full call writes {feat_out['shape']}, shallow call reads {feat_in['shape']}")
    want = record.get("feature_shape")
    if feat_in and want and list(feat_in["shape"][1:]) != list(want):
        problems.append(f"{FEATURE_NAME} shape {feat_in['shape']} != the artifact's {want}")
    for name, fn in ((FULL_FUNCTION, full), (SHALLOW_FUNCTION, shallow)):
        if OUTPUT_NAME not in fn["outputs"]:
            problems.append(f"the {name} call has no {OUTPUT_NAME!r} output")
    if set(shallow["inputs"]) - {FEATURE_NAME} != set(full["inputs"]):
        problems.append(f"inputs differ: full {sorted(full['inputs'])}, shallow {sorted(shallow['inputs'])}")
    return problems
