"""`load_pipeline`: what a user points at (a pipeline folder, or an artifact made from one) as a Pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgediff.errors import BadInput
from edgediff.pipelines.components import Pipeline, pipeline_of


def load_pipeline(spec: str | Path, opts: Any = None) -> Pipeline:
    from edgediff.loaders import load_model

    model = load_model(spec, opts)
    p = pipeline_of(model)
    if p is None:
        raise BadInput(f"{spec}: not a pipeline (no model_index.json with components)")
    return p
