"""cache: DeepCache (Ma et al. 2024) for UNet2DModel / UNet2DConditionModel, training-free.

The pass changes no weight: it checks that the denoiser has the skip branch asked for and
records the cache schedule in `model.extras["cache"]` = {depth, interval, feature_shape,
macs_full, macs_shallow}. Every sampler that runs the artifact then calls the full UNet on
steps 0, N, 2N, ... (caching the deep feature) and only the shallow branch in between
(edgediff.deepcache); the ONNX bundle carries two graphs, full (with the feature as a second
output) and shallow (the feature as an input), and the numpy runtime drives them the same way.

Options: `depth` is the skip branch (0 = the outermost down/up block pair, the cheapest
shallow call; larger = more of the UNet recomputed on shallow steps, closer to the full
model), `interval` is N. `schedule` says which steps are full (edgediff.runtime.cache_schedule):
"uniform" (every N-th, plus the last with `full_last`), "centred" (as many full calls, crowded
around step `centre` x (steps - 1) with spacing ~ distance^`power`, first and last full), or
"auto" (measured, below). The record keeps the chosen `full_steps` for the artifact's step
count, and every sampler follows it.

One-step error, measured on `error_samples` uncached trajectories of the artifact's sampler and
steps (the calibration points): for a shallow call at step i reading the feature of the full
call at step j < i, the first-order (DDIM) next state a' x0 + b' eps built from its output,
against the same from the full call at step i, relative L2. That is what the error costs the
sampler's state one step later, in any prediction type (an epsilon error at t ~ T enters x0
times 1/alpha, the next state only times b' - a' b / a). On the demo the digit FD grew about
100x the summed error of a schedule (docs/fast_sampling.md), hence a budget on the sum:
`schedule = "auto"` makes the fewest full calls (first and last always full, at most N - 1
shallow calls in a row) whose summed one-step error stays within `error_bound`; `depth = "auto"`
takes the depth whose schedule within the bound has the fewest MACs per image. The measured
table goes to the pass metrics; where no depth meets the bound the deepest is used and
`bound_met` is false.

`check_samples` > 0 samples that many images with and without the cache (the artifact's
sampler and steps) and records the PSNR between them.

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
from edgediff.deepcache import CACHE_KEY, FullEntry, ShallowEntry, check_depth, find_unet, max_depth
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext, register
from edgediff.passes.sampling import sampling_of
from edgediff.runtime.cache_schedule import SCHEDULES, centred_full_steps, n_full_calls, uniform_full_steps


@dataclass
class CacheOptions:
    depth: int | str = 0  # an int, or "auto": the shallowest depth under error_bound (module doc)
    interval: int = 3
    schedule: str = "uniform"  # "uniform", "centred" or "auto" (see the module doc)
    full_last: bool = False  # uniform: also a full call at the last step
    centre: float = 0.5  # centred: where the full calls crowd, as a fraction of the run
    power: float = 1.5  # centred: spacing grows as distance^power
    error_bound: float = 0.02  # auto: the summed one-step error a schedule may have
    error_samples: int = 16  # trajectories the one-step errors are measured on
    check_samples: int = 8
    # cache-aware fine-tuning (0 = training-free DeepCache)
    train_steps: int = 0
    train_lr: float = 1e-4
    train_batch: int = 32
    train_trajectories: int = 128
    train_full_weight: float = 1.0  # weight of the full-call term against the shallow one
    train_ema: float = 0.999

    def __post_init__(self) -> None:
        if self.depth != "auto" and (not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0):
            raise BadInput(f"cache: depth must be an integer >= 0 or \"auto\", got {self.depth!r}")
        if self.schedule not in SCHEDULES:
            raise BadInput(f"cache: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= float(self.centre) <= 1 or not float(self.power) >= 1:
            raise BadInput(f"cache: centre must be in [0, 1] and power >= 1, got {self.centre!r}, {self.power!r}")
        if not float(self.error_bound) > 0 or not isinstance(self.error_samples, int) or self.error_samples < 1:
            raise BadInput("cache: error_bound must be > 0 and error_samples a positive integer")
        for k in ("check_samples", "train_steps"):
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


def uncached_trajectories(model: DiffusionModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(xs (steps, n, ...): what the denoiser was given at each step, ts (steps,), cond) along `n` uncached
    trajectories of the artifact's sampler and steps."""
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    samp = sampling_of(model)
    cond = model.signature.conditioning(n, seed + 104729, labels="random")
    cfg = SamplerConfig(samp["sampler"], int(samp["steps"]), float(samp["eta"]))
    _, traj = sample(TorchDenoiser(model, use_cache=False), model.schedule, tuple(model.signature.sample_shape), n,
                     seed + 104729, cfg, cond=cond, return_trajectory=True)
    return torch.stack([x for _, x in traj]), torch.tensor([float(t) for t, _ in traj]), cond


