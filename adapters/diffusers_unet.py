"""Where things are in diffusers' `UNet2DConditionModel`: the map every diffusers technique reads.

Nothing here applies anything (that is `diffusers_site`, through the technique registry). It maps
DeepCache's `cache_branch_id` onto the U-Net's skip connections the way the DeepCache authors
number them: skip 0 is `conv_in`'s output, then one skip per down layer (a resnet with its
attention, or a downsampler) in execution order. Branch `b` keeps the first `b` down layers
and the last `b + 1` up layers (the ones consuming skips 0..b); everything else — the remaining
down layers, the mid block and the first up layers — is "deep" and is cached. Whole blocks are
named where a block is entirely deep, so a cached step does not even concatenate their skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class UNetLayers:
    """The U-Net as DeepCache sees it: down layers, the mid block, up layers (execution order)."""

    down: list[tuple[nn.Module, list[nn.Module]]]  # (block, modules of one layer)
    mid: nn.Module
    up: list[tuple[nn.Module, list[nn.Module]]]

    @property
    def num_branches(self) -> int:
        return len(self.down)


def unet_layers(unet: nn.Module) -> UNetLayers:
    """Read the layer structure of a `UNet2DConditionModel`-shaped module."""
    for name in ("conv_in", "down_blocks", "mid_block", "up_blocks"):
        if getattr(unet, name, None) is None:
            raise TypeError(f"{type(unet).__name__} has no `{name}`: not a UNet2DConditionModel-shaped U-Net")
    down: list[tuple[nn.Module, list[nn.Module]]] = []
    for block in unet.down_blocks:
        attentions = list(getattr(block, "attentions", None) or [])
        for i, resnet in enumerate(block.resnets):
            down.append((block, [resnet] + ([attentions[i]] if i < len(attentions) else [])))
        for sampler in getattr(block, "downsamplers", None) or []:
            down.append((block, [sampler]))
    up: list[tuple[nn.Module, list[nn.Module]]] = []
    for block in unet.up_blocks:
        attentions = list(getattr(block, "attentions", None) or [])
        layers = [[resnet] + ([attentions[i]] if i < len(attentions) else []) for i, resnet in enumerate(block.resnets)]
        layers[-1] += list(getattr(block, "upsamplers", None) or [])
        up.extend((block, layer) for layer in layers)
    if len(up) != len(down) + 1:
        raise TypeError(f"unexpected U-Net: {len(down) + 1} skips but {len(up)} up layers consume them")
    return UNetLayers(down, unet.mid_block, up)


def deep_modules(unet: nn.Module, branch_id: int) -> list[nn.Module]:
    """The largest modules that lie entirely below skip branch `branch_id`, in execution order."""
    layers = unet_layers(unet)
    if not 0 <= branch_id < layers.num_branches:
        raise ValueError(f"cache_branch_id must be in [0, {layers.num_branches - 1}] for this U-Net, got {branch_id}")
    deep_down = layers.down[branch_id:]
    deep_up = layers.up[: len(layers.up) - branch_id - 1]
    return _coarsest(deep_down, layers.down) + [layers.mid] + _coarsest(deep_up, layers.up)


def _coarsest(
    deep: list[tuple[nn.Module, list[nn.Module]]], every: list[tuple[nn.Module, list[nn.Module]]]
) -> list[nn.Module]:
    """Name a whole block where all its layers are deep, else the individual modules."""
    out: list[nn.Module] = []
    for block, layer in deep:
        whole_block_deep = sum(b is block for b, _ in every) == sum(b is block for b, _ in deep)
        if not whole_block_deep:
            out.extend(layer)
        elif not any(m is block for m in out):
            out.append(block)
    return out


def read_timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The noise level of a `UNet2DConditionModel.forward(sample, timestep, ...)` call."""
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


SKIPPED_PREFIXES = ("conv_in", "conv_out", "time_embedding", "class_embedding", "add_embedding", "time_proj")


def quant_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The U-Net's Linear/Conv2d layers a quantizer replaces, by qualified name.

    Every one except the first and last convolutions and the timestep/class embeddings, which are
    tiny, run once per call and carry the signal the rest depends on (the usual post-training
    quantization practice).
    """
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d) and not name.startswith(SKIPPED_PREFIXES)}


def feature_module(unet: nn.Module, branch_id: int) -> nn.Module:
    """The deep module whose output the shallow branch reads (what a cache reuses and corrects)."""
    return deep_modules(unet, branch_id)[-1]


def cross_attentions(unet: nn.Module) -> list[nn.Module]:
    """The cross-attention `Attention` modules (where DGQ log-quantizes the scores)."""
    return [m for m in unet.modules() if type(m).__name__ == "Attention" and getattr(m, "is_cross_attention", False)]


def feedback_block(unet: nn.Module, branch_id: int) -> str:
    """The qualified name of the block an ILF module copies at `branch_id`: the last resnet among the deep
    modules that maps the feature's channels to themselves (it can run on the feature the shallow branch reads,
    conditioned on the step's timestep embedding like every resnet of the U-Net)."""
    channels = feature_channels(unet, branch_id)
    inside = {id(m) for deep in deep_modules(unet, branch_id) for m in deep.modules()}
    names = [name for name, m in unet.named_modules() if id(m) in inside and type(m).__name__ == "ResnetBlock2D"
             and m.in_channels == m.out_channels == channels and getattr(m, "time_emb_proj", None) is not None]
    if not names:
        raise TypeError(f"no deep resnet of this U-Net maps {channels} channels to {channels} with a timestep "
                        f"embedding: ILF cannot attach at branch {branch_id}")
    return names[-1]


def feature_channels(unet: nn.Module, branch_id: int) -> int:
    """The channels of the feature the shallow branch reads at `branch_id` (its last deep layer's output)."""
    layers = unet_layers(unet)
    last_up = layers.up[len(layers.up) - branch_id - 2][1] if len(layers.up) - branch_id - 2 >= 0 else None
    resnet = None if last_up is None else next((m for m in last_up if type(m).__name__ == "ResnetBlock2D"), None)
    if resnet is None:
        raise TypeError(f"branch {branch_id} of this U-Net has no deep up layer with a resnet")
    return int(resnet.out_channels)


def run_resnet(block: nn.Module, feature: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A resnet copy on `feature` with the timestep embedding every deep module receives (`temb`, second)."""
    return block(feature, kwargs["temb"] if "temb" in kwargs else args[1])
