"""distill.steps: progressive distillation (Salimans & Ho 2022), halving the sampler steps per round.

Round k has a teacher sampled with DDIM (eta 0) at 2S steps and a student, initialised from
the teacher, that learns to take one DDIM step where the teacher takes two:

    x0 ~ data, t = grid_S[j] (uniform j), z_t = alpha_t x0 + sigma_t eps
    z_t' = DDIM_teacher(z_t, t -> t'), z_t'' = DDIM_teacher(z_t', t' -> t'')   (t' the midpoint in grid_2S)
    x~ = (z_t'' - sigma_t''/sigma_t z_t) / (alpha_t'' - sigma_t''/sigma_t alpha_t)   (one step from z_t lands on z_t'')
    loss = MSE(student output, the model-parameterised target of x~ at z_t)    (eps, v or x0)

`grid_S` are DDIM's "trailing" timesteps (round(T - j T/S) - 1), so grid_S is every other
point of grid_2S and the final student is sampled by diffusers' DDIMScheduler with
timestep_spacing="trailing" at `target_steps`: the pass sets that as the model's own
scheduler and records the step count (extras["sampling"]), so generate, verify, bundles and
later calibration use it. The teacher steps follow diffusers' DDIM (x0 clipped when the
schedule clips, the unclipped output as the direction term).

Training reuses the finetune machinery: the same data sources (the images given to the
pipeline, else the teacher's own samples), AdamW, diffusers-style EMA warm-up, and
DistributedDataParallel when torch.distributed is initialised (torchrun). Resumable:
`checkpoint_dir` holds the student and optimiser state of the running round every
`checkpoint_every` steps and the weights of each finished round; a rerun with the same
directory continues where it stopped.

`method = "consistency"`: consistency distillation (Song et al. 2023) with LCM's choices (Luo et
al. 2023): one round on the skipping-step grid t_n = n*k - 1 (k = T // start_steps); the student's
consistency function f(z, t) = c_skip(t) z + c_out(t) x0(z, t) (LCMScheduler's boundary condition)
at t_n is trained to match the EMA student's f at t_{n-1} after one teacher DDIM hop. The result
samples with LCMScheduler (original_inference_steps = start_steps) at target_steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext, register
from edgediff.passes.finetune import finish_training, train_step
from edgediff.passes.prune_data import DATA_SOURCES, DataSource, call_kwargs
from edgediff.schedule import NoiseSchedule

CKPT = "distill_running.safetensors"
METHODS = ("progressive", "consistency")
LOSSES = ("l2", "huber")
WEIGHTINGS = ("uniform", "min-snr")
HUBER_C = 0.001  # diffusers train_lcm_distill's huber_c
TIMESTEP_SCALING, SIGMA_DATA = 10.0, 0.5  # diffusers LCMScheduler's boundary condition


@dataclass
class DistillOptions:
    start_steps: int = 32  # the teacher's DDIM steps in the first round
    target_steps: int = 4  # halve until here: start_steps / target_steps must be a power of two
    steps_per_round: int = 600  # optimiser steps per round
    batch_size: int = 32
    lr: float = 2e-4
    ema: float = 0.999  # diffusers-style warm-up (decay_t = min(ema, (1 + t) / (10 + t)))
    data: str = "auto"  # auto | given | samples, as finetune
    data_pool: int = 512
    checkpoint_dir: str = ""
    checkpoint_every: int = 100
    # progressive: halving rounds, DDIM trailing; consistency: one LCM-style round (start_steps is the
    # teacher's DDIM grid, LCM's original_inference_steps), sampled with LCMScheduler at target_steps
    method: str = "progressive"
    # consistency only: the distance (LCM's "l2" or "huber" with c = 0.001) and the per-sample weight.
    # "min-snr" weighs a pair by min(SNR(t_n), 1) (Hang et al. 2023): with epsilon prediction the
    # consistency function at t is x0 = (z - sigma eps) / alpha, which at t = 999 of a linear pixel-space
    # schedule multiplies the network's error by 1/alpha ~ 150, so uniform weights let the noisiest pairs
    # dominate the gradient (latent LCMs see ~15x)
    # (defaults: the setting measured to work on the demo; LCM's own script uses l2 with uniform weights)
    loss: str = "huber"
    weighting: str = "min-snr"

    def __post_init__(self) -> None:
        for k in ("start_steps", "target_steps", "steps_per_round", "batch_size", "data_pool", "checkpoint_every"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BadInput(f"distill.steps: {k} must be a positive integer, got {v!r}")
        if self.method not in METHODS:
            raise BadInput(f"distill.steps: method={self.method!r}; expected one of {', '.join(METHODS)}")
        ratio = self.start_steps / self.target_steps
        if self.method == "consistency":
            if self.start_steps < max(2, self.target_steps):
                raise BadInput(f"distill.steps: consistency needs start_steps (the teacher grid, {self.start_steps}) "
                               f">= target_steps ({self.target_steps}) and >= 2")
        elif self.start_steps <= self.target_steps or ratio != 2 ** round(math.log2(ratio)):
            raise BadInput(f"distill.steps: start_steps ({self.start_steps}) must be target_steps "
                           f"({self.target_steps}) times a power of two (each round halves the steps)")
        if not float(self.lr) > 0 or not 0.0 <= float(self.ema) < 1.0:
            raise BadInput("distill.steps: lr must be > 0 and ema in [0, 1)")
        if self.data not in DATA_SOURCES:
            raise BadInput(f"distill.steps: data={self.data!r}; expected one of {', '.join(DATA_SOURCES)}")
        if self.loss not in LOSSES:
            raise BadInput(f"distill.steps: loss={self.loss!r}; expected one of {', '.join(LOSSES)}")
        if self.weighting not in WEIGHTINGS:
            raise BadInput(f"distill.steps: weighting={self.weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def grid(num_train: int, steps: int) -> list[int]:
    """DDIM 'trailing' timesteps, descending: round(T - j*T/S) - 1."""
    return [int(round(num_train - j * num_train / steps)) - 1 for j in range(steps)]


def _coef(ac: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) per sample at integer steps t, with t = -1 meaning the clean end (alpha 1)."""
    a = torch.where(t >= 0, ac[t.clamp_min(0)], torch.ones_like(ac[:1]).expand(t.shape))
    return a.sqrt().view(-1, 1, 1, 1).float(), (1 - a).sqrt().view(-1, 1, 1, 1).float()


