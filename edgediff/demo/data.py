"""The demo's real images: scikit-learn's bundled handwritten digits, upscaled.

scikit-learn ships the 1,797 8x8 digits inside its wheel, so nothing is downloaded.
The split is fixed (seeded) so that the held-out set used for the Fréchet distance is
never seen by the diffusion model or the classifier during training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
HELD_OUT_FRACTION = 1 / 3
SPLIT_SEED = 0


def load_digits_tensor(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as float32 images in [-1, 1], shape (N, 1, size, size), and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def split(size: int = IMAGE_SIZE) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed train / held-out split of the digits."""
    x, y = load_digits_tensor(size)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(x), generator=g)
    n_held = int(len(x) * HELD_OUT_FRACTION)
    held, train = perm[:n_held], perm[n_held:]
    return {"train": (x[train], y[train]), "held_out": (x[held], y[held])}
