"""Save and reload a (possibly pruned or rewritten) denoiser without unpickling anything.

A diffusers denoiser is saved as its original config, its weights (safetensors) and a
`structure.json` that records how the module tree differs from what the config builds:
modules replaced by other classes (constructed from recorded keyword arguments, and only
from a closed table of stable class names: `@serializable` classes of edgediff and a short
list of torch.nn classes; see docs/security.md), simple
attributes that passes changed (channel counts, attention heads...), and tensors whose
shapes changed (pruned channels). Reloading builds the config's model, replays those
differences, then loads the weights strictly. A module without a diffusers config is saved
as a `torch.export` archive instead.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput

STRUCTURE_VERSION = 2  # 2: classes named by stable names; 1 wrote dotted import paths (still read via aliases)
_SIMPLE = (int, float, bool, str, type(None))
# constructor arguments and attribute overrides larger than this are refused before building
_MAX_INT_ARG = 1 << 20
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*\Z")

# ---------------------------------------------------------------- the class table
# The only classes structure.json may name: stable name -> class. Our own modules register
# with @serializable; torch classes are listed below. Lookup is by exact key: nothing from the
# file is ever imported or walked with getattr.
_CLASSES: dict[str, type] = {}
_NAMES: dict[type, str] = {}
# modules that define @serializable classes: imported (fixed names, never from a file) before a lookup
_PROVIDERS = ("edgediff.fused", "edgediff.passes.skip_modules", "edgediff.quant.core", "edgediff.testing")


def serializable(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `name` is the class's stable name in structure.json (keep it forever)."""
    if not _NAME_PART.match(name):
        raise ValueError(f"stable name {name!r}: use letters, digits and underscores")

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _CLASSES and _CLASSES[name] is not cls:
            raise ValueError(f"stable name {name!r} is already taken by {_CLASSES[name].__qualname__}")
        _CLASSES[name] = cls
        _NAMES[cls] = name
        return cls

    return deco


def _init_torch_table() -> None:
    for name, cls in {"torch.Identity": nn.Identity, "torch.SiLU": nn.SiLU, "torch.GELU": nn.GELU,
                      "torch.ReLU": nn.ReLU, "torch.Dropout": nn.Dropout, "torch.Conv2d": nn.Conv2d,
                      "torch.Linear": nn.Linear, "torch.GroupNorm": nn.GroupNorm,
                      "torch.LayerNorm": nn.LayerNorm}.items():
        _CLASSES[name] = cls
        _NAMES[cls] = name


_init_torch_table()

# The dotted names version-1 artifacts actually contain (type.__module__ + qualname at the time),
# pinned here so that old artifacts load even after a class moves.
ALIASES: dict[str, str] = {
    "torch.nn.modules.linear.Identity": "torch.Identity",
    "torch.nn.modules.activation.SiLU": "torch.SiLU",
    "torch.nn.modules.activation.GELU": "torch.GELU",
    "torch.nn.modules.activation.ReLU": "torch.ReLU",
    "torch.nn.modules.dropout.Dropout": "torch.Dropout",
    "torch.nn.modules.conv.Conv2d": "torch.Conv2d",
    "torch.nn.modules.linear.Linear": "torch.Linear",
    "torch.nn.modules.normalization.GroupNorm": "torch.GroupNorm",
    "torch.nn.modules.normalization.LayerNorm": "torch.LayerNorm",
    "edgediff.passes.skip_modules.SkipResnet": "skip_resnet",
    "edgediff.passes.skip_modules.SkipAttention": "skip_attention",
    "edgediff.passes.skip_modules.ZeroBranch": "zero_branch",
    "edgediff.passes.skip_modules.SkipBlock": "skip_block",
    "edgediff.fused.PackedAway": "packed_away",
    "edgediff.fused.PackedAttnProcessor": "packed_attn_processor",
    "edgediff.fused.FoldedTimesteps": "folded_timesteps",
    "edgediff.quant.core.WeightQuantizer": "weight_quantizer",
    "edgediff.quant.core.ActQuantizer": "act_quantizer",
    "edgediff.quant.core.QuantConv2d": "quant_conv2d",
    "edgediff.quant.core.QuantLinear": "quant_linear",
    "edgediff.quant.core.FloatAttnProcessor": "float_attn_processor",
    "edgediff.quant.core.QuantAttnProcessor": "quant_attn_processor",
    "edgediff.testing.MinMaxSimLayer": "minmax_sim_layer",
}

