"""BRECQ-style block reconstruction with AdaRound weights and LSQ-style activation steps.

For each block (a ResnetBlock2D, an attention block, a transformer block, a down/upsampler,
the time embedding, or a lone layer), in execution order:
  - inputs: what the block receives in the *quantized* model, whose earlier blocks are already
    reconstructed (BRECQ/Q-Diffusion: errors of earlier blocks are seen and compensated);
  - target: what the same block outputs in the *float* model on the float model's inputs;
  - optimise AdaRound's rounding variables of every weight in the block and the step sizes of
    its activation quantizers to minimise the output MSE, plus AdaRound's rounding
    regulariser with beta annealed from 20 to 2 after a 20% warm-up;
  - harden the rounding (the float weights are then on the quantization grid).
The output-MSE objective is BRECQ's without the Fisher weighting (no labels/loss here).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgediff.quant.core import ActQuantizer, _QuantLayer

BLOCK_CLASSES = {"ResnetBlock2D", "Attention", "BasicTransformerBlock", "Downsample2D", "Upsample2D",
                 "TimestepEmbedding", "FeedForward"}


@dataclass
class ReconConfig:
    iters: int = 100  # per block
    batch_size: int = 16
    lr: float = 1e-2  # AdaRound alphas (BRECQ uses 1e-3 over 20k iterations; our budgets are ~100x shorter)
    act_lr: float = 1e-2  # relative to each quantizer's initial step
    round_weight: float = 0.01  # lambda of the rounding regulariser
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    learn_act: bool = True


class _Stop(Exception):
    pass


def find_blocks(denoiser: nn.Module) -> list[str]:
    """Outermost block-class modules holding a quant wrapper, plus wrappers outside any block."""
    names = [n for n, m in denoiser.named_modules() if n and type(m).__name__ in BLOCK_CLASSES]
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    wrappers = [n for n, m in denoiser.named_modules() if isinstance(m, _QuantLayer)]
    blocks = [b for b in outer if any(w.startswith(b + ".") for w in wrappers)]
    blocks += [w for w in wrappers if not any(w.startswith(b + ".") for b in blocks)]
    return blocks


@torch.no_grad()
def execution_order(denoiser: nn.Module, blocks: list[str], run_one: Callable[[], Any]) -> list[str]:
    seen: list[str] = []
    handles = []
    for b in blocks:
        m = denoiser.get_submodule(b)
        handles.append(m.register_forward_pre_hook(lambda mod, args, b=b: seen.append(b) if b not in seen else None))
    try:
        run_one()
    finally:
        for h in handles:
            h.remove()
    never = [b for b in blocks if b not in seen]
    return seen + never


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(x) for x in v)
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v


@torch.no_grad()
def capture(root: nn.Module, block: nn.Module, run_batches: Callable[[], Any], what: str) -> list[Any]:
    """Per calibration batch: the block's (args, kwargs) ("inputs") or its output ("output").

    The forward is cut short right after the block, so later blocks cost nothing.
    """
    got: list[Any] = []

    if what == "inputs":
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            got.append((_detach(args), _detach(kwargs)))
            raise _Stop
        h = block.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(mod: nn.Module, args: tuple, out: Any) -> None:
            got.append(_detach(out[0] if isinstance(out, (tuple, list)) else out))
            raise _Stop
        h = block.register_forward_hook(post)
    try:
        for call in run_batches():
            try:
                call()
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def reconstruct_block(qblock: nn.Module, inputs: list[Any], targets: list[torch.Tensor], cfg: ReconConfig,
                      seed: int = 0) -> dict[str, float]:
    layers = [m for m in qblock.modules() if isinstance(m, _QuantLayer)]

    def loss_on(i: int, reduce: str = "mean") -> torch.Tensor:
        args, kwargs = inputs[i]
        out = qblock(*args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        d = (out - targets[i]) ** 2
        # BRECQ's scaling: squared error summed per sample, averaged over the batch
        return d.flatten(1).sum(1).mean() if reduce == "sum" else d.mean()

    # the starting point (nearest rounding, initial steps), to compare with and fall back to
    with torch.no_grad():
        before = float(sum(loss_on(i) for i in range(len(inputs))) / max(len(inputs), 1))
        saved = {k: v.detach().clone() for k, v in qblock.state_dict().items()}
    alphas = [m.wq.start_adaround(m.inner.weight) for m in layers if m.wq.enabled]
    acts = [q for q in qblock.modules() if isinstance(q, ActQuantizer)
            if cfg.learn_act and not q.disabled and q.fixed_range is None] if cfg.learn_act else []
    groups: list[dict[str, Any]] = []
    if alphas:
        groups.append({"params": alphas, "lr": cfg.lr})
    for q in acts:
        q.scale.requires_grad_(True)
        groups.append({"params": [q.scale], "lr": cfg.act_lr * float(q.scale.detach().abs())})
    rng = random.Random(seed)


    if groups and cfg.iters > 0:
        opt = torch.optim.Adam(groups)
        warm = int(cfg.warmup * cfg.iters)
        for it in range(cfg.iters):
            i = rng.randrange(len(inputs))
            loss = loss_on(i, "sum")
            if alphas and it >= warm:
                # beta annealed from high (free rounding) to low (forces a 0/1 decision)
                frac = (it - warm) / max(cfg.iters - warm, 1)
                beta = cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * (1 - frac)
                reg = sum(m.wq.round_loss(beta) for m in layers if m.wq.alpha is not None)
                loss = loss + cfg.round_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        for m in layers:
            if m.wq.alpha is not None:
                m.inner.weight.copy_(m.wq.finish_adaround(m.inner.weight))
        for q in acts:
            q.scale.requires_grad_(False)
            q.scale.abs_()
        after = float(sum(loss_on(i) for i in range(len(inputs))) / max(len(inputs), 1))
        reverted = after > before
        if reverted:
            # a short budget can end worse than nearest rounding: keep the better of the two
            qblock.load_state_dict(saved)
            for m in layers:
                m.inner.weight.copy_(m.wq(m.inner.weight))
    return {"mse_before": before, "mse_after": min(after, before), "reverted": float(reverted)}
