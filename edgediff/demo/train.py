"""Reproduce the bundled demo model: a small UNet2DModel on upscaled scikit-learn digits.

    python -m edgediff.demo.train --steps 2400 -o edgediff/demo/weights

Writes `unet/` (diffusers config + safetensors), `scheduler_config.json`,
`classifier.safetensors` and `train_log.json` (times, losses, classifier accuracy).
Training uses only the train split; the held-out split is kept for the Fréchet distance.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgediff.demo.classifier import DigitClassifier
from edgediff.demo.data import IMAGE_SIZE, split
from edgediff.schedule import NoiseSchedule

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}


def train_classifier(seed: int = 0, epochs: int = 30) -> tuple[DigitClassifier, float]:
    torch.manual_seed(seed)
    data = split()
    x, y = data["train"]
    xh, yh = data["held_out"]
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            # Small random shifts make the features robust to the generator's jitter.
            xb = torch.roll(x[idx], shifts=(int(torch.randint(-1, 2, ())), int(torch.randint(-1, 2, ()))), dims=(2, 3))
            loss = F.cross_entropy(clf(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(xh).argmax(1) == yh).float().mean())
    return clf, acc


def train_unet(steps: int, batch: int = 128, lr: float = 1e-3, seed: int = 0, log_every: int = 100):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    x, _ = split()["train"]
    sched = NoiseSchedule.from_config(SCHEDULER_CONFIG)
    model = UNet2DModel(**UNET_CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = min(200, steps // 10)
    lr_at = lambda s: lr * min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    losses = []
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, len(x), (batch,))
        x0 = x[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.num_train_timesteps, (batch,))
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(model(xt, t.float()).sample, sched.target(x0, noise, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            avg = sum(losses[-log_every:]) / log_every
            print(f"step {step + 1}/{steps} loss {avg:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return ema, losses, time.time() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).parent / "weights")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    clf, acc = train_classifier(args.seed)
    clf_time = time.time() - t0
    save_file(clf.state_dict(), str(args.out / "classifier.safetensors"))
    print(f"classifier held-out accuracy {acc:.4f} ({clf_time:.0f}s)")

    unet, losses, unet_time = train_unet(args.steps, args.batch, seed=args.seed)
    unet.save_pretrained(args.out / "unet", safe_serialization=True)
    (args.out / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    log = {
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "unet_train_seconds": round(unet_time, 1),
        "classifier_train_seconds": round(clf_time, 1),
        "classifier_held_out_accuracy": acc,
        "final_loss_avg100": sum(losses[-100:]) / min(100, len(losses)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
