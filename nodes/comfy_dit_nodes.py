"""Nodes for ComfyUI's own `MODEL` whose diffusion model is a DiT (Flux, SD3, Wan, Qwen-Image, Lumina 2): the
block cache, and token slicing (a DiT slices over tokens, not samples). Step rehash and W8A8/DGQ take a DiT
MODEL through the MODEL nodes every family shares (`comfy_nodes.StepRehashModel`,
`comfy_model_nodes.QuantizeModel`).

The same shape as `comfy_nodes`: each node returns a patched clone of its input, the technique runs inside
whatever sampler later samples the MODEL (applied through the registry with every other LiveCache technique
on it, once ComfyUI has loaded the model: LoRAs included), and the run's stats go to this node in the frontend.
"""

from __future__ import annotations

from typing import Any

from ..accel.cache_schedule import CalibratedSchedule
from ..accel.slicing import SlicingConfig
from ..adapters.comfy_dit import check_span, family_of
from ..adapters.comfy_unet import apply_slicing, apply_technique
from .comfy_nodes import MODEL_INPUT, stats_reporter
from .dit_nodes import block_cache_config, block_cache_inputs, block_cache_schedule_input
from .fields import declare, int_field, schema
from .kinds import ModelTechnique


class BlockCacheModel(ModelTechnique):
    """Block cache for a ComfyUI DiT MODEL: a span of transformer blocks is skipped on cached steps."""

    DESCRIPTION = ("Block caching on a DiT MODEL (Flux, Flux 2, SD3, Wan, Qwen-Image, Lumina 2, Z-Image): every N "
                   "steps all transformer blocks run and what a span of middle blocks adds is kept; in between the "
                   "span adds that (reuse), its extrapolation in the noise level (forecast) or a weighted sum of "
                   "the last full steps' residuals fitted on a calibrated schedule (fitted) without running. "
                   "Connect the result to KSampler (or any sampler node).")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (the name ComfyUI calls)
        return schema({"model": MODEL_INPUT, **block_cache_inputs()}, block_cache_schedule_input(), unique_id=True)

    def apply(self, model: Any, cache_interval: int, span_start: int, span_stop: int, mode: str, order: int,
              calibrated_schedule: CalibratedSchedule | None = None, unique_id: str | None = None) -> tuple[Any]:
        diffusion_model = model.get_model_object("diffusion_model")
        default = check_span(diffusion_model, None)  # the family's default; an unsupported model fails here
        config = block_cache_config(default, cache_interval, span_start, span_stop, mode, order, calibrated_schedule)
        check_span(diffusion_model, config.span)
        return (apply_technique(model, config, stats_reporter(unique_id)),)


class TokenSlicingModel(ModelTechnique):
    """Token slicing for a ComfyUI DiT MODEL: each block's feed-forwards run a slice of the tokens at a time."""

    DESCRIPTION = ("Lower peak memory, same output, on a DiT MODEL (Flux, SD3, Wan, Qwen-Image, Lumina 2): every "
                   "transformer block's feed-forward (its widest layer, 2-4x the model width) runs on one slice of "
                   "the image/video tokens at a time. Stacks with the block cache, step rehash and quantization.")

    INPUT_TYPES = declare({"model": MODEL_INPUT, "slices": int_field(4, 1, 4096, (
        "Slices per feed-forward call; the feed-forwards' hidden activations fall about this many times (1: off)."))},
        unique_id=True)

    def apply(self, model: Any, slices: int, unique_id: str | None = None) -> tuple[Any]:
        family_of(model.get_model_object("diffusion_model"))  # a U-Net or other model: one clear error
        config = SlicingConfig("spatial", int(slices), vae=False)
        return (apply_slicing(model, config, stats_reporter(unique_id)),)