def _x0_eps(pred: str, out: torch.Tensor, z: torch.Tensor, al: torch.Tensor, sg: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    if pred == "epsilon":
        return (z - sg * out) / al, out
    if pred == "sample":
        return out, (z - al * out) / sg
    return al * z - sg * out, al * out + sg * z  # v_prediction


def _target(pred: str, x0: torch.Tensor, z: torch.Tensor, al: torch.Tensor, sg: torch.Tensor) -> torch.Tensor:
    if pred == "sample":
        return x0
    eps = (z - al * x0) / sg
    return eps if pred == "epsilon" else al * eps - sg * x0


def _ddim(pred: str, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, ac: torch.Tensor,
          clip: float | None) -> torch.Tensor:
    al, sg = _coef(ac, t)
    al_p, sg_p = _coef(ac, t_prev)
    x0, eps = _x0_eps(pred, out, z, al, sg)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return al_p * x0 + sg_p * eps


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from edgediff.artifact import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, force=True) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.is_floating_point()]


def _set_params(module: nn.Module, values: list[torch.Tensor], where: Path) -> None:
    params = _params(module)
    if len(values) != len(params) or any(v.shape != p.shape for v, p in zip(values, params)):
        raise BadInput(f"{where}: checkpoint does not fit this model (another model's checkpoint_dir?)")
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def lcm_grid(num_train: int, n: int) -> list[int]:
    """LCMScheduler's skipping-step grid, ascending: k*i - 1 for i = 1..n, k = T // n."""
    k = num_train // n
    return [k * i - 1 for i in range(1, n + 1)]


