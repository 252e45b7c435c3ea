"""calib: calibration sets taken from the float model's own sampling trajectories.

Two ways of choosing which x_t go into the set (both from trajectories of the FP sampler, as
the papers prescribe, not from noised training images):

- ptq4dm (Shang et al. 2023, NDTC): timesteps drawn from a normal distribution whose mean
  lies below T/2 (skewed toward x_0); each drawn t takes x_t from a random trajectory at
  the sampler step of nearest noise level. `mean` and `std` are fractions of T, the training
  index (sampler steps are mapped to it by NoiseSchedule.index_of: flow sigmas and EDM's
  c_noise are not indices).
- qdiff (Li et al. 2023): time-step-aware uniform calibration: every `interval`-th sampler
  step, all `n_samples` trajectories' x_t at that step.

Models with conditioning get it: class-conditional models random labels, cross-attention
models random encoder states (no text encoder ships with a bare denoiser), one per trajectory.

The data (calibration set, plus the full trajectories with the FP model's outputs, which the
ptqd pass regresses against) go to a safetensors file in ctx.cache_dir/calib/, keyed by a
hash of the model's weights and the options; model.extras["calib"] only records the key and
metadata, so a second run (or the next pass) reuses the file instead of sampling again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgediff.artifact import atomic_file
from edgediff.errors import BadInput
from edgediff.model import Cond, DiffusionModel, cond_cat, cond_flatten, cond_take
from edgediff.passes import PassContext, register
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

METHODS = ("ptq4dm", "qdiff")
CACHE_VERSION = 1


@dataclass
class CalibOptions:
    method: str = "qdiff"  # "ptq4dm" (normal timestep distribution) or "qdiff" (every c-th step)
    n_samples: int = 32  # trajectories generated (qdiff: samples per chosen step)
    steps: int = 50  # sampler steps of each trajectory
    sampler: str | None = None  # None: the model's own scheduler
    # use the sampler and steps the artifact will be used with (the `sampling` pass's record) when it has one
    follow_sampling: bool = True
    interval: int = 5  # qdiff: keep every interval-th step
    count: int = 256  # ptq4dm: calibration points drawn
    mean: float = 0.4  # ptq4dm: mean of the timestep normal, as a fraction of T (< 0.5: toward x_0)
    std: float = 0.25  # ptq4dm: its standard deviation, as a fraction of T
    seed: int = 0
    batch_size: int = 64

    def validate(self) -> None:
        if self.method not in METHODS:
            raise BadInput(f"calib: unknown method {self.method!r}; expected one of {METHODS}")
        for k in ("n_samples", "steps", "interval", "count", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BadInput(f"calib: {k} must be a positive integer (a calibration count of zero "
                               f"gives nothing to calibrate on), got {v!r}")
        if not 0 <= self.mean <= 1:
            raise BadInput(f"calib: mean is a fraction of T in [0, 1], got {self.mean}")
        if not self.std > 0:
            raise BadInput(f"calib: std must be > 0, got {self.std}")
        SamplerConfig(self.sampler, self.steps)  # validates the sampler name


def model_hash(model: DiffusionModel) -> str:
    """Hash of what determines the trajectories: weights, architecture, schedule, signature."""
    h = hashlib.sha256()
    h.update(json.dumps([model.arch, model.signature.to_dict(), model.schedule.to_config()], default=str).encode())
    for k, v in sorted(model.denoiser.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(model: DiffusionModel, opts: CalibOptions) -> str:
    h = hashlib.sha256()
    h.update(model_hash(model).encode())
    h.update(json.dumps({"v": CACHE_VERSION, **asdict(opts)}, sort_keys=True).encode())
    if opts.method == "ptq4dm" and model.schedule.family != "discrete":  # steps matched by noise level
        h.update(b"ptq4dm-index-of")
    if model.signature.extra:  # every named input is drawn and stored (older sets zeroed them)
        h.update(b"named-conditioning")
    if model.extras.get("cache"):  # a DeepCache schedule changes the trajectories
        h.update(json.dumps(model.extras["cache"], sort_keys=True, default=str).encode())
    if model.extras.get("pipeline"):  # text pipelines calibrate on their prompts with guidance
        from edgediff.pipelines.conditioning import prompts_key

        h.update(prompts_key(model).encode())
    return h.hexdigest()[:32]


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "calib" / f"{key}.safetensors"


def make_conditioning(model: DiffusionModel, n: int, seed: int) -> Cond:
    """The calibration conditioning: the signature's generator, random labels, every named input
    (SDXL text_embeds/time_ids, SD3/Flux pooled_projections, ids, guidance) drawn, not zeroed."""
    return model.signature.conditioning(n, seed + 7919, labels="random")


class _Recorder:
    """Wraps a denoiser and keeps every output, so trajectories come with the FP model's outputs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.outs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = self.inner(x, t, cond)
        self.outs.append(out.detach().clone())
        return out