@torch.no_grad()
def one_step_errors(model: DiffusionModel, depth: int, xs: torch.Tensor, ts: torch.Tensor, cond: Any,
                    max_gap: int) -> dict[tuple[int, int], float]:
    """{(j, i): error} for 0 < i - j <= max_gap: a shallow call at step i reading step j's feature (module doc)."""
    from edgediff.passes.prune_data import call_kwargs

    module = model.module().eval()
    full, shallow = FullEntry(module, depth), ShallowEntry(module, depth)
    kw = call_kwargs(model, cond)
    steps = len(ts)
    sch = model.schedule

    def next_state(out: torch.Tensor, i: int) -> torch.Tensor:
        eps, x0 = sch.to_eps_x0(out.float(), xs[i], float(ts[i]))
        a, b = sch.io_coeffs(float(ts[i + 1])) if i + 1 < steps else (1.0, 0.0)  # the last step lands on x0
        return a * x0 + b * eps

    feats, refs = [], []
    for i in range(steps):
        out, feat = full(xs[i], ts[i].expand(len(xs[i])), **kw)
        feats.append(feat)
        refs.append(next_state(out, i))
    errs: dict[tuple[int, int], float] = {}
    for i in range(1, steps):
        for j in range(max(0, i - max_gap), i):
            out = shallow(xs[i], ts[i].expand(len(xs[i])), feature=feats[j], **kw)
            errs[(j, i)] = float((next_state(out, i) - refs[i]).norm() / refs[i].norm().clamp_min(1e-12))
    return errs


def schedule_error(full: list[int], errs: dict[tuple[int, int], float], steps: int) -> tuple[float, float]:
    """(summed, largest) one-step error of the shallow steps under full-step set `full`."""
    fs = sorted(full)
    vals = []
    for i in range(steps):
        if i in fs:
            continue
        j = max(f for f in fs if f < i)
        vals.append(errs.get((j, i), float("inf")))
    return (sum(vals), max(vals)) if vals else (0.0, 0.0)


def budget_full_steps(errs: dict[tuple[int, int], float], steps: int, budget: float, max_gap: int) -> list[int]:
    """The fewest full steps (the first and last always full) whose summed one-step error stays within `budget`.

    Greedy from an all-full run: turn into a shallow call the step that adds the least summed error
    (the steps after it that read its feature then read the previous full step's), while the sum
    stays within the budget and no shallow step is more than `max_gap` steps from its full one."""
    full = list(range(steps))
    while True:
        best: tuple[float, int] | None = None
        for i in full[1:-1]:
            trial = [f for f in full if f != i]
            if max(b - a for a, b in zip(trial, trial[1:])) > max_gap + 1:
                continue
            total, _ = schedule_error(trial, errs, steps)
            if total <= budget + 1e-12 and (best is None or total < best[0]):
                best = (total, i)
        if best is None:
            return full
        full.remove(best[1])


def choose_schedule(opts: CacheOptions, steps: int, errs: dict[tuple[int, int], float] | None) -> list[int]:
    """The full steps of `opts.schedule` at `steps` steps (the errors are needed for "auto")."""
    if opts.schedule == "centred":
        return centred_full_steps(steps, n_full_calls(steps, opts.interval), float(opts.centre), float(opts.power))
    if opts.schedule == "auto":
        assert errs is not None
        return budget_full_steps(errs, steps, float(opts.error_bound), max(1, int(opts.interval) - 1))
    return uniform_full_steps(steps, opts.interval, bool(opts.full_last))


