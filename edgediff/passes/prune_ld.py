"""Pass "prune.ld": LD-Pruner (Castells et al., CVPR-W 2024), operator-level pruning.

1. Enumerate operators that can be removed without changing any tensor shape:
   ResNet blocks (their shortcut stays: identity, or the 1x1 conv when channels change),
   residual attention blocks of UNets, and in transformer blocks (UNet2DConditionModel's
   Transformer2DModel, DiT) the whole block, its self-attention, its cross-attention and
   its feed-forward branch.
2. Generate the final samples of a fixed set of seeds (and fixed conditioning) with the
   unmodified model (Z) and with each operator removed in turn (Z_o), same sampler.
3. Score each operator by the shift in central tendency plus the shift in variability of
   the samples: ||mean(Z_o) - mean(Z)||_2 + ||std(Z_o) - std(Z)||_2, mean and std taken per
   element over the seeds. The score needs no task metric, which is the paper's point.
4. Remove operators in ascending score order until the MACs budget (`macs_reduction`) is
   met; by default (`order = "per_cost"`) in ascending score per MAC saved (per predicted ms
   under the latency budget: the greedy knapsack order), `order = "score"` as the paper; each
   removed operator becomes an edgediff stand-in module (skip_modules.py) so that
   the artifact reloads, and every other weight is kept as it was.

Operator level (`include = "convs"` or `"operators"`): single 3x3 convolutions of ResNet blocks
are candidates too, replaced by a cheaper op, a 1x1 convolution whose weight is the sum of the
3x3 taps (exact on locally constant features; 1/9 of the MACs). With `rounds` > 1 the budget
is spent in that many rounds and the remaining candidates are re-scored on the pruned model
after each round (removals interact: the second-cheapest operator may matter once the first
is gone). With `include = "linears"` (or `"operators"`), every single Linear layer is a
candidate three ways (`linear_ops`): an identity where in and out features agree, its best
rank-r approximation (truncated SVD, r = `lowrank_ratio` of the full rank, only where that is
cheaper) and its removal (the output is the bias alone); the first of them that a round
accepts wins.

Budget (`budget`): `macs` (the default) removes until MACs drop by `macs_reduction`;
`latency` until the latency measured by edgediff's profiler (fp32 ONNX export, per-layer ms
from onnxruntime's own profiler, `latency_threads` threads) drops by `latency_reduction`.
Within a round a candidate's saving is predicted from the measured per-layer ms of the layers
it replaces, scaled by the share of their MACs it removes; the model is measured again after
each round, and rounds continue until the measured latency meets the budget.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, set_submodule
from edgediff.passes import PassContext, register
from edgediff.passes.prune_data import random_cond
from edgediff.passes.skip_modules import LinearBias, LowRankLinear, SkipAttention, SkipBlock, SkipResnet, ZeroBranch


@dataclass
class PruneLDOptions:
    macs_reduction: float = 0.3  # remove operators until MACs drop by at least this share, in (0, 1)
    samples: int = 16  # fixed seeds whose final samples are compared
    steps: int = 10  # DDIM steps per generation while scoring
    # which operator kinds are candidates: all (blocks and branches) | resnets | attention |
    # transformer | convs (single 3x3 convs -> 1x1) | linears (single Linear layers) | operators (all three)
    include: str = "all"
    rounds: int = 1  # budget spent in this many rounds, candidates re-scored after each
    linear_ops: str = "identity,lowrank,remove"  # replacements tried for a single Linear layer
    lowrank_ratio: float = 0.25  # low-rank replacement: rank as a share of min(in, out)
    budget: str = "macs"  # macs | latency (measured by the profiler on onnxruntime)
    latency_reduction: float = 0.3  # budget = latency: measured latency must drop by this share, in (0, 1)
    latency_threads: int = 1  # onnxruntime threads of the latency measurement
    latency_repeats: int = 20  # timed calls per measurement
    # per_cost: score per MAC (latency budget: per ms) saved, the greedy knapsack order; score: the paper's.
    # per_cost measured better on the demo at operator level (docs/pruning.md)
    order: str = "per_cost"


    def __post_init__(self) -> None:
        if not 0.0 < float(self.macs_reduction) < 1.0:
            raise BadInput(f"prune.ld: option macs_reduction={self.macs_reduction} must lie strictly between 0 and 1")
        if int(self.samples) < 2:
            raise BadInput(f"prune.ld: option samples={self.samples} must be >= 2 (a spread needs two samples)")
        if int(self.steps) < 1:
            raise BadInput(f"prune.ld: option steps={self.steps} must be >= 1")
        if self.include not in ("all", "resnets", "attention", "transformer", "convs", "linears", "operators"):
            raise BadInput(f"prune.ld: option include={self.include!r}; expected all, resnets, attention, transformer, "
                           "convs, linears or operators")
        ops = [o.strip() for o in str(self.linear_ops).split(",") if o.strip()]
        if not ops or set(ops) - set(LINEAR_OPS):
            raise BadInput(f"prune.ld: option linear_ops={self.linear_ops!r}; expected a comma-separated subset of "
                           f"{', '.join(LINEAR_OPS)}")
        if not 0.0 < float(self.lowrank_ratio) < 1.0:
            raise BadInput(f"prune.ld: option lowrank_ratio={self.lowrank_ratio} must lie strictly between 0 and 1")
        if self.budget not in ("macs", "latency"):
            raise BadInput(f"prune.ld: option budget={self.budget!r}; expected macs or latency")
        if not 0.0 < float(self.latency_reduction) < 1.0:
            raise BadInput(f"prune.ld: option latency_reduction={self.latency_reduction} must lie strictly between 0 "
                           "and 1")
        if int(self.latency_threads) < 1 or int(self.latency_repeats) < 1:
            raise BadInput("prune.ld: options latency_threads and latency_repeats must be >= 1")
        if self.order not in ("score", "per_cost"):
            raise BadInput(f"prune.ld: option order={self.order!r}; expected score or per_cost")
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or not 1 <= self.rounds <= 100:
            raise BadInput(f"prune.ld: option rounds={self.rounds!r} must be an integer in [1, 100]")


LINEAR_OPS = ("identity", "lowrank", "remove")


@dataclass
class Candidate:
    name: str  # module path inside the denoiser
    kind: str  # resnet | attention | block | attn1 | attn2 | ff | conv1x1 | linear_identity | linear_lowrank | linear_remove
    rank: int = 0  # linear_lowrank: the rank of the factorisation

    def replacement(self, module: nn.Module) -> nn.Module:
        if self.kind == "linear_identity":
            return nn.Identity()
        if self.kind == "linear_lowrank":
            return LowRankLinear.replacing(module, self.rank)
        if self.kind == "linear_remove":
            return LinearBias.replacing(module)
        if self.kind == "resnet":
            return SkipResnet.replacing(module)
        if self.kind == "attention":
            return SkipAttention(float(module.rescale_output_factor))
        if self.kind == "block":
            return SkipBlock()
        if self.kind == "conv1x1":
            return conv_to_1x1(module)
        return ZeroBranch()


def _is_3x3_same(m: nn.Module) -> bool:
    """A 3x3, stride 1, padding 1, ungrouped conv: a 1x1 conv in its place keeps every shape."""
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3) and tuple(m.stride) == (1, 1)
            and tuple(m.padding) == (1, 1) and tuple(m.dilation) == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros")


@torch.no_grad()
def conv_to_1x1(conv: nn.Conv2d) -> nn.Conv2d:
    """The 1x1 conv whose weight is the sum of the 3x3 taps (same output on constant features)."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
    new.weight.copy_(conv.weight.sum((2, 3), keepdim=True))
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new.to(conv.weight.dtype)


