"""Shared fixtures: tiny SD-shaped U-Nets built in code from fixed seeds (no downloads)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def make_tiny_unet(seed: int = 0):
    """Two cross-attention down blocks and a plain one: every block kind DeepCache meets in SD."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture(scope="session")
def unet_factory():
    """`make_tiny_unet` for tests that need several models (other seeds, other precisions)."""
    return make_tiny_unet


class DeepCallCounter:
    """Counts how often the deep blocks really compute (the mid block's first resnet)."""

    def __init__(self, unet) -> None:
        self.count = 0
        self.handle = unet.mid_block.resnets[0].register_forward_pre_hook(self._bump)

    def _bump(self, *_):
        self.count += 1


@pytest.fixture
def deep_counter():
    return DeepCallCounter
