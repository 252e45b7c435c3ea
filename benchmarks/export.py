"""ONNX export benchmark: size, onnxruntime latency per denoiser call, verify PSNR; vs PyTorch and ORT quantize_static.

    python benchmarks/export.py [--models demo,cifar] [--repeat 20] [--steps 20] [--samples 8]
                                [--threads 1] [--out bench-out/export.json]

Models: `demo` (the bundled 1x16x16 digits UNet2DModel, trained) and `cifar` (diffusers
UNet2DModel with the google/ddpm-cifar10-32 config, 35.7M params, RANDOMLY INITIALISED: size
and speed figures only; its PSNRs compare runtimes on the same random network).

Per model, in one run:
- PyTorch eager fp32: latency per denoiser call (batch 1) = the reference for the ratios;
- edgediff ONNX fp32 / fp16 / int8: file size, onnxruntime latency and its ratio to PyTorch,
  and `edgediff.verify` (same DDIM sampler and seeds on onnxruntime vs the PyTorch reference):
  final-sample PSNR, max abs error of single calls, exit code. int8 uses hand-built min-max
  W8A8 QuantParams (edgediff.testing.minmax_quantize, NOT the quant pass's calibration), so its
  verify compares onnxruntime against that simulation; its PSNR vs the float model is given too;
- the peer: onnxruntime.quantization.quantize_static on the fp32 ONNX (QDQ, per-channel int8
  weights, uint8 activations, min-max calibration on the same kind of inputs): size, latency,
  PSNR of its samples vs the float model.
cifar runs with a quarter of --repeat/--samples and half of --steps (it costs ~100x the demo).
Latency: onnxruntime and torch both with --threads intra-op threads, batch 1, median of
--repeat calls after 3 warm-up calls. This machine is a shared 2-core VM: absolute times are
noisy, ratios taken in the same run are the figures to read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgediff.exporters import get_backend
from edgediff.exporters.onnx import OnnxDenoiser

from edgediff.metrics import psnr
from edgediff.model import DiffusionModel, InputSignature
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample
from edgediff.schedule import NoiseSchedule
from edgediff.testing import minmax_quantize
from edgediff.verify import verify

# google/ddpm-cifar10-32's UNet2DModel config (as in benchmarks/pruning.py)
CIFAR_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, dropout=0.0)


def load(name: str) -> tuple[DiffusionModel, str]:
    if name == "demo":
        from edgediff.loaders import load_model

        return load_model("demo"), "bundled demo model (trained on digits)"
    if name == "cifar":
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        m = UNet2DModel(**CIFAR_CONFIG).eval()
        return (DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((3, 32, 32)), "UNet2DModel",
                               dict(m.config), {"source": "cifar-config"}),
                "google/ddpm-cifar10-32 config, randomly initialised")
    raise SystemExit(f"unknown model {name!r} (demo, cifar)")


def latency_ms(fn: Any, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ort_latency(path: Path, model: DiffusionModel, repeat: int, threads: int) -> float:
    den = OnnxDenoiser(path, providers=["CPUExecutionProvider"], threads=threads)
    inp = model.signature.example_inputs(1)
    return latency_ms(lambda: den(inp["sample"], inp["timestep"]), repeat)


def final_samples(den: Any, model: DiffusionModel, steps: int, samples: int) -> torch.Tensor:
    out = sample(den, model.schedule, model.signature.sample_shape, samples, 0, SamplerConfig("ddim", steps))
    assert isinstance(out, torch.Tensor)
    return out


def ort_quantize_static(fp32: Path, dest: Path, model: DiffusionModel) -> None:
    """The peer: onnxruntime's own static quantization (QDQ) with min-max calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.items = []
            for i in range(4):
                inp = model.signature.example_inputs(2, seed=i)
                t = torch.randint(0, model.schedule.num_train_timesteps, (2,), generator=g).float()
                self.items.append({"sample": inp["sample"].numpy(), "timestep": t.numpy()})
            self.it = iter(self.items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(fp32), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def bench_model(name: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    model, what = load(name)
    if name == "cifar":
        # ~100x the demo's MACs per call: fewer calls keep the default run to a few minutes
        args = argparse.Namespace(**{**vars(args), "repeat": max(3, args.repeat // 4), "steps": max(2, args.steps // 2),
                                     "samples": max(1, args.samples // 4)})
    rows: list[dict[str, Any]] = []
    torch.set_num_threads(args.threads)
    ref = TorchDenoiser(model)
    inp = model.signature.example_inputs(1)
    t_torch = latency_ms(lambda: ref(inp["sample"], inp["timestep"]), args.repeat)
    float_samples = final_samples(ref, model, args.steps, args.samples)
    params = sum(p.numel() for p in model.denoiser.parameters())
    rows.append({"model": name, "what": what, "variant": "pytorch eager fp32", "size_bytes": params * 4,
                 "latency_ms": round(t_torch, 3), "vs_pytorch": 1.0, "psnr_db": None, "note": "reference"})
    quantized = minmax_quantize(model)
    backend = get_backend("onnx")
    paths: dict[str, Path] = {}
    for precision in ("fp32", "fp16", "int8"):
        src = quantized if precision == "int8" else model
        path = work / f"{name}-{precision}.onnx"
        t0 = time.perf_counter()
        rep = backend.export(src, path, precision, force=True)
        export_s = time.perf_counter() - t0
        paths[precision] = path
        t = ort_latency(path, model, args.repeat, args.threads)
        v = verify(src, path, steps=args.steps, samples=args.samples, return_samples=True)
        row = {"model": name, "what": what, "variant": f"edgediff onnx {precision}", "steps": args.steps,
               "samples": args.samples, "size_bytes": rep["size_bytes"],
               "latency_ms": round(t, 3), "vs_pytorch": round(t_torch / t, 3), "psnr_db": v.get("psnr_db"),
               "max_abs_err": v.get("max_abs_err"), "verify_exit": v["exit_code"], "export_s": round(export_s, 1),
               "nodes": rep["nodes"]}
        if precision == "int8":
            row["psnr_vs_float_db"] = round(psnr(v["final_samples"], float_samples), 3)
            row["note"] = "hand-built min-max W8A8 (edgediff.testing), verify vs its simulation"
        rows.append(row)
        print(f"  {name} {precision}: {row}", file=sys.stderr, flush=True)
    peer = work / f"{name}-ort-qdq.onnx"
    ort_quantize_static(paths["fp32"], peer, model)
    t = ort_latency(peer, model, args.repeat, args.threads)
    peer_den = OnnxDenoiser(peer, providers=["CPUExecutionProvider"], threads=args.threads)
    s = final_samples(peer_den, model, args.steps, args.samples)
    rows.append({"model": name, "what": what, "variant": "onnxruntime quantize_static int8 (peer)",
                 "size_bytes": peer.stat().st_size, "latency_ms": round(t, 3), "vs_pytorch": round(t_torch / t, 3),
                 "psnr_db": None, "psnr_vs_float_db": round(psnr(s, float_samples), 3),
                 "note": "QDQ, per-channel int8 weights, uint8 activations, min-max calibration"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,cifar")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench-out/export.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgediff-bench-export-") as td:
        for name in args.models.split(","):
            print(f"benchmarking {name}", file=sys.stderr, flush=True)
            rows += bench_model(name.strip(), args, Path(td))
    hdr = f"{'model':6} {'variant':42} {'bytes':>11} {'ms/call':>9} {'x torch':>8} {'PSNR':>8} {'PSNR/fp':>8}"
    print(hdr)
    for r in rows:
        p = "" if r.get("psnr_db") is None else f"{r['psnr_db']:.2f}"
        pf = "" if r.get("psnr_vs_float_db") is None else f"{r['psnr_vs_float_db']:.2f}"
        print(f"{r['model']:6} {r['variant']:42} {r['size_bytes']:>11,} {r['latency_ms']:>9.2f} {r['vs_pytorch']:>8.2f} "
              f"{p:>8} {pf:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "export", "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1),
              "notes": ["PSNR: verify's final-sample PSNR vs the reference (int8: vs its own PyTorch simulation)",
                        "PSNR/fp: final samples vs the float PyTorch model (quantization error, not export error)",
                        "cifar is randomly initialised: speed/size only; int8 QuantParams are min-max, not the "
                        "quant pass"]}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