# torch.nn classes we know how to rebuild from their attributes.
_NN_INIT: dict[type, Any] = {
    nn.Identity: lambda m: {},
    nn.SiLU: lambda m: {},
    nn.GELU: lambda m: {"approximate": m.approximate},
    nn.ReLU: lambda m: {},
    nn.Dropout: lambda m: {"p": m.p},
    nn.Conv2d: lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
                          "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
                          "bias": m.bias is not None},
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    nn.GroupNorm: lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps,
                             "affine": m.affine},
    nn.LayerNorm: lambda m: {"normalized_shape": m.normalized_shape, "eps": m.eps,
                             "elementwise_affine": m.elementwise_affine},
}


def _load_providers() -> None:
    for mod in _PROVIDERS:
        importlib.import_module(mod)


def registered_classes() -> dict[str, type]:
    """Every class structure.json may name, by stable name."""
    _load_providers()
    return dict(_CLASSES)


def stable_name(cls: type) -> str:
    """The stable name of a serializable class; TypeError when it has none."""
    if cls not in _NAMES:
        _load_providers()
    try:
        return _NAMES[cls]
    except KeyError:
        raise TypeError(f"class {cls.__module__}.{cls.__qualname__} has no stable name: decorate it with "
                        "@serializable(\"name\") (edgediff.serialize)") from None


def class_for(name: object, where: str = "structure.json") -> type:
    """The class with this stable name (or a version-1 dotted alias); BadInput for anything else."""
    if not isinstance(name, str):
        raise BadInput(f"{where}: class name must be a string, got {type(name).__name__}")
    _load_providers()
    key = name if name in _CLASSES else ALIASES.get(name)
    if key is None or key not in _CLASSES:
        raise BadInput(f"{where}: names class {name!r}, which is not in edgediff's table of serializable classes")
    return _CLASSES[key]


def _is_simple(v: Any) -> bool:
    if isinstance(v, _SIMPLE):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v)


def _class_path(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _init_kwargs(m: nn.Module, name: str) -> dict[str, Any]:
    if hasattr(m, "_edgediff_init"):
        return dict(m._edgediff_init)
    if type(m) in _NN_INIT:
        return _NN_INIT[type(m)](m)
    raise TypeError(f"cannot save module {name!r} of class {_class_path(m)}: give it an `_edgediff_init` dict "
                    "of constructor arguments")


def _same_init(m: nn.Module, init: dict[str, Any]) -> bool:
    """Whether `m`'s own constructor arguments equal the saved (checked) ones."""
    own = getattr(m, "_edgediff_init", None)
    if not isinstance(own, dict):
        return True  # nothing to compare: the parent's constructor is the only record
    return {k: tuple(v) if isinstance(v, list) else v for k, v in own.items()} == init


def _check_value(v: Any, where: str, what: str, nested: bool = False) -> Any:
    """A JSON scalar or a flat list of scalars (shapes, kernel sizes); ints and lengths bounded."""
    if isinstance(v, list) and not nested:
        if len(v) > 64:
            raise BadInput(f"{where}: {what} is a list of {len(v)} items (at most 64)")
        return [_check_value(x, where, what, nested=True) for x in v]
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str):
        if len(v) > 256:
            raise BadInput(f"{where}: {what} is a string of {len(v)} characters (at most 256)")
        return v
    if isinstance(v, int):
        if abs(v) > _MAX_INT_ARG:
            raise BadInput(f"{where}: {what} = {v} is out of range (|value| <= {_MAX_INT_ARG})")
        return v
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise BadInput(f"{where}: {what} = {v} is not a finite number")
        return v
    raise BadInput(f"{where}: {what} must be a number, string, boolean, null or a flat list of those "
                   f"(got {type(v).__name__})")


