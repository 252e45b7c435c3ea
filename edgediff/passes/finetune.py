"""Pass "finetune": recover quality after pruning (denoising loss + distillation, EMA, DDP).

loss = MSE(student(x_t, t), target) + distill * MSE(student(x_t, t), teacher(x_t, t))

where target is the schedule's training target (eps / v / x0) and the teacher is the
unpruned model the pipeline started from (ctx.original), when there is one. Weights are
averaged by an EMA with diffusers' warm-up (decay_t = min(ema, (1 + t) / (10 + t))), so that
short fine-tunes are not dominated by the initial weights; the EMA weights are what the pass
returns.

Runs single-process inside a recipe, or distributed with torch.distributed:

    torchrun --nproc_per_node 2 -m edgediff.passes.finetune ARTIFACT_IN -o ARTIFACT_OUT --steps N

(gloo on CPU, nccl on GPU). `batch_size` is the global batch: each of W processes draws
batch_size / W images per step, DistributedDataParallel averages the gradients, so the same
options give the same optimisation on 1 or W processes, just faster.

Resumable: every `checkpoint_every` steps the model, the EMA and the Adam state go to
`checkpoint_dir/finetune.safetensors` (written atomically, no pickle). A later run with the same
checkpoint_dir continues from the saved step. Each step's batch is drawn from a generator
seeded by (seed, step, rank), so a resumed run sees exactly the batches the uninterrupted run
would have seen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, cond_cat, cond_take, cond_unflatten
from edgediff.passes import PassContext, register
from edgediff.passes.prune_data import DATA_SOURCES, DataSource, call_kwargs

CKPT_NAME = "finetune.safetensors"


@dataclass
class FinetuneOptions:
    steps: int = 300  # optimiser steps
    batch_size: int = 32  # global batch (split across processes when distributed)
    lr: float = 2e-4  # AdamW learning rate
    weight_decay: float = 0.0
    distill: float = 1.0  # weight of the teacher-output MSE (0 = plain denoising loss); needs a teacher
    denoise: float = 1.0  # weight of the denoising (data-target) MSE; 0 = pure distillation
    ema: float = 0.999  # EMA decay (0 = no EMA); warmed up as in diffusers
    data: str = "auto"  # auto | given (ctx.data) | samples (the teacher's own DDIM samples)
    data_pool: int = 512  # generated samples when data = samples
    checkpoint_dir: str = ""  # "" = no checkpoints
    checkpoint_every: int = 100
    # distillation on the teacher's own sampling trajectories: a share of every batch is x_t taken
    # from `trajectories` DDIM runs of the teacher (seeds disjoint from evaluation seeds), with the
    # teacher's output there as the target, so the student learns where it will be sampled
    trajectories: int = 0  # teacher trajectories in the pool (0 = off)
    trajectory_steps: int = 50  # DDIM steps of each trajectory
    trajectory_share: float = 0.5  # share of each batch drawn from the pool

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise BadInput(f"finetune: option steps={self.steps} must be >= 1")
        if int(self.batch_size) < 1:
            raise BadInput(f"finetune: option batch_size={self.batch_size} must be >= 1")
        if not float(self.lr) > 0:
            raise BadInput(f"finetune: option lr={self.lr} must be > 0")
        if float(self.distill) < 0:
            raise BadInput(f"finetune: option distill={self.distill} must be >= 0")
        if float(self.denoise) < 0:
            raise BadInput(f"finetune: option denoise={self.denoise} must be >= 0")
        if not 0.0 <= float(self.ema) < 1.0:
            raise BadInput(f"finetune: option ema={self.ema} must lie in [0, 1)")
        if self.data not in DATA_SOURCES:
            raise BadInput(f"finetune: option data={self.data!r}; expected one of {', '.join(DATA_SOURCES)}")
        if int(self.checkpoint_every) < 1:
            raise BadInput(f"finetune: option checkpoint_every={self.checkpoint_every} must be >= 1")
        if int(self.trajectories) < 0 or int(self.trajectory_steps) < 1:
            raise BadInput("finetune: options trajectories must be >= 0 and trajectory_steps >= 1")
        if not 0.0 < float(self.trajectory_share) <= 1.0:
            raise BadInput(f"finetune: option trajectory_share={self.trajectory_share} must lie in (0, 1]")


# --------------------------------------------------------------------------------------------
# distributed helpers


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_params(module: nn.Module) -> None:
    import torch.distributed as dist

    if _dist()[1] > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


# --------------------------------------------------------------------------------------------
# checkpoints (safetensors: tensors only, step and options as metadata)


def _save_checkpoint(path: Path, step: int, module: nn.Module, ema: list[torch.Tensor] | None,
                     opt: torch.optim.Optimizer, opts: FinetuneOptions) -> None:
    from safetensors.torch import save_file

    from edgediff.artifact import atomic_file

    tensors: dict[str, torch.Tensor] = {}
    params = [p for p in module.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().cpu().contiguous().clone()
        if ema is not None:
            tensors[f"ema.{i}"] = ema[i].cpu().contiguous().clone()
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"adam.{k}.{i}"] = st[k].cpu().contiguous().clone()
        if "step" in st:
            tensors[f"adam.step.{i}"] = torch.as_tensor(st["step"], dtype=torch.float32).cpu().reshape(1).clone()
    meta = {"step": str(step), "n_params": str(len(params)), "options": json.dumps(asdict(opts))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, force=True) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_checkpoint(path: Path, module: nn.Module, ema: list[torch.Tensor] | None,
                     opt: torch.optim.Optimizer) -> int:
    from safetensors import safe_open

    params = [p for p in module.parameters() if p.requires_grad]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if int(meta.get("n_params", -1)) != len(params):
            raise BadInput(f"{path}: checkpoint holds {meta.get('n_params')} parameter tensors, this model has "
                           f"{len(params)}: it belongs to another model; use another checkpoint_dir")
        keys = set(f.keys())
        for i, p in enumerate(params):
            t = f.get_tensor(f"param.{i}")
            if t.shape != p.shape:
                raise BadInput(f"{path}: checkpoint tensor {i} has shape {tuple(t.shape)}, the model's has "
                               f"{tuple(p.shape)}: it belongs to another model; use another checkpoint_dir")
            with torch.no_grad():
                p.copy_(t)
            if ema is not None and f"ema.{i}" in keys:
                ema[i].copy_(f.get_tensor(f"ema.{i}"))
            if f"adam.exp_avg.{i}" in keys:
                opt.state[p] = {"step": f.get_tensor(f"adam.step.{i}").reshape(()),  # stays on the CPU, as AdamW keeps it
                                "exp_avg": f.get_tensor(f"adam.exp_avg.{i}").to(p.device),
                                "exp_avg_sq": f.get_tensor(f"adam.exp_avg_sq.{i}").to(p.device)}
        return int(meta.get("step", 0))


# --------------------------------------------------------------------------------------------
# the training loop

# trajectory seeds start far from the small seeds that demo/verify/benchmarks sample with, so the
# student never trains on the exact trajectories it is scored on
TRAJECTORY_SEED_OFFSET = 1_000_003


def teacher_trajectories(teacher: DiffusionModel, n: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """(x_t, t, teacher output, cond) at every step of n DDIM trajectories of the teacher, flattened."""
    from edgediff.passes.calib import CalibOptions, generate

    d = generate(teacher, CalibOptions(method="qdiff", n_samples=n, steps=steps, interval=1,
                                       seed=TRAJECTORY_SEED_OFFSET + int(seed)))
    s = d["traj_x"].shape[0]
    out = {"x": d["traj_x"].flatten(0, 1), "t": d["traj_t"].repeat_interleave(n),
           "out": d["traj_out"].flatten(0, 1)}
    tc = cond_unflatten(d, "traj_cond")
    if tc is not None:  # one copy per step, in the order of traj_x.flatten(0, 1)
        out["cond"] = cond_cat([tc] * s)
    return out


def finetune(model: DiffusionModel, opts: FinetuneOptions, teacher: DiffusionModel | None, seed: int = 0,
             track: Any = None, log: Any = None, given: torch.Tensor | None = None) -> dict[str, Any]:
    """Train `model` in place (rank-aware); returns a summary. EMA weights end up in the model."""
    from torch.nn.parallel import DistributedDataParallel

    rank, world = _dist()
    if int(opts.batch_size) < world:
        raise BadInput(f"finetune: batch_size={opts.batch_size} is smaller than the {world} processes")
    local_bs = int(opts.batch_size) // world
    module = model.module()
    # x0 pool (before any device move: sampling runs on the CPU): the caller's images (ctx.data),
    # or the *teacher's* samples (the unpruned model's distribution)
    src = DataSource(teacher or model, opts.data, local_bs, seed, pool=int(opts.data_pool), given=given)
    # one GPU per process when there are GPUs (torchrun sets LOCAL_RANK); the random draws stay
    # on the CPU generator so that CPU and GPU runs see the same batches
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    module.to(device)
    for p in module.parameters():
        p.requires_grad_(p.is_floating_point())
    _broadcast_params(module)
    use_teacher = teacher is not None and float(opts.distill) > 0
    traj = (teacher_trajectories(teacher, int(opts.trajectories), int(opts.trajectory_steps), seed)
            if teacher is not None and int(opts.trajectories) > 0 else None)
    n_traj = max(1, round(local_bs * float(opts.trajectory_share))) if traj is not None else 0
    n_data = local_bs - n_traj
    t_mod = teacher.module().to(device).eval() if use_teacher else None
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(opts.lr), weight_decay=float(opts.weight_decay))
    ema = [p.detach().clone() for p in params] if float(opts.ema) > 0 else None
    start = 0
    ckpt = Path(opts.checkpoint_dir) / CKPT_NAME if opts.checkpoint_dir else None
    if ckpt is not None and ckpt.is_file():
        start = _load_checkpoint(ckpt, module, ema, opt)
        if log:
            log(f"finetune: resumed from {ckpt} at step {start}")
    # unused parameters happen legitimately (e.g. the class-embedding row for "no label")
    train_mod = (DistributedDataParallel(module, device_ids=[local_rank] if device.type == "cuda" else None,
                                         find_unused_parameters=True) if world > 1 else module)
    module.train()
    steps = range(start, int(opts.steps))
    it = track(steps, "Fine-tuning", len(steps)) if (track is not None and rank == 0) else steps
    losses: list[float] = []
    for step in it:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + step * 1009 + rank)
        loss = torch.zeros(())
        if n_data > 0:
            loss = loss + _data_loss(model, train_mod, t_mod if use_teacher else None, src, n_data, g, device,
                                     float(opts.distill), float(opts.denoise))
        if traj is not None:
            j = torch.randint(0, len(traj["x"]), (n_traj,), generator=g)
            c = cond_take(traj.get("cond"), j)
            kw = call_kwargs(model, {k: v.to(device) for k, v in c.items()} if isinstance(c, dict)
                             else c.to(device) if c is not None else None)
            out = train_mod(traj["x"][j].to(device), traj["t"][j].float().to(device), **kw)
            # weighted by the batch share so that the two terms keep the scale of a full batch
            t_loss = torch.nn.functional.mse_loss(out, traj["out"][j].to(device))
            loss = loss * (n_data / local_bs) + t_loss * (n_traj / local_bs)
        train_step(opt, loss, ema, params, step, float(opts.ema))
        losses.append(float(loss.detach()))
        if ckpt is not None and rank == 0 and ((step + 1) % int(opts.checkpoint_every) == 0 or step + 1 == opts.steps):
            _save_checkpoint(ckpt, step + 1, module, ema, opt, opts)
    finish_training(module, ema, params)
    module.to("cpu")
    if t_mod is not None:
        t_mod.to("cpu")
    return {"steps": int(opts.steps), "resumed_from": start, "world_size": world, "data": src.source,
            "distilled": use_teacher, "trajectory_points": len(traj["x"]) if traj is not None else 0,
            "loss_first": losses[0] if losses else None, "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None}


def train_step(opt: torch.optim.Optimizer, loss: torch.Tensor, ema: list[torch.Tensor] | None,
               params: list[nn.Parameter], step: int, ema_decay: float) -> None:
    """One optimiser step, then the EMA update (its decay warmed up as min(ema, (1+step)/(10+step)));
    shared with distill.steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if ema is not None:
        d = min(float(ema_decay), (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)


def finish_training(module: nn.Module, ema: list[torch.Tensor] | None, params: list[nn.Parameter]) -> None:
    """The EMA weights copied in (when kept), the module frozen and in eval mode."""
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params):
                p.copy_(e)
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def _data_loss(model: DiffusionModel, train_mod: nn.Module, t_mod: nn.Module | None, src: DataSource, n: int,
               g: torch.Generator, device: torch.device, distill: float, denoise: float = 1.0) -> torch.Tensor:
    """Denoising loss on noised training images, plus the teacher-output MSE when distilling."""
    idx = torch.randint(0, len(src.x), (n,), generator=g)
    x0 = src.x[idx]
    if src.cond is not None:
        cond = src.cond[idx]
    else:
        from edgediff.passes.prune_data import random_cond
        cond = random_cond(model, n, g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, model.schedule.num_train_timesteps, (n,), generator=g)
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    if isinstance(cond, dict):
        cond = {k: v.to(device) for k, v in cond.items()}
    elif cond is not None:
        cond = cond.to(device)
    # the model's own forward process (alphas, flow sigmas or EDM preconditioning)
    xt, t_in, target = model.schedule.training_example(x0, noise, t)
    kw = call_kwargs(model, cond)
    out = train_mod(xt, t_in, **kw)
    c = x0.shape[1]
    loss = denoise * torch.nn.functional.mse_loss(out[:, :c], target)
    if t_mod is not None:
        with torch.no_grad():
            t_out = t_mod(xt, t_in, **kw)
        loss = loss + distill * torch.nn.functional.mse_loss(out, t_out)
    return loss


