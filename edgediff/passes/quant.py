"""quant: W8A8 / low-bit (W4A8) post-training quantization of the denoiser, diffusion-aware.

Steps: trace the denoiser once (execution order, first/last layers, skip concatenations),
wrap every Conv2d/Linear (and attention matmuls) in simulation wrappers, initialise weight
scales per channel and activation ranges per tensor on the calibration set from the calib
pass (min-max, percentile, or L_p search with p = 2.4), then optionally run BRECQ block
reconstruction with AdaRound (weights) and learned activation steps. The float weights left
in each wrapper's `.inner` are on the quantization grid; model.extras["quant"] holds the
backend-neutral QuantParams (edgediff/quant_params.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
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

    def config(self) -> QuantConfig:
        return QuantConfig(self.weight_bits, self.act_bits, self.softmax_bits, self.first_last_bits, self.act_symmetric,
                           self.split_shortcut, self.quant_attention, self.weight_init, self.act_init, self.p,
                           self.percentile, quant_output=self.quant_output)

    def validate(self) -> None:
        self.config().validate()
        for k in ("iters", "act_iters", "recon_batch", "calib_limit", "batch_size"):
            v = getattr(self, k)
            zero_ok = k in ("iters", "act_iters")
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero_ok else 1):
                raise BadInput(f"quant: {k} must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")
        if not float(self.recon_lr) > 0:
            raise BadInput(f"quant: recon_lr must be > 0, got {self.recon_lr!r}")


def method_name(opts: QuantOptions) -> str:
    parts = [f"W{opts.weight_bits}A{opts.act_bits}", f"init={opts.weight_init}/{opts.act_init}"]
    if opts.reconstruct:
        parts.append(f"brecq-adaround(iters={opts.iters}+{opts.act_iters})")
    if opts.split_shortcut:
        parts.append("shortcut-split")
    if opts.quant_attention:
        parts.append(f"attn-matmuls(softmax {opts.softmax_bits}b)")
    return " ".join(parts)


@register("quant", QuantOptions, requires=("calib",))
def run(model: DiffusionModel, opts: QuantOptions, ctx: PassContext) -> DiffusionModel:
    opts.validate()
    from edgediff.onnx_source import calibration_feeds, is_graph_model, quantize_graph

    if is_graph_model(model):  # an ONNX graph: quantized as a graph, fed with the same calibration set
        if (opts.weight_bits, opts.act_bits) != (8, 8):
            raise BadInput(f"quant: an ONNX-only model is quantized W8A8 (got W{opts.weight_bits}A{opts.act_bits})")
        data = load_calibration(model, ctx)
        n = min(opts.calib_limit, len(data["x"]))
        feeds = calibration_feeds({k: v[:n] for k, v in data.items() if k in ("x", "t", "cond")}, model.signature)
        ctx.metrics.update(quantize_graph(model, feeds, opts.graph_quantizer))
        return model
    cfg = opts.config()
    if any(is_quant_wrapper(m) for m in model.denoiser.modules()):
        raise BadInput("quant: the model is already quantized (it has quantization wrappers)")
    if any(p.dtype != torch.float32 for p in model.denoiser.parameters()):
        raise BadInput("quant: the model must be float32 (run quant before fp16, not after)")
    data = load_calibration(model, ctx)
    n = min(opts.calib_limit, len(data["x"]))
    data = {k: v[:n] for k, v in data.items() if k in ("x", "t", "cond")}
    num_classes = model.signature.num_classes
    den = model.denoiser.eval()
    fp_den = copy.deepcopy(den)  # the float reference for reconstruction targets
    for p in list(den.parameters()) + list(fp_den.parameters()):
        p.requires_grad_(False)
    t0 = time.perf_counter()

    def runner(root_model: DiffusionModel, limit: int | None = None):  # noqa: ANN202
        mod = root_model.module()

        def calls():  # noqa: ANN202
            for x, t, c in batches(data, opts.batch_size, limit):
                yield lambda x=x, t=t, c=c: call_denoiser(mod, x, t, c, num_classes)
        return calls

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
