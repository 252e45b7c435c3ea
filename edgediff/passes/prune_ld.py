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
   met; each removed operator becomes an edgediff stand-in module (skip_modules.py) so that
   the artifact reloads, and every other weight is kept as it was.

Operator level (`include = "convs"` or `"operators"`): single 3x3 convolutions of ResNet blocks
are candidates too, replaced by a cheaper op, a 1x1 convolution whose weight is the sum of the
3x3 taps (exact on locally constant features; 1/9 of the MACs). With `rounds` > 1 the budget
is spent in that many rounds and the remaining candidates are re-scored on the pruned model
after each round (removals interact: the second-cheapest operator may matter once the first
is gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, set_submodule
from edgediff.passes import PassContext, register
from edgediff.passes.prune_data import random_cond
from edgediff.passes.skip_modules import SkipAttention, SkipBlock, SkipResnet, ZeroBranch


@dataclass
class PruneLDOptions:
    macs_reduction: float = 0.3  # remove operators until MACs drop by at least this share, in (0, 1)
    samples: int = 16  # fixed seeds whose final samples are compared
    steps: int = 10  # DDIM steps per generation while scoring
    # which operator kinds are candidates: all (blocks and branches) | resnets | attention |
    # transformer | convs (single 3x3 convs -> 1x1) | operators (all + convs)
    include: str = "all"
    rounds: int = 1  # budget spent in this many rounds, candidates re-scored after each

    def __post_init__(self) -> None:
        if not 0.0 < float(self.macs_reduction) < 1.0:
            raise BadInput(f"prune.ld: option macs_reduction={self.macs_reduction} must lie strictly between 0 and 1")
        if int(self.samples) < 2:
            raise BadInput(f"prune.ld: option samples={self.samples} must be >= 2 (a spread needs two samples)")
        if int(self.steps) < 1:
            raise BadInput(f"prune.ld: option steps={self.steps} must be >= 1")
        if self.include not in ("all", "resnets", "attention", "transformer", "convs", "operators"):
            raise BadInput(f"prune.ld: option include={self.include!r}; expected all, resnets, attention, transformer, "
                           "convs or operators")
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or not 1 <= self.rounds <= 100:
            raise BadInput(f"prune.ld: option rounds={self.rounds!r} must be an integer in [1, 100]")


@dataclass
class Candidate:
    name: str  # module path inside the denoiser
    kind: str  # resnet | attention | block | attn1 | attn2 | ff

    def replacement(self, module: nn.Module) -> nn.Module:
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


def _inner(model: DiffusionModel) -> nn.Module:
    return model.denoiser.inner if hasattr(model.denoiser, "inner") else model.denoiser


def candidates(model: DiffusionModel, include: str = "all") -> list[Candidate]:
    """Operators of the denoiser that can be removed while keeping every shape."""
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


@register("prune.ld", PruneLDOptions, must_precede=("calib", "quant", "ptqd"))
def run(model: DiffusionModel, opts: PruneLDOptions, ctx: PassContext) -> DiffusionModel:
    from edgediff.metrics import macs, params
    from edgediff.passes.prune_diff import check_prunable

    check_prunable(model)
    cands = candidates(model, opts.include)
    if not cands:
        raise BadInput(f"prune.ld: {model.arch} has no removable operator (no ResNet block, residual attention or "
                       f"transformer block{'' if opts.include == 'all' else ' of kind ' + opts.include})")
    inner = _inner(model)
    base_macs, base_params = macs(model), params(model.module())
    # can the budget be met at all? remove every non-nested candidate and count
    trial = model.clone()
    t_inner = _inner(trial)
    removed_all: list[str] = []
    for c in cands:
        if any(_overlaps(c.name, r) for r in removed_all):
            continue
        set_submodule(t_inner, c.name, c.replacement(t_inner.get_submodule(c.name)))
        removed_all.append(c.name)
    best = 1 - macs(trial) / base_macs
    if best < opts.macs_reduction:
        raise BadInput(f"prune.ld: macs_reduction={opts.macs_reduction} cannot be met: removing all {len(removed_all)} "
                       f"removable operators of this {model.arch} saves only {best:.1%} of its MACs")
    removed: list[dict[str, Any]] = []
    current = base_macs
    target = base_macs * (1 - opts.macs_reduction)
    round_scores: list[dict[str, float]] = []
    for rnd in range(opts.rounds):
        left = [c for c in cands if not any(_overlaps(c.name, r["name"]) for r in removed)]
        if current <= target or not left:
            break
        scored = score_candidates(model, left, opts, ctx)  # on the model as pruned so far
        round_scores.append({c.name: round(s, 6) for c, s in scored})
        # this round's share of the budget (the last round: all that is left)
        goal = target if rnd == opts.rounds - 1 else base_macs - (base_macs - target) * (rnd + 1) / opts.rounds
        for c, s in sorted(scored, key=lambda cs: cs[1]):
            if current <= goal:
                break
            if any(_overlaps(c.name, r["name"]) for r in removed):
                continue
            set_submodule(inner, c.name, c.replacement(inner.get_submodule(c.name)))
            new_macs = macs(model)
            removed.append({"name": c.name, "kind": c.kind, "score": round(s, 6), "macs_saved": current - new_macs,
                            "round": rnd})
            current = new_macs
    model.denoiser.eval()
    info = {"candidates": len(cands), "removed": removed, "rounds": len(round_scores),
            "scores": round_scores[0] if round_scores else {}, "round_scores": round_scores,
            "params_before": base_params, "params_after": params(model.module()),
            "macs_before": base_macs, "macs_after": current, "macs_reduction": round(1 - current / base_macs, 4)}
    ctx.metrics.update(info)
    model.provenance.setdefault("pruning", []).append({"pass": "prune.ld", "removed": [r["name"] for r in removed]})
    ctx.log(f"prune.ld: removed {len(removed)} of {len(cands)} operators, MACs {base_macs:,} -> {current:,}")
    return model