@register("finetune", FinetuneOptions)
def run(model: DiffusionModel, opts: FinetuneOptions, ctx: PassContext) -> DiffusionModel:
    from edgediff.passes.prune_diff import check_prunable

    if model.config is None:
        check_prunable(model)  # same message: an exported graph cannot be trained here
    teacher = ctx.original if ctx.original is not None and ctx.original is not model else None
    info = finetune(model, opts, teacher, seed=ctx.seed, track=ctx.track, log=ctx.log, given=ctx.data)
    ctx.metrics.update(info)
    return model


# --------------------------------------------------------------------------------------------
# command line: python -m edgediff.passes.finetune / torchrun -m edgediff.passes.finetune


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from edgediff import pipeline
    from edgediff.artifact import write_artifact
    from edgediff.errors import EdgediffError
    from edgediff.loaders import load_model
    from edgediff.recipe import PassSpec, Recipe

    ap = argparse.ArgumentParser(prog="edgediff.passes.finetune", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="artifact directory or model (anything `edgediff compress` takes)")
    ap.add_argument("-o", "--out", required=True, help="output artifact directory")
    ap.add_argument("--steps", type=int, default=FinetuneOptions.steps)
    ap.add_argument("--batch-size", type=int, default=FinetuneOptions.batch_size)
    ap.add_argument("--lr", type=float, default=FinetuneOptions.lr)
    ap.add_argument("--ema", type=float, default=FinetuneOptions.ema)
    ap.add_argument("--distill", type=float, default=FinetuneOptions.distill)
    ap.add_argument("--teacher", default=None, help="unpruned model to distil from (default: none)")
    ap.add_argument("--data", default="auto", choices=DATA_SOURCES)
    ap.add_argument("--data-pool", type=int, default=FinetuneOptions.data_pool,
                    help="generated samples when --data samples")
    ap.add_argument("--checkpoint-dir", default="")
    ap.add_argument("--checkpoint-every", type=int, default=FinetuneOptions.checkpoint_every)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank, _ = _dist()
    try:
        # a thin wrapper: a one-pass recipe through the pass manager, like `edgediff compress`
        options = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
                   "distill": args.distill if args.teacher else 0.0, "data": args.data, "data_pool": args.data_pool,
                   "checkpoint_dir": args.checkpoint_dir, "checkpoint_every": args.checkpoint_every}
        recipe = Recipe("finetune", passes=[PassSpec("finetune", options)], source="edgediff.passes.finetune")
        model = load_model(args.model)
        out = Path(args.out)
        if out.exists() and not args.force:
            raise BadInput(f"{out}: already exists (use --force to replace it)")
        teacher = load_model(args.teacher) if args.teacher else None
        log = (lambda m: print(m, file=sys.stderr)) if rank == 0 else None
        result, records = pipeline.run_recipe(model, recipe, args.seed, log=log, original=teacher)
        if rank == 0:
            write_artifact(result, out, pipeline.manifest_of(model, result, recipe, args.seed, records), force=args.force)
            print(json.dumps({"out": str(out), **records[0].metrics}))
    except EdgediffError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if distributed:
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
