"""`edgediff generate OPENCL_BUNDLE`: the sampler loop with the bundle's denoiser on the OpenCL device.

An OpenCL bundle records at export the sampling its artifact is meant for (`sampling`: sampler,
steps, eta) and the model's noise schedule (`noise_schedule`); generation runs edgediff's sampler
(diffusers schedulers, edgediff.sampling) with the bundle on the device as the denoiser: with a
DeepCache schedule the full and shallow schedules per step (kernels/deepcache.py), the calls of
each reported as `denoiser_calls_full` / `denoiser_calls_shallow`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.kernels.export import read_bundle

from edgediff.errors import BadInput
from edgediff.model import InputSignature
from edgediff.schedule import NoiseSchedule


def generate_opencl(path: Path | str, samples: int = 4, seed: int = 0, steps: int | None = None,
                    sampler: str | None = None, save_npy: Path | str | None = None,
                    output: Path | str | None = None, progress: Any = None) -> dict[str, Any]:
    """Sample `samples` images from an OpenCL bundle; writes the .npy / PNG asked for; returns the report."""
    from edgediff.kernels.export import BACKEND

    from edgediff.generate import DEFAULT_STEPS, write_png_grid
    from edgediff.sampling import SamplerConfig, sample

    path = Path(path)
    meta = read_bundle(path)
    if "noise_schedule" not in meta:
        raise BadInput(f"{path}: this OpenCL bundle records no noise schedule (exported by an older edgediff); "
                       "export it again to generate from it")
    if samples < 1:
        raise BadInput(f"--samples must be >= 1, got {samples}")
    rec = meta.get("sampling") or {}
    same = sampler is None or sampler == rec.get("sampler")
    use_sampler = sampler if sampler is not None else rec.get("sampler")
    n_steps = int(steps or (rec.get("steps") if same and rec.get("steps") else DEFAULT_STEPS))
    eta = float(rec.get("eta") or 0.0) if same else 0.0
    schedule = NoiseSchedule.from_config(meta["noise_schedule"], f"{path / 'opencl_bundle.json'}: noise_schedule")
    sig = InputSignature.from_dict(meta["signature"])
    t_load = time.perf_counter()
    den = BACKEND.load_denoiser(path)
    load_ms = (time.perf_counter() - t_load) * 1e3
    cond = sig.conditioning(samples, seed)
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    x = sample(den, schedule, tuple(sig.sample_shape), samples, seed, SamplerConfig(use_sampler, n_steps, eta),
               cond=cond, progress=progress, description="generate (opencl)", stats=stats)
    seconds = time.perf_counter() - t0
    d = den.describe()
    report: dict[str, Any] = {
        "bundle": str(path), "runtime": "opencl", "device": d.get("device"), "precision": meta.get("precision"),
        "sampler": stats["sampler"], "steps": n_steps, "samples": samples, "seed": seed,
        "denoiser_calls": int(stats["denoiser_calls"]),
        "denoiser_calls_full": int(stats.get("denoiser_calls_full", stats["denoiser_calls"])),
        "denoiser_calls_shallow": int(stats.get("denoiser_calls_shallow", 0)),
        "cache": ({k: meta["cache"][k] for k in ("depth", "interval")} if meta.get("cache") else None),
        "seconds": round(seconds, 4), "ms_per_image": round(seconds * 1e3 / samples, 3), "load_ms": round(load_ms, 2)}
    arr = np.asarray(x.float().numpy(), dtype=np.float32)
    if save_npy is not None:
        np.save(str(save_npy), arr)
        report["save_npy"] = str(save_npy)
    if output is not None:
        report["png"] = write_png_grid(arr, Path(output))
        report["output"] = str(output)
    return report