def _module_path(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 512 or not all(
            _NAME_PART.match(p) for p in name.split(".")):
        raise BadInput(f"{where}: {name!r} is not a module path (dotted names of letters, digits, underscores)")
    return name


def _resolve_class(path: str) -> type:
    """Kept for callers of the old name: exact-key lookup, never an import."""
    return class_for(path)


def structure_diff(model: nn.Module, fresh: nn.Module) -> dict[str, Any]:
    """How `model` differs from `fresh` (built from the same config)."""
    fresh_mods = dict(fresh.named_modules())
    replaced, attrs = [], {}
    for name, m in model.named_modules():
        if not name:
            continue
        f = fresh_mods.get(name)
        if f is None or type(f) is not type(m):
            replaced.append({"name": name, "class": stable_name(type(m)), "init": _init_kwargs(m, name)})
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


def _check_attr(m: nn.Module, key: object, value: Any, where: str) -> Any:
    """An attribute override may only change plain data: never a method, property, module or tensor."""
    if not isinstance(key, str) or not _NAME_PART.match(key) or key in ("training", "forward"):
        raise BadInput(f"{where}: attribute name {key!r} cannot be overridden")
    cls_attr = getattr(type(m), key, None)
    if cls_attr is not None and (callable(cls_attr) or isinstance(cls_attr, property)
                                 or hasattr(cls_attr, "__get__")):
        raise BadInput(f"{where}: attribute {key!r} is a method or property of {type(m).__name__}; "
                       "structure.json may only change plain values")
    cur = vars(m).get(key, None)
    if cur is not None and not _is_simple(cur):
        raise BadInput(f"{where}: attribute {key!r} of {type(m).__name__} holds a {type(cur).__name__}, "
                       "not a plain value; structure.json may only change plain values")
    for store in ("_modules", "_parameters", "_buffers"):
        if key in getattr(m, store, {}):
            raise BadInput(f"{where}: {key!r} is a submodule or tensor of {type(m).__name__}, not a plain value")
    v = _check_value(value, where, f"attribute {key!r}")
    return tuple(v) if isinstance(v, list) and isinstance(cur, tuple) else v


def _submodule(root: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return root.get_submodule(name) if name else root
    except AttributeError:
        raise BadInput(f"{where}: names module {name!r}, which the model does not have") from None


def apply_structure(module: nn.Module, structure: dict[str, Any], state: dict[str, torch.Tensor],
                    where: str = "structure.json") -> nn.Module:
    """Replay a structure diff on a freshly built module and load `state` strictly.

    Everything from the file is checked first: classes come from the closed table, constructor
    arguments and attribute values are plain bounded data, module paths are dotted names.
    """
    if not isinstance(structure, dict):
        raise BadInput(f"{where}: expected a JSON object")
    replaced, attrs = structure.get("replaced", []), structure.get("attrs", {})
    if not isinstance(replaced, list) or not isinstance(attrs, dict):
        raise BadInput(f"{where}: 'replaced' must be a list and 'attrs' an object")
    for rec in replaced:
        if not isinstance(rec, dict) or not isinstance(rec.get("init", {}), dict):
            raise BadInput(f"{where}: each 'replaced' entry must be an object with name, class and init")
        name = _module_path(rec.get("name"), where)
        cls = class_for(rec.get("class"), where)
        init = {}
        for k, v in rec.get("init", {}).items():
            if not isinstance(k, str) or not _NAME_PART.match(k):
                raise BadInput(f"{where}: {name}: constructor argument name {k!r} is not an identifier")
            v = _check_value(v, where, f"{name}: argument {k!r}")
            init[k] = tuple(v) if isinstance(v, list) else v
        parent_name, _, leaf = name.rpartition(".")
        parent = _submodule(module, parent_name, where)
        cur = parent._modules.get(leaf)
        if cur is not None and type(cur) is cls and _same_init(cur, init):
            continue  # built by its parent's constructor already, with the saved arguments
        # (a child built by its parent but changed afterwards, e.g. a disabled quantizer, is rebuilt)
        if cur is None and hasattr(type(parent), leaf):
            # instance data (an attention processor) may become a module; a method or property may not
            raise BadInput(f"{where}: {name!r} would replace a method or property of {type(parent).__name__}")
        try:
            new = cls(**init)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BadInput(f"{where}: cannot build {name!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                           ) from None
        setattr(parent, leaf, new)
    for name, diff in attrs.items():
        m = _submodule(module, _module_path(name, where) if name else "", where)
        if not isinstance(diff, dict):
            raise BadInput(f"{where}: attrs[{name!r}] must be an object")
        for k, v in diff.items():
            setattr(m, k, _check_attr(m, k, v, f"{where}: {name or '(root)'}"))
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
    from edgediff.onnx_source import OnnxGraphModule, save_graph

    inner = getattr(denoiser, "inner", denoiser)
    if isinstance(inner, OnnxGraphModule):  # an ONNX-in model keeps its graphs, no torch.export
        save_graph(inner, folder)
        return
    if getattr(denoiser, "_edgediff_adapted", False):  # an --adapter torch module: weights + adapter, no torch.export
        from edgediff.adapter import fresh_inner, save_adapted

        # passes that replaced modules (w8a8 wrappers) are replayed at reload from this diff
        save_adapted(denoiser, folder, structure_diff(denoiser.inner, fresh_inner(denoiser)))  # type: ignore[arg-type]
        return
    if config is None:
        if example_inputs is None:
            raise ValueError("a module without a diffusers config needs example inputs to be saved via torch.export")
        from edgediff.model import DenoiserModule

        mod = denoiser if isinstance(denoiser, DenoiserModule) else denoiser
        args = tuple(example_inputs.values())
        batch = tuple({0: torch.export.Dim.AUTO} for _ in args)
        ep = None
        # a dynamic batch, so that exporters and samplers can call it with any batch size; a module
        # taking *args (ExportedDenoiser) wants the specs as one tuple
        for spec in (batch, (batch,)):
            try:
                ep = torch.export.export(mod, args, dynamic_shapes=spec)
                break
            except Exception:  # noqa: BLE001, S112 - try the next form, then a fixed batch
                continue
        if ep is None:
            ep = torch.export.export(mod, args)
        torch.export.save(ep, str(folder / "denoiser.pt2"))
        return
    from edgediff.files import build_diffusers

    cfg = {k: v for k, v in config.items()}
    cfg["_class_name"] = arch
    fresh = build_diffusers(arch, cfg, folder)
    structure = structure_diff(denoiser, fresh)
    (folder / "config.json").write_text(json.dumps(_jsonable(cfg), indent=2, sort_keys=True) + "\n")
    (folder / "structure.json").write_text(json.dumps(_jsonable(structure), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().clone() for k, v in denoiser.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_denoiser(folder: Path, trust_pickle: bool = False) -> tuple[nn.Module, str, dict[str, Any] | None]:
    """Inverse of save_denoiser: (module, arch, config). Nothing from the folder is run."""
    from edgediff.files import build_diffusers, load_safetensors, read_json
    from edgediff.safe_load import ExportedDenoiser, load_exported_program

    if (folder / "graph.json").is_file():
        from edgediff.onnx_source import load_graph

        return load_graph(folder), "OnnxGraph", None
    if (folder / "adapter.json").is_file():
        from edgediff.adapter import load_adapted

        where = str(folder / "structure.json")
        return load_adapted(folder, lambda m, st, state: apply_structure(m, st, state, where=where)), "Adapted", None
    if (folder / "denoiser.pt2").is_file():
        return ExportedDenoiser(load_exported_program(folder / "denoiser.pt2", trust_pickle)), "ExportedProgram", None
    cfg = read_json(folder / "config.json")
    arch = cfg.get("_class_name", "")
    module = build_diffusers(arch, cfg, folder / "config.json")
    structure = read_json(folder / "structure.json") if (folder / "structure.json").is_file() else {}
    state = load_safetensors(folder / "model.safetensors")
    try:
        apply_structure(module, structure, state, where=str(folder / "structure.json"))
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
