"""Node classes that accelerate ComfyUI's own `MODEL` (Load Checkpoint → MODEL → … → KSampler).

Each node returns a patched clone of its input (ComfyUI's `ModelPatcher.clone()`), so the input
MODEL and every other branch of the graph stay untouched. The technique runs inside whatever
sampler node later samples with the MODEL; when that run ends, what it did is sent to the
frontend as a `livecache.stats` message for *this* node (web/comfyui/livecache.js shows it).
A further technique is one more node of the same shape around `adapters.comfy_unet.apply_technique`.
"""

from __future__ import annotations

from typing import Any

from ..accel.cache_schedule import CalibratedSchedule
from ..accel.deepcache import DeepCacheConfig
from ..accel.rehash import StepRehashConfig
from ..adapters.comfy_unet import TechniqueSession, apply_deepcache, apply_step_rehash
from .diffusers_nodes import ApplyDeepCache
from .fields import MODEL_INPUT, declare, link
from .kinds import ModelTechnique
from .streamlined_nodes import ApplyStepRehash
from .ui_messages import send_stats


def on_model(diffusers_node: type) -> dict[str, Any]:
    """The diffusers-side node's knobs, ranges and tooltips, with its model input taking a ComfyUI MODEL."""
    required = dict(diffusers_node.INPUT_TYPES()["required"])
    required["model"] = MODEL_INPUT
    return required


def stats_reporter(unique_id: str | None):
    """What sends a run's stats line (the registry's report for the technique) to the node's frontend."""

    def report(session: TechniqueSession) -> None:
        line = session.report()
        if line is not None:
            send_stats(unique_id, *line)

    return report


class DeepCacheModel(ModelTechnique):
    """DeepCache for a ComfyUI MODEL (SD1.x, SD2.x, SDXL U-Nets), any ComfyUI sampler and scheduler."""

    DESCRIPTION = ("Feature caching (DeepCache) on a ComfyUI MODEL: the full U-Net every N steps, only the "
                   "shallow branch in between. Connect the result to KSampler (or any sampler node).")
    INPUT_TYPES = declare(on_model(ApplyDeepCache), {"calibrated_schedule": link("LC_SCHEDULE", (
        "A CacheQuant schedule (Load/Calibrate Cache Schedule): its full steps replace cache_interval, schedule, "
        "start and end; the sampler must run exactly its number of steps."))}, unique_id=True)

    def apply(self, model: Any, cache_interval: int, cache_branch_id: int, schedule: str, start: float, end: float,
              calibrated_schedule: CalibratedSchedule | None = None, unique_id: str | None = None) -> tuple[Any]:
        if calibrated_schedule is None:
            config = DeepCacheConfig(cache_interval, cache_branch_id, schedule=schedule, start=start, end=end)
        else:  # the same core with explicit full steps; a run of another length fails at its start, naming both
            config = DeepCacheConfig(cache_interval, cache_branch_id, schedule="calibrated",
                                     full_steps_override=tuple(calibrated_schedule.full_steps))
        return (apply_deepcache(model, config, stats_reporter(unique_id)),)


class StepRehashModel(ModelTechnique):
    """Step rehash for a ComfyUI MODEL: skips whole U-Net calls whose output would nearly repeat the last one."""

    DESCRIPTION = ("Step rehash (Streamlined Inference) on a ComfyUI MODEL: reuses the last U-Net output on steps "
                   "whose predicted output change is below the threshold. Connect the result to any sampler node.")
    INPUT_TYPES = declare(on_model(ApplyStepRehash), unique_id=True)

    def apply(self, model: Any, threshold: float, max_skips: int, mode: str,
              unique_id: str | None = None) -> tuple[Any]:
        config = StepRehashConfig(float(threshold), int(max_skips), mode)
        return (apply_step_rehash(model, config, stats_reporter(unique_id)),)
