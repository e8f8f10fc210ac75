"""Where CacheQuant, W8A8 and DGQ act on a diffusers `UNet2DConditionModel`, and how they are applied.

- Quantized layers: every `nn.Linear` and `nn.Conv2d` of the U-Net except the first and last
  convolutions and the timestep/class embeddings, which are tiny, run once per call and carry
  the signal the rest depends on (the usual post-training-quantization practice).
- Cache feature: the last deep module of `deep_modules(unet, branch)`: its (cached) output is the
  one deep value the shallow branch consumes, so it is what calibration records and what the
  cache correction adjusts.
- DGQ's logarithmic attention quantizer goes on the cross-attention `Attention` modules: they get
  diffusers' plain `AttnProcessor` (which materialises the score matrix) and an instance override
  of `get_attention_scores`; both are restored on `remove()`.
- Calibration takes the generations to run as callables (`models.calibration.calibration_runs`
  builds them from prompts and seeds), so the adapter does not care who samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..accel.cache_schedule import (
    CalibratedSchedule,
    calibrated_schedule,
    max_segment,
    measure_segments,
    model_fingerprint,
)
from ..accel.cachequant import CacheQuant, CacheQuantConfig, CacheQuantPlan, calibrate_cachequant, record_features
from ..accel.deepcache import DeepCacheConfig
from ..accel.quant import QuantConfig, Quantizer, QuantPlan, calibrate_quant, log2_quantize
from ..accel.schedules import Schedule
from .diffusers_unet import DeepCacheHandle, apply_deepcache, deep_modules, read_timestep

ScheduleObjective = Literal["feature", "output"]
SKIPPED_PREFIXES = ("conv_in", "conv_out", "time_embedding", "class_embedding", "add_embedding", "time_proj")


def quant_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The U-Net's Linear/Conv2d layers a quantizer replaces, by qualified name."""
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d) and not name.startswith(SKIPPED_PREFIXES)}


def feature_module(unet: nn.Module, branch_id: int) -> nn.Module:
    """The deep module whose output the shallow branch reads (what a cache reuses and corrects)."""
    return deep_modules(unet, branch_id)[-1]


def cross_attentions(unet: nn.Module) -> list[nn.Module]:
    return [m for m in unet.modules() if type(m).__name__ == "Attention" and getattr(m, "is_cross_attention", False)]


def calibrate_schedule(unet: nn.Module, runs: Sequence[Callable[[], Any]], steps: int, full_steps: int,
                       cache_branch_id: int, model: str, scheduler: str,
                       calibration: dict[str, Any] | None = None,
                       objective: ScheduleObjective = "output") -> CalibratedSchedule:
    """The DP cache schedule for this U-Net from calibration generations (with progress bars).

    `objective="output"` also runs the first calibration generation once per reuse segment with
    DeepCache on exactly that segment (`cache_schedule.measure_segments`); `"feature"` needs only
    the uncached pass.
    """
    stats = record_features(unet, feature_module(unet, cache_branch_id), read_timestep, steps, runs)
    measure = _segment_measure(unet, runs, steps, full_steps, cache_branch_id, objective)
    info = {"cache_branch_id": cache_branch_id, **(calibration or {})}
    return calibrated_schedule(stats, full_steps, model_fingerprint(unet), model, scheduler, info,
                               None if measure is None else measure())


def _segment_measure(unet: nn.Module, runs: Sequence[Callable[[], Any]], steps: int, full_steps: int, branch: int,
                     objective: ScheduleObjective) -> Callable[[], Any] | None:
    """What measures the output objective's segment costs on the first calibration run (None: feature objective)."""
    if objective not in ("feature", "output"):
        raise ValueError(f"objective must be 'feature' or 'output', got {objective!r}")
    if objective == "feature" or steps < 2:
        return None
    return lambda: measure_segments(lambda schedule: _generate_with(unet, runs[0], schedule, branch),
                                    steps, max_segment(steps, full_steps))


