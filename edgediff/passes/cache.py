"""cache: DeepCache (Ma et al. 2024) for UNet2DModel / UNet2DConditionModel, training-free.

The pass changes no weight: it checks that the denoiser has the skip branch asked for and
records the cache schedule in `model.extras["cache"]` = {depth, interval, feature_shape,
macs_full, macs_shallow}. Every sampler that runs the artifact then calls the full UNet on
steps 0, N, 2N, ... (caching the deep feature) and only the shallow branch in between
(edgediff.deepcache); the ONNX bundle carries two graphs, full (with the feature as a second
output) and shallow (the feature as an input), and the numpy runtime drives them the same way.

Options: `depth` is the skip branch (0 = the outermost down/up block pair, the cheapest
shallow call; larger = more of the UNet recomputed on shallow steps, closer to the full
model), `interval` is N. `check_samples` > 0 samples that many images with and without the
cache (the artifact's sampler and steps) and records the PSNR between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgediff import metrics
from edgediff.deepcache import CACHE_KEY, FullEntry, ShallowEntry, check_depth, find_unet
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext, register
from edgediff.passes.sampling import sampling_of


@dataclass
class CacheOptions:
    depth: int = 0
    interval: int = 3
    check_samples: int = 8

    def __post_init__(self) -> None:
        for k in ("depth", "check_samples"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise BadInput(f"cache: {k} must be an integer >= 0, got {v!r}")
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise BadInput(f"cache: interval must be an integer >= 1, got {self.interval!r}")


@torch.no_grad()
def entry_macs(model: DiffusionModel, depth: int) -> tuple[int, int, list[int]]:
    """(MACs of a full call, MACs of a shallow call, cached feature shape without batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    mod = model.module().eval()
    inputs = model.example_inputs(1)
    full, shallow = FullEntry(mod, depth), ShallowEntry(mod, depth)
    with FlopCounterMode(display=False, custom_mapping=metrics._EXTRA_FLOPS) as fc:
        _, feat = full(**inputs)
    macs_full = int(fc.get_total_flops() // 2)
    with FlopCounterMode(display=False, custom_mapping=metrics._EXTRA_FLOPS) as fc:
        shallow(**inputs, feature=feat)
    return macs_full, int(fc.get_total_flops() // 2), list(feat.shape[1:])


@register("cache", CacheOptions)
def run(model: DiffusionModel, opts: CacheOptions, ctx: PassContext) -> DiffusionModel:
    unet = find_unet(model.module())
    check_depth(unet, opts.depth)
    macs_full, macs_shallow, feat_shape = entry_macs(model, opts.depth)
    model.extras[CACHE_KEY] = {"depth": opts.depth, "interval": opts.interval, "feature_shape": feat_shape,
                               "macs_full": macs_full, "macs_shallow": macs_shallow}
    samp = sampling_of(model)
    steps = int(samp["steps"])
    n_full = len(range(0, steps, opts.interval))
    per_image = n_full * macs_full + (steps - n_full) * macs_shallow
    ctx.metrics.update({"depth": opts.depth, "interval": opts.interval, "macs_full": macs_full,
                        "macs_shallow": macs_shallow, "shallow_share": round(macs_shallow / max(macs_full, 1), 4),
                        "steps": steps, "calls_full": n_full, "calls_shallow": steps - n_full,
                        "macs_per_image_speedup": round(steps * macs_full / max(per_image, 1), 3)})
    if opts.check_samples:
        from edgediff.sampling import SamplerConfig, TorchDenoiser, sample_model

        cfg = SamplerConfig(samp["sampler"], steps, float(samp["eta"]))
        plain = sample_model(model, opts.check_samples, ctx.seed, cfg, denoiser=TorchDenoiser(model, use_cache=False))
        cached = sample_model(model, opts.check_samples, ctx.seed, cfg, denoiser=TorchDenoiser(model))
        ctx.metrics["psnr_vs_uncached_db"] = round(metrics.psnr(cached, plain), 2)
    return model
