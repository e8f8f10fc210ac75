"""Adapter for diffusers' `UNet2DConditionModel` (any pipeline with `pipe.unet`).

It maps DeepCache's `cache_branch_id` onto the U-Net's skip connections the way the DeepCache
authors number them: skip 0 is `conv_in`'s output, then one skip per down layer (a resnet with
its attention, or a downsampler) in execution order. Branch `b` keeps the first `b` down layers
and the last `b + 1` up layers (the ones consuming skips 0..b); everything else — the remaining
down layers, the mid block and the first up layers — is "deep" and is cached. Whole blocks are
named where a block is entirely deep, so a cached step does not even concatenate their skips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..accel.compose import application_order
from ..accel.deepcache import DeepCache, DeepCacheConfig
from ..accel.rehash import StepRehashConfig
from ..accel.slicing import SlicingConfig


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


class DeepCacheHandle:
    """DeepCache applied to a diffusers U-Net (and its pipeline's scheduler, when given one)."""

    def __init__(self, core: DeepCache, scheduler: Any | None) -> None:
        self.core = core
        self._scheduler = scheduler
        if scheduler is not None:
            original = scheduler.set_timesteps

            def set_timesteps(*args: Any, **kwargs: Any) -> Any:
                result = original(*args, **kwargs)
                core.reset(len(scheduler.timesteps))  # a new generation: its length fixes the schedule
                return result

            scheduler.set_timesteps = set_timesteps

    @property
    def stats(self):
        return self.core.stats

    def remove(self) -> None:
        self.core.remove()
        if self._scheduler is not None and "set_timesteps" in self._scheduler.__dict__:
            del self._scheduler.set_timesteps
            self._scheduler = None


def apply_deepcache(target: Any, config: DeepCacheConfig) -> DeepCacheHandle:
    """Apply DeepCache to a diffusers pipeline (`target.unet`) or directly to a U-Net.

    With a pipeline, its scheduler's `set_timesteps` marks each new generation and its length, which
    the non-uniform schedule needs; with a bare U-Net, call `handle.core.reset(num_steps)` yourself
    before each generation (without it, uniform caching still works from the noise levels alone).
    """
    unet = getattr(target, "unet", target)
    scheduler = getattr(target, "scheduler", None) if unet is not target else None
    core = DeepCache(config).apply(unet, deep_modules(unet, config.cache_branch_id), read_timestep)
    return DeepCacheHandle(core, scheduler)


def _appliers() -> dict[type, Callable[[Any, Any], Any]]:
    """Config type -> function applying it to a `SimpleNamespace(unet=, scheduler=)`.

    Imported on use because the rehash and slicing adapters read this module's layer map.
    """
    from ..accel.cachequant import CacheQuantPlan
    from ..accel.quant import QuantPlan
    from .diffusers_quant import apply_cachequant, apply_quantization
    from .diffusers_rehash import apply_rehash
    from .diffusers_slicing import apply_slicing

    return {DeepCacheConfig: apply_deepcache, StepRehashConfig: apply_rehash, SlicingConfig: apply_slicing,
            CacheQuantPlan: lambda t, plan: apply_cachequant(t.unet, t.scheduler, plan),
            QuantPlan: lambda t, plan: apply_quantization(t.unet, plan)}


@contextmanager
def accelerated(unet: nn.Module, scheduler: Any, configs: Sequence[Any]) -> Iterator[list[Any]]:
    """Apply each acceleration config to `unet` (and `scheduler`) for the duration of a `with` block.

    The configs are checked and ordered by `accel.compose` (one per technique; slicing innermost, then
    DeepCache, then step rehash outermost) whatever order they are given in; the handles (`.stats`,
    `.remove()`) come back in the order of `configs`. Removal runs even when sampling fails, in reverse
    order of application, so the U-Net leaves the block exactly as it entered — which is what lets node
    classes share one loaded model without mutating it.
    """
    target = SimpleNamespace(unet=unet, scheduler=scheduler, configs=tuple(configs))
    appliers = _appliers()
    unknown = [type(c).__name__ for c in configs if type(c) not in appliers]
    if unknown:
        raise TypeError(f"no diffusers adapter for {unknown[0]}")
    applied: list[tuple[Any, Any]] = []
    try:
        for config in application_order(configs):
            applied.append((config, appliers[type(config)](target, config)))
        yield [next(h for c, h in applied if c is config) for config in configs]
    finally:
        for _, handle in reversed(applied):
            handle.remove()
