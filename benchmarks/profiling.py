"""Benchmark of edgediff.profiling: the estimator's error on this CPU and the profiler's overhead.

For the demo model (bundled weights) and a cifar-scale UNet2DModel (google/ddpm-cifar10-32
config, RANDOM init: latency does not depend on the weights' values):
1. export fp32 ONNX with the project's exporter, profile it on onnxruntime (per-layer, plain total);
2. profiler overhead: median of profiled runs vs plain runs, and the per-node profiler floor;
3. estimator error: the `this-cpu` roofline fitted on one model and evaluated on the OTHER
   (held-out), plus in-sample; per layer (median / time-weighted |error|) and total;
4. peer baseline, same run: the estimate FLOP counters imply (latency proportional to MACs,
   one GMAC/s rate fitted on the same fit set, as with thop/fvcore/ptflops figures), and the
   uncalibrated roofline (default efficiencies) to show what calibration buys;
5. estimated totals on every device in the table (estimates, labelled so).

    python benchmarks/profiling.py [--out bench-out/profiling.json] [--threads 1] [--repeats 20] [--models demo,cifar]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CIFAR_CONFIG = {  # google/ddpm-cifar10-32 unet config
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "dropout": 0.0, "norm_num_groups": 32, "attention_head_dim": None, "norm_eps": 1e-6,
    "flip_sin_to_cos": False, "freq_shift": 1, "time_embedding_type": "positional", "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 0, "mid_block_scale_factor": 1,
}


def load(name: str) -> Any:
    from edgediff.loaders import load_model
    from edgediff.model import DiffusionModel, InputSignature
    from edgediff.schedule import NoiseSchedule

    if name == "demo":
        return load_model("demo"), "bundled trained weights"
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    m = UNet2DModel(**CIFAR_CONFIG).eval()
    return (DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((3, 32, 32)), "UNet2DModel", dict(m.config),
                           {"source": "cifar-scale config, random init"}), "random init (ddpm-cifar10-32 config)")


def baseline_macs_rate(fit_ops: list[Any], fit_meas: dict[str, Any]) -> float:
    """The FLOP-counter estimate: one MACs/ms rate, fitted as total MACs / total measured time."""
    macs = sum(o.macs for o in fit_ops)
    return macs / fit_meas["total_ms"]


def baseline_eval(ops: list[Any], meas: dict[str, Any], rate: float) -> dict[str, Any]:
    from edgediff.profiling.estimate import align, error_report

    per: dict[str, float] = {}
    for o in ops:
        per[o.name or "(root)"] = per.get(o.name or "(root)", 0.0) + o.macs / rate
    layers = [{"name": k, "ms": max(v, 1e-6)} for k, v in per.items()]
    return error_report(align(layers, meas["layers"]), sum(per.values()), meas["total_ms"], meas["total"]["min_ms"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/profiling.json"))
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: steadier on a shared box)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--models", default="demo,cifar")
    args = ap.parse_args()

    from edgediff import metrics
    from edgediff.profiling.estimate import DEFAULT_EFFICIENCY, device_names, estimate_profile, evaluate, fit_efficiency, this_cpu
    from edgediff.profiling.graph import onnx_ops
    from edgediff.profiling.ort import profile_ort
    from edgediff.profiling.run import attach_work, export_onnx

    names = [m for m in args.models.split(",") if m]
    load_before = os.getloadavg()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgediff-bench-prof-") as tmp:
        for name in names:
            model, weights = load(name)
            path = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            how = export_onnx(model, path)
            t_export = time.perf_counter() - t0
            ops = onnx_ops(path)
            reps = args.repeats if name == "demo" else max(5, args.repeats // 2)
            t0 = time.perf_counter()
            meas = profile_ort(path, warmup=3, repeats=reps, threads=args.threads)
            t_prof = time.perf_counter() - t0
            attach_work(meas, ops)
            runs[name] = {"model": model, "weights": weights, "ops": ops, "meas": meas, "export": how,
                          "export_s": t_export, "profile_s": t_prof, "params": metrics.params(model.module())}
            print(f"[{name}] exported ({how}) in {t_export:.1f}s, profiled in {t_prof:.1f}s", file=sys.stderr)

        dev = this_cpu(args.threads)
        fits = {n: fit_efficiency(r["ops"], r["meas"]["layers"], dev) for n, r in runs.items()}
        results: dict[str, Any] = {}
        for name, r in runs.items():
            other = next((n for n in runs if n != name), name)
            m = r["meas"]
            held = evaluate(r["ops"], m, fits[other], args.threads)
            insample = evaluate(r["ops"], m, fits[name], args.threads)
            uncal = evaluate(r["ops"], m, dict(DEFAULT_EFFICIENCY), args.threads)
            rate = baseline_macs_rate(runs[other]["ops"], runs[other]["meas"])
            base = baseline_eval(r["ops"], m, rate)
            devices = {d: estimate_profile(r["ops"], d)["total_ms"] for d in device_names() if d != "this-cpu"}
            for e in (held, insample, uncal):
                e.pop("pairs", None)
            results[name] = {
                "weights": r["weights"], "exported_with": r["export"], "params": r["params"],
                "macs": sum(o.macs for o in r["ops"]), "onnx_nodes": len(r["ops"]),
                "measured": {"total_median_ms": m["total_ms"], **{k: m["total"][k] for k in ("p10_ms", "p90_ms", "min_ms")},
                             "runs": m["total"]["runs"], "layer_sum_ms": m["layer_sum_ms"],
                             "layer_sum_raw_ms": m["layer_sum_raw_ms"], "profiler_floor_ms": m["profiler_floor_ms"],
                             "profiled_run_median_ms": m["profiled_run_median_ms"],
                             "profiler_overhead": m["profiler_overhead"], "peak_memory_bytes": m["peak_memory_bytes"],
                             "layers": len(m["layers"])},
                "estimator": {"fit_on": other, "held_out": held, "in_sample": insample, "uncalibrated_roofline": uncal},
                "peer_macs_proportional": {"fit_on": other, "gmacs_per_s": rate / 1e6, **base},
                "device_estimates_ms": devices,
                "top_layers": sorted(({k: la.get(k) for k in ("name", "op", "ms", "share", "macs")} for la in m["layers"]),
                                     key=lambda la: -la["ms"])[:10],
            }
    out = {"benchmark": "profiling", "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
           "this_cpu_peaks": {"gmacs_fp32": dev["peak_gmacs"]["fp32"], "bandwidth_gbs": dev["bandwidth_gbs"]},
           "fitted_efficiency": fits, "models": results,
           "note": "device_estimates_ms are ESTIMATES (roofline, cited peaks, assumed efficiencies)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from edgediff.artifact import atomic_file

    with atomic_file(args.out, force=True) as t:
        t.write_text(json.dumps(out, indent=2, default=float) + "\n")
    _print(out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _f(v: Any, fmt: str = ".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def _print(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=170)
    t = Table(title=f"profiler on onnxruntime CPU, threads={out['threads']} (load avg {out['load_avg_before'][0]:.1f})")
    for col in ("model", "MACs", "plain median ms", "p10-p90", "profiled run ms", "overhead", "layer sum ms",
                "profiler floor us", "peak arena MB"):
        t.add_column(col, justify="right")
    for name, r in out["models"].items():
        m = r["measured"]
        t.add_row(name, f"{r['macs'] / 1e6:,.1f}M", _f(m["total_median_ms"], ".3f"), f"{_f(m['p10_ms'])}-{_f(m['p90_ms'])}",
                  _f(m["profiled_run_median_ms"], ".3f"), f"{_f(m['profiler_overhead'] * 100, '.0f')}%",
                  _f(m["layer_sum_ms"], ".3f"), _f(m["profiler_floor_ms"] * 1000, ".1f"),
                  _f(m["peak_memory_bytes"] / 2**20, ".1f"))
    c.print(t)
    t = Table(title="estimator error on this CPU (per-layer = per source module)")
    for col in ("model", "method", "fit on", "median |err| %", "time-weighted |err| %", "rank corr.", "total err % (vs median)",
                "total err % (vs fastest run)"):
        t.add_column(col, justify="right")
    for name, r in out["models"].items():
        e = r["estimator"]
        rows = [("roofline, calibrated (held-out)", e["held_out"], e["fit_on"]),
                ("roofline, calibrated (in-sample)", e["in_sample"], name),
                ("roofline, uncalibrated", e["uncalibrated_roofline"], "-"),
                ("peer: MACs-proportional", r["peer_macs_proportional"], r["peer_macs_proportional"]["fit_on"])]
        for label, err, fit in rows:
            t.add_row(name, label, fit, _f(err.get("median_abs_pct_err"), ".0f"), _f(err.get("weighted_abs_pct_err"), ".0f"),
                      _f(err.get("spearman")), _f(err.get("total_pct_err"), "+.0f"),
                      _f(err.get("total_pct_err_vs_fastest"), "+.0f"))
        ho, pe = e["held_out"], r["peer_macs_proportional"]
        if ho.get("weighted_abs_pct_err") and pe.get("weighted_abs_pct_err"):
            t.add_row(name, "ratio ours/peer (weighted err)", "", "", _f(ho["weighted_abs_pct_err"] / pe["weighted_abs_pct_err"]),
                      "", "", "")
    c.print(t)
    t = Table(title="ESTIMATED latency per denoiser call on devices (ms; roofline, cited peaks, assumed efficiencies)")
    t.add_column("device")
    for name in out["models"]:
        t.add_column(name, justify="right")
    devs = next(iter(out["models"].values()))["device_estimates_ms"]
    for d in devs:
        t.add_row(d, *(_f(r["device_estimates_ms"][d], ".3f") for r in out["models"].values()))
    c.print(t)


if __name__ == "__main__":
    sys.exit(main())
