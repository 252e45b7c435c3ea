"""quant: W8A8 / low-bit (W4A8) post-training quantization of the denoiser, diffusion-aware.

Steps: trace the denoiser once (execution order, first/last layers, skip concatenations),
wrap every Conv2d/Linear (and attention matmuls) in simulation wrappers, initialise weight
scales per channel and activation ranges per tensor on the calibration set from the calib
pass (min-max, percentile, or L_p search with p = 2.4), then optionally run BRECQ block
reconstruction with AdaRound (weights) and learned activation steps. The float weights left
in each wrapper's `.inner` are on the quantization grid; model.extras["quant"] holds the
backend-neutral QuantParams (edgediff/quant_params.py).

Outliers and the quality floor: `smooth` migrates per-channel activation outliers into the
weights before anything is quantized (SmoothQuant, edgediff/quant/smooth.py); `min_psnr_db`
measures the final samples of the quantized model against the float model that entered the
pass and, under the floor, keeps the most sensitive layers in float until it holds
(edgediff/quant/sensitivity.py). Layers kept in float are plain Conv2d/Linear in the result,
absent from QuantParams, so every exporter runs them in float.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, set_submodule
from edgediff.passes import PassContext, register
from edgediff.passes.calib import load_calibration
from edgediff.quant.apply import (
    QuantConfig,
    bake_weights,
    batches,
    calibrate_activations,
    call_denoiser,
    init_weights,
    quant_params,
    quantize_module,
    trace_layers,
)
from edgediff.quant.core import quant_layers
from edgediff.quant.reconstruct import ReconConfig, capture, execution_order, find_blocks, reconstruct_block
from edgediff.quant_params import is_quant_wrapper


@dataclass
class QuantOptions:
    weight_bits: int = 8
    act_bits: int = 8
    softmax_bits: int = 8  # bit-width of the softmax output entering softmax·V
    first_last_bits: int = 8  # first and last layer (BRECQ/Q-Diffusion keep them at 8 bits)
    act_symmetric: bool = False  # False: unsigned with a zero point (better after SiLU)
    split_shortcut: bool = True  # Q-Diffusion's shortcut splitting where skip features are concatenated
    split_weights: bool = False  # also split the weights there: each input half its own per-channel scale
    weight_symmetric: bool = True  # False: per-channel asymmetric weights (zero points; for <= 4 bits)
    quant_attention: bool = True  # quantize QK^T and softmax·V operands
    weight_init: str = "mse"  # minmax | percentile | mse (L_p search)
    act_init: str = "mse"
    p: float = 2.4  # the L_p norm of the MSE search
    percentile: float = 99.99
    reconstruct: bool = False  # BRECQ block reconstruction with AdaRound
    iters: int = 1000  # stage 1 (AdaRound weights, float activations) iterations per block
    act_iters: int = 500  # stage 2 (activation steps, LSQ) iterations per block
    recon_lr: float = 1e-3  # AdaRound learning rate (Q-Diffusion / BRECQ)
    recon_batch: int = 16
    learn_act: bool = True  # LSQ-style learned activation steps during reconstruction
    round_weight: float = 0.01  # AdaRound regulariser weight
    calib_limit: int = 512  # calibration points used (a prefix of the calib set, which is shuffled)
    batch_size: int = 64
    quant_output: bool = True  # requantize layer outputs like integer kernels (false: float outputs)
    graph_quantizer: str = "ort"  # ONNX-in models only: "ort" (quantize_static) or "nncf" (edgediff.onnx_source)
    smooth: bool = False  # SmoothQuant scale migration into norm -> Linear / 1x1 conv pairs
    smooth_alpha: float = 0.5  # migration strength (SmoothQuant's alpha)
    # quality floor: PSNR (dB) of final samples vs the float model entering the pass; 0 = off
    min_psnr_db: float = 0.0
    floor_samples: int = 16  # the floor's protocol (as compress's psnr_vs_original_db: 16 x 20, seed 0)
    floor_steps: int = 20
    sensitivity_samples: int = 4  # the per-layer sweep's smaller protocol (one run per layer)
    sensitivity_steps: int = 10
    floor_max_layers: int = 0  # most layers kept in float (0: as many as needed)
    floor_device: str = "rpi5-cpu"  # device of the latency estimate for layers kept in float

    def config(self) -> QuantConfig:
        return QuantConfig(self.weight_bits, self.act_bits, self.softmax_bits, self.first_last_bits, self.act_symmetric,
                           self.split_shortcut, self.quant_attention, self.weight_init, self.act_init, self.p,
                           self.percentile, quant_output=self.quant_output, split_weights=self.split_weights,
                           weight_symmetric=self.weight_symmetric)

    def validate(self) -> None:
        self.config().validate()
        for k in ("iters", "act_iters", "recon_batch", "calib_limit", "batch_size", "floor_samples", "floor_steps",
                  "sensitivity_samples", "sensitivity_steps", "floor_max_layers"):
            v = getattr(self, k)
            zero_ok = k in ("iters", "act_iters", "floor_max_layers")
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero_ok else 1):
                raise BadInput(f"quant: {k} must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")
        if not float(self.recon_lr) > 0:
            raise BadInput(f"quant: recon_lr must be > 0, got {self.recon_lr!r}")
        if isinstance(self.min_psnr_db, bool) or not isinstance(self.min_psnr_db, (int, float)) \
                or not 0 <= self.min_psnr_db < 200:
            raise BadInput(f"quant: min_psnr_db must be a number of dB in [0, 200) (0: off), got {self.min_psnr_db!r}")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                or not 0 < self.smooth_alpha < 1:
            raise BadInput(f"quant: smooth_alpha must be in (0, 1), got {self.smooth_alpha!r}")
        if self.min_psnr_db:
            from edgediff.profiling.estimate import device_names

            if self.floor_device not in device_names():
                raise BadInput(f"quant: floor_device {self.floor_device!r} is unknown; expected one of "
                               f"{', '.join(device_names())}")


def method_name(opts: QuantOptions) -> str:
    parts = [f"W{opts.weight_bits}A{opts.act_bits}", f"init={opts.weight_init}/{opts.act_init}"]
    if opts.smooth:
        parts.append(f"smoothquant(alpha={opts.smooth_alpha:g})")
    if opts.reconstruct:
        parts.append(f"brecq-adaround(iters={opts.iters}+{opts.act_iters})")
    if opts.split_shortcut:
        parts.append("shortcut-split" + ("(weights too)" if opts.split_weights else ""))
    if not opts.weight_symmetric:
        parts.append("asymmetric-weights")
    if opts.quant_attention:
        parts.append(f"attn-matmuls(softmax {opts.softmax_bits}b)")
    return " ".join(parts)


@register("quant", QuantOptions, requires=("calib",), must_precede=("fp16",))
def run(model: DiffusionModel, opts: QuantOptions, ctx: PassContext) -> DiffusionModel:
    opts.validate()
    from edgediff.onnx_source import calibration_feeds, is_graph_model, quantize_graph

    if is_graph_model(model):  # an ONNX graph: quantized as a graph, fed with the same calibration set
        if (opts.weight_bits, opts.act_bits) != (8, 8):
            raise BadInput(f"quant: an ONNX-only model is quantized W8A8 (got W{opts.weight_bits}A{opts.act_bits})")
        data = load_calibration(model, ctx)
        n = min(opts.calib_limit, len(data["x"]))
        points = {k: v[:n] for k, v in data.items() if k in ("x", "t", "cond") or k.startswith("cond.")}
        feeds = calibration_feeds(points, model.signature)
        ctx.metrics.update(quantize_graph(model, feeds, opts.graph_quantizer, split_shortcut=opts.split_shortcut))
        return model
    cfg = opts.config()
    if any(is_quant_wrapper(m) for m in model.denoiser.modules()):
        raise BadInput("quant: the model is already quantized (it has quantization wrappers)")
    if any(p.dtype != torch.float32 for p in model.denoiser.parameters()):
        raise BadInput("quant: the model must be float32 (run quant before fp16, not after)")
    data = load_calibration(model, ctx)
    n = min(opts.calib_limit, len(data["x"]))
    data = {k: v[:n] for k, v in data.items() if k in ("x", "t", "cond") or k.startswith("cond.")}
    num_classes = model.signature.num_classes
    den = model.denoiser.eval()
    for p in den.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()

    def runner(root_model: DiffusionModel, limit: int | None = None):  # noqa: ANN202
        mod = root_model.module()

        def calls():  # noqa: ANN202
            for x, t, c in batches(data, opts.batch_size, limit):
                yield lambda x=x, t=t, c=c: call_denoiser(mod, x, t, c, num_classes)
        return calls

    smooth_stats = None
    if opts.smooth:  # before the float reference is copied: the smoothed model computes the same
        from edgediff.quant.smooth import smooth

        first = next(runner(model, opts.batch_size)())
        with torch.no_grad():
            smooth_stats = smooth(den, runner(model), lambda: first().detach().clone(), float(opts.smooth_alpha))
    fp_den = copy.deepcopy(den)  # the float reference for reconstruction targets and the floor

    one = next(runner(model, 2)())
    infos = trace_layers(den, one)
    if not infos:
        raise BadInput("quant: model has no quantizable layers (no Conv2d/Linear is called in its forward)")
    quantize_module(den, infos, cfg)
    init_weights(den, cfg)

    def run_all() -> None:
        with torch.no_grad():
            for call in ctx.track(list(runner(model)()), "quant: observing activations"):
                call()

    calibrate_activations(den, run_all, cfg)
    recon_stats = {}
    t_recon = time.perf_counter()
    if opts.reconstruct and (opts.iters > 0 or opts.act_iters > 0):
        fp_model = DiffusionModel(fp_den, model.schedule, model.signature, model.arch, model.config)
        blocks = execution_order(den, find_blocks(den), next(runner(model, 2)()))
        rc = ReconConfig(iters=opts.iters, act_iters=opts.act_iters, lr=float(opts.recon_lr),
                         batch_size=opts.recon_batch, round_weight=opts.round_weight, learn_act=opts.learn_act)
        for i, name in enumerate(ctx.track(blocks, f"quant: block reconstruction ({opts.iters} it/block)")):
            qb, fb = den.get_submodule(name), fp_den.get_submodule(name)
            # inputs as the quantized model sees them, targets from the float model
            inputs = capture(den, qb, runner(model), "inputs")
            targets = capture(fp_den, fb, runner(fp_model), "output")
            if opts.recon_batch < opts.batch_size:
                inputs, targets = _rebatch(inputs, targets, opts.recon_batch)
            if not inputs:
                continue
            with torch.enable_grad():
                recon_stats[name] = reconstruct_block(qb, inputs, targets, rc, seed=ctx.seed + i)
    floor_stats = None
    if opts.min_psnr_db:
        fp_model = DiffusionModel(fp_den, model.schedule, model.signature, model.arch, model.config)
        floor_stats = _quality_floor(model, fp_model, opts, next(runner(model, 1)()), ctx)
    bake_weights(den)
    params = quant_params(den, cfg, method_name(opts))
    model.extras["quant"] = params.to_extras()
    model.provenance["quant"] = {"method": params.method}
    n_layers = len([k for k in params.layers if ":" not in k])
    ctx.metrics.update({
        "method": params.method, "calib_points": n, "quantized_layers": n_layers,
        "attention_matmuls": len([k for k in params.layers if ":" in k]) // 2,
        "split_layers": sum(1 for lq in params.layers.values() if lq.meta.get("split_at")),
        "wrappers": len(quant_layers(den)), "seconds": round(time.perf_counter() - t0, 2),
    })
    if smooth_stats is not None:
        ctx.metrics["smoothing"] = smooth_stats
    if floor_stats is not None:
        ctx.metrics["quality_floor"] = floor_stats
    if recon_stats:
        ctx.metrics["reconstruction"] = {
            "blocks": len(recon_stats),
            "mse_before_sum": sum(s["mse_before"] for s in recon_stats.values()),
            "mse_after_sum": sum(s["mse_after"] for s in recon_stats.values()),
            "blocks_reverted": int(sum(s["reverted"] for s in recon_stats.values())),
            "reverted": sorted(n for n, s in recon_stats.items() if s["reverted"]),
            "rounding_decided_mean": round(sum(s["rounding_decided"] for s in recon_stats.values())
                                           / len(recon_stats), 4),
            "seconds": round(time.perf_counter() - t_recon, 2),
        }
    return model


def _quality_floor(model: DiffusionModel, fp_model: DiffusionModel, opts: QuantOptions, run_one: Any,
                   ctx: PassContext) -> dict[str, Any]:
    """Measure the quantized model's final samples against the float one; under the floor, find
    the layers to keep in float (most sensitive first) and what they cost."""
    from edgediff.quality import final_samples, psnr_vs
    from edgediff.quant import sensitivity as sens

    def protocol(samples: int, steps: int) -> Any:
        ref = final_samples(fp_model, samples, steps, None, 0, with_correction=False)
        return lambda: psnr_vs(final_samples(model, samples, steps, None, 0, with_correction=False), ref)

    floor = float(opts.min_psnr_db)
    psnr_of = protocol(opts.floor_samples, opts.floor_steps)
    t0 = time.perf_counter()
    bake_weights(model.denoiser)  # measured as shipped (on-grid weights, AdaRound decided)
    before = psnr_of()
    out: dict[str, Any] = {"min_psnr_db": floor, "protocol": {"samples": opts.floor_samples, "steps": opts.floor_steps,
                                                              "seed": 0, "reference": "float model entering quant"},
                           "psnr_before_db": round(before, 3), "raised": [], "psnr_after_db": round(before, 3)}
    if before >= floor:
        out.update(held=True, seconds=round(time.perf_counter() - t0, 2))
        return out
    den, us = model.denoiser, sens.units(model.denoiser)
    work = sens.unit_work(den, list(us), run_one)
    # float units are the float modules they came from swapped in (not quantizers switched off):
    # what is measured is what ships
    make_float = _swapper(den, fp_model.denoiser, us)
    sweep = sens.sensitivities(list(us), make_float, protocol(opts.sensitivity_samples, opts.sensitivity_steps))
    order = sorted(us, key=lambda n: sweep[n])
    raised, after, tried = sens.raise_until(order, make_float, psnr_of, floor, opts.floor_max_layers or None)
    work = {n: work[n] for n in raised if n in work}
    held = after >= floor
    out.update(
        held=held, psnr_after_db=round(after, 3), raised=raised, units=len(us),
        sensitivity={"protocol": {"samples": opts.sensitivity_samples, "steps": opts.sensitivity_steps},
                     "psnr_db_only_this_quantized": {n: round(sweep[n], 2) for n in order[:10]}},
        searched=[[k, round(p, 3)] for k, p in tried], cost=sens.cost(work, opts.floor_device),
        seconds=round(time.perf_counter() - t0, 2))
    msg = (f"quant: final samples {before:.1f} dB vs the float model, under the floor {floor:g} dB; "
           f"kept {len(raised)} layer(s) in float -> {after:.1f} dB")
    ctx.log(msg if held else msg + " (floor NOT reached)")
    return out


def _swapper(den: torch.nn.Module, fp_den: torch.nn.Module, us: dict[str, Any]) -> Any:
    """make_float for the floor: the named units become the float modules they came from (plain
    Conv2d/Linear, a float attention processor), the others their quantized wrappers again;
    the exporters then run the float ones in float (they are absent from QuantParams)."""
    from edgediff.quant.core import QuantAttnProcessor

    floats: dict[str, Any] = {}

    def place(name: str, mod: Any) -> None:
        if isinstance(us[name], QuantAttnProcessor):
            den.get_submodule(name.rsplit(".processor", 1)[0]).set_processor(mod)
            return
        set_submodule(den, name, mod)

    def make_float(names: list[str]) -> None:
        off = set(names)
        for name, unit in us.items():
            if name in off:
                if name not in floats:
                    floats[name] = copy.deepcopy(unit.inner if isinstance(unit, QuantAttnProcessor)
                                                 else fp_den.get_submodule(name))
                place(name, floats[name])
            else:
                place(name, unit)
    return make_float


def _rebatch(inputs: list, targets: list, bs: int) -> tuple[list, list]:
    """Split captured batches into reconstruction mini-batches (tensors with a batch axis only)."""
    out_in, out_t = [], []
    for (args, kwargs), tgt in zip(inputs, targets):
        b = tgt.shape[0]
        for i in range(0, b, bs):
            j = min(i + bs, b)
            out_in.append((tuple(_slice(a, i, j, b) for a in args), {k: _slice(v, i, j, b) for k, v in kwargs.items()}))
            out_t.append(tgt[i:j])
    return out_in, out_t


def _slice(v: object, i: int, j: int, b: int) -> object:
    return v[i:j] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v
