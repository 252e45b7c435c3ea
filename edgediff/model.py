"""The IR every pass takes and returns: a denoiser with its schedule, signature and provenance."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgediff.schedule import NoiseSchedule

# how InputSpec.fill draws an example value (deterministic under the seed)
FILLS = ("randn", "zeros", "const", "grid", "randint")


@dataclass(frozen=True)
class InputSpec:
    """One extra denoiser input beyond sample/timestep/encoder_hidden_states/class_labels.

    shape: without the batch axis. dtype: "float32" or "int64". route: "kwarg" passes it as
    `inner(arg=...)`, "added_cond" inside `added_cond_kwargs` (SDXL text_embeds/time_ids,
    PixArt resolution/aspect_ratio). unbatched: the model wants it without the batch axis
    (Flux img_ids/txt_ids): every exported input keeps a batch axis, the first row is passed.
    fill/value: what an example value looks like: "randn", "zeros", "const" (`value`, a list
    broadcast to the shape), "grid" (Flux position ids of a value=[h, w] token grid), "randint"
    (0..value-1). Missing at call time, a "const"/"grid"/"zeros" input takes its example value,
    any other zeros.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    route: str = "kwarg"
    arg: str | None = None
    unbatched: bool = False
    fill: str = "randn"
    value: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "route": self.route,
                "arg": self.arg, "unbatched": self.unbatched, "fill": self.fill,
                "value": list(self.value) if self.value is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]), d.get("dtype", "float32"), d.get("route", "kwarg"),
                   d.get("arg"), bool(d.get("unbatched", False)), d.get("fill", "randn"),
                   tuple(d["value"]) if d.get("value") is not None else None)

    def example(self, batch: int, g: torch.Generator | None = None) -> torch.Tensor:
        dt = torch.int64 if self.dtype == "int64" else torch.float32
        if self.fill == "randn":
            return torch.randn(batch, *self.shape, generator=g).to(dt)
        if self.fill == "randint":
            return torch.randint(0, int((self.value or (2,))[0]), (batch, *self.shape), generator=g).to(dt)
        if self.fill == "const":
            v = torch.tensor(list(self.value or (0.0,)), dtype=torch.float64)
            v = v.reshape(-1)[0] if not self.shape else v.expand(*self.shape)
            return v.to(dt).unsqueeze(0).expand(batch, *self.shape).clone()
        if self.fill == "grid":
            h, w = (int(x) for x in (self.value or (1, self.shape[0])))
            ids = torch.zeros(h, w, 3)
            ids[..., 1] = torch.arange(h).view(-1, 1)
            ids[..., 2] = torch.arange(w).view(1, -1)
            return ids.view(1, h * w, 3).expand(batch, -1, -1).to(dt).clone()
        return torch.zeros(batch, *self.shape, dtype=dt)

    def has_default(self) -> bool:
        return self.fill in ("const", "grid", "zeros")


