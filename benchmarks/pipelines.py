"""Per-image time of pipeline bundles on onnxruntime vs diffusers' StableDiffusionPipeline in PyTorch.

    python benchmarks/pipelines.py PIPELINE_DIR BUNDLE_DIR [BUNDLE_DIR ...] [--steps 10 --samples 4 --repeats 3]

Runs are interleaved (bundle 1, bundle 2, ..., PyTorch; repeated) so that a loaded machine slows
every variant alike; prints medians of ms_per_image (with session loading) and
sampling_ms_per_image (loaded sessions: tokenizer + text encoder + denoiser + scheduler + VAE).
The PyTorch side uses the first bundle's scheduler config, so both run the same sampler.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="a red cat")
    a = ap.parse_args()
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    from edgediff.runtime.pipeline import run_pipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(str(a.pipeline), safety_checker=None, requires_safety_checker=False)
    cfg = json.loads((a.bundles[0] / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)  # the bundle's own scheduler
    pipe.set_progress_bar_config(disable=True)
    rows: dict[str, list[tuple[float, float]]] = {}
    for rep in range(a.repeats):
        for b in a.bundles:
            _, _, st = run_pipeline(b, a.prompt, samples=a.samples, seed=rep, steps=a.steps, threads=1)
            rows.setdefault(str(b), []).append((st["ms_per_image"], st["sampling_ms_per_image"]))
        t0 = time.perf_counter()
        pipe(a.prompt, num_inference_steps=a.steps, num_images_per_prompt=a.samples, output_type="np",
             generator=torch.Generator().manual_seed(rep))
        ms = (time.perf_counter() - t0) * 1e3 / a.samples
        rows.setdefault("pytorch (diffusers)", []).append((ms, ms))
    for k, v in rows.items():
        print(f"{k}: ms_per_image {np.median([x for x, _ in v]):.1f}, sampling_ms_per_image {np.median([y for _, y in v]):.1f}")


if __name__ == "__main__":
    main()
