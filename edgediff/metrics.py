"""What a compression cost and bought: params, MACs, bytes, sample PSNR, Fréchet distance of features.

The demo's digit judge (a classifier's features and confidence) lives in edgediff.demo.judge.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from edgediff.model import DiffusionModel


def params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    graph = getattr(module, "inner", module)
    if hasattr(graph, "stats"):  # an ONNX graph (edgediff.onnx_source): counted from its initializers
        return graph.stats()["params"]
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def size_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers as stored (dtype-aware)."""
    graph = getattr(module, "inner", module)
    if hasattr(graph, "stats"):
        return graph.stats()["size_bytes"]
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def macs(model: DiffusionModel, batch: int = 1) -> int:
    """Multiply-accumulates per denoiser call at the model's sample shape.

    Counted by torch's FlopCounterMode on the real forward, so it covers conv, linear
    and the matmuls inside attention (including fused scaled_dot_product_attention) and
    stays right after pruning. MACs = FLOPs / 2.
    """
    from torch.utils.flop_counter import FlopCounterMode

    graph = getattr(model.denoiser, "inner", model.denoiser)
    if hasattr(graph, "stats"):  # an ONNX graph: MACs from its nodes
        return int(graph.stats()["macs"])
    mod = model.module().eval()
    inputs = model.example_inputs(batch)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as fc:
        mod(**inputs)
    return int(fc.get_total_flops() // 2 // batch)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and softmax·V of one attention call; batch and head axes lead, sequence and dim trail."""
    lead = 1
    for d in query_shape[:-2]:
        lead *= d
    sq, dqk = query_shape[-2], query_shape[-1]
    sk, dv = key_shape[-2], value_shape[-1]
    return 2 * lead * sq * sk * (dqk + dv)


# torch's FlopCounterMode has no formula for the CPU flash kernel that 4-D (B, heads, S, D)
# scaled_dot_product_attention dispatches to, so diffusers' attention would count as zero.
_EXTRA_FLOPS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops


@torch.no_grad()
def macs_of_call(fn: Any, *args: Any) -> int:
    """MACs of one call `fn(*args)` of any torch code (pipeline components: text encoders, VAEs), counted as `macs`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as fc:
        fn(*args)
    return int(fc.get_total_flops() // 2)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of samples in [-1, 1] (data range 2) against a reference; inf if equal."""
    mse = float(torch.mean((x.double() - ref.double()) ** 2))
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(data_range**2 / mse))


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as in FID)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # ReLU features have dead units, so the covariances can be singular: regularise as pytorch-fid does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            off = np.eye(s1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def grid_png(x: torch.Tensor, nrow: int = 8, scale: int = 2) -> bytes:
    """A PNG of samples in [-1, 1], laid out in a grid (no torchvision needed)."""
    from PIL import Image

    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 40, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr[:, :, :3])
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
