"""Torch-free generation: numpy ports of diffusers' schedulers, torch's CPU normal stream,
the bundle reader, the prompt tokenizer and `generate_bundle`, which runs an exported bundle
(a denoiser, or a whole text-to-image pipeline) on its runtime.

Nothing under edgediff.runtime imports torch (a test runs it with torch blocked).
"""

from __future__ import annotations

from typing import Any

from edgediff.runtime.rng import TorchGenerator
from edgediff.runtime.schedulers import SCHEDULERS, NumpyScheduler, from_config

__all__ = ["SCHEDULERS", "NumpyScheduler", "TorchGenerator", "from_config", "generate_bundle", "is_bundle"]


def generate_bundle(path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate with an exported bundle directory: text-to-image pipelines (edgediff.runtime.pipeline),
    denoiser bundles (edgediff.runtime.generate)."""
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.pipeline import generate_pipeline, is_text_pipeline

    if is_text_pipeline(read_bundle(path)):
        return generate_pipeline(path, *args, **kwargs)
    from edgediff.runtime.generate import generate_bundle as _impl

    return _impl(path, *args, **kwargs)


def is_bundle(path: Any) -> bool:
    """True for a directory holding edgediff_bundle.json."""
    from edgediff.runtime.bundle import is_bundle as _impl

    return _impl(path)
