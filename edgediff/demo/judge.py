"""The demo's judge of generated digits: the bundled classifier's confidence share and the
Fréchet distance of its features against held-out real digits (edgediff.metrics.frechet_distance)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from edgediff.demo.classifier import DigitClassifier
from edgediff.demo.data import split
from edgediff.metrics import frechet_distance


class DigitJudge:
    """The bundled digit classifier: confidence share and Fréchet distance of generated digits."""

    CONFIDENCE = 0.9

    def __init__(self, weights: Path | None = None) -> None:
        from safetensors.torch import load_file

        weights = weights or Path(__file__).parent / "weights" / "classifier.safetensors"
        self.net = DigitClassifier()
        self.net.load_state_dict(load_file(str(weights)))
        self.net.eval()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self.net.features(x.float().clamp(-1, 1)).numpy().astype(np.float64)

    @torch.no_grad()
    def confidence_share(self, x: torch.Tensor) -> float:
        p = torch.softmax(self.net(x.float().clamp(-1, 1)), dim=1)
        return float((p.max(1).values >= self.CONFIDENCE).float().mean())

    @torch.no_grad()
    def predicted(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float().clamp(-1, 1)).argmax(1)

    def frechet(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> float:
        """Fréchet distance vs `reference`, by default the held-out real digits."""
        if reference is None:
            reference = held_out_digits()
        return frechet_distance(self.features(x), self.features(reference))

    def report(self, x: torch.Tensor) -> dict[str, float]:
        return {"digit_frechet": self.frechet(x), "confidence_share": self.confidence_share(x)}


@lru_cache(maxsize=1)
def held_out_digits() -> torch.Tensor:
    return split()["held_out"][0]
