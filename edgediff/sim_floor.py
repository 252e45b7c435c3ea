"""The simulation's own noise floor: how far a quantized model's samples move when only the
rounding of its float ops changes.

An int8 export and the PyTorch simulation run the same integer layers bit for bit, but the
float ops between them (GroupNorm, SiLU, softmax, LayerNorm, GELU) are each runtime's own
kernels: results differ by a few ulps, which now and then moves a value across a quantizer's
rounding boundary. One such flip changes that tensor by one quantization step; the sampler
carries it to the end of the trajectory. How much that costs in final-sample PSNR is a property
of the quantized model and the sampler, not of the runtime: `exact_float_ops()` runs the
simulation with those float ops computed in float64 and rounded once to float32 (a correctly
rounded implementation, as good as any runtime's), and the PSNR between the two simulations is
the floor that no runtime without torch's exact float kernels can beat (docs/int8.md).

`Stepwise` is the check without the chaos: along the simulation's own trajectory, every
denoiser call is also given to the export (the same x_t, t and conditioning), and the two
outputs of that one call are compared. A flip then costs what it costs in one call (one
quantization step of one tensor) instead of being carried through the remaining steps, so the
figure says how faithful the runtime is, independent of how chaotic the sampler is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from edgediff.metrics import psnr
from edgediff.quality import data_range

# the float ops that sit between integer kernels in the exported graphs
FLOAT_OPS: frozenset[Any] = frozenset({
    F.group_norm, F.layer_norm, F.silu, F.gelu, F.softmax, F.sigmoid, torch.sigmoid, torch.softmax,
    torch.Tensor.softmax, torch.Tensor.sigmoid, F.mish,
})


def _group_norm_explicit(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm as mean / variance reductions (what traces to ReduceMean/Sub/Mul/Sqrt/Div)."""
    h = x.reshape(x.shape[0], num_groups, -1)
    d = h - h.mean(-1, keepdim=True)
    y = (d / torch.sqrt((d * d).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


class _ExactFloatOps(TorchFunctionMode):
    """Computes FLOAT_OPS on float32 tensors in float64 and rounds the result to float32 once."""

    def __init__(self, explicit_group_norm: bool = False) -> None:
        super().__init__()
        self.calls = 0
        self.explicit_group_norm = explicit_group_norm

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in FLOAT_OPS:
            return func(*args, **kwargs)
        found = []

        def up(a: Any) -> Any:
            if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
                found.append(a)
                return a.double()
            return a

        args64, kwargs64 = tree_map(up, args), tree_map(up, kwargs)
        if not found:
            return func(*args, **kwargs)
        self.calls += 1
        fn = _group_norm_explicit if func is F.group_norm and self.explicit_group_norm else func
        out = fn(*args64, **kwargs64)
        return tree_map(lambda o: o.float() if isinstance(o, torch.Tensor) and o.dtype == torch.float64 else o, out)


@contextmanager
def exact_float_ops(explicit_group_norm: bool = False) -> Iterator[_ExactFloatOps]:
    """Within the block, PyTorch's GroupNorm/LayerNorm/SiLU/GELU/softmax/sigmoid on float32 tensors
    are computed in float64 and rounded to float32 once (`.calls` counts them).

    `explicit_group_norm`: GroupNorm as explicit reductions, for tracing an export in this mode
    (onnxruntime's InstanceNormalization, torch's ONNX form of GroupNorm, has no double kernel).
    """
    mode = _ExactFloatOps(explicit_group_norm)
    with mode:
        yield mode


def per_sample_psnr(got: torch.Tensor, want: torch.Tensor, data_range: float = 2.0) -> list[float]:
    """PSNR of each sample (first axis), rounded to 0.1 dB; inf where a sample matches exactly."""
    return [round(v, 1) if math.isfinite(v) else v
            for v in (psnr(got[i: i + 1], want[i: i + 1], data_range) for i in range(got.shape[0]))]


def noise_floor(run: Callable[[], torch.Tensor], want: torch.Tensor, data_range: float = 2.0) -> dict[str, Any]:
    """`run()` (the simulation's sampling, same seeds as `want`) again under exact_float_ops():
    the PSNR of those samples vs `want`, per sample too, and how many float ops were rerounded."""
    with torch.inference_mode(), exact_float_ops() as mode:
        alt = run()
    p = psnr(alt, want, data_range)
    per = per_sample_psnr(alt, want, data_range)
    finite = sorted(v for v in per if math.isfinite(v))
    return {"noise_floor_db": round(p, 3) if math.isfinite(p) else p,
            "noise_floor_per_sample_db": per,
            "noise_floor_identical_samples": sum(1 for v in per if not math.isfinite(v)),
            "noise_floor_min_sample_db": finite[0] if finite else math.inf,
            "float_ops_rerounded": mode.calls}


def _finite(v: float) -> float:
    return round(v, 2) if math.isfinite(v) else v


class Stepwise:
    """A denoiser that returns `ref`'s output and also runs `exp` on the very same call, recording
    how far apart the two outputs are (teacher forcing: `exp` never sees its own earlier outputs).

    Each call's PSNR is over the reference output's own peak-to-peak (edgediff.quality.data_range);
    `report()` gives the worst call, the worst single sample of any call, per-call figures and the
    largest absolute difference.
    """

    def __init__(self, ref: Callable[..., torch.Tensor], exp: Callable[..., torch.Tensor]) -> None:
        self.ref, self.exp = ref, exp
        self.calls: list[dict[str, float]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        want = self.ref(x, t, cond)
        got = self.exp(x, t, cond)
        if got.shape != want.shape:
            raise ValueError(f"export output shape {tuple(got.shape)} differs from the reference's {tuple(want.shape)}")
        span = data_range(want)
        per = per_sample_psnr(got, want, span)
        self.calls.append({"t": float(t.flatten()[0]) if t.numel() else 0.0, "psnr_db": psnr(got, want, span),
                           "min_sample_psnr_db": min(per), "max_abs_err": float((got - want).abs().max())})
        return want

    def report(self) -> dict[str, Any]:
        if not self.calls:
            return {"stepwise_calls": 0}
        worst = min(self.calls, key=lambda c: c["psnr_db"])
        return {"stepwise_calls": len(self.calls),
                "stepwise_psnr_db": _finite(worst["psnr_db"]),
                "stepwise_worst_t": worst["t"],
                "stepwise_min_sample_psnr_db": _finite(min(c["min_sample_psnr_db"] for c in self.calls)),
                "stepwise_psnr_per_call_db": [_finite(c["psnr_db"]) for c in self.calls],
                "stepwise_max_abs_err": max(c["max_abs_err"] for c in self.calls),
                "stepwise_max_abs_err_per_call": [float(f"{c['max_abs_err']:.3g}") for c in self.calls]}
