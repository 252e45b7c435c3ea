"""How good is the bundled demo model? Digit-classifier figures with baselines for scale.

    python benchmarks/demo_model.py [--samples 512] [--steps 50] [--out bench-out/demo_model.json]

Rows: the demo model's samples (DDIM and DDPM), real training digits, and two baselines that
show what "bad" looks like on the same scale: shuffled-pixel digits and uniform noise. Every
row is scored against the held-out real digits, never seen in training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgediff.demo.data import split
from edgediff.demo.judge import DigitJudge, held_out_digits
from edgediff.loaders import DEMO_DIR, load_model
from edgediff.metrics import params, size_bytes
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/demo_model.json"))
    args = ap.parse_args()

    judge = DigitJudge()
    model = load_model("demo")
    held = held_out_digits()
    train_x = split()["train"][0]
    g = torch.Generator().manual_seed(args.seed)
    n = args.samples
    rows = []

    def score(name: str, x: torch.Tensor, seconds: float | None = None) -> None:
        r = {"name": name, "n": len(x), "confidence_share": judge.confidence_share(x), "digit_frechet": judge.frechet(x, held)}
        if seconds is not None:
            r["seconds"] = round(seconds, 1)
        rows.append(r)
        print(f"{name:32s} n={len(x):4d} confident={r['confidence_share']:.3f} FD={r['digit_frechet']:.3f}", flush=True)

    for sampler in ("ddim", "ddpm"):
        steps = args.steps if sampler == "ddim" else max(args.steps, 100)
        t0 = time.perf_counter()
        cfg = SamplerConfig(sampler, steps)
        x = sample(TorchDenoiser(model), model.schedule, model.signature.sample_shape, n, args.seed, cfg)
        score(f"demo model, {sampler.upper()} {steps} steps", x, time.perf_counter() - t0)
    idx = torch.randperm(len(train_x), generator=g)[:n]
    score("real digits (train split)", train_x[idx])
    real = train_x[idx]
    perm = torch.randperm(real[0].numel(), generator=g)
    score("baseline: shuffled-pixel digits", real.flatten(1)[:, perm].view_as(real))
    score("baseline: uniform noise", torch.rand(n, *real.shape[1:], generator=g) * 2 - 1)

    log = json.loads((DEMO_DIR / "train_log.json").read_text())
    result = {
        "rows": rows,
        "model": {"params": params(model.denoiser), "size_bytes": size_bytes(model.denoiser),
                  "weights_file_bytes": (DEMO_DIR / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size,
                  "train_seconds": log["unet_train_seconds"], "train_steps": log["steps"],
                  "classifier_held_out_accuracy": log["classifier_held_out_accuracy"]},
        "held_out_n": len(held),
        "args": vars(args) | {"out": str(args.out)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["model"], indent=2))


if __name__ == "__main__":
    main()