def _generate_with(unet: nn.Module, run: Callable[[], Any], schedule: Schedule | None, branch: int) -> Any:
    """One calibration generation with DeepCache on `schedule` (None: uncached); returns its output."""
    if schedule is None:
        return run()
    handle = apply_deepcache(unet, DeepCacheConfig(cache_branch_id=branch, schedule="calibrated",
                                                   full_steps_override=schedule))
    try:
        return run()
    finally:
        handle.remove()


def calibrate_quantization(unet: nn.Module, config: QuantConfig, runs: Sequence[Callable[[], Any]]) -> QuantPlan:
    """A `QuantPlan` (W8A8 or DGQ) for this U-Net from calibration generations."""
    from tqdm import tqdm

    def run_all() -> None:
        for run in tqdm(runs, desc=f"calibrating {config.label()}", unit="run"):
            run()

    return calibrate_quant(config, unet, quant_layers(unet), read_timestep, run_all, model_fingerprint(unet))


def calibrate_cachequant_unet(unet: nn.Module, config: CacheQuantConfig, runs: Sequence[Callable[[], Any]],
                              steps: int, model: str, scheduler: str, schedule: CalibratedSchedule | None = None,
                              calibration: dict[str, Any] | None = None,
                              objective: ScheduleObjective = "output") -> CacheQuantPlan:
    """Calibrate CacheQuant (schedule unless given, quantization, both corrections) for this U-Net.

    Without a `schedule`, the core chooses one from its own calibration pass (plus, for the output
    objective, the segment generations).
    """
    if schedule is not None and schedule.calibration.get("cache_branch_id", config.cache_branch_id) != \
            config.cache_branch_id:
        raise ValueError(f"the schedule was calibrated at cache_branch_id {schedule.calibration['cache_branch_id']}, "
                         f"not {config.cache_branch_id}")
    measure = _segment_measure(unet, runs, steps, config.full_steps, config.cache_branch_id, objective)
    info = {"cache_branch_id": config.cache_branch_id, **(calibration or {})}
    return calibrate_cachequant(config, unet, feature_module(unet, config.cache_branch_id), quant_layers(unet),
                                read_timestep, steps, runs, model_fingerprint(unet), model, scheduler, schedule, info,
                                measure)


@dataclass
class QuantHandle:
    """A quantization plan applied to a U-Net (plus DGQ's log-quantized cross-attention scores)."""

    quantizer: Quantizer
    restore: list[tuple[nn.Module, Any]]

    @property
    def stats(self):
        return self.quantizer.stats

    def remove(self) -> None:
        self.quantizer.remove()
        while self.restore:
            attention, processor = self.restore.pop()
            attention.__dict__.pop("get_attention_scores", None)
            attention.set_processor(processor)


def apply_quantization(unet: nn.Module, plan: QuantPlan) -> QuantHandle:
    """Apply a calibrated `QuantPlan` to `unet`; refuses a plan calibrated for another model."""
    if plan.fingerprint and plan.fingerprint != model_fingerprint(unet):
        raise ValueError("this quantization was calibrated for another model: calibrate it for this one")
    quantizer = Quantizer(plan).apply(unet, quant_layers(unet), read_timestep)
    restore: list[tuple[nn.Module, Any]] = []
    if plan.config.attention_bits:
        from diffusers.models.attention_processor import AttnProcessor

        bits = plan.config.attention_bits
        for attention in cross_attentions(unet):
            restore.append((attention, attention.processor))
            attention.set_processor(AttnProcessor())
            original = attention.get_attention_scores
            attention.get_attention_scores = lambda *a, f=original, **k: log2_quantize(f(*a, **k), bits)
    return QuantHandle(quantizer, restore)


def apply_cachequant(unet: nn.Module, scheduler: Any, plan: CacheQuantPlan) -> DeepCacheHandle:
    """Apply a calibrated CacheQuant plan (schedule, quantization, corrections) to `unet`.

    The handle is DeepCache's: the scheduler's `set_timesteps` starts each generation of the core.
    """
    plan.schedule.check(model_fingerprint(unet))
    branch = plan.config.cache_branch_id
    core = CacheQuant(plan).apply(unet, deep_modules(unet, branch), feature_module(unet, branch), quant_layers(unet),
                                  read_timestep)
    return DeepCacheHandle(core, scheduler)
