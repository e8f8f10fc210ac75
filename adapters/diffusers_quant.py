"""Calibrating CacheQuant, its DP cache schedule and W8A8/DGQ on a diffusers `UNet2DConditionModel`.

Where things are comes from the U-Net map (`diffusers_unet`: quantized layers, the cache feature —
the last deep module, the one deep value the shallow branch consumes, so it is what calibration
records and what the cache correction adjusts); applying the calibrated plans goes through the
technique registry like every other config (`diffusers_site`). Calibration takes the generations to
run as callables (`models.calibration.calibration_runs` builds them from prompts and seeds), so the
adapter does not care who samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

from torch import nn

from ..accel.cache_schedule import (
    CalibratedSchedule,
    calibrated_schedule,
    max_segment,
    measure_segments,
    model_fingerprint,
)
from ..accel.cachequant import CacheQuantConfig, CacheQuantPlan, Calibration, calibrate_cachequant, record_features
from ..accel.deepcache import DeepCacheConfig
from ..accel.progress import Progress
from ..accel.quant import QuantConfig, QuantPlan, calibrate_quant
from ..accel.schedules import Schedule
from ..accel.site import CacheSite
from .diffusers_site import UNetSite, apply_technique
from .diffusers_unet import quant_layers, read_timestep

ScheduleObjective = Literal["feature", "output"]


def _with_branch(calibration: Calibration, branch: int) -> Calibration:
    return replace(calibration, info={"cache_branch_id": branch, **calibration.info})


def calibrate_schedule(unet: nn.Module, calibration: Calibration, full_steps: int, cache_branch_id: int,
                       objective: ScheduleObjective = "output") -> CalibratedSchedule:
    """The DP cache schedule for this U-Net from calibration generations (with progress bars).

    `objective="output"` also runs the first calibration generation once per reuse segment with
    DeepCache on exactly that segment (`cache_schedule.measure_segments`); `"feature"` needs only
    the uncached pass.
    """
    site = UNetSite(unet).cache_site(cache_branch_id)
    stats = record_features(site, calibration)
    measure = _segment_measure(site, calibration, full_steps, cache_branch_id, objective)
    calibration = _with_branch(calibration, cache_branch_id)
    return calibrated_schedule(stats, full_steps, site.fingerprint, calibration.model, calibration.scheduler,
                               calibration.info, None if measure is None else measure())


def _segment_measure(site: CacheSite, calibration: Calibration, full_steps: int, branch: int,
                     objective: ScheduleObjective) -> Callable[[], Any] | None:
    """What measures the output objective's segment costs on the first calibration run (None: feature objective)."""
    if objective not in ("feature", "output"):
        raise ValueError(f"objective must be 'feature' or 'output', got {objective!r}")
    steps = calibration.steps
    if objective == "feature" or steps < 2:
        return None
    run = calibration.runs[0]
    return lambda: measure_segments(lambda schedule: _generate_with(site.root, run, schedule, branch),
                                    steps, max_segment(steps, full_steps), progress=calibration.progress)


def _generate_with(unet: nn.Module, run: Callable[[], Any], schedule: Schedule | None, branch: int) -> Any:
    """One calibration generation with DeepCache on `schedule` (None: uncached); returns its output."""
    if schedule is None:
        return run()
    handle = apply_technique(unet, DeepCacheConfig(cache_branch_id=branch, schedule="calibrated",
                                                   full_steps_override=schedule))
    try:
        return run()
    finally:
        handle.remove()


def calibrate_quantization(unet: nn.Module, config: QuantConfig, runs: Sequence[Callable[[], Any]],
                           progress: Progress | None = None) -> QuantPlan:
    """A `QuantPlan` (W8A8 or DGQ) for this U-Net from calibration generations (`progress`: bar and stop check)."""

    def run_all() -> None:
        for run in (progress or Progress()).loop(runs, f"calibrating {config.label()}", "run"):
            run()

    return calibrate_quant(config, unet, quant_layers(unet), read_timestep, run_all, model_fingerprint(unet))


def calibrate_cachequant_unet(unet: nn.Module, config: CacheQuantConfig, calibration: Calibration,
                              schedule: CalibratedSchedule | None = None,
                              objective: ScheduleObjective = "output") -> CacheQuantPlan:
    """Calibrate CacheQuant (schedule unless given, quantization, both corrections) for this U-Net.

    Without a `schedule`, the core chooses one from its own calibration pass (plus, for the output
    objective, the segment generations).
    """
    branch = config.cache_branch_id
    if schedule is not None and schedule.calibration.get("cache_branch_id", branch) != branch:
        raise ValueError(f"the schedule was calibrated at cache_branch_id {schedule.calibration['cache_branch_id']}, "
                         f"not {branch}")
    site = UNetSite(unet).cache_site(branch)
    measure = _segment_measure(site, calibration, config.full_steps, branch, objective)
    return calibrate_cachequant(config, site, _with_branch(calibration, branch), schedule, measure)
