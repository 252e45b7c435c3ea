"""OpenVINO vs ONNX Runtime, fp32 vs int8, and NNCF's calibration vs ours.

    python benchmarks/openvino.py [--models demo,cifar] [--repeats 20] [--samples 64] [--steps 20]
                                  [--calib-count 256] [--out bench-out/openvino.json]

Part 1 (speed): for each model, four files from the same source: ORT fp32 (.onnx), ORT int8
(edgediff's lowered Q/DQ .onnx), OpenVINO fp32 (.xml) and OpenVINO int8 (the same Q/DQ graph
converted: FakeQuantize, int8 kernels in the CPU plugin). One denoiser call each, interleaved
round-robin (so machine load hits every runner alike), threads pinned to 1 and then 2, median
of --repeats calls; ratios are against the fp32 file of the same runtime.
  demo  : the bundled model, quantized by the `w8a8` recipe (calib + quant passes);
  cifar : diffusers UNet2DModel with google/ddpm-cifar10-32's config, RANDOM weights (nothing
          downloads here): speed and size only, its quality figures mean nothing; int8 from
          plain min-max QuantParams (edgediff.testing) to keep the run short.

Part 2 (calibration, demo only, the ONNX-in situation): the fp32 ONNX file quantized by
`nncf.quantize` on OpenVINO, once with the calibration a generic user would give it (inputs
drawn at random: x ~ N(0, 1), t ~ U[0, T)) and once with edgediff's diffusion-aware set (x_t from
the model's own sampler trajectories, Q-Diffusion step selection), same number of points.
Each runs the sampler in the loop on OpenVINO (DDIM --steps, --samples seeds); final-sample
PSNR vs the fp32 model under the same seeds, and the demo's digit metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# this file is named like the package it benchmarks: keep `import openvino` from finding it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _onnx_session(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feed: sess.run(None, feed)


def _ov_session(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], Any]:
    from edgediff.exporters.openvino import compile_ir

    req = compile_ir(path, threads).create_infer_request()
    return lambda feed: req.infer(feed)


def interleaved(runners: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, float]:
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def _models(names: list[str]) -> dict[str, tuple[Any, Any, str]]:
    """name -> (fp32 model, int8 artifact, how the int8 was made)."""
    from edgediff.loaders import load_model

    out = {}
    for name in names:
        if name == "demo":
            from edgediff.pipeline import run_recipe
            from edgediff.recipe import load_recipe

            m = load_model("demo")
            with tempfile.TemporaryDirectory() as cache:
                q, _ = run_recipe(m, load_recipe("w8a8"), cache_dir=Path(cache))
            out[name] = (m, q, "w8a8 recipe (calib + quant passes)")
        elif name == "cifar":
            from diffusers import UNet2DModel

            from edgediff.model import DiffusionModel, InputSignature
            from edgediff.schedule import NoiseSchedule

            torch.manual_seed(0)
            unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                               layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                                     "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()
            m = DiffusionModel(unet, NoiseSchedule.from_config({}), InputSignature((3, 32, 32)), "UNet2DModel",
                               dict(unet.config), {"source": "ddpm-cifar10-32 config, random init"})
            # the real quant pass (requantized outputs: the integer-kernel layout of docs/int8.md),
            # calibrated on a few short trajectories: random weights make quality meaningless here
            from edgediff.pipeline import run_recipe
            from edgediff.recipe import PassSpec, Recipe

            recipe = Recipe("w8a8-bench", passes=[
                PassSpec("calib", {"method": "ptq4dm", "n_samples": 4, "steps": 10, "count": 32}), PassSpec("quant", {})])
            with tempfile.TemporaryDirectory() as cache:
                q, _ = run_recipe(m, recipe, cache_dir=Path(cache))
            out[name] = (m, q, "w8a8 quant pass (4 x 10-step calibration), random weights")
        else:
            raise SystemExit(f"unknown model {name!r}: expected demo or cifar")
    return out


def speed(name: str, fp32: Any, int8: Any, how: str, work: Path, repeats: int) -> list[dict[str, Any]]:
    from edgediff.exporters import get_backend

    files = {
        ("ort", "fp32"): work / f"{name}.onnx", ("ort", "int8"): work / f"{name}.int8.onnx",
        ("openvino", "fp32"): work / f"{name}.xml", ("openvino", "int8"): work / f"{name}.int8.xml",
    }
    sizes = {}
    for (rt, prec), path in files.items():
        target = "onnx" if rt == "ort" else "openvino"
        rep = get_backend(target).export(fp32 if prec == "fp32" else int8, path, prec)
        sizes[(rt, prec)] = rep["size_bytes"]
        print(f"  exported {name} {rt} {prec}: {rep['size_bytes']:,} bytes", file=sys.stderr, flush=True)
    feed = {k: v.numpy() for k, v in fp32.example_inputs(1, seed=0).items()}
    feed["timestep"] = feed["timestep"].astype(np.float32)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runners = {}
        for (rt, prec), path in files.items():
            fn = (_onnx_session if rt == "ort" else _ov_session)(path, threads)
            runners[f"{rt} {prec}"] = (lambda fn=fn: fn(feed))
        med = interleaved(runners, repeats)
        for (rt, prec) in files:
            ms = med[f"{rt} {prec}"]
            rows.append({"model": name, "runtime": rt, "precision": prec, "threads": threads, "ms_per_call": round(ms, 3),
                         "ratio_vs_fp32": round(ms / med[f"{rt} fp32"], 3), "bytes": sizes[(rt, prec)],
                         "int8_source": how if prec == "int8" else None})
    return rows


def calibration_study(model: Any, artifact: Any, work: Path, count: int, samples: int, steps: int) -> list[dict[str, Any]]:
    import nncf
    import openvino as ov
    from edgediff.exporters import get_backend
    from edgediff.exporters.openvino import OpenVinoDenoiser

    from edgediff.demo.judge import DigitJudge, held_out_digits
    from edgediff.metrics import psnr
    from edgediff.passes.calib import CalibOptions, generate
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    src = work / "demo_in.onnx"
    get_backend("onnx").export(model, src, "fp32")
    T = model.schedule.num_train_timesteps
    g = torch.Generator().manual_seed(123)
    generic = [{"sample": torch.randn(1, *model.signature.sample_shape, generator=g).numpy(),
                "timestep": (torch.rand(1, generator=g) * (T - 1)).round().numpy().astype(np.float32)}
               for _ in range(count)]
    t0 = time.perf_counter()
    data = generate(model, CalibOptions(method="qdiff", n_samples=max(1, count // 10), steps=50, interval=5))
    ours_s = time.perf_counter() - t0
    ours = [{"sample": data["x"][i:i + 1].numpy(), "timestep": data["t"][i:i + 1].numpy().astype(np.float32)}
            for i in range(min(count, len(data["x"])))]
    cfg = SamplerConfig("ddim", steps)
    shape = model.signature.sample_shape
    ref = sample(TorchDenoiser(model), model.schedule, shape, samples, 0, cfg)
    judge, held = DigitJudge(), held_out_digits()
    rows = [{"row": "fp32 (PyTorch)", "psnr_db": None, "confident_share": judge.confidence_share(ref),
             "digit_fd": judge.frechet(ref, held)}]
    for label, feeds, secs in (("NNCF, generic calibration (random x, t)", generic, 0.0),
                               ("NNCF, edgediff diffusion-aware calibration", ours, ours_s)):
        m = ov.Core().read_model(str(src))
        t0 = time.perf_counter()
        qm = nncf.quantize(m, nncf.Dataset(feeds), subset_size=len(feeds))
        secs += time.perf_counter() - t0
        path = work / ("nncf_generic.xml" if "generic" in label else "nncf_ours.xml")
        ov.save_model(qm, str(path), compress_to_fp16=False)
        got = sample(OpenVinoDenoiser(path, threads=2), model.schedule, shape, samples, 0, cfg)
        rows.append({"row": label, "points": len(feeds), "psnr_db": round(psnr(got, ref), 2),
                     "confident_share": judge.confidence_share(got), "digit_fd": judge.frechet(got, held),
                     "calibration_seconds": round(secs, 1),
                     "bytes": path.stat().st_size + path.with_suffix(".bin").stat().st_size})
    # ONNX-in: the graph quantized by edgediff's quant pass (ORT quantize_static or NNCF ONNX), fed with
    # the same diffusion-aware points, run in onnxruntime
    from edgediff.adapter import load_adapter
    from edgediff.onnx_source import load_onnx_model, quantize_graph

    third = work / "third_party.onnx"
    _third_party_onnx(model, third)
    (work / "adapter.toml").write_text(_ADAPTER)
    for quantizer in ("ort", "nncf"):
        gm = load_onnx_model(third, load_adapter(work / "adapter.toml"))
        t0 = time.perf_counter()
        quantize_graph(gm, ours, quantizer)
        got = sample(TorchDenoiser(gm), model.schedule, shape, samples, 0, cfg)
        rows.append({"row": f"ONNX-in, edgediff quant pass ({quantizer}), diffusion-aware calibration",
                     "points": len(ours), "psnr_db": round(psnr(got, ref), 2), "confident_share": judge.confidence_share(got),
                     "digit_fd": judge.frechet(got, held), "calibration_seconds": round(ours_s + time.perf_counter() - t0, 1)})
    gm = load_onnx_model(third, load_adapter(work / "adapter.toml"))
    quantize_graph(gm, generic, "ort")
    got = sample(TorchDenoiser(gm), model.schedule, shape, samples, 0, cfg)
    rows.append({"row": "ONNX-in, edgediff quant pass (ort), generic calibration", "points": len(generic),
                 "psnr_db": round(psnr(got, ref), 2), "confident_share": judge.confidence_share(got),
                 "digit_fd": judge.frechet(got, held)})
    # the default int8 path of the openvino target: the artifact's own QuantParams, lowered to Q/DQ
    path = work / "edgediff_w8a8.xml"
    get_backend("openvino").export(artifact, path, "int8")
    got = sample(OpenVinoDenoiser(path, threads=2), model.schedule, shape, samples, 0, cfg)
    rows.append({"row": "edgediff w8a8 artifact -> openvino int8", "psnr_db": round(psnr(got, ref), 2),
                 "confident_share": judge.confidence_share(got), "digit_fd": judge.frechet(got, held),
                 "bytes": path.stat().st_size + path.with_suffix(".bin").stat().st_size})
    return rows


_ADAPTER = ('sample_shape = [1, 16, 16]\ninputs = ["x", "t"]\nsample = "x"\ntime = "t"\n'
            '[scheduler]\n_class_name = "DDIMScheduler"\nnum_train_timesteps = 1000\n')


def _third_party_onnx(model: Any, path: Path) -> None:
    """The model as another tool ships it: own input names, int64 time, a plain output."""
    from edgediff.testing import export_third_party_onnx

    export_third_party_onnx(model.denoiser, path, (torch.randn(2, *model.signature.sample_shape),
                                                   torch.tensor([10, 500])), input_names=("x", "t"), output_name="eps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,cifar")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-out/openvino.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import openvino

    result: dict[str, Any] = {"openvino": openvino.__version__, "repeats": args.repeats, "speed": [], "calibration": []}
    models = _models(args.models.split(","))
    with tempfile.TemporaryDirectory(prefix="edgediff-bench-ov-") as td:
        work = Path(td)
        for name, (fp32, int8, how) in models.items():
            if not args.skip_speed:
                result["speed"] += speed(name, fp32, int8, how, work, args.repeats)
        if not args.skip_calibration and "demo" in models:
            result["calibration"] = calibration_study(models["demo"][0], models["demo"][1], work, args.calib_count,
                                                      args.samples, args.steps)
    print(f"\n{'model':6s} {'runtime':9s} {'prec':5s} {'thr':>3s} {'ms/call':>9s} {'vs fp32':>8s} {'bytes':>12s}")
    for r in result["speed"]:
        print(f"{r['model']:6s} {r['runtime']:9s} {r['precision']:5s} {r['threads']:3d} {r['ms_per_call']:9.2f} "
              f"{r['ratio_vs_fp32']:8.3f} {r['bytes']:12,d}")
    if result["calibration"]:
        print(f"\n{'int8 of the demo (PSNR of final samples vs fp32)':70s} {'PSNR':>7s} {'conf':>6s} {'FD':>8s}")
        for r in result["calibration"]:
            p = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
            print(f"{r['row']:70s} {p:>7s} {r['confident_share']:6.3f} {r['digit_fd']:8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
