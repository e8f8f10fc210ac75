"""CacheQuant: a calibrated DeepCache schedule + W8A8 quantization + decoupled error correction.

The three parts compose in one core, each reusing its own module:
- the cache: the DeepCache core with an explicit schedule chosen by dynamic programming
  (`cache_schedule.dp_schedule`) from calibration runs; on a DiT (`CacheQuantConfig.blocks`), the block
  cache core on that span instead, and the feature the schedule and correction are fitted on is the
  residual the span adds (every stream it changes, its tokens side by side, channels last);
- the quantization: a `QuantPlan` (`quant.py`) applied to the Linear/Conv2d layers; on cached
  steps the deep layers do not run, so quantization and caching save different work and stack;
- the *decoupled* correction: two independent sets of per-channel affine maps, each fitted by
  least squares against the float, uncached model on calibration data: the cache correction acts
  on the reused deep feature at each cached step (`CacheCorrection`), the quantization correction
  on each quantized layer's output at each noise level (`QuantPlan` corrections). Fitting them
  separately keeps each one a small, well-posed regression on the error it targets, and the
  ablation switches (`correct_cache`, `correct_quant`) turn each off without recalibrating.

`calibrate_cachequant` runs the calibration generations it is given (one callable per prompt/seed,
with a progress bar): one uncached pass records the deep features per step (schedule + cache
correction) and the activation ranges, and with quantization correction a second pass compares
each quantized layer with its float output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .block_cache import BlockCache, BlockCacheConfig
from .cache_schedule import (
    CacheCorrection,
    CalibratedSchedule,
    FeatureRecorder,
    LevelReader,
    PairStats,
    cache_correction,
    calibrated_schedule,
)
from .deepcache import DeepCache, DeepCacheConfig
from .progress import Progress
from .quant import QuantConfig, Quantizer, QuantPlan, calibrate_quant
from .schedules import format_schedule
from .site import BlockSpan, CacheSite, Removal, Streams, hook_calls, remove_all


@dataclass(frozen=True)
class CacheQuantConfig:
    """What a user picks for CacheQuant; validated on creation."""

    full_steps: int = 4  # K: steps that run the whole U-Net (used when no schedule is given)
    cache_branch_id: int = 0
    quant: QuantConfig | None = QuantConfig()  # None: calibrated caching + cache correction only
    correct_cache: bool = True
    correct_quant: bool = True
    # a DiT: the block span (first, stop) whose residual is cached (None: a U-Net, cached at `cache_branch_id`)
    blocks: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.full_steps, int) or self.full_steps < 1:
            raise ValueError(f"full_steps must be an integer >= 1, got {self.full_steps!r}")
        if not isinstance(self.cache_branch_id, int) or self.cache_branch_id < 0:
            raise ValueError(f"cache_branch_id must be an integer >= 0, got {self.cache_branch_id!r}")
        if self.quant is not None and self.quant.method != "w8a8":
            raise ValueError(f"CacheQuant quantizes with W8A8, got method {self.quant.method!r} (DGQ runs on its own)")
        if self.blocks is not None:
            BlockCacheConfig(span=self.blocks)  # the span's own validation


@dataclass(frozen=True)
class CacheQuantPlan:
    """A calibrated CacheQuant for one model: apply it any number of times (`LC_PIPE` acceleration)."""

    config: CacheQuantConfig
    schedule: CalibratedSchedule
    cache_correction: CacheCorrection | None
    quant: QuantPlan | None

    @property
    def deepcache(self) -> DeepCacheConfig | BlockCacheConfig:
        """The cache this plan runs: DeepCache at its branch, or on a DiT the block cache on its span."""
        if self.config.blocks is not None:
            return BlockCacheConfig(span=self.config.blocks, schedule="calibrated",
                                    full_steps_override=self.schedule.full_steps)
        return DeepCacheConfig(cache_branch_id=self.config.cache_branch_id, schedule="calibrated",
                               full_steps_override=self.schedule.full_steps)

    def variant(self, correct_cache: bool, correct_quant: bool) -> CacheQuantPlan:
        """The same calibration with corrections switched (the ablations)."""
        return replace(self, config=replace(self.config, correct_cache=correct_cache, correct_quant=correct_quant))

    def label(self) -> str:
        parts = [f"DP cache K={self.schedule.k}/{self.schedule.steps}"]
        if self.quant is not None:
            parts.append(self.quant.config.label())
        fixes = [n for n, on in (("cache", self.config.correct_cache and self.cache_correction is not None),
                                 ("quant", self.config.correct_quant and self.quant is not None
                                  and self.quant.correction_error is not None)) if on]
        parts.append(f"correction: {'+'.join(fixes) or 'none'}")
        return " + ".join(parts)


@dataclass
class CacheQuantStats:
    full_calls: int = 0
    cached_calls: int = 0
    schedule: str = ""
    label: str = ""
    backend: str = ""
    size_ratio: float = 1.0


class CacheQuant:
    """The CacheQuant core applied to one model through the modules an adapter names."""

    def __init__(self, plan: CacheQuantPlan) -> None:
        self.plan = plan
        cache = plan.deepcache
        self.deepcache = BlockCache(cache) if isinstance(cache, BlockCacheConfig) else DeepCache(cache)
        self.quantizer = None if plan.quant is None else Quantizer(plan.quant, correct=plan.config.correct_quant)
        self._hooks: list[torch.utils.hooks.RemovableHandle | Removal] = []

    def apply(self, site: CacheSite) -> CacheQuant:
        correct = self.plan.config.correct_cache and self.plan.cache_correction is not None
        if isinstance(self.deepcache, BlockCache):
            if site.span is None:
                raise TypeError("this CacheQuant was calibrated on a DiT's block span; the model offers none")
            self.deepcache.attach_span(site.span)
            self._hooks.append(hook_calls(site.root, site.read_level, self.deepcache.begin_call,
                                          self.deepcache.end_call))
            if correct:
                self.deepcache.correction = lambda step, residual: correct_streams(
                    self.plan.cache_correction, step, residual)
        else:
            self.deepcache.apply(site.root, site.deep_modules, site.read_level)
        try:
            if self.quantizer is not None:
                self.quantizer.apply(site.root, dict(site.quant_layers), site.read_level)
        except Exception:
            self.remove()
            raise
        if correct and not isinstance(self.deepcache, BlockCache):
            self._hooks.append(site.feature_module.register_forward_hook(lambda _m, _a, out: self._correct(out)))
        return self

    def _correct(self, out: torch.Tensor) -> torch.Tensor | None:
        tick = self.deepcache.tick
        if not self.deepcache.reusing or tick is None:
            return None  # a full step: the fresh feature needs no correction
        return self.plan.cache_correction.apply(tick.step, out)

    def reset(self, total_steps: int | None) -> None:
        self.deepcache.reset(total_steps)

    @property
    def stats(self) -> CacheQuantStats:
        dc = self.deepcache.stats
        quant = self.quantizer.stats if self.quantizer is not None else None
        schedule = dc.schedule or format_schedule(self.plan.schedule.full_steps)
        return CacheQuantStats(dc.full_calls, dc.cached_calls, schedule, self.plan.label(),
                               "" if quant is None else quant.described(),
                               1.0 if quant is None else quant.size_ratio)

    def remove(self) -> None:
        remove_all(self._hooks)
        if self.quantizer is not None:
            self.quantizer.remove()
        self.deepcache.remove()


def span_feature(residual: Streams) -> torch.Tensor:
    """A block span's residual as one feature [B, C, tokens]: its streams' tokens side by side, channels
    first (the layout the schedule statistics and the per-channel correction read)."""
    return torch.cat(residual, dim=1).transpose(1, 2)


def correct_streams(correction: CacheCorrection, step: int, residual: Streams) -> Streams:
    """The reused residual with `correction`'s per-channel map for `step` applied to every stream."""
    return tuple(correction.apply(step, stream.transpose(1, 2)).transpose(1, 2) for stream in residual)


