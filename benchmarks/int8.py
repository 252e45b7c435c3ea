"""int8 speed and quality: edgediff's integer exports vs fp32 and the peer quantizers, same run.

    python benchmarks/int8.py [--models demo,cifar] [--threads 1,2] [--reps 20] [--samples 8]
                              [--quick] [--no-tflite] [--out bench-out/int8.json]

Per model (demo: the bundled digits UNet, trained; cifar: diffusers UNet2DModel with
google/ddpm-cifar10-32's config, RANDOMLY INITIALISED: speed, size and integer share only):
  ort-fp32        the float model exported to ONNX, onnxruntime CPU
  edgediff-int8   recipe w8a8 (PTQ4DM calibration) -> `export --target onnx --precision int8`
                  (the "qlinear" layout: QLinearConv / QGemm / QLinearMatMul after ORT's optimizer)
  ort-qdq         onnxruntime.quantization.quantize_static on the fp32 ONNX: QDQ, per-channel
                  int8 weights, uint8 activations, min-max, calibrated on the SAME x_t/t points
                  the w8a8 recipe's calib pass drew
  nncf            nncf.quantize in OpenVINO's runtime, when `openvino` is importable
  tflite-fp32 / tflite-int8   LiteRT (XNNPACK) on the litert-torch exports (demo only with --quick);
                  tflite-int8 is the full-integer layout (exporters.tflite.integerize)
  aeq-int8        ai-edge-quantizer's static_wi8_ai8 recipe on the fp32 .tflite, same calibration points
Columns: ms/call (batch 1, median of --reps interleaved calls, per thread count), ratio to the
fp32 of the same runtime (of medians, and of minima), file bytes, integer_macs_share (ORT
optimized graph; for .tflite the conv/FC/matmul ops with int8 activation and weight inputs),
final-sample PSNR vs the fp32 model (demo only: DDIM 20, same seeds).
Measured on whatever machine runs it; the figures in docs/int8.md name theirs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# the script's own folder holds benchmarks/openvino.py, which would shadow the openvino package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediff.metrics import psnr  # noqa: E402
from edgediff.model import DiffusionModel, InputSignature  # noqa: E402
from edgediff.timing import time_denoisers  # noqa: E402

CIFAR_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, dropout=0.0)


def cifar_model() -> DiffusionModel:
    from diffusers import DDPMScheduler, UNet2DModel

    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    m = UNet2DModel(**CIFAR_CONFIG).eval()
    sched = NoiseSchedule.from_config(dict(DDPMScheduler(num_train_timesteps=1000).config))
    return DiffusionModel(m, sched, InputSignature((3, 32, 32)), "UNet2DModel", dict(m.config),
                          {"source": "google/ddpm-cifar10-32 config, random init"})


def quantize(model: DiffusionModel, calib: dict[str, Any], cache: Path) -> tuple[DiffusionModel, dict[str, torch.Tensor]]:
    from edgediff.passes import PassContext
    from edgediff.passes.calib import load_calibration
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import PassSpec, Recipe

    recipe = Recipe("w8a8-bench", passes=[PassSpec("calib", {"method": "ptq4dm", **calib}), PassSpec("quant", {})])
    q, _ = run_recipe(model, recipe, cache_dir=cache)
    data = load_calibration(q, PassContext(cache_dir=cache))
    return q, data


def ort_quantize_static(fp32: Path, out: Path, data: dict[str, torch.Tensor]) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    feeds = [{"sample": data["x"][i:i + 1].numpy(), "timestep": data["t"][i:i + 1].float().numpy()}
             for i in range(len(data["x"]))]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    t0 = time.perf_counter()
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - t0


def aeq_static(fp32: Path, out: Path, data: dict[str, torch.Tensor]) -> float:
    """ai-edge-quantizer's static int8 recipe (static_wi8_ai8: every supported op, min-max),
    calibrated on the same x_t/t points, on the fp32 .tflite; returns seconds."""
    from ai_edge_quantizer import quantizer, recipe

    feeds = [{"sample": data["x"][i:i + 1].numpy(), "timestep": data["t"][i:i + 1].float().numpy().reshape(1)}
             for i in range(len(data["x"]))]
    t0 = time.perf_counter()
    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    calib = qt.calibrate({"serving_default": feeds}, num_threads=1)
    out.write_bytes(bytes(qt.quantize(calib).quantized_model))
    return time.perf_counter() - t0


class OvDenoiser:
    def __init__(self, model: Any, threads: int) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        r = self.compiled({"sample": x.numpy(), "timestep": t.float().numpy()})
        return torch.from_numpy(np.asarray(next(iter(r.values()))))


def final_samples(model: DiffusionModel, den: Any, n: int, steps: int) -> torch.Tensor:
    from edgediff.sampling import SamplerConfig, sample_model

    with torch.inference_mode():
        return sample_model(model, n, seed=0, cfg=SamplerConfig("ddim", steps), denoiser=den)


def _stage(name: str, what: str) -> None:
    print(f"  {name}: {what} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from edgediff.exporters import get_backend
    from edgediff.exporters.onnx import OnnxDenoiser, integer_macs

    from edgediff.loaders import load_model

    model = load_model("demo") if name == "demo" else cifar_model()
    calib = ({"count": 256} if name == "demo" else {"count": 32, "n_samples": 4, "steps": 10}) if not args.quick else (
        {"count": 64, "n_samples": 8, "steps": 20} if name == "demo" else {"count": 16, "n_samples": 2, "steps": 5})
    t0 = time.perf_counter()
    q, data = quantize(model, calib, tmp / "cache")
    quant_s = time.perf_counter() - t0
    _stage(name, f"calibrated and quantized in {quant_s:.0f} s")
    onnx = get_backend("onnx")
    files: dict[str, Path] = {"ort-fp32": tmp / f"{name}-fp32.onnx", "edgediff-int8": tmp / f"{name}-int8.onnx",
                              "ort-qdq": tmp / f"{name}-ortqdq.onnx"}
    onnx.export(model, files["ort-fp32"], "fp32")
    onnx.export(q, files["edgediff-int8"], "int8")
    ort_s = ort_quantize_static(files["ort-fp32"], files["ort-qdq"], data)
    rows: dict[str, dict[str, Any]] = {k: {"runtime": "onnxruntime", "bytes": p.stat().st_size}
                                       for k, p in files.items()}
    rows["edgediff-int8"]["calib_quant_s"] = round(quant_s, 1)
    rows["ort-qdq"]["calib_quant_s"] = round(ort_s, 1)
    for k in files:
        im = integer_macs(files[k])
        rows[k]["integer_macs_share"], rows[k]["macs"] = im["integer_macs_share"], im["macs"]
    ov_model = None
    try:
        import nncf
        import openvino as ov

        feeds = [{"sample": data["x"][i:i + 1].numpy(), "timestep": data["t"][i:i + 1].float().numpy()}
                 for i in range(len(data["x"]))]
        ov_model = nncf.quantize(ov.convert_model(str(files["ort-fp32"])), nncf.Dataset(feeds), subset_size=len(feeds))
        rows["nncf"] = {"runtime": "openvino"}
    except Exception as e:  # noqa: BLE001 - openvino is an optional peer; a broken install is a row too
        rows["nncf"] = {"skipped": f"openvino/nncf unavailable here ({type(e).__name__}: {str(e)[:150]})"}
    _stage(name, "ONNX rows and NNCF ready")
    tfl = {}
    if args.tflite and (name == "demo" or not args.quick):
        from edgediff.exporters.tflite import integer_macs as tfl_integer_macs

        tb = get_backend("tflite")
        for prec, src in (("fp32", model), ("int8", q)):
            p = tmp / f"{name}-{prec}.tflite"
            try:
                rep = tb.export(src, p, prec)
                tfl[f"tflite-{prec}"] = p
                rows[f"tflite-{prec}"] = {"runtime": "litert", "bytes": p.stat().st_size}
                if prec == "int8":
                    rows["tflite-int8"]["layout"] = rep["int8"].get("layout")
            except Exception as e:  # noqa: BLE001 - a peer/converter failure is a row, not a crash
                rows[f"tflite-{prec}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        if "tflite-fp32" in tfl:
            p = tmp / f"{name}-aeq.tflite"
            try:
                rows["aeq-int8"] = {"runtime": "litert", "calib_quant_s": round(aeq_static(tfl["tflite-fp32"], p, data), 1),
                                    "bytes": p.stat().st_size}
                tfl["aeq-int8"] = p
            except Exception as e:  # noqa: BLE001 - a peer failure is a row, not a crash
                rows["aeq-int8"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        for k, p in tfl.items():
            im = tfl_integer_macs(p)
            rows[k]["integer_macs_share"], rows[k]["macs"] = im["integer_macs_share"], im["macs"]
    _stage(name, "files ready, timing")
    x = model.signature.example_inputs(batch=1)
    for th in args.threads:
        dens: dict[str, Any] = {k: OnnxDenoiser(p, threads=th) for k, p in files.items()}
        if ov_model is not None:
            dens["nncf"] = OvDenoiser(ov_model, th)
        if tfl:
            from edgediff.exporters.tflite import LiteRTDenoiser

            dens.update({k: LiteRTDenoiser(p, threads=th) for k, p in tfl.items()})
        torch.set_num_threads(th)
        res = time_denoisers(dens, x["sample"], x["timestep"], reps=args.reps)
        for k, r in res.items():
            rows[k][f"ms_{th}t"], rows[k][f"ms_min_{th}t"] = r["ms_per_call"], r["ms_min"]
        for k in res:
            base = "tflite-fp32" if k.startswith(("tflite", "aeq")) else "ort-fp32"
            if base in res:
                rows[k][f"ratio_{th}t"] = round(res[k]["ms_per_call"] / res[base]["ms_per_call"], 3)
                # the ratio of minima (undisturbed calls) next to the medians: on a shared machine the
                # medians of millisecond calls are bimodal (a call is preempted or not)
                rows[k][f"ratio_min_{th}t"] = round(res[k]["ms_min"] / res[base]["ms_min"], 3)
    torch.set_num_threads(1)
    if name == "demo" and args.samples:
        ref = final_samples(model, OnnxDenoiser(files["ort-fp32"], threads=1), args.samples, 20)
        for k in rows:
            if k == "ort-fp32" or "skipped" in rows[k] or "error" in rows[k]:
                continue
            if k in files:
                den: Any = OnnxDenoiser(files[k], threads=1)
            elif k == "nncf":
                den = OvDenoiser(ov_model, 1)
            else:
                from edgediff.exporters.tflite import LiteRTDenoiser

                den = LiteRTDenoiser(tfl[k], threads=1)
            rows[k]["psnr_vs_fp32_db"] = round(float(psnr(final_samples(model, den, args.samples, 20), ref)), 2)
    return {"model": name, "weights": "trained (bundled demo)" if name == "demo" else "random init (speed only)",
            "calib": calib, "rows": rows}


def table(res: list[dict[str, Any]], threads: list[int]) -> str:
    cols = ["row", "runtime"] + [f"ms_{t}t" for t in threads] + [f"ratio_{t}t" for t in threads] + [
        f"ratio_min_{t}t" for t in threads] + [
        "bytes", "integer_macs_share", "psnr_vs_fp32_db"]
    lines = []
    for r in res:
        lines.append(f"\n{r['model']} ({r['weights']})")
        lines.append(" | ".join(cols))
        for k, row in r["rows"].items():
            if "skipped" in row or "error" in row:
                lines.append(f"{k} | {row.get('skipped') or row.get('error')}")
                continue
            lines.append(" | ".join([k] + [str(row.get(c, "")) for c in cols[1:]]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,cifar")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8, help="final samples for PSNR vs fp32 (demo); 0: skip")
    ap.add_argument("--quick", action="store_true", help="smaller calibration sets; TFLite on the demo only")
    ap.add_argument("--no-tflite", dest="tflite", action="store_false")
    ap.add_argument("--out", default="bench-out/int8.json")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.reps < 20:
        print("note: fewer than 20 reps per row", file=sys.stderr)
    torch.set_num_threads(1)
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgediff-int8-") as td:
        for name in args.models.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            out.append(bench_model(name, args, Path(td)))
            # written after every model: a cifar-scale TFLite conversion can take longer than a session has
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"results": out, "threads": args.threads, "reps": args.reps}, indent=2))
            print(table(out[-1:], args.threads), flush=True)


if __name__ == "__main__":
    main()
