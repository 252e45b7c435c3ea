"""Putting the simulation into a denoiser: find layers, detect skip concatenations, wrap, calibrate.

`QuantConfig` says what to quantize and how; `quantize_module` wraps every Conv2d/Linear
(and attention matmuls) of a float denoiser in place; `calibrate_activations` sets the
activation ranges from calibration data; `quant_params` reads the result back as the
backend-neutral QuantParams.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgediff.attention import explicit_supports
from edgediff.errors import BadInput
from edgediff.model import cond_take, cond_unflatten, set_submodule
from edgediff.quant.core import (
    QuantAttnProcessor,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    act_quantizers,
    check_bits,
    link_attention_outputs,
    set_act_mode,
)
from edgediff.quant_params import LayerQuant, QuantParams

INIT_METHODS = ("minmax", "percentile", "mse")


@dataclass
class QuantConfig:
    weight_bits: int = 8
    act_bits: int = 8
    softmax_bits: int = 8
    first_last_bits: int = 8  # Q-Diffusion/BRECQ keep the first and last layer at 8 bits
    act_symmetric: bool = False
    split_shortcut: bool = True
    quant_attention: bool = True
    weight_init: str = "mse"
    act_init: str = "mse"
    p: float = 2.4
    percentile: float = 99.99
    # requantize conv/linear outputs as integer kernels do (all but the last layer, whose float
    # output is the model's): see edgediff/quant/core.py QuantLayer
    quant_output: bool = True
    # Q-Diffusion splits the weights at shortcut concatenations too: each half of a concat-fed
    # conv's input channels gets its own per-output-channel scale (needs split_shortcut)
    split_weights: bool = False
    weight_symmetric: bool = True  # False: per-channel asymmetric weights (unsigned grid + zero points)

    def validate(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        check_bits(self.softmax_bits, "softmax_bits")
        check_bits(self.first_last_bits, "first_last_bits")
        for k in ("weight_init", "act_init"):
            if getattr(self, k) not in INIT_METHODS:
                raise BadInput(f"{k}: unknown initialisation {getattr(self, k)!r}; expected one of {INIT_METHODS}")
        if not self.p > 0:
            raise BadInput(f"p: the L_p norm needs p > 0, got {self.p}")
        if not 50 < self.percentile <= 100:
            raise BadInput(f"percentile must be in (50, 100], got {self.percentile}")


def call_denoiser(module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                  num_classes: int | None) -> torch.Tensor:
    """Call a DenoiserModule the way TorchDenoiser does (class labels vs encoder states, or named inputs)."""
    if isinstance(cond, dict):  # multi-input models (SDXL, SD3, Flux ...)
        return module(x, t.float(), **cond)
    if num_classes:
        return module(x, t.float(), None, cond)
    return module(x, t.float(), cond)


def batches(data: dict[str, torch.Tensor], bs: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    n = len(data["x"]) if limit is None else min(limit, len(data["x"]))
    for i in range(0, n, bs):
        j = min(i + bs, n)
        yield data["x"][i:j], data["t"][i:j], cond_take(cond_unflatten(data, "cond"), slice(i, j))


@dataclass
class LayerInfo:
    name: str
    module: nn.Module
    order: int
    split_at: int | None = None
    first: bool = False
    last: bool = False


class _Stop(Exception):
    pass


@torch.no_grad()
def trace_layers(denoiser: nn.Module, run: Any) -> dict[str, LayerInfo]:
    """Execution order of every Conv2d/Linear, which ones consume a skip concatenation, first/last.

    `run()` calls the model once. torch.cat is watched during that call: a module whose input
    is (a channel-wise function of) the output of a cat along dim 1 gets split_at = size of the
    first part. In diffusers' up blocks the concatenation enters a ResnetBlock2D, whose
    conv_shortcut sees it directly and whose conv1 sees it after GroupNorm+SiLU (channel
    layout unchanged), so both get the split.
    """
    cat_splits: dict[int, int] = {}
    keep: list[torch.Tensor] = []
    orig_cat = torch.cat

    def watching_cat(tensors: Any, dim: int = 0, **kw: Any) -> torch.Tensor:
        out = orig_cat(tensors, dim=dim, **kw)
        ts = list(tensors)
        if dim == 1 and len(ts) == 2 and out.dim() == 4:
            cat_splits[id(out)] = int(ts[0].shape[1])
            keep.append(out)
        return out

    infos: dict[str, LayerInfo] = {}
    block_splits: dict[int, int] = {}  # id(resnet block) -> split
    handles = []
    sample_ids: set[int] = set()

    def layer_hook(name: str) -> Any:
        def pre(mod: nn.Module, args: tuple) -> None:
            if name in infos:
                return
            x = args[0] if args else None
            split = cat_splits.get(id(x)) if x is not None else None
            infos[name] = LayerInfo(name, mod, len(infos), split, first=x is not None and id(x) in sample_ids)
        return pre

    def block_hook(mod: nn.Module, args: tuple) -> None:
        if args and id(args[0]) in cat_splits:
            block_splits[id(mod)] = cat_splits[id(args[0])]

    for name, m in denoiser.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(layer_hook(name)))
        elif type(m).__name__ == "ResnetBlock2D":
            handles.append(m.register_forward_pre_hook(block_hook))

    def top_pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        s = args[0] if args else kwargs.get("sample")
        if s is not None:
            sample_ids.add(id(s))

    handles.append(denoiser.register_forward_pre_hook(top_pre, with_kwargs=True))
    torch.cat = watching_cat  # type: ignore[assignment]
    try:
        run()
    finally:
        torch.cat = orig_cat  # type: ignore[assignment]
        for h in handles:
            h.remove()
    # the resnet's conv1 and conv_shortcut see the concatenation (conv1 through norm+SiLU)
    for name, m in denoiser.named_modules():
        if id(m) in block_splits:
            for leaf in ("conv1", "conv_shortcut"):
                info = infos.get(f"{name}.{leaf}")
                if info is not None and isinstance(info.module, nn.Conv2d):
                    info.split_at = block_splits[id(m)]
    if infos:
        ordered = sorted(infos.values(), key=lambda i: i.order)
        if not any(i.first for i in ordered):
            ordered[0].first = True
        ordered[-1].last = True
    return infos


def quantize_module(denoiser: nn.Module, infos: dict[str, LayerInfo], cfg: QuantConfig) -> dict[str, nn.Module]:
    """Replace the traced layers by wrappers and attention processors by quantized ones, in place."""
    cfg.validate()
    wrapped: dict[str, nn.Module] = {}
    for name, info in infos.items():
        edge = info.first or info.last
        q = {"weight_bits": cfg.first_last_bits if edge else cfg.weight_bits,
             "act_bits": cfg.first_last_bits if edge else cfg.act_bits,
             "act_symmetric": cfg.act_symmetric,
             "split_at": info.split_at if cfg.split_shortcut else None,
             "split_weights": cfg.split_weights and cfg.split_shortcut,
             # the first and last layer stay at 8 bits, symmetric (as every int8 backend takes them)
             "weight_symmetric": cfg.weight_symmetric or edge,
             "mp_eligible": not edge,
             "quant_output": cfg.quant_output and not info.last}
        m = info.module
        w = QuantConv2d.wrap(m, **q) if isinstance(m, nn.Conv2d) else QuantLinear.wrap(m, **q)
        set_submodule(denoiser, name, w)
        wrapped[name] = w
    if cfg.quant_attention:
        for name, m in list(denoiser.named_modules()):
            if (type(m).__name__ == "Attention" and hasattr(m, "set_processor") and hasattr(m, "head_to_batch_dim")
                    and explicit_supports(m)):
                proc = QuantAttnProcessor(cfg.act_bits, cfg.softmax_bits)
                m.set_processor(proc)
                wrapped[name] = proc
        link_attention_outputs(denoiser)
    if not wrapped:
        raise BadInput("model has no quantizable layers (no Conv2d/Linear found in the denoiser)")
    return wrapped


@torch.no_grad()
def init_weights(denoiser: nn.Module, cfg: QuantConfig) -> None:
    for m in denoiser.modules():
        if isinstance(m, QuantLayer):
            m.wq.init(m.inner.weight, cfg.weight_init, cfg.p, cfg.percentile)


@torch.no_grad()
def calibrate_activations(denoiser: nn.Module, run_all: Any, cfg: QuantConfig) -> None:
    """Observe every activation quantizer over the calibration set (float weights), then set ranges."""
    weights_were = [(m.wq, m.wq.enabled) for m in denoiser.modules() if isinstance(m, QuantLayer)]
    for wq, _ in weights_were:
        wq.enabled = False
    for q in act_quantizers(denoiser):
        q.reset_stats()
    set_act_mode(denoiser, "observe")
    try:
        run_all()
    finally:
        set_act_mode(denoiser, "quant")
        for wq, en in weights_were:
            wq.enabled = en
    for q in act_quantizers(denoiser):
        if q.fixed_range is None and q._kept == 0:
            # never called on the calibration set (e.g. an unused branch): leave it pass-through
            q.disable()
            continue
        q.init_from_stats(cfg.act_init, cfg.p, cfg.percentile)
        q.reset_stats()


@torch.no_grad()
def bake_weights(denoiser: nn.Module) -> None:
    """Write the fake-quantized (on-grid) weights into each wrapper's float module."""
    for m in denoiser.modules():
        if isinstance(m, QuantLayer):
            w = m.inner.weight
            on_grid = m.wq.finish_adaround(w) if m.wq.alpha is not None else m.wq(w)
            w.copy_(on_grid)


