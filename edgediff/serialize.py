"""Save and reload a (possibly pruned or rewritten) denoiser without unpickling anything.

A diffusers denoiser is saved as its original config, its weights (safetensors) and a
`structure.json` that records how the module tree differs from what the config builds:
modules replaced by other classes (constructed from recorded keyword arguments, and only
from an allowlist of torch.nn classes or classes inside the edgediff package), simple
attributes that passes changed (channel counts, attention heads...), and tensors whose
shapes changed (pruned channels). Reloading builds the config's model, replays those
differences, then loads the weights strictly. A module without a diffusers config is saved
as a `torch.export` archive instead.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput

STRUCTURE_VERSION = 1
_SIMPLE = (int, float, bool, str, type(None))

# torch.nn classes we know how to rebuild from their attributes.
_NN_INIT: dict[str, Any] = {
    "Identity": lambda m: {},
    "SiLU": lambda m: {},
    "Dropout": lambda m: {"p": m.p},
    "Conv2d": lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
                         "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
                         "bias": m.bias is not None},
    "Linear": lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    "GroupNorm": lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps, "affine": m.affine},
    "LayerNorm": lambda m: {"normalized_shape": m.normalized_shape, "eps": m.eps,
                            "elementwise_affine": m.elementwise_affine},
}


def _is_simple(v: Any) -> bool:
    if isinstance(v, _SIMPLE):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v)


def _class_path(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _init_kwargs(m: nn.Module, name: str) -> dict[str, Any]:
    if hasattr(m, "_edgediff_init"):
        return dict(m._edgediff_init)
    if type(m).__module__.startswith("torch.nn") and type(m).__name__ in _NN_INIT:
        return _NN_INIT[type(m).__name__](m)
    raise TypeError(f"cannot save module {name!r} of class {_class_path(m)}: give it an `_edgediff_init` dict "
                    "of constructor arguments")


def _resolve_class(path: str) -> type:
    if not (path.startswith("edgediff.") or path.startswith("torch.nn.")):
        raise BadInput(f"structure.json names class {path!r}, outside the allowlist (edgediff.*, torch.nn.*)")
    mod, _, qual = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError:
        # nested qualname, e.g. torch.nn.modules.conv.Conv2d is fine; a.b.C.D needs a walk
        mod, _, outer = mod.rpartition(".")
        obj = getattr(importlib.import_module(mod), outer)
    return getattr(obj, qual)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def structure_diff(model: nn.Module, fresh: nn.Module) -> dict[str, Any]:
    """How `model` differs from `fresh` (built from the same config)."""
    fresh_mods = dict(fresh.named_modules())
    replaced, attrs = [], {}
    for name, m in model.named_modules():
        if not name:
            continue
        f = fresh_mods.get(name)
        if f is None or type(f) is not type(m):
            replaced.append({"name": name, "class": _class_path(m), "init": _init_kwargs(m, name)})
            continue
    # attributes: compared after replacement, on modules of the same class
    for name, m in model.named_modules():
        f = fresh_mods.get(name)
        if f is None or type(f) is not type(m):
            continue
        diff = {k: v for k, v in vars(m).items()
                if not k.startswith("_") and k != "training" and _is_simple(v) and vars(f).get(k, object()) != v}
        if diff:
            attrs[name] = diff
    return {"version": STRUCTURE_VERSION, "replaced": replaced, "attrs": attrs}


def apply_structure(module: nn.Module, structure: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """Replay a structure diff on a freshly built module and load `state` strictly."""
    for rec in structure.get("replaced", []):
        cls = _resolve_class(rec["class"])
        try:
            cur = module.get_submodule(rec["name"])
        except AttributeError:
            cur = None
        if cur is not None and type(cur) is cls:
            continue  # built by its parent's constructor already
        _set_module(module, rec["name"], cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec["init"].items()}))
    for name, diff in structure.get("attrs", {}).items():
        m = module.get_submodule(name) if name else module
        for k, v in diff.items():
            setattr(m, k, tuple(v) if isinstance(v, list) and isinstance(getattr(m, k, None), tuple) else v)
    # tensors whose shape or dtype changed (pruned channels, fp16): replace them with empties like the saved ones
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    for key, t in state.items():
        cur = own.get(key)
        if cur is not None and (cur.shape != t.shape or cur.dtype != t.dtype):
            parent_name, _, leaf = key.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if isinstance(cur, nn.Parameter):
                setattr(parent, leaf, nn.Parameter(torch.empty_like(t), requires_grad=cur.requires_grad))
            else:
                parent._buffers[leaf] = torch.empty_like(t)
    module.load_state_dict(state, strict=True)
    return module


def save_denoiser(denoiser: nn.Module, arch: str, config: dict[str, Any] | None, folder: Path,
                  example_inputs: dict[str, torch.Tensor] | None = None) -> None:
    """Write `folder/` so that `load_denoiser(folder)` rebuilds an equal module."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        if example_inputs is None:
            raise ValueError("a module without a diffusers config needs example inputs to be saved via torch.export")
        from edgediff.model import DenoiserModule

        mod = denoiser if isinstance(denoiser, DenoiserModule) else denoiser
        ep = torch.export.export(mod, tuple(example_inputs.values()))
        torch.export.save(ep, str(folder / "denoiser.pt2"))
        return
    from edgediff.loaders import build_diffusers

    cfg = {k: v for k, v in config.items()}
    cfg["_class_name"] = arch
    fresh = build_diffusers(arch, cfg, folder)
    structure = structure_diff(denoiser, fresh)
    (folder / "config.json").write_text(json.dumps(_jsonable(cfg), indent=2, sort_keys=True) + "\n")
    (folder / "structure.json").write_text(json.dumps(_jsonable(structure), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().clone() for k, v in denoiser.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_denoiser(folder: Path) -> tuple[nn.Module, str, dict[str, Any] | None]:
    """Inverse of save_denoiser: (module, arch, config)."""
    from edgediff.loaders import _read_json, build_diffusers, load_safetensors

    if (folder / "denoiser.pt2").is_file():
        ep = torch.export.load(str(folder / "denoiser.pt2"))
        return ep.module(), "ExportedProgram", None
    cfg = _read_json(folder / "config.json")
    arch = cfg.get("_class_name", "")
    module = build_diffusers(arch, cfg, folder / "config.json")
    structure = _read_json(folder / "structure.json") if (folder / "structure.json").is_file() else {}
    state = load_safetensors(folder / "model.safetensors")
    try:
        apply_structure(module, structure, state)
    except (RuntimeError, AttributeError, TypeError) as e:
        raise BadInput(f"{folder}: saved weights do not fit the saved structure ({str(e).splitlines()[0]})") from None
    module.eval()
    return module, arch, dict(module.config)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, _SIMPLE):
        return v
    return str(v)
