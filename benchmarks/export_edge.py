"""TFLite/LiteRT and Core ML exports: file size, LiteRT latency per call vs onnxruntime fp32, verify PSNR.

    python benchmarks/export_edge.py [--models demo,cifar] [--steps 10] [--samples 4] [--rows ...]
                                     [--out bench-out/export_edge.json]

Models: `demo` (the bundled demo UNet, 1x16x16) and `cifar` (diffusers UNet2DModel with the
config of google/ddpm-cifar10-32, 35.7M params, RANDOMLY INITIALISED: no hub download works
here; its figures are for size and speed, not quality). int8 rows use min-max W8A8
QuantParams from edgediff.testing.minmax_quantize (not the quant pass), unless --artifact
gives a quantized artifact.

Rows per model: the peer (onnxruntime fp32, exported by exporters/onnx.py in the same run),
tflite fp32/fp16/int8 and coreml fp16/int8/palettized. Latency: median over --repeat calls at
batch 1 after warm-up, LiteRT (XNNPACK) and onnxruntime both with --threads threads, the
runtimes taking turns call by call (fair under a changing machine load). Core ML
cannot run on Linux: its rows have size only and `verified: false` with the reason.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

CIFAR_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, dropout=0.0)


def cifar_model() -> Any:
    from diffusers import UNet2DModel

    from edgediff.model import DiffusionModel, InputSignature
    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    m = UNet2DModel(**CIFAR_CONFIG).eval()
    return DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((3, 32, 32)), "UNet2DModel", dict(m.config),
                          {"source": "google/ddpm-cifar10-32 config, random init"})


def interleaved_latency_ms(runners: dict[int, Any], model: Any, repeat: int) -> dict[int, float]:
    """Median ms per call at batch 1, the runtimes taking turns call by call.

    Round-robin rather than one runtime after the other: on a shared machine the load
    changes over minutes, and taking turns exposes every runtime to the same load.
    """
    inp = model.signature.example_inputs(1, seed=0)
    x, t = inp["sample"], inp["timestep"]
    for den in runners.values():
        for _ in range(2):
            den(x, t)
    times: dict[int, list[float]] = {k: [] for k in runners}
    for _ in range(repeat):
        for k, den in runners.items():
            t0 = time.perf_counter()
            den(x, t)
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def bench_model(name: str, model: Any, qmodel: Any, folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from edgediff.exporters import get_backend
    from edgediff.exporters.onnx import OnnxDenoiser
    from edgediff.exporters.tflite import LiteRTDenoiser

    try:
        from edgediff.verify import verify
    except ImportError:
        verify = None
    rows: list[dict[str, Any]] = []
    runners: dict[int, Any] = {}
    plan = [("onnx", "fp32", {}), ("tflite", "fp32", {}), ("tflite", "fp16", {}), ("tflite", "int8", {}),
            ("coreml", "fp16", {}), ("coreml", "int8", {}), ("coreml", "fp16", {"palettize": args.palettize})]
    if args.rows:
        wanted = set(args.rows.split(","))
        plan = [p for p in plan if f"{p[0]}:{p[1]}{':pal' if p[2] else ''}" in wanted or p[0] == "onnx"]
    ext = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}
    for target, prec, opts in plan:
        label = f"{target} {prec}" + (f" palettized {opts['palettize']}-bit" if opts else "")
        print(f"[{name}] {label} ...", flush=True)
        src = qmodel if prec == "int8" else model
        path = folder / f"{name}-{target}-{prec}{'-pal' if opts else ''}{ext[target]}"
        row: dict[str, Any] = {"model": name, "target": target, "precision": prec, **opts}
        t0 = time.perf_counter()
        try:
            rep = get_backend(target).export(src, path, prec, force=True, **opts)
        except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and goes on
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            continue
        row["export_s"] = round(time.perf_counter() - t0, 1)
        row["size_bytes"] = rep["size_bytes"]
        if target == "tflite":
            row["gpu_delegate_fallback"] = rep["gpu_delegate"]["cpu_fallback_ops"]
        if target == "onnx":
            runners[len(rows)] = OnnxDenoiser(path, threads=args.threads)
        elif target == "tflite":
            runners[len(rows)] = LiteRTDenoiser(path, threads=args.threads)
        if verify is not None and args.steps > 0:
            v = verify(src, path, steps=args.steps, samples=args.samples)
            row["verified"] = v["verified"]
            row["psnr_db"] = v.get("psnr_db")
            if not v["verified"]:
                row["reason"] = v.get("reason")
        rows.append(row)
    print(f"[{name}] latency: {len(runners)} runtimes taking turns, {args.repeat} calls each", flush=True)
    for i, ms in interleaved_latency_ms(runners, model, args.repeat).items():
        rows[i]["latency_ms"] = ms
    base = next((r for r in rows if r["target"] == "onnx" and "size_bytes" in r), None)
    for r in rows:
        if base and "size_bytes" in r:
            r["size_vs_onnx_fp32"] = round(r["size_bytes"] / base["size_bytes"], 3)
        if base and "latency_ms" in r and base.get("latency_ms"):
            r["latency_vs_ort_fp32"] = round(r["latency_ms"] / base["latency_ms"], 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo", help="comma-separated: demo, cifar")
    ap.add_argument("--artifact", type=Path, default=None, help="a quantized artifact to use for the int8 rows (demo)")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps for verify (0: skip verify)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--palettize", type=int, default=6)
    ap.add_argument("--rows", default="", help="only these rows, e.g. tflite:fp32,coreml:fp16,coreml:fp16:pal "
                    "(onnx fp32, the peer, always runs)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/export_edge"))
    ap.add_argument("--out", type=Path, default=Path("bench-out/export_edge.json"))
    args = ap.parse_args()

    from edgediff.loaders import load_model
    from edgediff.testing import minmax_quantize

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    for name in args.models.split(","):
        if name == "demo":
            model = load_model("demo")
            notes["demo"] = "bundled demo UNet (trained weights)"
        elif name == "cifar":
            model = cifar_model()
            notes["cifar"] = "google/ddpm-cifar10-32 config, RANDOM INIT (sizes/speed only)"
        else:
            raise SystemExit(f"unknown model {name!r}; expected demo or cifar")
        if args.artifact and name == "demo":
            qmodel = load_model(str(args.artifact))
            notes["int8"] = f"QuantParams from {args.artifact}"
        else:
            qmodel = minmax_quantize(model)
            notes.setdefault("int8", "min-max W8A8 QuantParams (edgediff.testing.minmax_quantize), not the quant pass")
        rows += bench_model(name, model, qmodel, args.workdir, args)

    cols = ["model", "target", "precision", "size_bytes", "size_vs_onnx_fp32", "latency_ms", "latency_vs_ort_fp32",
            "psnr_db", "verified"]
    print("\n" + " | ".join(cols))
    for r in rows:
        label = dict(r)
        if r.get("palettize"):
            label["precision"] = f"{r['precision']}+pal{r['palettize']}"
        cells = []
        for c in cols:
            v = label.get(c, label.get("error", "")[:40] if c == "size_bytes" else "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))
    result = {"benchmark": "export_edge", "machine": platform.platform(), "threads": args.threads,
              "torch_threads": torch.get_num_threads(), "notes": notes, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
