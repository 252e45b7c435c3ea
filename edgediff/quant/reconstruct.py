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

from edgediff.quant.core import ActQuantizer, QuantLayer

BLOCK_CLASSES = {"ResnetBlock2D", "Attention", "BasicTransformerBlock", "Downsample2D", "Upsample2D",
                 "TimestepEmbedding", "FeedForward"}


@dataclass
class ReconConfig:
    iters: int = 1000  # stage 1 (AdaRound weights) iterations per block; Q-Diffusion runs 20k
    act_iters: int = 500  # stage 2 (activation steps, LSQ) iterations per block
    batch_size: int = 16
    lr: float = 1e-3  # AdaRound alphas (Q-Diffusion / BRECQ)
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
    wrappers = [n for n, m in denoiser.named_modules() if isinstance(m, QuantLayer)]
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


def recon_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and positions (BRECQ / Q-Diffusion).

    Channels are dim 1 of a (B, C, H, W) map and the last dim of (B, S, C) tokens. Summing over
    C x H x W instead would weaken the rounding regulariser by a factor H x W.
    """
    d = (out - target) ** 2
    if d.dim() <= 1:
        return d.mean()
    return d.sum(1).mean() if d.dim() == 4 else d.sum(-1).mean()


def _adaround_fraction_decided(layers: list[nn.Module]) -> float:
    """Share of AdaRound's soft rounding values already at 0 or 1 (decided), before hardening."""
    n = decided = 0
    for m in layers:
        if m.wq.alpha is not None:
            h = m.wq.h().detach()
            n += h.numel()
            decided += int(((h < 1e-3) | (h > 1 - 1e-3)).sum())
    return decided / n if n else 1.0


def reconstruct_block(qblock: nn.Module, inputs: list[Any], targets: list[torch.Tensor], cfg: ReconConfig,
                      seed: int = 0) -> dict[str, float]:
    """Q-Diffusion's reconstruction of one block, in two stages.

    Stage 1: AdaRound on the block's weights with its activations in float (the activation
    quantizers of the block are off), `iters` iterations, Adam at `lr`, beta annealed 20 -> 2
    after a `warmup` share, regulariser weight `round_weight`; then the rounding is hardened.
    Stage 2: the activation step sizes (LSQ) with the hardened weights, `act_iters` iterations.
    If the block ends worse than nearest rounding with the initial steps, that is restored
    ("reverted", counted by the caller).
    """
    layers = [m for m in qblock.modules() if isinstance(m, QuantLayer)]
    all_acts = [q for q in qblock.modules() if isinstance(q, ActQuantizer)]

    def loss_on(i: int) -> torch.Tensor:
        args, kwargs = inputs[i]
        out = qblock(*args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return recon_loss(out, targets[i])

    def mean_loss() -> float:
        return float(sum(loss_on(i) for i in range(len(inputs))) / max(len(inputs), 1))

    # the starting point (nearest rounding, initial steps), to compare with and fall back to
    with torch.no_grad():
        before = mean_loss()
        saved = {k: v.detach().clone() for k, v in qblock.state_dict().items()}
    rng = random.Random(seed)
    decided = 1.0

    # stage 1: weights, float activations
    alphas = [m.wq.start_adaround(m.inner.weight) for m in layers if m.wq.enabled]
    if alphas and cfg.iters > 0:
        modes = {q: q.mode for q in all_acts}
        for q in all_acts:
            q.mode = "off"
        try:
            opt = torch.optim.Adam(alphas, lr=cfg.lr)
            warm = int(cfg.warmup * cfg.iters)
            for it in range(cfg.iters):
                loss = loss_on(rng.randrange(len(inputs)))
                if it >= warm:
                    # beta annealed from high (free rounding) to low (forces a 0/1 decision)
                    frac = (it - warm) / max(cfg.iters - warm, 1)
                    beta = cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * (1 - frac)
                    reg = sum(m.wq.round_loss(beta) for m in layers if m.wq.alpha is not None)
                    loss = loss + cfg.round_weight * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            for q, mode in modes.items():
                q.mode = mode
        decided = _adaround_fraction_decided(layers)
    with torch.no_grad():
        for m in layers:
            if m.wq.alpha is not None:
                m.inner.weight.copy_(m.wq.finish_adaround(m.inner.weight))

    # stage 2: activation step sizes on the hardened weights
    acts = [q for q in all_acts if cfg.learn_act and not q.disabled and q.fixed_range is None and q.mode == "quant"]
    if acts and cfg.act_iters > 0:
        for q in acts:
            q.scale.requires_grad_(True)
        opt = torch.optim.Adam([{"params": [q.scale], "lr": cfg.act_lr * float(q.scale.detach().abs())} for q in acts])
        for _ in range(cfg.act_iters):
            loss = loss_on(rng.randrange(len(inputs)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            for q in acts:
                q.scale.requires_grad_(False)
                q.scale.abs_()
    with torch.no_grad():
        after = mean_loss()
        reverted = after > before
        if reverted:
            # a short budget can end worse than nearest rounding: keep the better of the two
            qblock.load_state_dict(saved)
            for m in layers:
                m.inner.weight.copy_(m.wq(m.inner.weight))
    return {"mse_before": before, "mse_after": min(after, before), "reverted": float(reverted),
            "rounding_decided": decided}
