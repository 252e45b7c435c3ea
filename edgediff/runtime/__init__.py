"""Torch-free generation: numpy ports of diffusers' schedulers, torch's CPU normal stream,
the bundle reader and `generate_bundle`, which runs an exported bundle on its runtime.

Nothing under edgediff.runtime imports torch (a test runs it with torch blocked).
"""

from __future__ import annotations

from typing import Any

from edgediff.runtime.rng import TorchGenerator
from edgediff.runtime.schedulers import SCHEDULERS, NumpyScheduler, from_config

__all__ = ["SCHEDULERS", "NumpyScheduler", "TorchGenerator", "from_config", "generate_bundle", "is_bundle"]


def generate_bundle(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate with an exported bundle directory (see edgediff.runtime.generate)."""
    from edgediff.runtime.generate import generate_bundle as _impl

    return _impl(*args, **kwargs)


def is_bundle(path: Any) -> bool:
    """True for a directory holding edgediff_bundle.json."""
    from edgediff.runtime.bundle import is_bundle as _impl

    return _impl(path)
