"""`--adapter FILE.toml`: declare how a non-diffusers denoiser is called (a .pt2 archive, a trusted pickle,
an ONNX graph: edgediff/onnx_source.py).

    sample_shape = [4, 32, 32]            # without the batch axis
    inputs = ["x", "sigma", "context"]    # the module's positional arguments / the graph's inputs, in order
    sample = "x"                          # which one is the noisy sample
    time = "sigma"                        # which one carries time
    time_kind = "sigma"                   # "timestep" (scheduler units) or "sigma" (EDM-family schedules:
                                          # sigma = exp(4 * c_noise))
    time_scale = 1.0                      # the module gets time * time_scale (e.g. 0.001 for t in [0, 1])
    preconditioning = "none"              # or "edm": a torch module that takes raw x and sigma and returns the
                                          # denoised x0 (k-diffusion style); edgediff applies c_in/c_skip/c_out

    [cond.context]                        # every other input: shape without batch, dtype, role
    shape = [77, 768]
    dtype = "float32"                     # or "int64"
    role = "encoder_hidden_states"        # or "class_labels" (with num_classes) or "extra" (default)

    [scheduler]                           # a diffusers scheduler config (default DDPMScheduler),
    _class_name = "EDMEulerScheduler"     # or scheduler_config = "path/relative/to/this.toml"

An artifact of an adapted torch module stores the adapter, the source's path and hash, and the
weights (no torch.export at save time); reloading rebuilds the module from the same source
(refused if the file changed) and loads the saved weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, InputSignature, InputSpec
from edgediff.schedule import NoiseSchedule

ROLES = ("encoder_hidden_states", "class_labels", "extra")
KEYS = ("sample_shape", "inputs", "sample", "time", "time_kind", "time_scale", "preconditioning", "cond",
        "scheduler", "scheduler_config")


@dataclass(frozen=True)
class CondInput:
    """One conditioning input of an adapted denoiser."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    role: str = "extra"
    num_classes: int | None = None


@dataclass
class Adapter:
    path: Path
    inputs: list[str]
    sample: str
    time: str
    sample_shape: tuple[int, ...]
    time_kind: str = "timestep"
    time_scale: float = 1.0
    preconditioning: str = "none"
    cond: list[CondInput] = field(default_factory=list)
    scheduler: dict[str, Any] = field(default_factory=dict)

    def contract_name(self, c: CondInput) -> str:
        """The exported-file contract's name for a conditioning input."""
        return c.role if c.role in ("encoder_hidden_states", "class_labels") else c.name

    def feed_names(self) -> dict[str, str]:
        """contract input name -> the module's / graph's own input name."""
        out = {"sample": self.sample, "timestep": self.time}
        out.update({self.contract_name(c): c.name for c in self.cond})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "inputs": list(self.inputs), "sample": self.sample, "time": self.time,
                "sample_shape": list(self.sample_shape), "time_kind": self.time_kind, "time_scale": self.time_scale,
                "preconditioning": self.preconditioning,
                "cond": [{"name": c.name, "shape": list(c.shape), "dtype": c.dtype, "role": c.role,
                          "num_classes": c.num_classes} for c in self.cond],
                "scheduler": self.scheduler}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Adapter:
        return cls(Path(d.get("path", "adapter.toml")), list(d["inputs"]), d["sample"], d["time"],
                   tuple(d["sample_shape"]), d.get("time_kind", "timestep"), float(d.get("time_scale", 1.0)),
                   d.get("preconditioning", "none"),
                   [CondInput(c["name"], tuple(c["shape"]), c.get("dtype", "float32"), c.get("role", "extra"),
                              c.get("num_classes")) for c in d.get("cond") or []],
                   dict(d.get("scheduler") or {}))

    def signature(self) -> InputSignature:
        cond_shape = num_classes = None
        extra = []
        for c in self.cond:
            if c.role == "encoder_hidden_states":
                cond_shape = c.shape
            elif c.role == "class_labels":
                num_classes = c.num_classes
            elif c.dtype == "int64":
                extra.append(InputSpec(c.name, c.shape, "int64", fill="randint", value=(c.num_classes or 2,)))
            else:
                extra.append(InputSpec(c.name, c.shape))
        return InputSignature(tuple(self.sample_shape), cond_shape, num_classes, tuple(extra))


