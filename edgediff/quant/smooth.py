"""SmoothQuant-style scale migration: per-channel activation outliers moved into the weights.

Real trained networks carry a few input channels of a projection that are orders of magnitude
larger than the rest; one per-tensor activation scale then either clips them or rounds every
other channel to zero. SmoothQuant (Xiao et al. 2023) divides channel j of the activation by
s_j = max|X_j|^alpha / max|W[:, j]|^(1 - alpha) and multiplies the weights' column j by s_j.

Here the division is folded into the affine of the normalisation that produces the activation
(LayerNorm, or GroupNorm acting per channel), so the graph is unchanged and every exporter
runs the smoothed model as it is: attention's group_norm -> to_q/to_k/to_v, a transformer
block's norm1/norm2/norm3 -> the projections behind them, GroupNorm -> a 1x1 proj_in. Pairs are
found by tracing (a Linear / 1x1 Conv2d whose input shares storage with a norm's output and
has its channel count), and the float function is checked on a calibration batch after each
group: a group whose output changes (the norm's output had another consumer) is reverted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

NORMS = (nn.LayerNorm, nn.GroupNorm)


def _consumer_ok(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) == (1, 1)


def _channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _norm_channels(m: nn.Module) -> int | None:
    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)
        ok = m.elementwise_affine and len(shape) == 1 and m.weight is not None and m.bias is not None
        return int(shape[0]) if ok else None
    if isinstance(m, nn.GroupNorm) and m.affine:
        return int(m.num_channels)
    return None


@torch.no_grad()
def find_pairs(den: nn.Module, calls: Callable[[], Any]) -> dict[str, list[str]]:
    """norm module name -> names of the Linear/1x1 Conv2d layers that read its output directly.

    `calls()` yields zero-argument callables, each running the model once; the first is used.
    """
    outs: dict[int, tuple[str, int]] = {}
    keep: list[torch.Tensor] = []  # hold the norms' outputs so their storage is not reused
    found: dict[str, list[str]] = {}
    handles = []

    def norm_hook(name: str, c: int) -> Any:
        def post(_m: nn.Module, _a: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                outs[out.untyped_storage().data_ptr()] = (name, c)
                keep.append(out)
        return post

    def cons_hook(name: str, m: nn.Module) -> Any:
        def pre(_m: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            hit = outs.get(x.untyped_storage().data_ptr())
            if hit is not None and hit[1] == _channels(m) and name not in found.setdefault(hit[0], []):
                found[hit[0]].append(name)
        return pre

    for name, m in den.named_modules():
        c = _norm_channels(m)
        if c is not None:
            handles.append(m.register_forward_hook(norm_hook(name, c)))
        elif _consumer_ok(m):
            handles.append(m.register_forward_pre_hook(cons_hook(name, m)))
    try:
        next(iter(calls()))()
    finally:
        for h in handles:
            h.remove()
    return {k: v for k, v in found.items() if v}


def _col_view(m: nn.Module, s: torch.Tensor) -> torch.Tensor:
    return s.view(1, -1) if isinstance(m, nn.Linear) else s.view(1, -1, 1, 1)


@torch.no_grad()
def act_absmax(den: nn.Module, layers: list[str], calls: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each named layer over every calibration call."""
    got: dict[str, torch.Tensor] = {}
    handles = []

    def pre_for(name: str, m: nn.Module) -> Any:
        def pre(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            a = x.abs().flatten(0, -2).amax(0) if isinstance(m, nn.Linear) else x.abs().transpose(0, 1).flatten(1).amax(1)
            got[name] = torch.maximum(got[name], a) if name in got else a
        return pre

    for name in layers:
        m = den.get_submodule(name)
        handles.append(m.register_forward_pre_hook(pre_for(name, m)))
    try:
        for call in calls():
            call()
    finally:
        for h in handles:
            h.remove()
    return got


def _outlier_ratio(a: torch.Tensor) -> float:
    """max over median of the per-channel ranges: how far the largest channel stands out."""
    med = float(a.median())
    return round(float(a.max()) / med, 2) if med > 0 else float("inf")


@torch.no_grad()
def smooth(den: nn.Module, calls: Callable[[], Any], check: Callable[[], torch.Tensor], alpha: float = 0.5,
           tol: float = 1e-4) -> dict[str, Any]:
    """Migrate activation outliers into the weights in place; returns what was done.

    `check()` runs the model on a fixed batch and returns its output (the float function must
    not change beyond `tol`, relative to the output's max).
    """
    pairs = find_pairs(den, calls)
    amax = act_absmax(den, sorted({c for cs in pairs.values() for c in cs}), calls)
    base = check()
    scale = float(base.abs().max()) or 1.0
    done, reverted = [], []
    for norm_name, cons in sorted(pairs.items()):
        if any(c not in amax for c in cons):
            continue
        norm = den.get_submodule(norm_name)
        a = torch.stack([amax[c] for c in cons]).amax(0)
        mods = [den.get_submodule(c) for c in cons]
        w = torch.stack([m.weight.detach().abs().flatten(2).amax(2).amax(0) if isinstance(m, nn.Conv2d)
                         else m.weight.detach().abs().amax(0) for m in mods]).amax(0)
        s = (a.clamp_min(1e-8).pow(alpha) / w.clamp_min(1e-8).pow(1 - alpha)).clamp(1e-4, 1e4)
        s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
        saved = [norm.weight.detach().clone(), norm.bias.detach().clone()] + [m.weight.detach().clone() for m in mods]
        norm.weight.div_(s)
        norm.bias.div_(s)
        for m in mods:
            m.weight.mul_(_col_view(m, s))
        err = float((check() - base).abs().max()) / scale
        rec = {"norm": norm_name, "layers": cons, "outlier_ratio_before": _outlier_ratio(a),
               "outlier_ratio_after": _outlier_ratio(a / s)}
        if err > tol:  # the norm's output has a consumer the trace did not see: undo
            norm.weight.copy_(saved[0])
            norm.bias.copy_(saved[1])
            for m, wv in zip(mods, saved[2:]):
                m.weight.copy_(wv)
            reverted.append({**rec, "relative_change": err})
        else:
            done.append(rec)
    return {"alpha": alpha, "smoothed": done, "reverted": reverted}
