"""Quantization simulation in PyTorch: quantizers, Conv2d/Linear wrappers, quantized attention.

Everything here follows the wrapper convention of edgediff/quant_params.py: a wrapper marks
itself with `_edgediff_quant_wrapper = True`, keeps the float module as `.inner` and records
its constructor arguments in `_edgediff_init`, so that edgediff/serialize.py can save and
rebuild it without pickling. Quantizer state (scales, zero points) lives in buffers/params so
it travels in the artifact's safetensors.

Arithmetic is the one docs/architecture.md ("Integer arithmetic") describes: q = clamp(round(x / s) + z, qmin, qmax) and
x ~ (q - z) * s; torch.round rounds half to even like ONNX Runtime.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgediff.attention import ExplicitAttnProcessor
from edgediff.errors import BadInput
from edgediff.quant_params import SUPPORTED_BITS, TensorQuant
from edgediff.serialize import serializable

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020)
ADA_ZETA, ADA_GAMMA = 1.1, -0.1
# how many activation values an observer keeps per call / in total for percentile and MSE search
_RESERVOIR_PER_CALL = 4096
_RESERVOIR_TOTAL = 1 << 17


def check_bits(bits: int, what: str) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS or bits > 8:
        raise BadInput(f"{what}: unsupported bit-width {bits!r}; supported: 2..8")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (LSQ / QAT convention)."""
    return (torch.round(x) - x).detach() + x


def lp_error(x: torch.Tensor, xq: torch.Tensor, p: float, dim: int | None = None) -> torch.Tensor:
    d = (x - xq).abs().pow(p)
    return d.mean() if dim is None else d.flatten(1).mean(1) if dim == 0 else d.mean(dim)


# --------------------------------------------------------------------------------------------
# weights: per-channel symmetric, axis 0
# --------------------------------------------------------------------------------------------