def linear_candidates(name: str, lin: nn.Linear, ops: tuple[str, ...], lowrank_ratio: float) -> list[Candidate]:
    """The cheaper stand-ins of one Linear layer that keep its output shape."""
    out: list[Candidate] = []
    n_in, n_out = lin.in_features, lin.out_features
    if "identity" in ops and n_in == n_out:
        out.append(Candidate(name, "linear_identity"))
    rank = max(1, round(lowrank_ratio * min(n_in, n_out)))
    if "lowrank" in ops and rank * (n_in + n_out) < n_in * n_out:
        out.append(Candidate(name, "linear_lowrank", rank))
    if "remove" in ops:
        out.append(Candidate(name, "linear_remove"))
    return out


def _inner(model: DiffusionModel) -> nn.Module:
    return model.denoiser.inner if hasattr(model.denoiser, "inner") else model.denoiser


def candidates(model: DiffusionModel, include: str = "all", linear_ops: str = "identity,lowrank,remove",
               lowrank_ratio: float = 0.25) -> list[Candidate]:
    """Operators of the denoiser that can be removed (or made cheaper) while keeping every shape."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    out: list[Candidate] = []
    inner = _inner(model)
    for name, m in inner.named_modules():
        parent = name.rpartition(".")[0]
        in_block = any(name.startswith(p) for p in ("down_blocks.", "up_blocks.", "mid_block."))
        if isinstance(m, ResnetBlock2D):
            # resnets that resample inside (up/down flags) change the spatial shape: not removable
            plain = in_block and not getattr(m, "up", False) and not getattr(m, "down", False)
            if plain and include in ("all", "resnets", "operators"):
                out.append(Candidate(name, "resnet"))
            if plain and include in ("convs", "operators"):
                out.extend(Candidate(f"{name}.{c}", "conv1x1") for c in ("conv1", "conv2")
                           if _is_3x3_same(getattr(m, c, None)))
        elif isinstance(m, Attention) and include in ("all", "attention", "operators"):
            if m.residual_connection and in_block and not isinstance(inner.get_submodule(parent) if parent else inner,
                                                                     BasicTransformerBlock):
                out.append(Candidate(name, "attention"))
        elif isinstance(m, BasicTransformerBlock) and include in ("all", "transformer", "operators"):
            # DiT reads its final adaLN conditioning from transformer_blocks[0].norm1: that block stays
            if not (name == "transformer_blocks.0" and model.arch.startswith("DiT")):
                out.append(Candidate(name, "block"))
            for sub in ("attn1", "attn2", "ff"):
                if isinstance(getattr(m, sub, None), nn.Module):
                    out.append(Candidate(f"{name}.{sub}", sub))
        if type(m) is nn.Linear and include in ("linears", "operators"):
            ops = tuple(o.strip() for o in linear_ops.split(",") if o.strip())
            out.extend(linear_candidates(name, m, ops, float(lowrank_ratio)))
    return out


@torch.no_grad()
def _generate(model: DiffusionModel, n: int, steps: int, seed: int, cond: torch.Tensor | None) -> torch.Tensor:
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    return sample(TorchDenoiser(model), model.schedule, tuple(model.signature.sample_shape), n, seed=seed,
                  cfg=SamplerConfig(None, steps=steps, batch_size=n), cond=cond)


def ld_score(z_mod: torch.Tensor, z_ref: torch.Tensor) -> float:
    """Shift in central tendency + shift in variability, per element over the sample set."""
    d_mean = torch.linalg.vector_norm(z_mod.mean(0) - z_ref.mean(0))
    d_std = torch.linalg.vector_norm(z_mod.std(0) - z_ref.std(0))
    return float(d_mean + d_std)


def score_candidates(model: DiffusionModel, cands: list[Candidate], opts: PruneLDOptions, ctx: PassContext
                     ) -> list[tuple[Candidate, float]]:
    inner = _inner(model)
    g = torch.Generator().manual_seed(ctx.seed + 11)
    cond = random_cond(model, opts.samples, g)
    z_ref = _generate(model, opts.samples, opts.steps, ctx.seed, cond)
    scored = []
    for c in ctx.track(cands, "LD-Pruner: scoring operators"):
        old = inner.get_submodule(c.name)
        set_submodule(inner, c.name, c.replacement(old))
        try:
            z = _generate(model, opts.samples, opts.steps, ctx.seed, cond)
        finally:
            set_submodule(inner, c.name, old)
        s = ld_score(z, z_ref)
        scored.append((c, s if torch.isfinite(torch.tensor(s)) else float("inf")))
    return scored


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def measure_latency(model: DiffusionModel, threads: int = 1, repeats: int = 20) -> tuple[float, list[dict[str, Any]]]:
    """Best-of ms of one denoiser call and the per-layer rows ({name, ms, macs}) of edgediff's profiler:
    the fp32 ONNX export run on onnxruntime's CPU provider, layer times from its own profiler.

    The minimum, not the median: on a shared machine the spread is other processes' load, and a
    budget decision must not follow it."""
    from edgediff.profiling.graph import onnx_ops
    from edgediff.profiling.ort import profile_ort
    from edgediff.profiling.run import attach_work, export_onnx

    with tempfile.TemporaryDirectory(prefix="edgediff-ld-latency-") as tmp:
        path = Path(tmp) / "denoiser.onnx"
        export_onnx(model, path)
        res = profile_ort(path, warmup=3, repeats=repeats, threads=threads)
        attach_work(res, onnx_ops(path))
    return float(res["total"]["min_ms"]), list(res["layers"])


def predicted_saving_ms(name: str, macs_saved: int, layers: list[dict[str, Any]]) -> float:
    """Measured ms of the layers under `name`, times the share of their MACs the replacement removes.

    A runtime may fuse a module into an ancestor's node (ORT names a resnet's Conv+Add after the
    resnet): a module without measured layers of its own takes its nearest measured ancestor's."""
    under = [la for la in layers if la["name"] == name or la["name"].startswith(name + ".")]
    if not under:
        by_name = {la["name"]: la for la in layers}
        k = name
        while k and k not in by_name:
            k = k.rpartition(".")[0]
        under = [by_name[k]] if k in by_name else []
    ms = sum(float(la["ms"]) for la in under)
    work = sum(int(la.get("macs", 0)) for la in under)
    if work <= 0:
        return ms if macs_saved > 0 else 0.0
    return ms * min(1.0, max(0.0, macs_saved / work))


