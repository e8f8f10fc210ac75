"""The block cache for ComfyUI's own `MODEL` whose diffusion model is a DiT (Flux, Wan, Qwen-Image, Lumina 2).

The same shape as `comfy_nodes`: the node returns a patched clone of its input, the block cache runs inside
whatever sampler later samples the MODEL (applied through the registry with every other LiveCache technique
on it, once ComfyUI has loaded the model: LoRAs included), and the run's stats go to this node in the frontend.
"""

from __future__ import annotations

from typing import Any

from ..adapters.comfy_dit import check_span
from ..adapters.comfy_unet import apply_technique
from .comfy_nodes import MODEL_INPUT, stats_reporter
from .dit_nodes import block_cache_config, block_cache_inputs


class BlockCacheModel:
    """Block cache for a ComfyUI DiT MODEL: a span of transformer blocks is skipped on cached steps."""

    CATEGORY = "LiveCache/accelerate"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Block caching on a DiT MODEL (Flux, Flux 2, Wan, Qwen-Image, Lumina 2, Z-Image): every N steps "
                   "all transformer blocks run and what a span of middle blocks adds is kept; in between the span "
                   "adds that (reuse) or its extrapolation in the noise level (forecast) without running. "
                   "Connect the result to KSampler (or any sampler node).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            **block_cache_inputs(),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model: Any, cache_interval: int, span_start: int, span_stop: int, mode: str, order: int,
              unique_id: str | None = None) -> tuple[Any]:
        diffusion_model = model.get_model_object("diffusion_model")
        default = check_span(diffusion_model, None)  # the family's default; an unsupported model fails here
        config = block_cache_config(default, cache_interval, span_start, span_stop, mode, order)
        check_span(diffusion_model, config.span)
        return (apply_technique(model, config, stats_reporter(unique_id)),)
