"""DeepCache on the TFLite, OpenVINO and OpenCL backends: export a cached artifact, verify, time cached vs uncached.

    python benchmarks/deepcache_backends.py ARTIFACT [--precision fp32|int8] [--samples 16]
                                            [--rounds 3] [--backends tflite,openvino,opencl]
                                            [--work DIR] [--out deepcache_backends.json]

ARTIFACT carries a cache schedule (e.g. `edgediff compress demo --recipe fast -o ART`). It is
exported as a TFLite bundle (`-o DIR`: full + shallow .tflite), an OpenVINO bundle (`-o DIR`:
full + shallow IR) and an OpenCL bundle (full + shallow schedules), each verified against the
cached PyTorch sampler (`edgediff.verify`), then sampled with the schedule on and off,
interleaved over --rounds (median): LiteRT and OpenVINO through the torch-free bundle loop
(denoiser + scheduler time, 1 thread), OpenCL through edgediff's sampler with the cached and
the plain OpenCL denoiser (wall time). OpenCL samples min(--samples, 8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# `python benchmarks/deepcache_backends.py` puts benchmarks/ first on sys.path, where
# benchmarks/openvino.py would shadow the openvino package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

BUNDLE_BACKENDS = ("onnx", "tflite", "openvino")  # bundles the torch-free loop runs (edgediff.runtime)
_VERIFY_KEYS = ("psnr_db", "max_abs_err", "exit_code", "denoiser_calls_full", "denoiser_calls_shallow", "runtime")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="tflite,openvino,opencl", help="comma-separated: onnx, tflite, openvino, opencl")
    ap.add_argument("--work", type=Path, default=Path("bench-out/deepcache_backends"))
    ap.add_argument("--out", type=Path, default=Path("bench-out/deepcache_backends.json"))
    args = ap.parse_args()

    from edgediff.exporters.base import set_threads

    from edgediff.artifact import load_artifact
    from edgediff.bundle import export_bundle
    from edgediff.runtime.generate import run_bundle
    from edgediff.verify import verify

    set_threads(1)
    art = load_artifact(args.artifact)
    if not art.extras.get("cache"):
        raise SystemExit(f"{args.artifact}: no cache schedule (compress it with a recipe that has the cache pass)")
    args.work.mkdir(parents=True, exist_ok=True)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    res: dict[str, Any] = {"artifact": str(args.artifact), "precision": args.precision, "samples": args.samples,
                           "rounds": args.rounds, "cache": art.extras["cache"], "backends": backends}
    for target in (b for b in backends if b in BUNDLE_BACKENDS):
        # a bundle (-o DIR: full + shallow file) sampled by the torch-free loop in its own runtime
        out = args.work / f"{target}-{args.precision}"
        t0 = time.perf_counter()
        rep = export_bundle(art, out, target, args.precision, force=True)
        res[f"{target}_export_s"] = round(time.perf_counter() - t0, 1)
        res[f"{target}_bytes"] = {k: c["size_bytes"] for k, c in rep["components"].items()}
        v = verify(art, out, samples=args.samples)
        res[f"{target}_verify"] = {k: v.get(k) for k in _VERIFY_KEYS}
        rows: dict[str, list[float]] = {"cached": [], "uncached": []}
        for r in range(args.rounds):
            for name, on in (("cached", True), ("uncached", False)):
                _, st = run_bundle(out, samples=args.samples, seed=r, threads=1, cache=on, batch_size=args.samples)
                rows[name].append(st["sampling_ms_per_image"])
                res[f"{target}_calls_{name}"] = [st["denoiser_calls_full"], st["denoiser_calls_shallow"]]
        res[f"{target}_ms_per_image"] = {k: round(statistics.median(v), 2) for k, v in rows.items()}
    if "opencl" in backends:
        _opencl(art, args, res)
    for k in backends:
        ms = res[f"{k}_ms_per_image"]
        res[f"{k}_speedup"] = round(ms["uncached"] / ms["cached"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(json.dumps(res, indent=1, default=str))


def _opencl(art: Any, args: argparse.Namespace, res: dict[str, Any]) -> None:
    """The OpenCL bundle (full + shallow schedules) through edgediff's sampler, cached vs plain denoiser."""
    import torch
    from edgediff.exporters import get_backend
    from edgediff.kernels.export import OpenCLDenoiser

    from edgediff.sampling import SamplerConfig, recorded_sampling, sample
    from edgediff.verify import verify

    cl = args.work / f"opencl-{args.precision}"
    get_backend("opencl").export(art, cl, args.precision, force=True)
    n = min(args.samples, 8)
    v = verify(art, cl, samples=n)
    res["opencl_verify"] = {k: v.get(k) for k in _VERIFY_KEYS}
    sampler, steps, eta = recorded_sampling(art)
    cfg = SamplerConfig(sampler, steps or 20, eta or 0.0)
    dens = {"cached": get_backend("opencl").load_denoiser(cl), "uncached": OpenCLDenoiser(cl)}
    cl_rows: dict[str, list[float]] = {"cached": [], "uncached": []}
    for r in range(args.rounds):
        for name, den in dens.items():
            t1 = time.perf_counter()
            with torch.inference_mode():
                sample(den, art.schedule, tuple(art.signature.sample_shape), n, r, cfg,
                       cond=art.signature.conditioning(n, r))
            cl_rows[name].append((time.perf_counter() - t1) * 1e3 / n)
    res["opencl_device"] = dens["cached"].describe().get("device")
    res["opencl_ms_per_image"] = {k: round(statistics.median(v), 1) for k, v in cl_rows.items()}


if __name__ == "__main__":
    main()