@serializable("weight_quantizer")
class WeightQuantizer(nn.Module):
    """Per-output-channel weight quantizer with optional AdaRound soft rounding.

    `symmetric`: signed grid, zero point 0 (the default); otherwise an unsigned grid [0, 2^b - 1]
    with a zero point per channel (asymmetric, what low-bit weights gain from). `split_at` > 0
    (Q-Diffusion's shortcut splitting applied to weights): the input channels [:split_at] and
    [split_at:] get their own per-output-channel scales (and zero points), `scale2`/`zero_point2`.
    """

    def __init__(self, bits: int = 8, channels: int = 1, split_at: int = 0, symmetric: bool = True) -> None:
        super().__init__()
        self.bits = check_bits(int(bits), "weight_bits")
        self.split_at = int(split_at or 0)
        self.symmetric = bool(symmetric)
        self._edgediff_init = {"bits": self.bits, "channels": int(channels), "split_at": self.split_at,
                               "symmetric": self.symmetric}
        # zero points and the second part's buffers exist only when used: artifacts written before
        # them (symmetric, unsplit weights) load with their state dicts unchanged
        # (a None buffer is not in the state dict)
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", None if self.symmetric else torch.zeros(channels))
        self.register_buffer("scale2", torch.ones(channels) if self.split_at else None)
        self.register_buffer("zero_point2", torch.zeros(channels) if self.split_at and not self.symmetric else None)
        self.enabled = True
        # AdaRound state, only alive during block reconstruction (never saved)
        self.alpha: nn.Parameter | None = None
        self.soft = False

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def _full(self, a: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
        """Per-channel values broadcast over w; with a split, [:split_at] input channels take `a`, the rest `b`."""
        col = a.view(-1, *([1] * (w.dim() - 1)))
        if not self.split_at or b is None or w.dim() < 2 or w.shape[1] <= self.split_at:
            return col
        c2 = b.view(-1, *([1] * (w.dim() - 1)))
        rest = list(w.shape[2:])
        return torch.cat([col.expand(-1, self.split_at, *rest), c2.expand(-1, w.shape[1] - self.split_at, *rest)], 1)

    def _s(self, w: torch.Tensor) -> torch.Tensor:
        return self._full(self.scale, self.scale2, w)

    def _z(self, w: torch.Tensor) -> torch.Tensor | float:
        return 0.0 if self.zero_point is None else self._full(self.zero_point, self.zero_point2, w)

    def parts(self, w: torch.Tensor) -> list[tuple[slice, torch.Tensor, torch.Tensor | None]]:
        """(input-channel slice, scale buffer, zero-point buffer) per weight part (two when split)."""
        if self.split_at and w.dim() >= 2 and w.shape[1] > self.split_at:
            assert self.scale2 is not None
            return [(slice(0, self.split_at), self.scale, self.zero_point),
                    (slice(self.split_at, None), self.scale2, self.zero_point2)]
        return [(slice(None), self.scale, self.zero_point)]

    @torch.no_grad()
    def init(self, w: torch.Tensor, method: str = "mse", p: float = 2.4, percentile: float = 99.99) -> None:
        for cols, scale, zero in self.parts(w):
            s, z = self._init_part(w.detach()[:, cols].flatten(1), method, p, percentile)
            scale.copy_(s)
            if zero is not None:
                zero.copy_(z)

    def _range(self, wf: torch.Tensor, r: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) per row for the range shrunk by r: symmetric |w| <= amax, or [min, max]
        (widened to hold 0, so that zero stays exact) on the unsigned grid."""
        if self.symmetric:
            return (wf.abs().amax(1).clamp_min(1e-8) * r / self.qmax), torch.zeros(wf.shape[0])
        lo, hi = wf.amin(1).clamp(max=0) * r, wf.amax(1).clamp(min=0) * r
        s = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-8)
        return s, torch.clamp(torch.round(-lo / s), self.qmin, self.qmax)

    def _init_part(self, wf: torch.Tensor, method: str, p: float, percentile: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        if method == "minmax":
            return self._range(wf)
        if method == "percentile":
            if self.symmetric:
                q = torch.quantile(wf.abs(), percentile / 100, dim=1).clamp_min(1e-8)
                return q / self.qmax, torch.zeros(wf.shape[0])
            lo = torch.quantile(wf, 1 - percentile / 100, dim=1).clamp(max=0)
            hi = torch.quantile(wf, percentile / 100, dim=1).clamp(min=0)
            s = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-8)
            return s, torch.clamp(torch.round(-lo / s), self.qmin, self.qmax)
        # MSE / L_p search over clipping ratios, per channel (vectorised over channels)
        best_err = torch.full((wf.shape[0],), float("inf"))
        best_s, best_z = self._range(wf)
        for r in torch.linspace(0.3, 1.0, 71):
            s, z = self._range(wf, r)
            wq = (torch.clamp(torch.round(wf / s[:, None]) + z[:, None], self.qmin, self.qmax) - z[:, None]) * s[:, None]
            err = (wf - wq).abs().pow(p).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        return best_s, best_z

    def start_adaround(self, w: torch.Tensor) -> nn.Parameter:
        """Initialise AdaRound's alpha so that the soft rounding starts at the nearest rounding."""
        s = self._s(w)
        rest = (w.detach() / s) - torch.floor(w.detach() / s)
        h = rest.clamp(0.01, 0.99)  # avoid infinities in the inverse sigmoid
        alpha = -torch.log((ADA_ZETA - ADA_GAMMA) / (h - ADA_GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)
        self.soft = True
        return self.alpha

    def h(self) -> torch.Tensor:
        assert self.alpha is not None
        return torch.clamp(torch.sigmoid(self.alpha) * (ADA_ZETA - ADA_GAMMA) + ADA_GAMMA, 0, 1)

    def round_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def _grid(self, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Integer offsets q (= round(w / s)) clamped to the grid through the zero point, back to floats."""
        s, z = self._s(w), self._z(w)
        return (torch.clamp(q + z, self.qmin, self.qmax) - z) * s

    @torch.no_grad()
    def finish_adaround(self, w: torch.Tensor) -> torch.Tensor:
        """Hard AdaRound decision; returns the on-grid float weights."""
        s = self._s(w)
        q = torch.floor(w / s) + (self.alpha >= 0).to(w.dtype) if self.alpha is not None else torch.round(w / s)
        self.alpha, self.soft = None, False
        return self._grid(q, w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = self._s(w)
        if self.soft and self.alpha is not None:
            return self._grid(torch.floor(w.detach() / s) + self.h(), w)
        return self._grid(torch.round(w / s), w)

    def _tq(self, scale: torch.Tensor, zero: torch.Tensor | None) -> TensorQuant:
        zp = torch.zeros_like(scale, dtype=torch.int32) if zero is None else torch.round(zero.detach()).to(torch.int32)
        return TensorQuant(self.bits, scale.detach().clone(), zp, axis=0, signed=self.symmetric)

    def tensor_quant(self) -> TensorQuant:
        """The weight quantization (of the first input-channel part when split)."""
        return self._tq(self.scale, self.zero_point)

    def tensor_quant2(self) -> TensorQuant | None:
        """The second part's quantization of a split weight; None otherwise."""
        return self._tq(self.scale2, self.zero_point2) if self.scale2 is not None else None


# --------------------------------------------------------------------------------------------
# activations: per-tensor, symmetric (signed) or asymmetric (unsigned with a zero point)
# --------------------------------------------------------------------------------------------


@serializable("act_quantizer")
class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with an observer for calibration and a learnable step.

    Modes: "observe" passes x through and records statistics; "quant" fake-quantizes; "off"
    passes through. `bits_override` is how step-aware mixed precision (PTQD) lowers the
    bit-width at some timesteps: the clipping range stays, the grid gets coarser.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, fixed_range: tuple[float, float] | None = None,
                 mp_eligible: bool = True, disabled: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(int(bits), "act_bits")
        self.symmetric = bool(symmetric)
        self.fixed_range = tuple(fixed_range) if fixed_range is not None else None
        self.mp_eligible = bool(mp_eligible)
        self._edgediff_init = {"bits": self.bits, "symmetric": self.symmetric, "fixed_range": self.fixed_range,
                               "mp_eligible": self.mp_eligible, "disabled": bool(disabled)}
        # scale is a Parameter so that reconstruction can learn it (LSQ); frozen otherwise
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.register_buffer("zero_point", torch.tensor(0.0))
        # a quantizer that never saw calibration data stays pass-through (recorded so it survives saving)
        self.mode = "off" if disabled else "quant"
        self.bits_override: int | None = None
        self._min = math.inf
        self._max = -math.inf
        self._reservoir: list[torch.Tensor] = []
        self._kept = 0
        if self.fixed_range is not None:
            self._set_range(*self.fixed_range)

    # integer range of the base bit-width
    def _qrange(self, bits: int) -> tuple[int, int]:
        if self.symmetric:
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1

    @property
    def disabled(self) -> bool:
        return bool(self._edgediff_init.get("disabled"))

    def disable(self) -> None:
        self._edgediff_init["disabled"] = True
        self.mode = "off"

    @property
    def qmin(self) -> int:
        return self._qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return self._qrange(self.bits)[1]

    @torch.no_grad()
    def _set_range(self, lo: float, hi: float) -> None:
        if self.symmetric:
            amax = max(abs(lo), abs(hi), 1e-8)
            self.scale.fill_(amax / self.qmax)
            self.zero_point.fill_(0.0)
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exactly representable (padding, ReLU)
            s = max(hi - lo, 1e-8) / (self.qmax - self.qmin)
            self.scale.fill_(s)
            self.zero_point.fill_(float(min(max(round(self.qmin - lo / s), self.qmin), self.qmax)))

    def reset_stats(self) -> None:
        self._min, self._max, self._reservoir, self._kept = math.inf, -math.inf, [], 0

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        xf = x.detach().float().flatten()
        self._min = min(self._min, float(xf.min()))
        self._max = max(self._max, float(xf.max()))
        if self._kept < _RESERVOIR_TOTAL:
            n = min(_RESERVOIR_PER_CALL, xf.numel())
            idx = torch.randint(0, xf.numel(), (n,), generator=torch.Generator().manual_seed(self._kept + xf.numel()))
            sample = xf[idx]
            # keep the extremes too: percentile/MSE search must see the tails
            sample = torch.cat([sample, xf.topk(min(16, xf.numel())).values, (-xf).topk(min(16, xf.numel())).values.neg()])
            self._reservoir.append(sample)
            self._kept += sample.numel()

    @torch.no_grad()
    def init_from_stats(self, method: str = "mse", p: float = 2.4, percentile: float = 99.99) -> None:
        if self.fixed_range is not None:
            self._set_range(*self.fixed_range)
            return
        if not math.isfinite(self._min):
            raise BadInput("activation quantizer saw no calibration data (is the layer ever called?)")
        if method == "minmax" or not self._reservoir:
            self._set_range(self._min, self._max)
            return
        data = torch.cat(self._reservoir)
        if method == "percentile":
            lo = float(torch.quantile(data, 1 - percentile / 100))
            hi = float(torch.quantile(data, percentile / 100))
            self._set_range(lo, hi)
            return
        # L_p search over shrunken ranges (asymmetric: shrink both ends together)
        best, best_err = (self._min, self._max), math.inf
        for r in torch.linspace(0.2, 1.0, 81).tolist():
            lo, hi = self._min * r, self._max * r
            self._set_range(lo, hi)
            err = float(lp_error(data, self._fq(data, self.bits), p))
            if err < best_err:
                best, best_err = (lo, hi), err
        self._set_range(*best)

    def _params_for(self, bits: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if bits == self.bits:
            qmin, qmax = self.qmin, self.qmax
            return self.scale, self.zero_point, qmin, qmax
        qmin, qmax = self._qrange(bits)
        # mixed precision: a range recalibrated for this width (set by the ptqd pass from its
        # table; a plain attribute, not state), else the same clipping range on a coarser grid
        per_width = self.__dict__.get("width_params")
        if per_width and bits in per_width:
            s_b, z_b = per_width[bits]
            return s_b, z_b, qmin, qmax
        if self.symmetric:
            return self.scale * self.qmax / qmax, torch.zeros_like(self.zero_point), qmin, qmax
        lo = (self.qmin - self.zero_point) * self.scale
        s = self.scale * (self.qmax - self.qmin) / (qmax - qmin)
        return s, torch.clamp(torch.round(qmin - lo / s), qmin, qmax), qmin, qmax

    def _fq(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        s, z, qmin, qmax = self._params_for(bits)
        # a learned step must stay positive; clamp (not add) so a normal scale is used bit-exactly
        s = s.abs().clamp_min(1e-12)
        return (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            bits = self.bits_override if (self.bits_override and self.mp_eligible) else self.bits
            return self._fq(x, bits)
        if self.mode == "observe":
            self._observe(x)
        return x

    def tensor_quant(self) -> TensorQuant:
        zp = int(round(float(self.zero_point)))
        if self.symmetric:
            return TensorQuant(self.bits, self.scale.detach().abs().clone(), torch.tensor(0, dtype=torch.int32), None, True)
        # unsigned grid [0, 2^b-1] with a zero point
        return TensorQuant(self.bits, self.scale.detach().abs().clone(), torch.tensor(zp, dtype=torch.int32), None, False)


# --------------------------------------------------------------------------------------------
# layer wrappers
# --------------------------------------------------------------------------------------------


class QuantLayer(nn.Module):
    """Common part of the Conv2d/Linear wrappers: weight quantizer, input quantizer(s)."""

    _edgediff_quant_wrapper = True
    inner: nn.Module

    def _setup(self, weight_bits: int, act_bits: int, act_symmetric: bool, split_at: int | None, out_ch: int,
               mp_eligible: bool, quant_output: bool = False, output_linked: bool = False,
               split_weights: bool = False, weight_symmetric: bool = True) -> None:
        # options off by default are recorded only when set: older artifacts keep their arguments
        if split_weights and split_at:
            self._edgediff_init["split_weights"] = True
        if not weight_symmetric:
            self._edgediff_init["weight_symmetric"] = False
        self.wq = WeightQuantizer(weight_bits, out_ch, int(split_at) if split_weights and split_at else 0,
                                  weight_symmetric)
        self.aq = ActQuantizer(act_bits, act_symmetric, mp_eligible=mp_eligible)
        # Q-Diffusion shortcut splitting: the two concatenated halves get their own quantizers
        self.split_at = int(split_at) if split_at else None
        self.aq2 = ActQuantizer(act_bits, act_symmetric, mp_eligible=mp_eligible) if self.split_at else None
        # Output requantization: integer kernels (QLinearConv, TFLite int8 CONV_2D) write int8, so
        # the simulation rounds the output onto its grid too. A split layer runs as two integer
        # layers on the halves, each requantizing its partial sum (oq, oq2), summed in float.
        self.oq = ActQuantizer(act_bits, act_symmetric, mp_eligible=mp_eligible) if quant_output else None
        self.oq2 = ActQuantizer(act_bits, act_symmetric, mp_eligible=mp_eligible) if quant_output and self.split_at \
            else None
        if self.oq is not None and output_linked:
            self.link_output()

    def link_output(self) -> None:
        """The output is written straight into a consumer's quantization (see link_attention_outputs).

        Recorded in the constructor arguments: the artifact rebuilds the layer with its output
        quantizer off (a submodule's own saved arguments are not replayed over its parent's).
        """
        if self.oq is not None:
            self.oq.disable()
            self._edgediff_init["output_linked"] = True

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq2 is not None and self.split_at is not None and x.shape[1] > self.split_at:
            return torch.cat([self.aq(x[:, : self.split_at]), self.aq2(x[:, self.split_at :])], dim=1)
        return self.aq(x)

    def act_quantizers(self) -> list[ActQuantizer]:
        return [q for q in (self.aq, self.aq2, self.oq, self.oq2) if q is not None]

    def _int_bias(self, bias: torch.Tensor | None, aq: ActQuantizer) -> torch.Tensor | None:
        """The bias as the integer kernel adds it: int32 at scale s_x * s_w (round half to even)."""
        if bias is None or aq.mode != "quant" or not self.wq.enabled:
            return bias
        bits = aq.bits_override if (aq.bits_override and aq.mp_eligible) else aq.bits
        s = aq._params_for(bits)[0].abs().clamp_min(1e-12) * self.wq.scale
        return round_ste(bias / s).clamp(-(2**31), 2**31 - 1) * s

    def _out_q(self) -> ActQuantizer | None:
        """The output quantizer in force: the layer's own, or (while a quantized attention runs)
        the operand quantizer it writes into directly (link_attention_outputs)."""
        if self.oq is not None and self.oq.mode == "quant":
            return self.oq
        return self.__dict__.get("_linked_to")  # a plain attribute: not a submodule, not saved

    def _exact(self) -> bool:
        """Run the integer arithmetic literally (inference with every quantizer active)."""
        out = self._out_q()
        ins = [q for q in (self.aq, self.aq2) if q is not None]
        if self.oq2 is not None:
            if self.oq2.mode != "quant":
                return False
        return (not torch.is_grad_enabled() and out is not None and out.mode == "quant" and self.wq.enabled
                and not self.wq.soft and all(q.mode == "quant" for q in ins))

    def _int_part(self, x: torch.Tensor, aq: ActQuantizer, w_int: torch.Tensor, bias: torch.Tensor | None,
                  oq: ActQuantizer | None, op: Any, w_scale: torch.Tensor | None = None) -> torch.Tensor:
        """acc = op(q_x - z_x, q_w - z_w) + bias_int32 (exact integers in float32), then float32
        requantization round(acc * (s_x*s_w/s_y)) half to even: onnxruntime's and XNNPACK's form.
        `w_scale`: this part's weight scale (a split weight's second part has its own)."""
        bits = aq.bits_override if (aq.bits_override and aq.mp_eligible) else aq.bits
        s_x, z_x, qmin, qmax = aq._params_for(bits)
        s_x = s_x.abs().clamp_min(1e-12)
        q = torch.clamp(torch.round(x / s_x) + z_x, qmin, qmax) - z_x
        acc = op(q, w_int, None)
        ch = (1, -1) + (1,) * (acc.dim() - 2) if acc.dim() > 2 and w_int.dim() == 4 else (-1,)
        s_acc = (s_x * (self.wq.scale if w_scale is None else w_scale)).view(ch)
        if bias is not None:
            acc = acc + torch.round(bias.view(ch) / s_acc)
        if oq is None:
            return acc * s_acc
        obits = oq.bits_override if (oq.bits_override and oq.mp_eligible) else oq.bits
        s_y, z_y, ymin, ymax = oq._params_for(obits)
        s_y = s_y.abs().clamp_min(1e-12)
        return (torch.clamp(torch.round(acc * (s_acc / s_y)) + z_y, ymin, ymax) - z_y) * s_y

    def _quant_forward(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        """op(x, w, b) with quantized input, weight, int32 bias and (if present) output."""
        if self._exact():
            w = self.inner.weight
            w_int = torch.round(w / self.wq._s(w))
            b = self.inner.bias
            if self.aq2 is not None and self.split_at is not None and x.shape[1] > self.split_at:
                c1 = self.split_at
                return (self._int_part(x[:, :c1], self.aq, w_int[:, :c1], b, self._out_q(), op)
                        + self._int_part(x[:, c1:], self.aq2, w_int[:, c1:], None, self.oq2, op, self.wq.scale2))
            return self._int_part(x, self.aq, w_int, b, self._out_q(), op)
        w, b = self.wq(self.inner.weight), self.inner.bias
        if self.oq is None:
            return op(self.quant_input(x), w, self._int_bias(b, self.aq))
        if self.aq2 is not None and self.split_at is not None and x.shape[1] > self.split_at:
            c1 = self.split_at
            y1 = op(self.aq(x[:, :c1]), w[:, :c1], self._int_bias(b, self.aq))
            y2 = op(self.aq2(x[:, c1:]), w[:, c1:], None)
            return self.oq(y1) + (self.oq2(y2) if self.oq2 is not None else y2)
        return self.oq(op(self.aq(x), w, self._int_bias(b, self.aq)))


@serializable("quant_conv2d")
class QuantConv2d(QuantLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 weight_bits: int = 8, act_bits: int = 8, act_symmetric: bool = False, split_at: int | None = None,
                 mp_eligible: bool = True, quant_output: bool = False, output_linked: bool = False,
                 split_weights: bool = False, weight_symmetric: bool = True) -> None:
        super().__init__()
        self.inner = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                               padding_mode)
        pad = self.inner.padding
        self._edgediff_init = {"in_channels": in_channels, "out_channels": out_channels,
                               "kernel_size": tuple(self.inner.kernel_size), "stride": tuple(self.inner.stride),
                               "padding": pad if isinstance(pad, str) else tuple(pad),
                               "dilation": tuple(self.inner.dilation), "groups": groups, "bias": bool(bias),
                               "padding_mode": padding_mode, "weight_bits": weight_bits, "act_bits": act_bits,
                               "act_symmetric": act_symmetric, "split_at": split_at, "mp_eligible": mp_eligible}
        if quant_output:  # only recorded when set: artifacts written before output requantization still load
            self._edgediff_init["quant_output"] = True
        self._setup(weight_bits, act_bits, act_symmetric, split_at, out_channels, mp_eligible, quant_output,
                    output_linked, split_weights, weight_symmetric)

    @classmethod
    def wrap(cls, conv: nn.Conv2d, **q: Any) -> QuantConv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, **q)
        m.inner = conv
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_forward(x, self.inner._conv_forward)


@serializable("quant_linear")
class QuantLinear(QuantLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8, act_bits: int = 8,
                 act_symmetric: bool = False, split_at: int | None = None, mp_eligible: bool = True,
                 quant_output: bool = False, output_linked: bool = False, split_weights: bool = False,
                 weight_symmetric: bool = True) -> None:
        super().__init__()
        self.inner = nn.Linear(in_features, out_features, bias)
        self._edgediff_init = {"in_features": in_features, "out_features": out_features, "bias": bool(bias),
                               "weight_bits": weight_bits, "act_bits": act_bits, "act_symmetric": act_symmetric,
                               "split_at": split_at, "mp_eligible": mp_eligible}
        if quant_output:
            self._edgediff_init["quant_output"] = True
        self._setup(weight_bits, act_bits, act_symmetric, None, out_features, mp_eligible, quant_output, output_linked,
                    weight_symmetric=weight_symmetric)

    @classmethod
    def wrap(cls, lin: nn.Linear, **q: Any) -> QuantLinear:
        q.pop("split_at", None)  # concatenation splits only concern convolutions' channel axis
        q.pop("split_weights", None)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, **q)
        m.inner = lin
        return m

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's float weight: modules around a Linear read it (transformers' T5 feed-forward casts
        its input to `wo.weight.dtype`), so the wrapper must answer for it."""
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_forward(x, F.linear)


# --------------------------------------------------------------------------------------------
# attention: QK^T and softmax·V with quantized operands
# --------------------------------------------------------------------------------------------


@serializable("float_attn_processor")
class FloatAttnProcessor(ExplicitAttnProcessor):
    """Float attention (torch SDPA) as an nn.Module, so it can stand where a quantized one was.

    strip_quant_wrappers() swaps a QuantAttnProcessor for its `.inner`, which must be a module.
    """

    sdpa = True


@serializable("quant_attn_processor")
class QuantAttnProcessor(ExplicitAttnProcessor):
    """Attention with fake-quantized matmul operands (Q-Diffusion): Q, K, V at act_bits and the
    softmax output at softmax_bits (unsigned, range [0, 1]).

    The body is edgediff.attention's explicit-matmul processor; this class only fills its
    operand hook, so every operand sits where the exporters place their Q/DQ or integer ops.
    """

    _edgediff_quant_wrapper = True

    def __init__(self, act_bits: int = 8, softmax_bits: int = 8, mp_eligible: bool = True) -> None:
        super().__init__()
        self._edgediff_init = {"act_bits": act_bits, "softmax_bits": softmax_bits, "mp_eligible": mp_eligible}
        self.inner = FloatAttnProcessor()
        self.q_quant = ActQuantizer(act_bits, symmetric=True, mp_eligible=mp_eligible)
        self.k_quant = ActQuantizer(act_bits, symmetric=True, mp_eligible=mp_eligible)
        # softmax output lies in [0, 1]: fixed unsigned range, its own bit-width
        self.p_quant = ActQuantizer(softmax_bits, symmetric=False, fixed_range=(0.0, 1.0), mp_eligible=False)
        self.v_quant = ActQuantizer(act_bits, symmetric=True, mp_eligible=mp_eligible)

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.q_quant, self.k_quant, self.p_quant, self.v_quant]

    def operand(self, which: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"{which}_quant")(x)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        from edgediff.attention import direct_producers

        # projections feeding an operand requantize straight onto the operand's grid (as the
        # integer runtimes do); the link lives only for this call
        linked = []
        for which, attr in direct_producers(attn).items():
            layer = getattr(attn, attr)
            if isinstance(layer, QuantLayer) and layer.oq is not None and layer.oq.mode != "quant":
                layer.__dict__["_linked_to"] = getattr(self, f"{which}_quant")
                linked.append(layer)
        try:
            return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            for layer in linked:
                layer.__dict__.pop("_linked_to", None)

    def _exact(self) -> bool:
        return not torch.is_grad_enabled() and all(q.mode == "quant" for q in self.act_quantizers())

    @staticmethod
    def _ints(q: ActQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z, qmin, qmax = q._params_for(q.bits_override if (q.bits_override and q.mp_eligible) else q.bits)
        s = s.abs().clamp_min(1e-12)
        return torch.clamp(torch.round(x / s) + z, qmin, qmax) - z, s

    def qk(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if not self._exact():
            return super().qk(attn, q, k)
        # exact int32 accumulator times s_q*s_k in float32 (onnxruntime's MatMulIntegerToFloat)
        qi, sq = self._ints(self.q_quant, q)
        ki, sk = self._ints(self.k_quant, k)
        return torch.matmul(qi, ki.transpose(-1, -2)) * (sq * sk)

    def pv(self, attn: nn.Module, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self._exact():
            return super().pv(attn, p, v)
        pi, sp = self._ints(self.p_quant, p)
        vi, sv = self._ints(self.v_quant, v)
        acc = torch.matmul(pi, vi)
        from edgediff.attention import is_joint

        out = attn.to_out[0]
        aq = out.aq if isinstance(out, QuantLayer) and out.aq2 is None else None
        # joint attention: part of the result goes to to_add_out, so no single consumer grid
        if aq is None or aq.mode != "quant" or is_joint(attn):
            return acc * (sp * sv)
        # the matmul writes to_out's input int8 directly: requantize acc * (s_p*s_v/s_out)
        so, zo, omin, omax = aq._params_for(aq.bits_override if (aq.bits_override and aq.mp_eligible) else aq.bits)
        so = so.abs().clamp_min(1e-12)
        return (torch.clamp(torch.round(acc * (sp * sv / so)) + zo, omin, omax) - zo) * so


def link_attention_outputs(module: nn.Module) -> list[str]:
    """Projections that feed a quantized attention operand directly write that operand's int8.

    Their own output quantizer is switched off (the operand quantizer rounds the same tensor),
    which is what the integer runtimes do: to_q's integer kernel requantizes straight to Q's
    scale. Returns the names of the layers linked this way.
    """
    from edgediff.attention import direct_producers

    linked = []
    for name, m in module.named_modules():
        if not isinstance(getattr(m, "processor", None), QuantAttnProcessor):
            continue
        for _, attr in direct_producers(m).items():
            layer = getattr(m, attr)
            if isinstance(layer, QuantLayer) and layer.oq is not None:
                layer.link_output()
                linked.append(f"{name}.{attr}" if name else attr)
    return linked


def act_quantizers(module: nn.Module) -> list[ActQuantizer]:
    return [m for m in module.modules() if isinstance(m, ActQuantizer)]


def quant_layers(module: nn.Module) -> dict[str, nn.Module]:
    """name -> wrapper (QuantConv2d/QuantLinear/QuantAttnProcessor) inside `module`."""
    return {n: m for n, m in module.named_modules() if isinstance(m, (QuantLayer, QuantAttnProcessor))}


def set_act_mode(module: nn.Module, mode: str) -> None:
    for q in act_quantizers(module):
        q.mode = "off" if q.disabled else mode


def set_bits_override(module: nn.Module, bits: int | None) -> None:
    for q in act_quantizers(module):
        q.bits_override = bits