def quant_params(denoiser: nn.Module, cfg: QuantConfig, method: str) -> QuantParams:
    layers: dict[str, LayerQuant] = {}
    for name, m in denoiser.named_modules():
        if isinstance(m, QuantLayer):
            kind = "conv" if isinstance(m, QuantConv2d) else "linear"
            meta: dict[str, Any] = {}
            if m.split_at:
                meta["split_at"] = m.split_at  # input: channels [:split_at], input2: [split_at:]
            if not m.aq.mp_eligible:
                meta["edge_layer"] = True
            if m.aq.disabled:
                meta["input_unquantized"] = True
            out = [q.tensor_quant() if q is not None and not q.disabled else None for q in (m.oq, m.oq2)]
            layers[name] = LayerQuant(name, kind, m.wq.tensor_quant(), m.aq.tensor_quant(),
                                      m.aq2.tensor_quant() if m.aq2 is not None else None, meta, out[0], out[1],
                                      m.wq.tensor_quant2())
        elif isinstance(m, QuantAttnProcessor):
            attn = name.rsplit(".processor", 1)[0]
            layers[f"{attn}:qk"] = LayerQuant(f"{attn}:qk", "matmul_qk", None, m.q_quant.tensor_quant(),
                                              m.k_quant.tensor_quant(), {})
            layers[f"{attn}:av"] = LayerQuant(f"{attn}:av", "matmul_av", None, m.p_quant.tensor_quant(),
                                              m.v_quant.tensor_quant(), {"softmax_bits": m.p_quant.bits})
    return QuantParams(cfg.weight_bits, cfg.act_bits, layers, method)
