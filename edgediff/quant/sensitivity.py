"""Per-layer sensitivity on final samples and the quality floor (the quant pass's `min_psnr_db`).

A unit is one quantized Conv2d/Linear wrapper or one quantized attention (its QK^T and
softmax·V operands). Sensitivity of a unit = PSNR of final samples with ONLY that unit
quantized (everything else float) against the float model: the lower, the more the unit's
quantization alone costs. The floor walks the units from the most sensitive, keeping them in
float, until the fully quantized model's final samples reach the floor again; the number kept
is found by doubling then bisection (about 2 log2(units) sample runs after the sweep).

What a raised unit costs is reported per unit: weight bytes (float32 instead of the integer
grid) and the roofline latency estimate of edgediff.profiling (int8 vs fp32 on one device,
batch 1), labelled estimated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgediff.quant.core import QuantAttnProcessor, QuantConv2d, QuantLinear, quant_layers

_LAYERS = (QuantConv2d, QuantLinear)


def units(den: nn.Module) -> dict[str, nn.Module]:
    """name -> quantized unit (wrappers, and attention processors that quantize something)."""
    return {n: m for n, m in quant_layers(den).items()
            if isinstance(m, _LAYERS) or (isinstance(m, QuantAttnProcessor)
                                              and any(not q.disabled for q in m.act_quantizers()))}


def set_quantized(unit: nn.Module, on: bool) -> None:
    """Switch one unit's quantization on or off (weights and every activation quantizer it owns)."""
    if isinstance(unit, _LAYERS):
        unit.wq.enabled = on
    for q in unit.act_quantizers():
        q.mode = "quant" if on and not q.disabled else "off"


def sensitivities(names: list[str], make_float: Callable[[list[str]], None],
                  psnr_of: Callable[[], float]) -> dict[str, float]:
    """PSNR with only each unit quantized (the others float); every unit quantized again after."""
    out: dict[str, float] = {}
    try:
        for name in names:
            make_float([n for n in names if n != name])
            out[name] = psnr_of()
    finally:
        make_float([])
    return out


def raise_until(order: list[str], make_float: Callable[[list[str]], None], psnr_of: Callable[[], float],
                floor_db: float, max_units: int | None = None) -> tuple[list[str], float, list[tuple[int, float]]]:
    """The fewest of `order` (most sensitive first) to keep in float so that psnr_of() >= floor_db.

    `make_float(names)` puts the model in the state "these units float, every other quantized".
    Returns (units kept in float, PSNR reached, [(count, PSNR) measured]) and leaves the model
    in the returned state. If even the first `max_units` miss the floor, those are returned with
    their PSNR.
    """
    limit = len(order) if max_units is None else min(max_units, len(order))
    tried: dict[int, float] = {}

    def at(k: int) -> float:
        make_float(order[:k])
        if k not in tried:
            tried[k] = psnr_of()
        return tried[k]

    lo, hi = 0, 1
    while hi < limit and at(hi) < floor_db:
        lo, hi = hi, min(2 * hi, limit)
    if at(hi) >= floor_db:
        while hi - lo > 1:  # at(lo) misses, at(hi) holds
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if at(mid) >= floor_db else (mid, hi)
    p = at(hi)
    return order[:hi], p, sorted(tried.items())


def toggler(us: dict[str, nn.Module]) -> Callable[[list[str]], None]:
    """make_float for raise_until by switching quantizers off (the pass swaps in float modules)."""
    def make_float(names: list[str]) -> None:
        off = set(names)
        for n, u in us.items():
            set_quantized(u, n not in off)
    return make_float


@torch.no_grad()
def unit_work(den: nn.Module, names: list[str], run_one: Callable[[], Any]) -> dict[str, dict[str, Any]]:
    """Per-sample MACs and tensor sizes of the named units over one model call (for cost estimates)."""
    work: dict[str, dict[str, Any]] = {}
    handles = []

    def layer_hook(name: str) -> Any:
        def post(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            b = max(int(out.shape[0]), 1)
            w = m.inner.weight
            per_out = w[0].numel()  # in/groups x kh x kw, or in_features
            rec = work.setdefault(name, {"op": "Conv" if w.dim() == 4 else "Gemm", "macs": 0, "in": 0, "out": 0,
                                         "weights": int(w.numel()), "weight_bits": int(m.wq.bits)})
            rec["macs"] += out.numel() // b * per_out
            rec["in"] += args[0].numel() // b
            rec["out"] += out.numel() // b
        return post

    def attn_hook(name: str) -> Any:
        def post(attn: nn.Module, args: tuple, out: torch.Tensor) -> None:
            q, k = args[0], args[1]
            b = max(int(q.shape[0]), 1)  # q, k: (batch, heads, tokens, head_dim)
            rec = work.setdefault(name, {"op": "MatMul", "macs": 0, "in": 0, "out": 0, "weights": 0, "weight_bits": 8})
            rec["macs"] += 2 * q.numel() // b * k.shape[-2]  # QK^T and softmax·V
            rec["in"] += (q.numel() + 2 * k.numel()) // b
            rec["out"] += q.numel() // b
        return post

    for name in names:
        m = den.get_submodule(name)
        if isinstance(m, _LAYERS):
            handles.append(m.register_forward_hook(layer_hook(name)))
        elif isinstance(m, QuantAttnProcessor):
            handles.append(_hook_qk(m, attn_hook(name)))
    try:
        run_one()
    finally:
        for h in handles:
            h.remove()
    return work


class _Handle:
    def __init__(self, m: QuantAttnProcessor) -> None:
        self.m = m

    def remove(self) -> None:
        self.m.__dict__.pop("qk", None)


def _hook_qk(m: QuantAttnProcessor, post: Callable[..., None]) -> _Handle:
    """Watch the processor's QK^T (q, k after head split) for one call."""
    orig = type(m).qk

    def qk(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out = orig(m, attn, q, k)
        post(attn, (q, k), out)
        return out

    m.__dict__["qk"] = qk
    return _Handle(m)


def cost(work: dict[str, dict[str, Any]], device: str) -> dict[str, Any]:
    """Bytes and estimated latency of keeping these units in float instead of int8 (batch 1)."""
    from edgediff.profiling.estimate import get_device, op_ms
    from edgediff.profiling.graph import OpWork

    dev = get_device(device)
    per: dict[str, dict[str, Any]] = {}
    for name, w in work.items():
        ms = {}
        for prec, nbytes in (("int8", 1), ("fp32", 4)):
            wb = w["weights"] * (w["weight_bits"] / 8 if prec == "int8" else 4)
            op = OpWork(name, name, w["op"], int(w["macs"]), int(w["in"] * nbytes), int(wb), int(w["out"] * nbytes),
                        prec)
            ms[prec] = op_ms(op, dev)[0]
        per[name] = {"extra_weight_bytes": int(w["weights"] * (4 - w["weight_bits"] / 8)),
                     "macs": int(w["macs"]), "est_ms_int8": round(ms["int8"], 4), "est_ms_fp32": round(ms["fp32"], 4)}
    return {"device": device, "estimated": True, "layers": per,
            "extra_weight_bytes": sum(p["extra_weight_bytes"] for p in per.values()),
            "extra_ms_per_call": round(sum(p["est_ms_fp32"] - p["est_ms_int8"] for p in per.values()), 4)}
