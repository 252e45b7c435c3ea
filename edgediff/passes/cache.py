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

`train_steps` > 0 makes it cache-aware fine-tuning, after the student-teacher setup of Block
Caching (Wimbauer et al. 2024, "Cache Me if You Can"): the teacher is the model as it enters the
pass, run uncached along `train_trajectories` of its own trajectories at the artifact's sampler
and steps; the student runs the cached schedule on those inputs: at a shallow step i it reads the
deep feature of its own full call at the step that fed it (i - i mod N), and its output is pulled
to the teacher's at step i; a full-call term at random steps keeps the full call where it was.
Only the shallow branch receives the shallow term's gradient (the stale feature is a constant),
so the deep blocks move only to keep full calls right. Block Caching learns a scale-shift per
cached block instead; here the shallow layers themselves learn to read a stale feature, which
leaves the exported graphs as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    # cache-aware fine-tuning (0 = training-free DeepCache)
    train_steps: int = 0
    train_lr: float = 1e-4
    train_batch: int = 32
    train_trajectories: int = 128
    train_full_weight: float = 1.0  # weight of the full-call term against the shallow one
    train_ema: float = 0.999

    def __post_init__(self) -> None:
        for k in ("depth", "check_samples", "train_steps"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise BadInput(f"cache: {k} must be an integer >= 0, got {v!r}")
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise BadInput(f"cache: interval must be an integer >= 1, got {self.interval!r}")
        for k in ("train_batch", "train_trajectories"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BadInput(f"cache: {k} must be a positive integer, got {v!r}")
        if not float(self.train_lr) > 0 or float(self.train_full_weight) < 0 or not 0 <= float(self.train_ema) < 1:
            raise BadInput("cache: train_lr must be > 0, train_full_weight >= 0 and train_ema in [0, 1)")


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


def cache_aware_finetune(model: DiffusionModel, opts: CacheOptions, seed: int, track: Any = None) -> dict[str, Any]:
    """Train `model` in place so that its cached schedule follows its uncached trajectories (see the module doc)."""
    import copy

    from edgediff.model import cond_take
    from edgediff.passes.finetune import finish_training, train_step
    from edgediff.passes.prune_data import call_kwargs
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    samp = sampling_of(model)
    steps, interval = int(samp["steps"]), int(opts.interval)
    shallow_steps = [i for i in range(steps) if i % interval]
    if not shallow_steps:
        return {"train_steps": 0, "reason": "no shallow step at this interval"}
    n = int(opts.train_trajectories)
    cond = model.signature.conditioning(n, seed + 104729, labels="random")
    cfg = SamplerConfig(samp["sampler"], steps, float(samp["eta"]))
    _, traj = sample(TorchDenoiser(model, use_cache=False), model.schedule, tuple(model.signature.sample_shape), n,
                     seed + 104729, cfg, cond=cond, return_trajectory=True)
    xs = torch.stack([x for _, x in traj])  # (steps, n, ...): what the denoiser was given at each step
    ts = torch.tensor([float(t) for t, _ in traj])
    module = model.module()
    teacher = copy.deepcopy(module).eval()
    with torch.no_grad():  # the teacher's (uncached) output at every trajectory point
        outs = torch.stack([torch.cat([teacher(xs[i, a:a + 64], ts[i].expand(len(xs[i, a:a + 64])),
                                               **call_kwargs(model, cond_take(cond, torch.arange(a, min(a + 64, n)))))
                                       for a in range(0, n, 64)]) for i in range(steps)])
    del teacher
    full, shallow = FullEntry(module, opts.depth), ShallowEntry(module, opts.depth)
    for p in module.parameters():
        p.requires_grad_(p.is_floating_point())
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(opts.train_lr))
    ema = [p.detach().clone() for p in params] if float(opts.train_ema) > 0 else None
    module.train()
    sh = torch.tensor(shallow_steps)
    losses: list[tuple[float, float]] = []
    it: Any = range(int(opts.train_steps))
    it = track(it, "cache-aware fine-tune", len(it)) if track is not None else it
    for step in it:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + step * 1009 + 17)
        b = int(opts.train_batch)
        r = torch.randint(0, n, (b,), generator=g)
        i = sh[torch.randint(0, len(sh), (b,), generator=g)]
        src = i - i % interval  # the full step whose feature a shallow step i reads
        kw = call_kwargs(model, cond_take(cond, r))
        with torch.no_grad():
            _, feat = full(xs[src, r], ts[src], **kw)
        loss_sh = torch.nn.functional.mse_loss(shallow(xs[i, r], ts[i], feature=feat.detach(), **kw), outs[i, r])
        j = torch.randint(0, steps, (b,), generator=g)
        out_full, _ = full(xs[j, r], ts[j], **kw)  # same trajectories r, so the same conditioning
        loss_full = torch.nn.functional.mse_loss(out_full, outs[j, r])
        train_step(opt, loss_sh + float(opts.train_full_weight) * loss_full, ema, params, step, float(opts.train_ema))
        losses.append((float(loss_sh.detach()), float(loss_full.detach())))
    finish_training(module, ema, params)
    head, tail = losses[:20], losses[-20:]
    return {"train_steps": int(opts.train_steps), "trajectories": n,
            "shallow_loss_first": sum(v for v, _ in head) / len(head), "shallow_loss_last": sum(v for v, _ in tail) / len(tail),
            "full_loss_last": sum(v for _, v in tail) / len(tail)}


@register("cache", CacheOptions)
def run(model: DiffusionModel, opts: CacheOptions, ctx: PassContext) -> DiffusionModel:
    unet = find_unet(model.module())
    check_depth(unet, opts.depth)
    macs_full, macs_shallow, feat_shape = entry_macs(model, opts.depth)
    model.extras[CACHE_KEY] = {"depth": opts.depth, "interval": opts.interval, "feature_shape": feat_shape,
                               "macs_full": macs_full, "macs_shallow": macs_shallow}
    samp = sampling_of(model)
    steps = int(samp["steps"])
    if opts.train_steps:
        if model.config is None:
            raise BadInput("cache: train_steps needs a trainable denoiser with a diffusers config, not an exported graph")
        ctx.metrics["training"] = cache_aware_finetune(model, opts, ctx.seed, ctx.track)
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
