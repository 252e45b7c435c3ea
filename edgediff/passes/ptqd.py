"""ptqd: PTQD (He et al. 2023) noise correction and step-aware mixed precision for a quantized model.

Quantization noise in the noise estimate is split into a part correlated with the FP
estimate and a residual: eps_q = (1 + k_t) * eps_fp + bias_t + r_t. Over the calibration
trajectories of the calib pass (FP model's own x_t and FP outputs, from the cache), k_t (one
per timestep) and bias_t (one per output channel and timestep) are fitted by least squares
of (eps_q - eps_fp) on eps_fp. The sampler then uses eps -> (eps - bias_t) / (1 + k_t), and for
stochastic samplers takes the residual's variance Var(r_t) / (1 + k_t)^2 out of sigma_t^2
(it is noise the quantized model already adds).

Step-aware mixed precision: for each sampler step and each candidate activation bit-width,
the residual noise after correction is measured and turned into an SNR against the noise
x_{t-1} is meant to carry anyway, SNR = 10 log10(b_{t-1}^2 / (c_t^2 Var(r_t))), with x_t = a_t x0 +
b_t eps in the scheduler's own noise levels (DDPM-type: a^2 = abar; flow: 1 - s, s; EDM: c_in,
c_in sigma) and c_t = b_{t-1} - a_{t-1} b_t / a_t the deterministic step's factor of eps in x_{t-1}
(DDIM's; flow models, fitted on the velocity: c_t = s_{t-1} - s_t, the Euler step's factor). Every
family is fitted at the model's own, possibly fractional, timesteps. Each step gets the lowest
bit-width whose SNR reaches `mp_min_snr_db`; early, noisy steps tolerate fewer bits, the last steps keep the base width.
With `mp_recalibrate` (default) every lower width gets its own activation ranges: each
mixed-precision-eligible quantizer's clipping range is searched again at that width (the same
L_p search as the quant pass, p = 2.4, over the activations of the calibration set), instead of
keeping the base width's range on a coarser grid.

model.extras["ptqd"] holds per-timestep tables; `correction_for(model)` turns them into an
EpsCorrection that the verifier applies around any denoiser, exported ones included.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, cond_take, cond_unflatten
from edgediff.passes import PassContext, register, register_correction, register_restorer
from edgediff.passes.calib import load_calibration
from edgediff.quant.apply import call_denoiser
from edgediff.quant.core import ActQuantizer, check_bits, lp_error, set_act_mode, set_bits_override
from edgediff.quant_params import is_quant_wrapper


@dataclass
class PtqdOptions:
    samples: int = 16  # trajectories of the calibration set used for the fit
    correct_bias: bool = True  # fit the per-channel bias (else k only)
    positive_k_only: bool = True  # apply the correlated correction only where k > 0 (the reference code)
    variance: bool = True  # absorb the residual variance into the sampler's sigma_t^2
    mixed_precision: bool = False  # step-aware activation bit-widths
    mp_bits: list[int] = field(default_factory=lambda: [6])  # candidate lower activation bit-widths
    mp_min_snr_db: float = 20.0
    mp_recalibrate: bool = True  # activation ranges searched again for each lower width
    mp_calib_points: int = 256  # calibration points observed for that search
    batch_size: int = 64

    def validate(self) -> None:
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise BadInput(f"ptqd: samples must be a positive integer (a calibration count of zero gives "
                           f"nothing to fit), got {self.samples!r}")
        if not isinstance(self.mp_bits, (list, tuple)):
            raise BadInput(f"ptqd: mp_bits must be a list of bit-widths, got {self.mp_bits!r}")
        for b in self.mp_bits:
            check_bits(b, "ptqd: mp_bits")
        if self.batch_size < 1:
            raise BadInput(f"ptqd: batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.mp_calib_points, int) or isinstance(self.mp_calib_points, bool) \
                or self.mp_calib_points < 1:
            raise BadInput(f"ptqd: mp_calib_points must be a positive integer, got {self.mp_calib_points!r}")


class PtqdCorrection:
    """EpsCorrection from per-timestep tables; a timestep between calibrated ones takes the nearest.

    Timesteps are the model's own (fractional for Euler-type, flow and EDM schedulers: s * T, c_noise).
    """

    def __init__(self, table: dict[str, Any]) -> None:
        self.ts = torch.as_tensor(table["timesteps"]).double()
        self.k = torch.as_tensor(table["k"]).float()
        self.bias = torch.as_tensor(table["bias"]).float()
        self.res_var = torch.as_tensor(table["residual_var"]).float()
        self.use_variance = bool(table.get("variance", True))
        # flow models: fitted on the velocity the model predicts (see eps_of); others: on eps
        self.space = str(table.get("space", "eps"))

    def _i(self, t: float) -> int:
        return int((self.ts - float(t)).abs().argmin())

    def correct(self, eps: torch.Tensor, t: int) -> torch.Tensor:
        i = self._i(t)
        b = self.bias[i].to(eps.dtype).view(1, -1, *([1] * (eps.dim() - 2)))
        return (eps - b) / (1 + float(self.k[i]))

    def variance_offset(self, t: int) -> float:
        """Variance of the residual left in the corrected eps at step t (eps units)."""
        return float(self.res_var[self._i(t)]) if self.use_variance else 0.0


@register_correction("ptqd")
def correction_for(model: DiffusionModel) -> PtqdCorrection | None:
    """The PTQD correction of a model, or None if the ptqd pass has not run on it."""
    table = getattr(model, "extras", {}).get("ptqd")
    return PtqdCorrection(table) if table else None


class _StepBits:
    """Forward pre-hook on the denoiser: sets the activation bit-width for the call's timestep."""

    def __init__(self, ts: torch.Tensor, bits: torch.Tensor, base: int) -> None:
        self.ts, self.bits, self.base = ts.double(), bits.long(), int(base)

    def __call__(self, mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if t is None:
            return
        t0 = float(torch.as_tensor(t).reshape(-1)[0])
        b = int(self.bits[int((self.ts - t0).abs().argmin())])
        set_bits_override(mod, None if b == self.base else b)


def _grid(q: ActQuantizer, lo: float, hi: float, bits: int) -> tuple[float, float]:
    """(scale, zero point) of q's kind of grid over [lo, hi] at `bits` (as ActQuantizer._set_range)."""
    qmin, qmax = q._qrange(bits)
    if q.symmetric:
        return max(abs(lo), abs(hi), 1e-8) / qmax, 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = max(hi - lo, 1e-8) / (qmax - qmin)
    return s, float(min(max(round(qmin - lo / s), qmin), qmax))


def width_quantizers(den: torch.nn.Module) -> dict[str, ActQuantizer]:
    """The activation quantizers step-aware precision acts on (eligible, calibrated, own range)."""
    return {n: q for n, q in den.named_modules() if isinstance(q, ActQuantizer) and q.mp_eligible
            and q.fixed_range is None and not q.disabled}


@torch.no_grad()
def recalibrate_widths(model: DiffusionModel, data: dict[str, Any], widths: list[int], points: int,
                       batch_size: int, p: float = 2.4) -> dict[str, Any]:
    """Per-width activation ranges: observe the calibration set, then an L_p range search per
    quantizer and width. Returns the table entries (names, bits, scale, zero point)."""
    den, mod = model.denoiser, model.module()
    qs = width_quantizers(den)
    for q in qs.values():
        q.reset_stats()
    set_act_mode(den, "observe")  # every activation float while observing (weights stay on the grid)
    try:
        n = min(points, len(data["x"]))
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            c = data.get("cond")
            call_denoiser(mod, data["x"][i:j], data["t"][i:j], c[i:j] if c is not None else None,
                          model.signature.num_classes)
    finally:
        set_act_mode(den, "quant")
    scale = torch.ones(len(widths), len(qs))
    zero = torch.zeros(len(widths), len(qs))
    for k, q in enumerate(qs.values()):
        if not q._reservoir:
            continue
        x = torch.cat(q._reservoir)
        for w, b in enumerate(widths):
            qmin, qmax = q._qrange(b)
            best, best_err = None, float("inf")
            for r in torch.linspace(0.2, 1.0, 81).tolist():
                s_b, z_b = _grid(q, q._min * r, q._max * r, b)
                xq = (torch.clamp(torch.round(x / s_b) + z_b, qmin, qmax) - z_b) * s_b
                err = float(lp_error(x, xq, p))
                if err < best_err:
                    best, best_err = (s_b, z_b), err
            scale[w, k], zero[w, k] = best
        q.reset_stats()
    return {"width_names": list(qs), "width_bits": torch.tensor(widths, dtype=torch.int64),
            "width_scale": scale, "width_zero": zero}


def attach_widths(den: torch.nn.Module, table: dict[str, Any]) -> int:
    """Give each quantizer its recalibrated per-width (scale, zero point); returns how many."""
    mods = dict(den.named_modules())
    bits = [int(b) for b in torch.as_tensor(table["width_bits"]).tolist()]
    done = 0
    for k, name in enumerate(table["width_names"]):
        q = mods.get(name)
        if isinstance(q, ActQuantizer):
            q.__dict__["width_params"] = {b: (table["width_scale"][w, k].clone(), table["width_zero"][w, k].clone())
                                          for w, b in enumerate(bits)}
            done += 1
    return done


def install_step_bits(model: DiffusionModel) -> DiffusionModel:
    table = model.extras["ptqd"]
    den = model.denoiser
    if table.get("width_names"):
        attach_widths(den, table)
    for h in list(getattr(den, "_edgediff_ptqd_hooks", [])):
        h.remove()
    den._edgediff_ptqd_hooks = []
    if table.get("mixed_precision"):
        hook = _StepBits(torch.as_tensor(table["timesteps"]), torch.as_tensor(table["act_bits"]), int(table["base_act_bits"]))
        den._edgediff_ptqd_hooks.append(den.register_forward_pre_hook(hook, with_kwargs=True))
    return model


@register_restorer("ptqd")
def _restore(model: DiffusionModel) -> DiffusionModel:
    return install_step_bits(model)


def space_of(model: DiffusionModel) -> str:
    """Where the noise model is fitted: eps, or for flow matching the predicted velocity.

    At a flow sampler's first step (sigma = 1) x is pure noise, so eps = x whatever the model
    predicts: an eps-space fit sees no quantization error there and the inverse map divides by
    1 - sigma = 0. The velocity carries the whole error at every sigma.
    """
    return "velocity" if model.schedule.family == "flow" else "eps"


def eps_of(model: DiffusionModel, out: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """The model output in the space PTQD fits (space_of): eps, or a flow model's velocity."""
    c = x.shape[1]
    if out.shape[1] == 2 * c:
        out = out[:, :c]  # learned-variance output: the first half is the prediction
    if space_of(model) == "velocity":
        return out
    return model.schedule.to_eps_x0(out, x, t)[0]


def fit(d: torch.Tensor, e: torch.Tensor, with_bias: bool,
        positive_k_only: bool = False) -> tuple[float, torch.Tensor, float]:
    """Least squares d = k * e + bias_c + r over a batch (B, C, ...); returns k, bias (C,), Var(r).

    positive_k_only: as the PTQD reference code, a k <= 0 is not applied (k = 0, bias refitted
    alone): dividing by (1 + k) < 1 would amplify the estimate instead of undoing a gain.
    """
    dims = [0] + list(range(2, d.dim()))
    if with_bias:
        dm, em = d.mean(dims, keepdim=True), e.mean(dims, keepdim=True)
        dc, ec = d - dm, e - em
        k = float((dc * ec).sum() / (ec * ec).sum().clamp_min(1e-12))
        if positive_k_only and k <= 0:
            k = 0.0
        bias = (dm - k * em).flatten()
    else:
        k = float((d * e).sum() / (e * e).sum().clamp_min(1e-12))
        if positive_k_only and k <= 0:
            k = 0.0
        bias = torch.zeros(d.shape[1])
    r = d - k * e - bias.view(1, -1, *([1] * (d.dim() - 2)))
    return k, bias, float((r * r).mean())


@register("ptqd", PtqdOptions, requires=("quant",))
def run(model: DiffusionModel, opts: PtqdOptions, ctx: PassContext) -> DiffusionModel:
    opts.validate()
    if not model.extras.get("quant") or not any(is_quant_wrapper(m) for m in model.denoiser.modules()):
        raise BadInput("ptqd: the model is not quantized; put a `quant` pass before `ptqd` in the recipe")
    data = load_calibration(model, ctx)
    base = int(model.extras["quant"]["act_bits"])
    cands = sorted({int(b) for b in opts.mp_bits if int(b) < base}) if opts.mixed_precision else []
    n = min(opts.samples, data["traj_x"].shape[1])
    traj_t, traj_x, traj_out = data["traj_t"], data["traj_x"][:, :n], data["traj_out"][:, :n]
    cond = cond_take(cond_unflatten(data, "traj_cond"), slice(None, n))
    den = model.denoiser.eval()
    mod = model.module()
    t0 = time.perf_counter()
    widths: dict[str, Any] = {}
    if cands and opts.mp_recalibrate:
        widths = recalibrate_widths(model, data, cands, opts.mp_calib_points, opts.batch_size)
        attach_widths(den, widths)
    rows = []
    for s in ctx.track(range(len(traj_t)), f"ptqd: fitting {len(traj_t)} steps x {1 + len(cands)} bit-widths"):
        # the model's own timestep (fractional for Euler-type / flow / EDM schedulers), never truncated
        t = float(traj_t[s])
        x = traj_x[s]
        e_fp = eps_of(model, traj_out[s], x, t)
        last = s + 1 >= len(traj_t)
        # x = a x0 + b eps at this step and a' x0 + b' eps at the next, in the scheduler's own noise
        # levels (abar, flow sigma, EDM sigma with c_in): a deterministic step's factor of an eps error
        # in the next x is b' - a' b / a (DDIM's for DDPM-type schedules), against noise b'^2 it carries
        a_t, b_t = model.schedule.io_coeffs(t)
        a_prev, b_prev = model.schedule.io_coeffs(float(traj_t[s + 1])) if not last else (1.0, 0.0)
        # flow (velocity space): an Euler step moves x by (sigma' - sigma) v
        c = b_prev - b_t if space_of(model) == "velocity" else b_prev - a_prev * b_t / a_t
        per_bits = {}
        for b in [base] + cands:
            set_bits_override(den, None if b == base else b)
            with torch.no_grad():
                outs = [call_denoiser(mod, x[i:i + opts.batch_size], torch.full((len(x[i:i + opts.batch_size]),), float(t)),
                                      cond_take(cond, slice(i, i + opts.batch_size)), model.signature.num_classes)
                        for i in range(0, len(x), opts.batch_size)]
            e_q = eps_of(model, torch.cat(outs).float(), x, t)
            k, bias, var_r = fit(e_q - e_fp, e_fp, opts.correct_bias, opts.positive_k_only)
            res_var = var_r / (1 + k) ** 2
            snr = 10 * math.log10(max(b_prev**2, 1e-12) / max(c * c * res_var, 1e-20)) if not last else -math.inf
            uncorrected = float(((e_q - e_fp) ** 2).mean())
            per_bits[b] = {"k": k, "bias": bias, "res_var": res_var, "snr_db": snr, "mse_uncorrected": uncorrected,
                           "fit_residual": var_r}
        set_bits_override(den, None)
        chosen = base
        for b in cands:  # lowest first
            if per_bits[b]["snr_db"] >= opts.mp_min_snr_db:
                chosen = b
                break
        rows.append((t, chosen, per_bits))
    table = {
        "version": 1, "space": space_of(model), "base_act_bits": base, "mixed_precision": bool(cands), "variance": opts.variance,
        "timesteps": torch.tensor([r[0] for r in rows], dtype=torch.float64),
        "act_bits": torch.tensor([r[1] for r in rows], dtype=torch.int64),
        "k": torch.tensor([r[2][r[1]]["k"] for r in rows], dtype=torch.float32),
        "bias": torch.stack([r[2][r[1]]["bias"] for r in rows]).float(),
        "residual_var": torch.tensor([r[2][r[1]]["res_var"] for r in rows], dtype=torch.float32),
        "snr_db": torch.tensor([r[2][r[1]]["snr_db"] if math.isfinite(r[2][r[1]]["snr_db"]) else -1.0 for r in rows],
                               dtype=torch.float32),
        "samples": n, "sampler_steps": len(rows), **widths,
    }
    model.extras["ptqd"] = table
    install_step_bits(model)
    ks = table["k"]
    mse_unc = sum(r[2][r[1]]["mse_uncorrected"] for r in rows) / len(rows)
    mse_cor = sum(r[2][r[1]]["res_var"] for r in rows) / len(rows)
    fit_res = sum(r[2][r[1]]["fit_residual"] for r in rows) / len(rows)
    ctx.metrics.update({
        "steps": len(rows), "samples": n, "k_min": round(float(ks.min()), 5), "k_max": round(float(ks.max()), 5),
        "k_applied_steps": int((ks != 0).sum()),
        # eps MSE vs the FP model before/after correction, and the regression's own residual
        "eps_mse_uncorrected": mse_unc, "eps_mse_corrected": mse_cor, "fit_residual_mse": fit_res,
        "mean_act_bits": round(float(table["act_bits"].float().mean()), 3),
        "low_bit_steps": int((table["act_bits"] < base).sum()), "seconds": round(time.perf_counter() - t0, 2),
        # eps MSE vs the FP model at each candidate width over all steps (before correction)
        "eps_mse_by_width": {b: sum(r[2][b]["mse_uncorrected"] for r in rows) / len(rows) for b in [base] + cands},
        "recalibrated_widths": [int(b) for b in cands] if widths else [],
    })
    return model