def consistency_fn(pred: str, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """f(z, t) = c_skip(t) z + c_out(t) x0(z, t), the parameterisation LCMScheduler samples with."""
    al, sg = _coef(ac, t)
    x0, _ = _x0_eps(pred, out, z, al, sg)
    st = (t.float() * TIMESTEP_SCALING).view(-1, 1, 1, 1)
    c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
    c_out = st / (st**2 + SIGMA_DATA**2) ** 0.5
    return c_skip * z + c_out * x0


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, ac: torch.Tensor, loss: str,
                     weighting: str) -> torch.Tensor:
    """Mean over the batch of the per-sample distance (l2 or LCM's pseudo-Huber), weighted per `weighting`."""
    d = (pred.float() - target.float()) ** 2
    if loss == "huber":
        d = torch.sqrt(d + HUBER_C**2) - HUBER_C
    per = d.flatten(1).mean(1)
    if weighting == "min-snr":
        a = ac[t.clamp_min(0)].float()
        per = per * (a / (1 - a)).clamp(max=1.0)
    return per.mean()


def distill_round(student: DiffusionModel, teacher_mod: nn.Module, steps: int, opts: DistillOptions, src: DataSource,
                  seed: int, ckpt_dir: Path | None, track: Any = None) -> dict[str, Any]:
    """One halving: train `student` (in place, EMA weights at the end) to match two teacher steps of grid_2S.

    With method "consistency": one round in which the student's consistency function at grid point
    n matches the EMA student's at n-1 after one teacher DDIM hop (consistency distillation, Song
    et al. 2023; LCM's skipping-step grid and boundary condition, Luo et al. 2023)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    rank, world = _dist()
    sched = student.schedule
    ac = sched.alphas_cumprod.float()
    T = sched.num_train_timesteps
    pred = sched.prediction_type
    clip_cfg = sched.config.get("clip_sample", True)
    clip = float(sched.config.get("clip_sample_range", 1.0)) if clip_cfg else None
    g_s = torch.tensor(grid(T, steps) + [-1])  # student grid and its end
    g_t = torch.tensor(grid(T, 2 * steps) + [-1])
    # the consistency pairs (g_c[j+1] -> g_c[j]) start with k-1 -> 0, where c_skip(0) = 1 anchors f to
    # the teacher's one-step result (the reference clamps t_n - k = -1 to 0 the same way)
    g_c = torch.tensor([0] + lcm_grid(T, opts.start_steps))
    module = student.module()
    target_net = copy.deepcopy(module).eval() if opts.method == "consistency" else None
    if target_net is not None:
        for p in target_net.parameters():
            p.requires_grad_(False)
    for p in module.parameters():
        p.requires_grad_(p.is_floating_point())
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(opts.lr))
    ema = [p.detach().clone() for p in params] if float(opts.ema) > 0 else None
    start = 0
    ck = ckpt_dir / CKPT if ckpt_dir is not None else None
    if ck is not None and ck.is_file():
        tens, meta = _load(ck)
        if int(meta.get("round_steps", -1)) == steps:
            _set_params(module, [tens[f"param.{i}"] for i in range(len(params))], ck)
            if ema is not None:
                for i, e in enumerate(ema):
                    e.copy_(tens[f"ema.{i}"])
            for i, p in enumerate(params):
                if f"adam.exp_avg.{i}" in tens:
                    opt.state[p] = {"step": tens[f"adam.step.{i}"].reshape(()),
                                    "exp_avg": tens[f"adam.exp_avg.{i}"], "exp_avg_sq": tens[f"adam.exp_avg_sq.{i}"]}
            start = int(meta["step"])
    train = DistributedDataParallel(module, find_unused_parameters=True) if world > 1 else module
    local_bs = max(1, int(opts.batch_size) // world)
    module.train()
    teacher_mod.eval()
    losses: list[float] = []
    it = range(start, int(opts.steps_per_round))
    what = f"distill {2 * steps} -> {steps} steps" if target_net is None else f"consistency distill ({opts.start_steps} grid)"
    it = track(it, what, len(it)) if (track is not None and rank == 0) else it
    for step in it:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + steps * 7919 + step * 1009 + rank)
        idx = torch.randint(0, len(src.x), (local_bs,), generator=g)
        x0 = src.x[idx]
        cond = src.cond[idx] if src.cond is not None else None
        if cond is None:
            from edgediff.passes.prune_data import random_cond

            cond = random_cond(student, local_bs, g)
        kw = call_kwargs(student, cond)
        j = torch.randint(0, steps if target_net is None else len(g_c) - 1, (local_bs,), generator=g)
        if target_net is None:
            t, t_mid, t_end = g_s[j], g_t[2 * j + 1], g_s[j + 1]
        noise = torch.randn(x0.shape, generator=g)
        c = x0.shape[1]
        if target_net is not None:  # consistency: t = grid point n, t_end = n-1 (one teacher DDIM hop)
            t, t_end = g_c[j + 1], g_c[j]
            al, sg = _coef(ac, t)
            z = al * x0 + sg * noise
            with torch.no_grad():
                z_prev = _ddim(pred, teacher_mod(z, t.float(), **kw), z, t, t_end, ac, clip)
                for tp, e in zip(_params(target_net), ema if ema is not None else params):
                    tp.copy_(e)
                target = consistency_fn(pred, target_net(z_prev, t_end.float(), **kw)[:, :c], z_prev, t_end, ac)
            out = train(z, t.float(), **kw)
            loss = consistency_loss(consistency_fn(pred, out[:, :c], z, t, ac), target, t, ac, opts.loss,
                                    opts.weighting)
        else:
            al, sg = _coef(ac, t)
            z = al * x0 + sg * noise
            with torch.no_grad():
                z_mid = _ddim(pred, teacher_mod(z, t.float(), **kw), z, t, t_mid, ac, clip)
                z_end = _ddim(pred, teacher_mod(z_mid, t_mid.float(), **kw), z_mid, t_mid, t_end, ac, clip)
                al_e, sg_e = _coef(ac, t_end)
                ratio = sg_e / sg
                x_tilde = (z_end - ratio * z) / (al_e - ratio * al)
                target = _target(pred, x_tilde, z, al, sg)
            out = train(z, t.float(), **kw)
            loss = torch.nn.functional.mse_loss(out[:, :c], target)
        train_step(opt, loss, ema, params, step, float(opts.ema))
        losses.append(float(loss.detach()))
        if ck is not None and rank == 0 and ((step + 1) % int(opts.checkpoint_every) == 0):
            tens = {f"param.{i}": p for i, p in enumerate(params)}
            if ema is not None:
                tens.update({f"ema.{i}": e for i, e in enumerate(ema)})
            for i, p in enumerate(params):
                st = opt.state.get(p, {})
                if "exp_avg" in st:
                    tens.update({f"adam.exp_avg.{i}": st["exp_avg"], f"adam.exp_avg_sq.{i}": st["exp_avg_sq"],
                                 f"adam.step.{i}": torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)})
            _save(ck, tens, {"round_steps": steps, "step": step + 1, "options": asdict(opts)})
    finish_training(module, ema, params)
    return {"steps": steps, "resumed_from": start,
            "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-20:]) / len(losses[-20:]) if losses else None}


def ddim_trailing(schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule with DDIM 'trailing' spacing as its own scheduler (what the student is sampled with)."""
    cfg = schedule.to_config()
    cfg.update({"_class_name": "DDIMScheduler", "timestep_spacing": "trailing", "steps_offset": 0})
    return NoiseSchedule.from_config(cfg, "distill.steps")


