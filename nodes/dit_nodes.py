"""The block cache for LiveCache's own `LC_PIPE` when its model is a diffusers DiT (the embedded DiT included).

The inputs and how they become a `BlockCacheConfig` are shared with the ComfyUI `MODEL` node
(`comfy_dit_nodes`), so both front ends offer the same settings with the same meaning.
"""

from __future__ import annotations

from typing import Any

from ..accel.block_cache import BlockCacheConfig
from ..accel.cache_schedule import CalibratedSchedule
from ..adapters.diffusers_dit import DiTSite
from ..models.pipeline import DiffusionModel
from .fields import choice_field, declare, int_field, link
from .kinds import PipeTechnique


def block_cache_inputs() -> dict[str, tuple[Any, dict[str, Any]]]:
    """The block cache's settings as node inputs (beside the node's model input)."""
    return {
        "cache_interval": int_field(3, 1, 1000, "A full step every N steps; 1 never caches (exactly the uncached "
                                                "output)."),
        "span_start": int_field(0, 0, 1000, "First cached block, counted over all blocks in execution order (Flux: "
                                            "double then single blocks). 0: the family's default (the longest range "
                                            "that can be cached; block 0 always runs)."),
        "span_stop": int_field(0, 0, 1000, "One past the last cached block. 0: the family's default (the last block "
                                           "always runs)."),
        "mode": choice_field(["reuse", "forecast", "fitted"], "reuse",
                             "reuse: the span's residual of the last full step; forecast: extrapolated to this "
                             "step's noise level from the last full steps; fitted: a weighted sum of the last full "
                             "steps' residuals, weights fitted on the calibration generations of a connected "
                             "schedule (needs calibrated_schedule)."),
        "order": int_field(1, 1, 2, "The forecast's order in the noise level (forecast mode only)."),
    }


def block_cache_schedule_input() -> dict[str, tuple[Any, dict[str, Any]]]:
    """The optional schedule input: a calibrated schedule's full steps, and for mode 'fitted' its weights."""
    return {"calibrated_schedule": link("LC_SCHEDULE", (
        "A schedule calibrated on this model's block span (Calibrate/Load Cache Schedule): its full steps replace "
        "cache_interval, and mode 'fitted' uses the forecast weights fitted with it; the sampler must run exactly "
        "its number of steps."))}


def block_cache_config(default_span: tuple[int, int], cache_interval: int, span_start: int, span_stop: int,
                       mode: str, order: int, schedule: CalibratedSchedule | None = None) -> BlockCacheConfig:
    """The node inputs as a config; a 0 span bound takes the family's default."""
    span = (int(span_start) or default_span[0], int(span_stop) or default_span[1])
    if schedule is None:
        if mode == "fitted":
            raise ValueError("mode 'fitted' needs a calibrated_schedule (its weights are fitted on the calibration "
                             "generations): connect Calibrate/Load Cache Schedule, or pick reuse or forecast")
        return BlockCacheConfig(cache_interval=int(cache_interval), span=span, mode=mode, order=int(order))
    if mode == "fitted" and schedule.forecast is None:
        raise ValueError("this cache schedule carries no fitted forecast (written before it existed): calibrate it "
                         "again, or pick reuse or forecast")
    return BlockCacheConfig(span=span, schedule="calibrated", full_steps_override=tuple(schedule.full_steps),
                            mode=mode, order=int(order), weights=schedule.forecast if mode == "fitted" else None)


class ApplyBlockCache(PipeTechnique):
    """Block cache for a LiveCache DiT model: a span of transformer blocks is skipped on cached steps."""

    DESCRIPTION = ("Block caching on a diffusers DiT (the embedded DiT, DiT, PixArt, Flux, SD3, Wan, Qwen-Image, "
                   "Z-Image): every N steps all transformer blocks run and what a span of middle blocks adds is "
                   "kept; in between the span adds that (reuse) or its extrapolation in the noise level (forecast).")
    INPUT_TYPES = declare({
        "model": link("LC_PIPE", "A DiT model (e.g. 'embedded:dit'); it is not modified, a copy is returned."),
        **block_cache_inputs(),
    }, block_cache_schedule_input(), unique_id=True)

    def apply(self, model: DiffusionModel, cache_interval: int, span_start: int, span_stop: int, mode: str,
              order: int, calibrated_schedule: CalibratedSchedule | None = None,
              unique_id: str | None = None) -> tuple[DiffusionModel]:
        site = DiTSite(model.unet)  # a U-Net fails here, naming its class and the supported families
        config = block_cache_config(site.default_span(), cache_interval, span_start, span_stop, mode, order,
                                    calibrated_schedule)
        site.block_span(config.span)  # a span this model lacks fails here, naming the range
        return (model.with_acceleration(config, unique_id),)