def choose_depth_and_schedule(model: DiffusionModel, opts: CacheOptions, seed: int) -> tuple[int, list[int], dict[str, Any]]:
    """(depth, full steps, measurement record) for the options: measured one-step errors when depth or schedule is auto.

    depth = "auto" takes, of the depths whose schedule keeps the summed one-step error within
    `error_bound`, the one with the fewest MACs per image (0 .. the deepest; with a fixed schedule
    that is the shallowest such depth); where none does, the deepest."""
    steps = int(sampling_of(model)["steps"])
    unet = find_unet(model.module())
    if opts.depth != "auto" and opts.schedule != "auto":
        return int(opts.depth), choose_schedule(opts, steps, None), {}
    depths = list(range(max_depth(unet) + 1)) if opts.depth == "auto" else [int(opts.depth)]
    xs, ts, cond = uncached_trajectories(model, int(opts.error_samples), seed)
    gap = max(1, int(opts.interval) - 1) if opts.schedule == "auto" else int(opts.interval)
    table = []
    for d in depths:
        errs = one_step_errors(model, d, xs, ts, cond, max(gap, int(opts.interval)))
        full = choose_schedule(opts, steps, errs)
        total, worst = schedule_error(full, errs, steps)
        macs_full, macs_shallow, _ = entry_macs(model, d)
        per_image = len(full) * macs_full + (steps - len(full)) * macs_shallow
        table.append({"depth": d, "full_steps": full, "error_sum": round(total, 5), "error_max": round(worst, 5),
                      "macs_per_image_speedup": round(steps * macs_full / max(per_image, 1), 4), "_macs": per_image,
                      "error_next_step": {f"{i - 1}->{i}": round(errs[(i - 1, i)], 5) for i in range(1, steps)}})
    ok = [r for r in table if r["error_sum"] <= float(opts.error_bound) + 1e-12]
    pick = min(ok, key=lambda r: (r["_macs"], r["depth"])) if ok else table[-1]
    for r in table:
        del r["_macs"]
    return int(pick["depth"]), list(pick["full_steps"]), {
        "one_step_errors": table, "error_bound": float(opts.error_bound), "error_samples": int(opts.error_samples),
        "bound_met": bool(ok)}


def cache_aware_finetune(model: DiffusionModel, opts: CacheOptions, seed: int, depth: int, full_steps: list[int],
                         track: Any = None) -> dict[str, Any]:
    """Train `model` in place so that its cached schedule (`depth`, `full_steps`) follows its uncached
    trajectories (see the module doc)."""
    import copy

    from edgediff.model import cond_take
    from edgediff.passes.finetune import finish_training, train_step
    from edgediff.passes.prune_data import call_kwargs

    steps = int(sampling_of(model)["steps"])
    shallow_steps = [i for i in range(steps) if i not in set(full_steps)]
    if not shallow_steps:
        return {"train_steps": 0, "reason": "no shallow step in this schedule"}
    n = int(opts.train_trajectories)
    xs, ts, cond = uncached_trajectories(model, n, seed)
    feeder = torch.tensor([max(f for f in full_steps if f <= i) for i in range(steps)])  # full step feeding step i
    module = model.module()
    teacher = copy.deepcopy(module).eval()
    with torch.no_grad():  # the teacher's (uncached) output at every trajectory point
        outs = torch.stack([torch.cat([teacher(xs[i, a:a + 64], ts[i].expand(len(xs[i, a:a + 64])),
                                               **call_kwargs(model, cond_take(cond, torch.arange(a, min(a + 64, n)))))
                                       for a in range(0, n, 64)]) for i in range(steps)])
    del teacher
    full, shallow = FullEntry(module, depth), ShallowEntry(module, depth)
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
        src = feeder[i]  # the full step whose feature a shallow step i reads
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
    if opts.depth != "auto":
        check_depth(unet, int(opts.depth))
    else:
        check_depth(unet, 0)  # a skip branch exists at all
    samp = sampling_of(model)
    steps = int(samp["steps"])
    depth, full, measured = choose_depth_and_schedule(model, opts, ctx.seed)
    if measured:
        ctx.metrics.update(measured)
    macs_full, macs_shallow, feat_shape = entry_macs(model, depth)
    model.extras[CACHE_KEY] = {"depth": depth, "interval": opts.interval, "schedule": opts.schedule,
                               "full_last": bool(opts.full_last), "centre": float(opts.centre),
                               "power": float(opts.power), "steps": steps, "full_steps": full,
                               "feature_shape": feat_shape, "macs_full": macs_full, "macs_shallow": macs_shallow}
    if opts.train_steps:
        if model.config is None:
            raise BadInput("cache: train_steps needs a trainable denoiser with a diffusers config, not an exported graph")
        ctx.metrics["training"] = cache_aware_finetune(model, opts, ctx.seed, depth, full, ctx.track)
    n_full = len(full)
    per_image = n_full * macs_full + (steps - n_full) * macs_shallow
    ctx.metrics.update({"depth": depth, "interval": opts.interval, "schedule": opts.schedule, "full_steps": full,
                        "macs_full": macs_full,
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