def lcm_schedule(schedule: NoiseSchedule, original_steps: int) -> NoiseSchedule:
    """The schedule with LCMScheduler as its own scheduler on the distillation grid."""
    cfg = schedule.to_config()
    cfg.update({"_class_name": "LCMScheduler", "original_inference_steps": int(original_steps),
                "timestep_scaling": TIMESTEP_SCALING, "clip_sample": False, "steps_offset": 0,
                "timestep_spacing": "leading"})
    return NoiseSchedule.from_config(cfg, "distill.steps")


@register("distill.steps", DistillOptions)
def run(model: DiffusionModel, opts: DistillOptions, ctx: PassContext) -> DiffusionModel:
    import copy

    sched = model.schedule
    if sched.family != "discrete":
        raise BadInput(f"distill.steps: the {sched.class_name} schedule is {sched.family}; progressive distillation "
                       "here runs DDIM on discrete (alphas_cumprod) schedules")
    if model.config is None:
        raise BadInput("distill.steps: the denoiser has no diffusers config (an exported graph): it cannot be trained here")
    T = sched.num_train_timesteps
    if T % opts.target_steps:
        raise BadInput(f"distill.steps: target_steps {opts.target_steps} must divide num_train_timesteps {T} "
                       "(so that DDIM's trailing schedule is the student's grid)")
    ckpt_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else None
    _, world = _dist()
    src = DataSource(model, opts.data, max(1, int(opts.batch_size) // world), ctx.seed, pool=int(opts.data_pool),
                     given=ctx.data)
    rounds: list[dict[str, Any]] = []
    if opts.method == "consistency":
        if T // opts.start_steps < 1:
            raise BadInput(f"distill.steps: start_steps {opts.start_steps} exceeds num_train_timesteps {T}")
        student = dataclasses.replace(model, denoiser=copy.deepcopy(model.denoiser), extras=dict(model.extras))
        t_mod = copy.deepcopy(model.module()).eval()
        for p in t_mod.parameters():
            p.requires_grad_(False)
        # steps= keys the running checkpoint; 0 never collides with a progressive round
        rounds.append(distill_round(student, t_mod, 0, opts, src, ctx.seed, ckpt_dir, ctx.track))
        student.schedule = lcm_schedule(sched, opts.start_steps)
        student.extras["sampling"] = {"sampler": None, "steps": opts.target_steps, "eta": 0.0}
        student.extras["distill.steps"] = {"method": "consistency", "start_steps": opts.start_steps,
                                           "target_steps": opts.target_steps, "sampler": "LCMScheduler"}
        ctx.metrics.update({"rounds": rounds, "method": "consistency", "target_steps": opts.target_steps,
                            "data": src.source})
        return student
    steps = opts.start_steps // 2
    teacher = model
    while steps >= opts.target_steps:
        done = ckpt_dir / f"distill_{steps}.safetensors" if ckpt_dir is not None else None
        student = dataclasses.replace(teacher, denoiser=copy.deepcopy(teacher.denoiser), extras=dict(teacher.extras))
        if done is not None and done.is_file():
            tens, _ = _load(done)
            _set_params(student.module(), [tens[f"param.{i}"] for i in range(len(tens))], done)
            rounds.append({"steps": steps, "resumed": "finished round loaded"})
        else:
            t_mod = copy.deepcopy(teacher.module()).eval()
            for p in t_mod.parameters():
                p.requires_grad_(False)
            rounds.append(distill_round(student, t_mod, steps, opts, src, ctx.seed, ckpt_dir, ctx.track))
            if done is not None and _dist()[0] == 0:
                _save(done, {f"param.{i}": p for i, p in enumerate(_params(student.module()))}, {"steps": steps})
        teacher = student
        steps //= 2
    out = teacher
    out.schedule = ddim_trailing(sched)
    out.extras["sampling"] = {"sampler": None, "steps": opts.target_steps, "eta": 0.0}
    out.extras["distill.steps"] = {"method": "progressive", "start_steps": opts.start_steps, "target_steps": opts.target_steps,
                                   "rounds": len(rounds), "sampler": "DDIMScheduler (trailing)"}
    ctx.metrics.update({"rounds": rounds, "target_steps": opts.target_steps, "data": src.source})
    return out
