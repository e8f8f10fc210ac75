"""Shared fixtures: tiny SD-shaped U-Nets built in code from fixed seeds (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)

# tests/comfy/ needs a ComfyUI checkout and its environment: scripts/test.sh runs it separately with
# LIVECACHE_COMFY_ROOT set (see tests/comfy/conftest.py); the main environment has no ComfyUI.
collect_ignore = [] if os.environ.get("LIVECACHE_COMFY_ROOT") else ["comfy"]


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


REASSOCIATION_ULPS = 64


def assert_close_reassociated(actual, expected, ulps: int = REASSOCIATION_ULPS) -> None:
    """`actual` is `expected` computed in another order (slices, split batches, a cache replayed).

    Why scaled: float addition is not associative, so a sum reduced in another order differs by a few
    units in the last place *of the largest terms*, i.e. of the tensor's magnitude, not of each element
    (an element near zero can differ by far more than rtol of itself). So every element must lie within
    `ulps` machine epsilons of the dtype times max|expected|. Shapes, dtypes and non-finite entries must
    match exactly; bit-identical results (a restored model) are compared with torch.equal instead.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite) and torch.equal(actual[~finite], expected[~finite])
    scale = float(expected[finite].abs().max()) if bool(finite.any()) else 0.0
    tolerance = reassociation_bound(expected.dtype, ulps) * scale
    worst = float((actual[finite].double() - expected[finite].double()).abs().max()) if bool(finite.any()) else 0.0
    assert worst <= tolerance, (f"max |difference| {worst:.3g} exceeds {ulps} eps × max|expected| "
                                f"= {tolerance:.3g} (max|expected| {scale:.3g})")


def reassociation_bound(dtype: torch.dtype = torch.float32, ulps: int = REASSOCIATION_ULPS) -> float:
    """The relative bound `assert_close_reassociated` applies (for results reported as max|Δ| / max|expected|)."""
    return ulps * torch.finfo(dtype).eps


assert_close_reassociated.bound = reassociation_bound


@pytest.fixture
def close_reassociated():
    """`assert_close_reassociated` for tests (fixtures, not imports: the suite runs in importlib mode)."""
    return assert_close_reassociated
