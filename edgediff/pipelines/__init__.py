"""Pipelines: a diffusers pipeline folder (model_index.json) as denoiser + text encoder(s),
tokenizer(s), VAE and scheduler (docs/pipelines.md).

The denoiser stays a DiffusionModel (the passes act on it); `extras["pipeline"]` records the
folder and its components, so artifacts made from it still find their text encoder and VAE.
"""

from __future__ import annotations

from edgediff.pipelines.components import KEY, Pipeline, attach, pipeline_of
from edgediff.pipelines.prompts import PROMPTS, prompts_for, read_prompts, use_prompts

__all__ = ["KEY", "PROMPTS", "Pipeline", "attach", "pipeline_of", "prompts_for", "read_prompts", "use_prompts"]