class SpanRecorder(FeatureRecorder):
    """Records a block span's residual per denoising step (`span_feature`), as `FeatureRecorder` does a
    module's output: what a DiT's CacheQuant schedules and corrects."""

    def __init__(self, root: nn.Module, span: BlockSpan, read_level: LevelReader) -> None:
        super().__init__(root, span.blocks[-1], read_level)
        self._span = span
        self._entry: Streams = ()
        # a copy: blocks may add to their inputs in place (ComfyUI's do)
        self._handles.append(span.blocks[0].register_forward_pre_hook(
            lambda _m, a, k: setattr(self, "_entry", tuple(s.clone() for s in span.io[0].streams_in(a, k))),
            with_kwargs=True))

    def _record(self, out: Any) -> None:
        streams = self._span.io[-1].streams_out(out)
        super()._record(span_feature(tuple(o - e for o, e in zip(streams, self._entry, strict=True))))


@dataclass(frozen=True)
class Calibration:
    """The calibration generations (one callable each) and what a schedule file records about them."""

    runs: Sequence[Callable[[], Any]]
    steps: int  # of every generation; the sampler that uses the result must run the same count
    model: str  # the model's name, for the schedule file
    scheduler: str
    info: dict[str, Any] = field(default_factory=dict)  # prompts, seeds, guidance, branch...
    # the host's progress bar and stop check for the passes over `runs` (the runs check it inside too)
    progress: Progress = field(default_factory=Progress, compare=False, repr=False)


