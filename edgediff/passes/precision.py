"""fp16: cast the denoiser's weights to half precision (storage and compute)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgediff.model import DiffusionModel
from edgediff.passes import PassContext, register, register_restorer


@dataclass
class Fp16Options:
    # GroupNorm/LayerNorm in fp16 can overflow on large activations; keep them fp32 by default.
    keep_norms_fp32: bool = True


@register("fp16", Fp16Options)
def fp16(model: DiffusionModel, opts: Fp16Options, ctx: PassContext) -> DiffusionModel:
    model.denoiser.half()
    model.extras["fp16"] = {"keep_norms_fp32": opts.keep_norms_fp32}
    ctx.metrics["dtype"] = "float16"
    return _apply_norm_hooks(model)


@register_restorer("fp16")
def _apply_norm_hooks(model: DiffusionModel) -> DiffusionModel:
    """Norms run in fp32 between fp16 layers; hooks are not saved, so loading re-adds them."""
    if model.extras["fp16"].get("keep_norms_fp32"):
        for m in model.denoiser.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.float()
                m.register_forward_pre_hook(_to_float)
                m.register_forward_hook(_to_half)
    return model


def _to_float(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _to_half(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.half()