def _shape(v: Any, where: str, key: str, allow_empty: bool = False) -> tuple[int, ...]:
    ok = isinstance(v, list) and (v or allow_empty) and all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
    if not ok:
        raise BadInput(f"{where}: adapter field `{key}` must be a list of positive integers, got {v!r}")
    return tuple(v)


def load_adapter(path: Path) -> Adapter:
    """Parse and check an adapter TOML; every problem is one BadInput line naming the file and the field."""
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no such adapter file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"{path}: not a readable TOML file ({str(e).splitlines()[0]})") from None
    w = str(path)
    for k in data:
        if k not in KEYS:
            raise BadInput(f"{w}: unknown adapter field `{k}` (fields: {', '.join(KEYS)})")
    for k in ("sample_shape", "inputs", "sample", "time"):
        if k not in data:
            raise BadInput(f"{w}: adapter field `{k}` is missing")
    shape = _shape(data["sample_shape"], w, "sample_shape")
    inputs = data["inputs"]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs) \
            or len(set(inputs)) != len(inputs):
        raise BadInput(f"{w}: adapter field `inputs` must be a list of distinct input names, got {inputs!r}")
    sample, time = data["sample"], data["time"]
    for key, v in (("sample", sample), ("time", time)):
        if not isinstance(v, str) or v not in inputs:
            raise BadInput(f"{w}: adapter field `{key}` = {v!r} is not one of `inputs` {inputs}")
    if sample == time:
        raise BadInput(f"{w}: adapter fields `sample` and `time` name the same input")
    kind = data.get("time_kind", "timestep")
    if kind not in ("timestep", "sigma"):
        raise BadInput(f"{w}: adapter field `time_kind` must be 'timestep' or 'sigma', got {kind!r}")
    scale = data.get("time_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise BadInput(f"{w}: adapter field `time_scale` must be a positive number, got {scale!r}")
    pre = data.get("preconditioning", "none")
    if pre not in ("none", "edm"):
        raise BadInput(f"{w}: adapter field `preconditioning` must be 'none' or 'edm', got {pre!r}")
    if "scheduler" in data and "scheduler_config" in data:
        raise BadInput(f"{w}: adapter fields `scheduler` and `scheduler_config` exclude each other")
    sched = data.get("scheduler", {})
    if "scheduler_config" in data:
        sc = path.parent / str(data["scheduler_config"])
        try:
            sched = json.loads(sc.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{w}: adapter field `scheduler_config` = {str(data['scheduler_config'])!r}: cannot read "
                           f"{sc} ({e.__class__.__name__})") from None
    if not isinstance(sched, dict):
        raise BadInput(f"{w}: adapter field `scheduler` must be a table (a diffusers scheduler config)")
    schedule = NoiseSchedule.from_config(sched, f"{w} [scheduler]")
    if (kind == "sigma" or pre == "edm") and schedule.family != "edm":
        raise BadInput(f"{w}: adapter field `time_kind`/`preconditioning` sigma/edm needs an EDM-family scheduler "
                       f"(e.g. EDMEulerScheduler), got {schedule.class_name}")
    table = data.get("cond", {})
    if not isinstance(table, dict):
        raise BadInput(f"{w}: adapter field `cond` must be a table of [cond.NAME] tables")
    for name in table:
        if name not in inputs:
            raise BadInput(f"{w}: adapter field `cond.{name}` names no input in `inputs` {inputs}")
    conds: list[CondInput] = []
    for name in inputs:
        if name in (sample, time):
            continue
        spec = table.get(name)
        wi = f"{w}: adapter field `cond.{name}`"
        if not isinstance(spec, dict):
            raise BadInput(f"{wi} is missing (every input besides sample and time needs shape, dtype, role)")
        role = spec.get("role", name if name in ("encoder_hidden_states", "class_labels") else "extra")
        if role not in ROLES:
            raise BadInput(f"{wi}.role must be one of {ROLES}, got {role!r}")
        dtype = spec.get("dtype", "int64" if role == "class_labels" else "float32")
        if dtype not in ("float32", "int64"):
            raise BadInput(f"{wi}.dtype must be 'float32' or 'int64', got {dtype!r}")
        nc = spec.get("num_classes")
        if role == "class_labels" and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
            raise BadInput(f"{wi}.num_classes (a positive integer) is needed for role 'class_labels'")
        shp = () if role == "class_labels" else _shape(spec.get("shape"), w, f"cond.{name}.shape", allow_empty=True)
        conds.append(CondInput(name, shp, dtype, role, nc))
    roles = [c.role for c in conds]
    for r in ("encoder_hidden_states", "class_labels"):
        if roles.count(r) > 1:
            raise BadInput(f"{w}: adapter field `cond`: more than one input with role {r!r}")
    return Adapter(path, list(inputs), sample, time, shape, kind, float(scale), pre, conds, schedule.to_config())


class AdaptedModule(nn.Module):
    """Calls a plain module the way its adapter says, from edgediff's (sample, timestep, named inputs) call."""

    _edgediff_adapted = True

    def __init__(self, inner: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter
        self.sigma_data = float(adapter.scheduler.get("sigma_data", 0.5))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, **named: torch.Tensor) -> torch.Tensor:
        ad = self.adapter
        t = timestep.float()
        sigma = torch.exp(4 * t) if ad.time_kind == "sigma" or ad.preconditioning == "edm" else None
        x = sample
        if ad.preconditioning == "edm":
            assert sigma is not None
            s = sigma.view(-1, *[1] * (sample.dim() - 1))
            x = sample * (s**2 + self.sigma_data**2) ** 0.5  # undo c_in: the module takes raw x
        roles = {c.name: c.role for c in ad.cond}
        args = []
        for name in ad.inputs:
            if name == ad.sample:
                args.append(x)
            elif name == ad.time:
                tt = sigma if ad.time_kind == "sigma" else t
                args.append(tt * ad.time_scale if ad.time_scale != 1.0 else tt)
            else:
                v = encoder_hidden_states if roles[name] == "encoder_hidden_states" else \
                    class_labels if roles[name] == "class_labels" else named.get(name)
                if v is None:
                    raise BadInput(f"{ad.path}: input {name!r} was not given to the adapted denoiser")
                args.append(v)
        out = self.inner(*args)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif not isinstance(out, torch.Tensor):
            out = out.sample
        if ad.preconditioning == "edm":
            # the module returned D(x) = x0; the scheduler wants F with x0 = c_skip x + c_out F
            s = sigma.view(-1, *[1] * (sample.dim() - 1))  # type: ignore[union-attr]
            sd = self.sigma_data
            c_skip = sd**2 / (s**2 + sd**2)
            c_out = s * sd / (s**2 + sd**2) ** 0.5
            if ad.scheduler.get("prediction_type") == "v_prediction":
                c_out = -c_out
            out = (out - c_skip * x) / c_out
        return out


def apply_adapter(base: DiffusionModel, adapter: Adapter, adapter_path: Path, source: Path,
                  trusted: bool) -> DiffusionModel:
    from edgediff.model import DenoiserModule

    inner = base.denoiser.inner if isinstance(base.denoiser, DenoiserModule) else base.denoiser
    mod = AdaptedModule(inner, adapter)
    mod._edgediff_source = {"path": str(Path(source).resolve()), "sha256": base.provenance.get("source_sha256"),
                            "trust_pickle": bool(trusted and Path(source).suffix.lower() != ".pt2")}
    prov = dict(base.provenance, adapter=str(adapter_path))
    return DiffusionModel(mod, NoiseSchedule.from_config(adapter.scheduler), adapter.signature(), "Adapted", None, prov)


def save_adapted(mod: AdaptedModule, folder: Path, structure: dict[str, Any] | None = None) -> None:
    """adapter.json (adapter + source path/hash) and weights.safetensors: no torch.export.

    `structure`: how the module differs from its freshly loaded source (edgediff.serialize's
    structure diff: quantization wrappers, attention processors), written as structure.json.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"adapter": mod.adapter.to_dict(), "source": getattr(mod, "_edgediff_source", {})}
    (folder / "adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    if structure and (structure.get("replaced") or structure.get("attrs")):
        (folder / "structure.json").write_text(json.dumps(structure, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().clone() for k, v in mod.inner.state_dict().items()}
    save_file(state, str(folder / "weights.safetensors"))


def fresh_inner(mod: AdaptedModule) -> nn.Module:
    """The adapted module's source loaded afresh: what a structure diff is taken against."""
    src = getattr(mod, "_edgediff_source", {})
    return _fresh_inner(Path(str(src.get("path", ""))), mod.adapter, src)


def _fresh_inner(path: Path, adapter: Adapter, src: dict[str, Any]) -> nn.Module:
    from edgediff.model import DenoiserModule

    if not _source_loader:
        raise RuntimeError("the adapter needs edgediff.loaders imported (it registers the source loader)")
    base = _source_loader[0](path, tuple(adapter.sample_shape), bool(src.get("trust_pickle")))
    return base.denoiser.inner if isinstance(base.denoiser, DenoiserModule) else base.denoiser


# (path, sample_shape, trust_pickle) -> the source's DiffusionModel: registered by edgediff.loaders,
# which imports this module (never the other way round: no import cycle)
_source_loader: list[Callable[[Path, tuple[int, ...], bool], DiffusionModel]] = []


def register_source_loader(fn: Callable[[Path, tuple[int, ...], bool], DiffusionModel]) -> None:
    """How load_adapted loads an adapted module's source file (edgediff.loaders registers load_model)."""
    _source_loader[:] = [fn]


def load_adapted(folder: Path, restore: Callable[[nn.Module, dict[str, Any], dict[str, torch.Tensor]], None]
                 | None = None) -> AdaptedModule:
    """Rebuild an adapted module from its (unchanged) source and the saved weights.

    With a structure.json, `restore(module, structure, state)` replays it and loads the state
    (edgediff.serialize passes its apply_structure); without one the state loads strictly.
    """
    from edgediff.files import load_safetensors, read_json, sha256_of

    meta = read_json(folder / "adapter.json")
    src = meta.get("source") or {}
    path = Path(str(src.get("path", "")))
    if not path.is_file():
        raise BadInput(f"{folder}/adapter.json: the adapted module's source {path} is gone; the artifact holds its "
                       "weights, not its code")
    if src.get("sha256") and sha256_of(path) != src["sha256"]:
        raise BadInput(f"{path}: changed since the artifact was made (sha256 differs); refusing to load it")
    adapter = Adapter.from_dict(meta["adapter"])
    inner = _fresh_inner(path, adapter, src)
    state = load_safetensors(folder / "weights.safetensors")
    try:
        if (folder / "structure.json").is_file():  # quantized (or otherwise rewritten) after adapting
            if restore is None:
                raise BadInput(f"{folder}/structure.json: this adapted module was rewritten by passes; load the "
                               "artifact with edgediff.serialize.load_denoiser")
            restore(inner, read_json(folder / "structure.json"), state)
        else:
            inner.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError, TypeError) as e:
        raise BadInput(f"{folder}: saved weights do not fit the source module ({str(e).splitlines()[0]})") from None
    mod = AdaptedModule(inner, adapter)
    mod._edgediff_source = src
    return mod


def sigma_of(timestep: float) -> float:
    """EDM's sigma from the c_noise timestep the schedulers give (c_noise = log(sigma) / 4)."""
    return math.exp(4 * timestep)