@dataclass
class InputSignature:
    """What one denoiser call takes, without the batch axis.

    sample_shape: shape of x_t ((C, H, W), or (tokens, C) for packed-latent models such as
    Flux). cond_shape: (seq_len, dim) of encoder_hidden_states, else None. num_classes:
    class-label conditioning (DiT), else None. extra: every further input (InputSpec), in
    the order exported files carry them. timestep_scale: the model gets scheduler timestep *
    this (Flux takes t / 1000). time_input: "timestep" (diffusers) or "sigma" (an adapter).
    """

    sample_shape: tuple[int, ...]
    cond_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    extra: tuple[InputSpec, ...] = ()
    timestep_scale: float = 1.0
    time_input: str = "timestep"

    def input_names(self) -> list[str]:
        """Every input in the fixed order DenoiserModule and exported files use."""
        names = ["sample", "timestep"]
        if self.cond_shape:
            names.append("encoder_hidden_states")
        if self.num_classes:
            names.append("class_labels")
        return names + [s.name for s in self.extra]

    def input_specs(self) -> list[InputSpec]:
        """Every input as an InputSpec (sample and timestep included), in input_names() order."""
        specs = [InputSpec("sample", tuple(self.sample_shape)), InputSpec("timestep", ())]
        if self.cond_shape:
            specs.append(InputSpec("encoder_hidden_states", tuple(self.cond_shape)))
        if self.num_classes:
            specs.append(InputSpec("class_labels", (), "int64", fill="randint", value=(self.num_classes,)))
        return specs + list(self.extra)

    def to_dict(self) -> dict[str, Any]:
        return {"sample_shape": list(self.sample_shape),
                "cond_shape": list(self.cond_shape) if self.cond_shape else None,
                "num_classes": self.num_classes, "extra": [s.to_dict() for s in self.extra],
                "timestep_scale": self.timestep_scale, "time_input": self.time_input,
                "inputs": {s.name: {"shape": list(s.shape), "dtype": s.dtype} for s in self.input_specs()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSignature:
        return cls(tuple(d["sample_shape"]), tuple(d["cond_shape"]) if d.get("cond_shape") else None,
                   d.get("num_classes"), tuple(InputSpec.from_dict(s) for s in d.get("extra") or ()),
                   float(d.get("timestep_scale", 1.0)), d.get("time_input", "timestep"))

    def example_inputs(self, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Deterministic example inputs for tracing, export and MACs counting, in input_names() order."""
        g = torch.Generator().manual_seed(seed)
        out = {"sample": torch.randn(batch, *self.sample_shape, generator=g).to(dtype),
               "timestep": torch.full((batch,), 500.0)}
        if self.cond_shape:
            out["encoder_hidden_states"] = torch.randn(batch, *self.cond_shape, generator=g).to(dtype)
        if self.num_classes:
            out["class_labels"] = torch.randint(0, self.num_classes, (batch,), generator=g)
        for s in self.extra:
            v = s.example(batch, g)
            out[s.name] = v.to(dtype) if v.is_floating_point() else v
        return out

    def conditioning(self, n: int, seed: int = 0, labels: str = "cycle",
                     generator: torch.Generator | None = None) -> Cond:
        """THE conditioning generator for n samples (verify, calibration, pruning data), as samplers take it.

        None without conditioning; the tensor itself when the model has only encoder_hidden_states
        or only class labels; otherwise a dict of every input but sample and timestep (SDXL
        text_embeds/time_ids, SD3/Flux pooled_projections, ids, guidance). Embeddings are seeded
        normal draws, constants take their value. labels: "cycle" (0, 1, ..., every class
        covered) or "random". `generator`, when given, is drawn from instead of `seed`.
        """
        if labels not in ("cycle", "random"):
            raise ValueError(f"labels must be 'cycle' or 'random', got {labels!r}")
        g = generator if generator is not None else torch.Generator().manual_seed(seed)
        cond: dict[str, torch.Tensor] = {}
        if self.cond_shape:
            cond["encoder_hidden_states"] = torch.randn(n, *self.cond_shape, generator=g)
        if self.num_classes:
            cond["class_labels"] = (torch.arange(n) % self.num_classes if labels == "cycle"
                                    else torch.randint(0, self.num_classes, (n,), generator=g))
        for s in self.extra:
            cond[s.name] = s.example(n, g)
        if not cond:
            return None
        if len(cond) == 1 and not self.extra:
            return next(iter(cond.values()))
        return cond


# what samplers, passes and runtimes take as conditioning: nothing, one tensor, or named inputs
Cond = torch.Tensor | dict[str, torch.Tensor] | None


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at the dotted path `name` below `root` (ModuleList/Sequential indices included); returns the
    module it replaces. The one helper passes and the quantizer use to swap a layer."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)  # ModuleList/Sequential keep children under their str index too
    return old


def cond_take(cond: Cond, idx: Any) -> Cond:
    """cond[idx] along the batch axis, for a tensor or each tensor of a dict."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[idx] for k, v in cond.items()}
    return cond[idx]


def cond_cat(conds: list[Cond]) -> Cond:
    """Concatenate conditionings along the batch axis (every item of the same kind)."""
    if not conds or conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}  # type: ignore[index]
    return torch.cat(conds)  # type: ignore[arg-type]


def cond_flatten(cond: Cond, key: str) -> dict[str, torch.Tensor]:
    """Tensors to store (safetensors holds flat names): `key` for a tensor, `key.NAME` for a dict."""
    if cond is None:
        return {}
    if isinstance(cond, dict):
        return {f"{key}.{k}": v.contiguous() for k, v in cond.items()}
    return {key: cond.contiguous()}


def cond_unflatten(data: dict[str, torch.Tensor], key: str) -> Cond:
    """The inverse of cond_flatten on a loaded dict (None when neither form is there)."""
    if key in data:
        return data[key]
    named = {k[len(key) + 1:]: v for k, v in data.items() if k.startswith(key + ".")}
    return named or None


def cond_kwargs(sig: InputSignature, cond: Cond) -> dict[str, torch.Tensor]:
    """Keyword arguments of DenoiserModule.forward for a sampler-style `cond`."""
    if cond is None:
        return {}
    if isinstance(cond, dict):
        return dict(cond)
    if sig.num_classes and not sig.cond_shape:
        return {"class_labels": cond}
    return {"encoder_hidden_states": cond}


def _route(sig: InputSignature, values: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The keyword arguments of the inner (diffusers-style) call for named plain tensors."""
    kwargs: dict[str, Any] = {}
    if sig.cond_shape:
        ehs = values.get("encoder_hidden_states")
        kwargs["encoder_hidden_states"] = ehs.to(dtype) if ehs is not None else None
    if sig.num_classes:
        kwargs["class_labels"] = values.get("class_labels")
    added: dict[str, Any] = {}
    batch = values["sample"].shape[0]
    for s in sig.extra:
        v = values.get(s.name)
        if v is None:
            # callers that pass only a tensor `cond` (older passes, runtimes): constants take their value,
            # embeddings (text_embeds, pooled_projections) zeros, i.e. an empty prompt's stand-in
            v = s.example(batch) if s.has_default() else torch.zeros(
                batch, *s.shape, dtype=torch.int64 if s.dtype == "int64" else torch.float32)
        if v.is_floating_point():
            v = v.to(dtype)
        if s.unbatched:
            v = v[0]
        if s.route == "added_cond":
            added[s.arg or s.name] = v
        else:
            kwargs[s.arg or s.name] = v
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs


def _rms_norm(x: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
              eps: float | None = None) -> torch.Tensor:
    """RMSNorm from primitive ops: the TorchScript ONNX exporter has no aten::rms_norm at opset 17."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


@contextlib.contextmanager
def trace_friendly() -> Iterator[None]:
    """While a tracer records the graph: ops the TorchScript exporters cannot carry, rewritten.

    - `squeeze(dim)` of a non-batch axis whose size is not 1 is a no-op in PyTorch, but traced
      with a dynamic batch it becomes an If(size == 1) whose Squeeze branch onnxruntime rejects
      at load (PixArt's output `squeeze(1)`): it is recorded as nothing.
    - `F.rms_norm` (Flux, SD3 and Sana q/k norms) is decomposed into pow/mean/rsqrt/mul.
    - `Tensor.unflatten` becomes a reshape of the traced sizes: the exporter's constant folding
      otherwise bakes the example batch into the next reshape's shape (Flux's rotary embedding
      then fails at any other batch).
    Only the batch axis is dynamic in exported files, so the rewrite holds for every batch.
    """
    import torch.nn.functional as F

    orig_squeeze, orig_rms, orig_unflatten = torch.Tensor.squeeze, F.rms_norm, torch.Tensor.unflatten

    def squeeze(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dim = args[0] if len(args) == 1 and not kwargs else kwargs.get("dim") if list(kwargs) == ["dim"] and not args else None
        if isinstance(dim, int) and self.dim() > 0 and dim % self.dim() != 0 and self.shape[dim] != 1:
            return self
        return orig_squeeze(self, *args, **kwargs)

    def unflatten(self: torch.Tensor, dim: Any, sizes: Any) -> torch.Tensor:
        if not isinstance(dim, int):  # named dimensions: left to PyTorch
            return orig_unflatten(self, dim, sizes)
        d = dim % self.dim()
        return self.reshape(*self.shape[:d], *sizes, *self.shape[d + 1:])

    torch.Tensor.squeeze = squeeze  # type: ignore[method-assign]
    torch.Tensor.unflatten = unflatten  # type: ignore[method-assign]
    F.rms_norm = _rms_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.squeeze = orig_squeeze  # type: ignore[method-assign]
        torch.Tensor.unflatten = orig_unflatten  # type: ignore[method-assign]
        F.rms_norm = orig_rms  # type: ignore[assignment]


_FACTORIES = ("arange", "linspace", "zeros", "ones", "full", "empty", "tensor", "as_tensor")


@contextlib.contextmanager
def float32_tables() -> Iterator[None]:
    """While a converter records the graph: tensors created as float64 are created as float32.

    Some models build small tables in float64 (diffusers' rotary embedding: Flux's FluxPosEmbed
    asks get_1d_rotary_pos_embed for float64 frequencies, which then promote the positions'
    outer product, cos and sin). Edge runtimes have no float64 kernels (TFLite cannot legalize
    a float64 POW), and they compute in float32 anyway. Every float64 value of such a graph
    starts at a factory call (arange, linspace, ...) or an explicit cast, so making those float32
    keeps the whole chain in float32; the error is float32 rounding of the table (about 1e-7
    relative), far below what verify measures.
    """
    originals = {name: getattr(torch, name) for name in _FACTORIES}
    orig_to, orig_double = torch.Tensor.to, torch.Tensor.double

    def factory(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("dtype") is torch.float64:
                kwargs["dtype"] = torch.float32
            return fn(*args, **kwargs)
        return call

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple(torch.float32 if a is torch.float64 else a for a in args)
        if kwargs.get("dtype") is torch.float64:
            kwargs["dtype"] = torch.float32
        return orig_to(self, *args, **kwargs)

    def double(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return orig_to(self, torch.float32)

    for name, fn in originals.items():
        setattr(torch, name, factory(fn))
    torch.Tensor.to = to  # type: ignore[method-assign]
    torch.Tensor.double = double  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        torch.Tensor.to = orig_to  # type: ignore[method-assign]
        torch.Tensor.double = orig_double  # type: ignore[method-assign]


def _is_diffusers(m: nn.Module) -> bool:
    # diffusers' transformers take the conditioning before the timestep: only keywords fit them all
    return any(c.__module__.startswith("diffusers.") for c in type(m).__mro__)


class DenoiserModule(nn.Module):
    """A plain-tensor view of any denoiser: forward(sample, timestep[, cond][, labels][, *extra]) -> output.

    diffusers models return dataclasses and take keyword arguments (PixArt, SD3, Sana and Flux
    take the conditioning before the timestep, SDXL takes added_cond_kwargs); exporters, the
    quantizer and the samplers want positional plain tensors in one fixed order
    (InputSignature.input_names()) and one tensor out. Timesteps are float32 of shape (B,)
    everywhere (friendlier to TFLite and FPGA flows than int64), in the scheduler's units.
    """

    def __init__(self, inner: nn.Module, signature: InputSignature) -> None:
        super().__init__()
        self.inner = inner
        self.signature = signature
        self.has_cond = signature.cond_shape is not None
        self.has_class = signature.num_classes is not None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        sig = self.signature
        # I/O stays float32 whatever the weights' dtype (fp16 models cast inside the graph)
        dtype = next((p.dtype for p in self.inner.parameters() if p.is_floating_point()), sample.dtype)
        values: dict[str, Any] = {"sample": sample, "encoder_hidden_states": encoder_hidden_states,
                                  "class_labels": class_labels}
        values.update(dict(zip([s.name for s in sig.extra], args)))
        values.update(kwargs)
        call = _route(sig, values, dtype)
        t = timestep if sig.timestep_scale == 1.0 else timestep * sig.timestep_scale
        with trace_friendly() if torch.jit.is_tracing() else contextlib.nullcontext():
            if _is_diffusers(self.inner):
                out = self.inner(sample.to(dtype), timestep=t, **call)
            else:  # plain modules (torch.export, pickled, adapters) take the time second, positionally
                out = self.inner(sample.to(dtype), t, **call)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif not isinstance(out, torch.Tensor):
            out = out.sample
        return out.float()


@dataclass
class DiffusionModel:
    """Denoiser + noise schedule + input signature + provenance (+ pass state in `extras`).

    `config` is the diffusers config the denoiser was built from (None for a pickled or
    exported module); `arch` names its class. `extras` holds what passes attach (quantization
    parameters, PTQD corrections...), keyed by pass name, saved by the artifact writer.
    """

    denoiser: nn.Module
    schedule: NoiseSchedule
    signature: InputSignature
    arch: str = "module"
    config: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def module(self) -> DenoiserModule:
        """The denoiser as a plain-tensor nn.Module (see DenoiserModule)."""
        if isinstance(self.denoiser, DenoiserModule):
            return self.denoiser
        return DenoiserModule(self.denoiser, self.signature)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.signature.example_inputs(batch, seed)

    def clone(self) -> DiffusionModel:
        """A deep copy, so that passes never modify their input in place."""
        return DiffusionModel(
            denoiser=copy.deepcopy(self.denoiser), schedule=self.schedule, signature=self.signature,
            arch=self.arch, config=copy.deepcopy(self.config), provenance=copy.deepcopy(self.provenance),
            extras=copy.deepcopy(self.extras),
        )
