"""Diffusers transformer diffusion models (DiTs) as sites: where the blocks are, how to read the noise level.

One table (`FAMILIES`) describes each supported class, by the name diffusers 0.42 gives it: the
forward parameter that carries the noise level, and the *stages* — the `nn.ModuleList`s of blocks the
model runs in order, which parameters of a block are its token streams and where its output puts
them (Flux's double-stream blocks feed its single-stream blocks (text, image) unchanged, so the two
stages are joined; Flux 2 concatenates the two streams in between, so a span cannot cross that
point). Block numbering, spans and their defaults: `dit_blocks`.

Any other model fails with one error naming its class and the supported families.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..accel.registry import Handle
from ..accel.site import Around, BlockSpan, FeedbackPoint, Removable
from ..accel.slicing import OperatorGroup, SliceAxis
from ..accel.techniques import REGISTRY
from .diffusers_rehash import wrap_model_calls
from .diffusers_scheduled import ScheduledSite
from .dit_blocks import BlockLayout, Stage, span_feedback, token_groups

PAIR = ("hidden_states", "encoder_hidden_states")  # joint blocks: both streams in ...
PAIR_OUT = (1, 0)  # ... and out as (encoder_hidden_states, hidden_states)
FF = ("ff", "ff_context")  # a joint block's image and text feed-forwards


@dataclass(frozen=True)
class Family:
    """What a DiT class offers the cores."""

    name: str
    level_argument: str  # the forward parameter carrying the noise level
    stages: tuple[Stage, ...]
    # the level argument counts up along sampling (Z-Image passes 1 - sigma): read 1 - value so that,
    # as for every other family, the level falls from step to step
    rising_level: bool = False
    sample_argument: str = "hidden_states"  # the forward parameter carrying the noisy latent


FAMILIES: dict[str, Family] = {
    "FluxTransformer2DModel": Family("Flux", "timestep", (
        Stage("transformer_blocks", PAIR, PAIR_OUT, joins_next=True, feed_forwards=FF),
        Stage("single_transformer_blocks", PAIR, PAIR_OUT))),
    "Flux2Transformer2DModel": Family("Flux 2", "timestep", (
        Stage("transformer_blocks", PAIR, PAIR_OUT, feed_forwards=FF),
        Stage("single_transformer_blocks", ("hidden_states",), None))),
    "SD3Transformer2DModel": Family("SD3", "timestep", (Stage("transformer_blocks", PAIR, PAIR_OUT,
                                                              feed_forwards=FF),)),
    "WanTransformer3DModel": Family("Wan", "timestep", (Stage("blocks", ("hidden_states",), None,
                                                              feed_forwards=("ffn",)),)),
    "QwenImageTransformer2DModel": Family("Qwen-Image", "timestep", (Stage("transformer_blocks", PAIR, PAIR_OUT,
                                                                           feed_forwards=("img_mlp", "txt_mlp")),)),
    "ZImageTransformer2DModel": Family("Z-Image", "t", (Stage("layers", ("x",), None,
                                                              feed_forwards=("feed_forward",)),),
                                       rising_level=True, sample_argument="x"),
    "DiTTransformer2DModel": Family("DiT", "timestep", (Stage("transformer_blocks", ("hidden_states",), None,
                                                              feed_forwards=("ff",)),)),
    "PixArtTransformer2DModel": Family("PixArt", "timestep",
                                       (Stage("transformer_blocks", ("hidden_states",), None,
                                              feed_forwards=("ff",)),)),
}


def supported() -> str:
    return ", ".join(f"{cls} ({family.name})" for cls, family in FAMILIES.items())


def is_dit(model: nn.Module) -> bool:
    """Whether `model`'s class (or a base class, by name) is a supported diffusers DiT."""
    return any(cls.__name__ in FAMILIES for cls in type(model).__mro__)


def family_of(model: nn.Module) -> Family:
    """The family of `model` (its class or a base class by name), or a TypeError naming what is supported."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise TypeError(f"{type(model).__name__} is not a supported diffusers transformer; supported: {supported()}")


class DiTSite(ScheduledSite):
    """A diffusers DiT of a supported family (and, when given, the scheduler that samples with it)."""

    component = "transformer"
    calls = "transformer calls"

    def __init__(self, transformer: nn.Module, scheduler: Any | None = None) -> None:
        self.dit = family_of(transformer)
        super().__init__(transformer, scheduler)
        self.family = f"diffusers DiT ({self.dit.name})"
        self.layout = BlockLayout(transformer, self.dit.name, self.dit.stages)
        params = list(inspect.signature(type(transformer).forward).parameters)[1:]
        self._level_position = params.index(self.dit.level_argument)

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block, in execution order (the numbering spans use)."""
        return self.layout.blocks

    def read_level(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        name = self.dit.level_argument
        value = kwargs[name] if name in kwargs else args[self._level_position]
        # the largest entry: a batch shares one level, and per-token levels (Wan 2.2) hold 0 for clean frames
        level = float(value.max()) if isinstance(value, torch.Tensor) else float(value)
        return 1.0 - level if self.dit.rising_level else level

    def default_span(self) -> tuple[int, int]:
        return self.layout.default_span()

    def block_span(self, span: tuple[int, int] | None) -> BlockSpan:
        return self.layout.block_span(span)

    def feedback_point(self, where: dict[str, Any] | None) -> FeedbackPoint:
        return span_feedback(self.layout, where)

    def quant_layers(self) -> dict[str, nn.Module]:
        return self.layout.linear_layers()

    def operator_groups(self, axis: SliceAxis, cache_inside: bool) -> list[OperatorGroup]:
        """The blocks' feed-forwards, over the tokens (inside the blocks, so a block cache always sits outside)."""
        return token_groups(self.layout, axis)

    def wrap_calls(self, around: Around) -> Removable:
        return wrap_model_calls(self.root, around, self.dit.sample_argument, self.read_level, _transformer_output)


def _transformer_output(sample: torch.Tensor) -> Any:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


def site_of(target: Any) -> DiTSite:
    """The site of a diffusers DiT pipeline (`target.transformer` and its scheduler) or of a bare transformer."""
    return DiTSite.of(target)


def apply_technique(target: Any, config: Any) -> Handle:
    """Apply one technique to a DiT pipeline or a bare transformer; `handle.remove()` (or removing it by name
    from `applied_to(transformer)`) takes it off again."""
    return REGISTRY.apply(site_of(target), [config])[0]
