"""The diffusers U-Net as a site, and how techniques are applied to diffusers pipelines.

`UNetSite` tells the cores what they need about a `UNet2DConditionModel` (the maps in
`diffusers_unet`, `diffusers_slicing` and `diffusers_rehash`) and, with a scheduler, when a
generation starts (`diffusers_scheduled.ScheduledSite`, the one place a diffusers scheduler is patched).
`apply_technique` and `accelerated` apply configs through the technique registry, which records
them on the U-Net (`accel.registry.applied_to(unet)`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..accel.quant import log2_quantize
from ..accel.registry import Handle
from ..accel.site import Around, FeedbackPoint, Removable, Removal, Site
from ..accel.slicing import OperatorGroup, SliceAxis
from ..accel.techniques import REGISTRY
from .diffusers_dit import DiTSite, is_dit
from .diffusers_rehash import wrap_unet_calls
from .diffusers_scheduled import ScheduledSite
from .diffusers_slicing import unet_groups
from .diffusers_unet import cross_attentions, deep_modules, feedback_block, quant_layers, read_timestep, run_resnet


class UNetSite(ScheduledSite):
    """A diffusers `UNet2DConditionModel` (and, when given, the scheduler that samples with it)."""

    family = "diffusers"
    calls = "U-Net calls"

    def read_level(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        return read_timestep(args, kwargs)

    def deep_modules(self, branch_id: int) -> list[nn.Module]:
        return deep_modules(self.root, branch_id)

    def quant_layers(self) -> dict[str, nn.Module]:
        return quant_layers(self.root)

    def feedback_point(self, where: dict[str, Any] | None) -> FeedbackPoint:
        """ILF below skip branch `branch` (default 0): the deep modules are skipped, the feature the shallow
        branch reads is corrected, by a copy of the deep resnet `block` (default `feedback_block`)."""
        where = dict(where or {})
        branch = where.setdefault("branch", 0)
        if isinstance(branch, bool) or not isinstance(branch, int):
            raise ValueError(f"ILF branch must be an integer, got {branch!r}")
        name = where.setdefault("block", feedback_block(self.root, branch))
        blocks = dict(self.root.named_modules())
        if name not in blocks:
            raise ValueError(f"this U-Net has no block {name!r} for the ILF module to copy")
        deep = tuple(deep_modules(self.root, branch))
        return FeedbackPoint(deep, len(deep) - 1, blocks[name], where, run_resnet)

    def operator_groups(self, axis: SliceAxis, cache_inside: bool) -> list[OperatorGroup]:
        return unet_groups(self.root, axis, cache_inside)

    def quantize_attention(self, bits: int) -> Removable:
        """DGQ's log2 score quantizer on the cross-attentions: diffusers' plain `AttnProcessor` (which
        materialises the score matrix) and an instance override of `get_attention_scores`."""
        from diffusers.models.attention_processor import AttnProcessor

        restore: list[tuple[nn.Module, Any]] = []
        for attention in cross_attentions(self.root):
            restore.append((attention, attention.processor))
            attention.set_processor(AttnProcessor())
            original = attention.get_attention_scores
            attention.get_attention_scores = lambda *a, f=original, **k: log2_quantize(f(*a, **k), bits)

        def undo() -> None:
            while restore:
                attention, processor = restore.pop()
                attention.__dict__.pop("get_attention_scores", None)
                attention.set_processor(processor)

        return Removal(undo)

    def wrap_calls(self, around: Around) -> Removable:
        return wrap_unet_calls(self.root, around)


def site_of(target: Any) -> UNetSite:
    """The site of a diffusers pipeline (`target.unet` and its scheduler) or of a bare U-Net."""
    return UNetSite.of(target)


def apply_technique(target: Any, config: Any) -> Handle:
    """Apply one technique to a diffusers pipeline or a bare U-Net; `handle.remove()` (or removing it by name
    from `applied_to(unet)`) takes it off again.

    With a pipeline, its scheduler's `set_timesteps` marks each new generation and its length, which
    schedules such as DeepCache's non-uniform one need.
    """
    return REGISTRY.apply(site_of(target), [config])[0]


def model_site(model: nn.Module, scheduler: Any | None = None) -> Site:
    """The site of the denoiser a `DiffusionModel` carries: a DiT's when its class is a supported DiT
    family (the embedded DiT, Flux, SD3, …), else the U-Net's."""
    return DiTSite(model, scheduler) if is_dit(model) else UNetSite(model, scheduler)


@contextmanager
def accelerated(unet: nn.Module, scheduler: Any, configs: Sequence[Any]) -> Iterator[list[Handle]]:
    """Apply each acceleration config to `unet` (and `scheduler`) for the duration of a `with` block.

    The registry checks and orders the configs (one per technique; slicing innermost, then the feature
    caches, then step rehash outermost) whatever order they are given in; the handles (`.stats`,
    `.remove()`) come back in the order of `configs`. Removal runs even when sampling fails, outermost
    first, so the U-Net leaves the block exactly as it entered — which is what lets node classes share
    one loaded model without mutating it.
    """
    handles = REGISTRY.apply(model_site(unet, scheduler), configs)
    try:
        yield handles
    finally:
        for handle in reversed(sorted(handles, key=lambda h: h.technique.rank)):
            handle.remove()
