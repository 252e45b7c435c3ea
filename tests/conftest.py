"""Shared fixtures: tiny denoisers of every supported kind, built in memory (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from edgediff.model import DiffusionModel, InputSignature
from edgediff.schedule import NoiseSchedule

torch.set_num_threads(1)  # tests run in parallel (pytest -n 2) on a 2-core machine


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("EDGEDIFF_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; set EDGEDIFF_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _wrap(module: torch.nn.Module, arch: str, sig: InputSignature) -> DiffusionModel:
    module.eval()
    return DiffusionModel(module, NoiseSchedule.from_config({}), sig, arch, dict(module.config), {"source": "test"})


@pytest.fixture
def tiny_unet() -> DiffusionModel:
    """UNet2DModel with an attention block, 1x16x16 (the demo's architecture, smaller)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8, attention_head_dim=8)
    return _wrap(m, "UNet2DModel", InputSignature((1, 16, 16)))


@pytest.fixture
def tiny_cond_unet() -> DiffusionModel:
    """UNet2DConditionModel with cross-attention, 4x8x8 latents, 6x32 conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                             cross_attention_dim=32, attention_head_dim=8)
    return _wrap(m, "UNet2DConditionModel", InputSignature((4, 8, 8), cond_shape=(6, 32)))


@pytest.fixture
def tiny_dit() -> DiffusionModel:
    """DiTTransformer2DModel (class-conditional), 4x8x8 latents, patch 2."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
    return _wrap(m, "DiTTransformer2DModel", InputSignature((4, 8, 8), num_classes=10))