def candidate_savings(model: DiffusionModel, cands: list[Candidate], layers: list[dict[str, Any]] | None = None
                      ) -> dict[int, float]:
    """id(candidate) -> what replacing it alone saves on the model as it is: MACs, or (given the
    profiler's per-layer rows) predicted ms. Each replacement is put in and taken out again."""
    from edgediff.metrics import macs

    inner = _inner(model)
    base = macs(model)
    out: dict[int, float] = {}
    for c in cands:
        original = inner.get_submodule(c.name)
        set_submodule(inner, c.name, c.replacement(original))
        try:
            saved = base - macs(model)
        finally:
            set_submodule(inner, c.name, original)
        out[id(c)] = predicted_saving_ms(c.name, saved, layers) if layers is not None else float(saved)
    return out


@register("prune.ld", PruneLDOptions, must_precede=("calib", "quant", "ptqd"))
def run(model: DiffusionModel, opts: PruneLDOptions, ctx: PassContext) -> DiffusionModel:
    from edgediff.metrics import macs, params
    from edgediff.passes.prune_diff import check_prunable

    check_prunable(model)
    cands = candidates(model, opts.include, opts.linear_ops, opts.lowrank_ratio)
    if not cands:
        raise BadInput(f"prune.ld: {model.arch} has no removable operator (no ResNet block, residual attention or "
                       f"transformer block{'' if opts.include == 'all' else ' of kind ' + opts.include})")
    inner = _inner(model)
    by_latency = opts.budget == "latency"
    threads, repeats = int(opts.latency_threads), int(opts.latency_repeats)
    base_macs, base_params = macs(model), params(model.module())
    # can the budget be met at all? apply the first replacement of every non-nested candidate and count
    trial = model.clone()
    t_inner = _inner(trial)
    removed_all: list[str] = []
    # replacements that leave work behind (low rank, 1x1) last: a full removal of the same layer goes first
    for c in sorted(cands, key=lambda c: c.kind in ("linear_lowrank", "conv1x1")):
        if any(_overlaps(c.name, r) for r in removed_all):
            continue
        set_submodule(t_inner, c.name, c.replacement(t_inner.get_submodule(c.name)))
        removed_all.append(c.name)
    if by_latency:
        base_ms, layers = measure_latency(model, threads, repeats)
        best_ms, _ = measure_latency(trial, threads, repeats)
        if 1 - best_ms / base_ms < opts.latency_reduction:
            raise BadInput(f"prune.ld: latency_reduction={opts.latency_reduction} cannot be met: removing all "
                           f"{len(removed_all)} removable operators of this {model.arch} takes its measured latency "
                           f"only from {base_ms:.3f} to {best_ms:.3f} ms ({1 - best_ms / base_ms:.1%})")
        base_cost, target = base_ms, base_ms * (1 - opts.latency_reduction)
    else:
        best = 1 - macs(trial) / base_macs
        if best < opts.macs_reduction:
            raise BadInput(f"prune.ld: macs_reduction={opts.macs_reduction} cannot be met: removing all "
                           f"{len(removed_all)} removable operators of this {model.arch} saves only {best:.1%} of "
                           "its MACs")
        base_cost, target = float(base_macs), base_macs * (1 - opts.macs_reduction)
    del trial
    removed: list[dict[str, Any]] = []
    current_macs, cost = base_macs, base_cost  # cost: MACs, or (predicted, then measured) ms
    round_scores: list[dict[str, float]] = []
    measured: list[float] = [base_cost] if by_latency else []
    # a latency budget keeps going after the planned rounds until the measurement meets it
    max_rounds = opts.rounds + (8 if by_latency else 0)
    for rnd in range(max_rounds):
        left = [c for c in cands if not any(_overlaps(c.name, r["name"]) for r in removed)]
        if cost <= target or not left:
            break
        scored = score_candidates(model, left, opts, ctx)  # on the model as pruned so far
        round_scores.append({f"{c.name}:{c.kind}" if c.kind.startswith("linear_") else c.name: round(s, 6)
                             for c, s in scored})
        # this round's share of the budget (the last planned round and later ones: all that is left)
        last = rnd >= opts.rounds - 1
        goal = target if last else base_cost - (base_cost - target) * (rnd + 1) / opts.rounds
        if opts.order == "per_cost":
            saving = candidate_savings(model, [c for c, _ in scored], layers if by_latency else None)
            order = sorted(scored, key=lambda cs: cs[1] / saving[id(cs[0])] if saving[id(cs[0])] > 0 else float("inf"))
        else:
            order = sorted(scored, key=lambda cs: cs[1])
        for c, s in order:
            if cost <= goal:
                break
            if any(_overlaps(c.name, r["name"]) for r in removed):
                continue
            set_submodule(inner, c.name, c.replacement(inner.get_submodule(c.name)))
            new_macs = macs(model)
            entry = {"name": c.name, "kind": c.kind, "score": round(s, 6), "macs_saved": current_macs - new_macs,
                     "round": rnd}
            if c.rank:
                entry["rank"] = c.rank
            if by_latency:
                saved = predicted_saving_ms(c.name, current_macs - new_macs, layers)
                entry["predicted_ms_saved"] = round(saved, 4)
                cost -= saved
            else:
                cost = float(new_macs)
            removed.append(entry)
            current_macs = new_macs
        if by_latency:  # the prediction is only a guide: measure the model as pruned so far
            cost, layers = measure_latency(model, threads, repeats)
            measured.append(cost)
    model.denoiser.eval()
    info: dict[str, Any] = {
        "candidates": len(cands), "removed": removed, "rounds": len(round_scores),
        "scores": round_scores[0] if round_scores else {}, "round_scores": round_scores,
        "params_before": base_params, "params_after": params(model.module()), "budget": opts.budget,
        "order": opts.order,
        "macs_before": base_macs, "macs_after": current_macs, "macs_reduction": round(1 - current_macs / base_macs, 4)}
    if by_latency:
        info.update({"latency_ms_before": round(base_cost, 4), "latency_ms_after": round(cost, 4),
                     "latency_reduction": round(1 - cost / base_cost, 4), "latency_measured_ms": measured,
                     "latency_met": bool(cost <= target),
                     "latency_runtime": f"onnxruntime CPU, {threads} thread(s), fp32 ONNX, best of {repeats} calls"})
        if cost > target:
            ctx.log(f"prune.ld: measured latency {cost:.3f} ms is above the budget's {target:.3f} ms after "
                    f"{len(round_scores)} rounds (removing more ran out of candidates or rounds)")
    ctx.metrics.update(info)
    model.provenance.setdefault("pruning", []).append({"pass": "prune.ld", "removed": [r["name"] for r in removed]})
    tail = f", latency {base_cost:.3f} -> {cost:.3f} ms" if by_latency else ""
    ctx.log(f"prune.ld: removed {len(removed)} of {len(cands)} operators, MACs {base_macs:,} -> {current_macs:,}{tail}")
    return model