def record_features(site: CacheSite, calibration: Calibration, desc: str = "calibrating cache",
                    stats: PairStats | None = None) -> PairStats:
    """Run the calibration generations uncached and sum their per-step feature statistics (into `stats`)."""
    stats = PairStats(calibration.steps) if stats is None else stats
    recorder = (FeatureRecorder(site.root, site.feature_module, site.read_level) if site.span is None
                else SpanRecorder(site.root, site.span, site.read_level))
    try:
        for run in calibration.progress.loop(calibration.runs, desc, "run"):
            run()
            stats.add_run(recorder.take_run())
    finally:
        recorder.close()
    return stats


def calibrate_cachequant(config: CacheQuantConfig, site: CacheSite, calibration: Calibration,
                         schedule: CalibratedSchedule | None = None,
                         measure_segments: Callable[[], torch.Tensor] | None = None) -> CacheQuantPlan:
    """Calibrate every part of CacheQuant on `site` from the calibration generations.

    A given `schedule` (loaded from a file) is checked against the model and step count and
    kept; otherwise the DP schedule with `config.full_steps` full steps is chosen here, for the
    output objective when the adapter passes `measure_segments` (called once, on the float model,
    after the calibration passes), else for the feature objective (no extra generations).
    """
    if schedule is not None:
        schedule.check(site.fingerprint, calibration.steps)
    if not calibration.runs:
        raise ValueError("CacheQuant calibration needs at least one calibration run")
    stats = PairStats(calibration.steps)
    passes = {"n": 0}

    def run_all() -> None:  # the first pass also records the cache statistics
        passes["n"] += 1
        if passes["n"] == 1:
            record_features(site, calibration, "calibrating cache + ranges", stats)
            return
        for run in calibration.progress.loop(calibration.runs, "calibrating quantization correction", "run"):
            run()

    quant_plan = None
    if config.quant is not None:
        quant_config = replace(config.quant, correct=config.correct_quant)
        quant_plan = calibrate_quant(quant_config, site.root, dict(site.quant_layers), site.read_level, run_all,
                                     site.fingerprint)
    else:
        run_all()
    if schedule is None:
        segments = None if measure_segments is None else measure_segments()
        schedule = calibrated_schedule(stats, config.full_steps, site.fingerprint, calibration.model,
                                       calibration.scheduler, calibration.info, segments)
    correction = cache_correction(stats, schedule.full_steps) if config.correct_cache else None
    return CacheQuantPlan(config, schedule, correction, quant_plan)
