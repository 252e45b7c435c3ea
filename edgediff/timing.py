"""Denoiser-call latency of exported files (or PyTorch models), measured interleaved.

`time_denoisers({"label": denoiser, ...}, x, t)` times every denoiser on the same inputs, one
call of each per round (interleaved, so load from other processes hits all of them alike), and
reports the median ms per call. `time_files` loads exported files through their backends;
`per_image` multiplies by the sampler's calls per image (steps x calls per step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch


def time_denoisers(denoisers: Mapping[str, Callable[..., Any]], x: torch.Tensor, t: torch.Tensor,
                   cond: Any = None, reps: int = 20, warmup: int = 2) -> dict[str, dict[str, float]]:
    """label -> {"ms_per_call": median, "ms_min": ..., "reps": n}; calls are interleaved by round."""
    if reps < 1:
        raise ValueError("reps must be >= 1")
    for d in denoisers.values():
        for _ in range(warmup):
            d(x, t, cond)
    times: dict[str, list[float]] = {k: [] for k in denoisers}
    with torch.inference_mode():
        for _ in range(reps):
            for k, d in denoisers.items():
                t0 = time.perf_counter()
                d(x, t, cond)
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: {"ms_per_call": round(statistics.median(v), 3), "ms_min": round(min(v), 3), "reps": len(v)}
            for k, v in times.items()}


def per_image(ms_per_call: float, batch: int, steps: int, calls_per_step: int = 1) -> float:
    """ms per generated image: a call handles `batch` images; a sample needs steps x calls_per_step calls."""
    return ms_per_call / max(batch, 1) * steps * calls_per_step


def time_files(files: Mapping[str, Path], model: Any, steps: int = 20, batch: int = 1, reps: int = 20,
               threads: int | None = None, extra: Mapping[str, Callable[..., Any]] | None = None
               ) -> list[dict[str, Any]]:
    """ms/call and ms/image of exported files (label -> path) on their real runtimes, interleaved.

    `model` gives the input signature (sample shape, conditioning); `extra` adds in-process
    denoisers (e.g. the original PyTorch model as a TorchDenoiser). Rows: label, file, runtime,
    ms_per_call, ms_per_image (= ms_per_call / batch x steps), batch, steps, threads.
    """
    from edgediff.exporters import get_backend, target_of

    dens: dict[str, Callable[..., Any]] = dict(extra or {})
    runtime: dict[str, str] = {k: "pytorch" for k in dens}
    for label, path in files.items():
        target = target_of(Path(path))
        backend = get_backend(target)
        try:
            den = backend.load_denoiser(Path(path), threads=threads)  # type: ignore[call-arg]
        except TypeError:  # a backend without a threads option
            den = backend.load_denoiser(Path(path))
        dens[label], runtime[label] = den, target
    sig = model.signature
    ex = sig.example_inputs(batch=batch)
    cond = ex.get("encoder_hidden_states", ex.get("class_labels"))
    res = time_denoisers(dens, ex["sample"], ex["timestep"], cond, reps=reps)
    return [{"label": k, "file": str(files.get(k, "")), "runtime": runtime[k], "ms_per_call": r["ms_per_call"],
             "ms_per_image": round(per_image(r["ms_per_call"], batch, steps), 2), "batch": batch, "steps": steps,
             "threads": threads} for k, r in res.items()]