def generate(model: DiffusionModel, opts: CalibOptions, progress: Any = None) -> dict[str, torch.Tensor]:
    """Sample FP trajectories and pick the calibration points."""
    n = opts.n_samples
    cond = make_conditioning(model, n, opts.seed)
    from edgediff.pipelines.conditioning import prompt_conditioning

    guided = prompt_conditioning(model, n, opts.seed)  # text pipelines: encoded prompts with guidance
    if guided is not None:
        cond = guided.cond
    rec = _Recorder(guided.wrap(TorchDenoiser(model)) if guided is not None else TorchDenoiser(model))
    cfg = SamplerConfig(opts.sampler, opts.steps, batch_size=opts.batch_size)
    step_ids: list[int] = []
    # one on_step call per sampler step, before the denoiser calls of that step
    on_step = (lambda i, t, x: step_ids.append(t)) if progress is None else (lambda i, t, x: (step_ids.append(t), progress(i)))
    _, traj = sample(rec, model.schedule, model.signature.sample_shape, n, seed=opts.seed, cfg=cfg, cond=cond,
                     on_step=on_step, return_trajectory=True)
    # integer steps stay int64; Euler/flow/EDM timesteps are fractional and must not be truncated
    fractional = any(not float(t).is_integer() for t, _ in traj)
    traj_t = torch.tensor([float(t) for t, _ in traj], dtype=torch.float32 if fractional else torch.int64)
    traj_x = torch.stack([x for _, x in traj])  # (S, N, C, H, W)
    traj_out = torch.cat(rec.outs).view(len(traj), n, *rec.outs[0].shape[1:])
    g = torch.Generator().manual_seed(opts.seed + 1)
    if opts.method == "qdiff":
        idx = list(range(0, len(traj), opts.interval))
        xs = torch.cat([traj_x[i] for i in idx])
        ts = torch.cat([torch.full((n,), traj_t[i].item()) for i in idx])
        cs = cond_cat([cond for _ in idx])
    else:
        T = model.schedule.num_train_timesteps
        want = (torch.randn(opts.count, generator=g) * opts.std * T + opts.mean * T).round().clamp(0, T - 1)
        # the sampler step of nearest noise level for each drawn index, a random trajectory for each point
        step = (model.schedule.index_of(traj_t).view(1, -1) - want.view(-1, 1).double()).abs().argmin(1)
        which = torch.randint(0, n, (opts.count,), generator=g)
        xs = traj_x[step, which]
        ts = traj_t[step]
        cs = cond_take(cond, which)
    if guided is not None:
        xs, ts, cs = guided.both(xs, ts, cs)  # each guided call runs its prompt and the empty prompt
    perm = torch.randperm(len(xs), generator=g)  # mix timesteps so that any prefix covers them all
    data = {"x": xs[perm].contiguous(), "t": ts[perm].to(torch.float32).contiguous(),
            "traj_t": traj_t, "traj_x": traj_x.contiguous(), "traj_out": traj_out.contiguous()}
    # dict conditioning is stored as cond.NAME / traj_cond.NAME (model.cond_unflatten reads it back)
    data.update(cond_flatten(cond_take(cs, perm), "cond"))
    data.update(cond_flatten(cond, "traj_cond"))
    return data


def load_calibration(model: DiffusionModel, ctx: PassContext) -> dict[str, torch.Tensor]:
    """The calibration data recorded by a previous calib pass (from the cache)."""
    from safetensors.torch import load_file

    meta = model.extras.get("calib")
    if not meta:
        raise BadInput("this pass needs calibration data: put a `calib` pass before it in the recipe")
    path = cache_path(ctx.cache_dir, meta["key"])
    if not path.is_file():
        raise BadInput(f"{path}: calibration data recorded by the calib pass is missing from the cache; "
                       "run the recipe again from the calib pass")
    return load_file(str(path))


@register("calib", CalibOptions)
def run(model: DiffusionModel, opts: CalibOptions, ctx: PassContext) -> DiffusionModel:
    from safetensors.torch import save_file

    rec = model.extras.get("sampling")
    if opts.follow_sampling and rec:
        import dataclasses

        opts = dataclasses.replace(opts, sampler=rec.get("sampler") or opts.sampler,
                                   steps=int(rec.get("steps") or opts.steps))
    opts.validate()
    key = cache_key(model, opts)
    path = cache_path(ctx.cache_dir, key)
    t0 = time.perf_counter()
    data = None
    if path.is_file():
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
            if not {"x", "t"} <= set(data):
                raise ValueError("missing x/t")
            generated = False
            ctx.log(f"calib: reusing cached calibration set {path}")
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal for every later run
            ctx.log(f"warning: calib: cached calibration set {path} is corrupt; rebuilding it")
            path.unlink(missing_ok=True)
            data = None
    if data is None:
        task_progress = None
        if ctx.progress is not None:
            task = ctx.progress.add_task(f"calib: {opts.n_samples} FP trajectories x {opts.steps} steps",
                                         total=min(opts.steps, model.schedule.num_train_timesteps))
            task_progress = lambda i: ctx.progress.update(task, completed=i + 1)  # noqa: E731
        try:
            data = generate(model, opts, task_progress)
        finally:
            if ctx.progress is not None:
                ctx.progress.remove_task(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, force=True) as tmp:
            save_file(data, str(tmp))
        generated = True
    ts = data["t"]
    model.extras["calib"] = {
        "key": key, "method": opts.method, "count": int(len(data["x"])), "options": asdict(opts),
        "timesteps": {"min": int(ts.min()), "max": int(ts.max()), "mean": round(float(ts.mean()), 2),
                      "distinct": int(len(torch.unique(ts)))},
    }
    ctx.metrics.update({"count": int(len(data["x"])), "generated": generated,
                        "seconds": round(time.perf_counter() - t0, 3), "cache": str(path)})
    return model
