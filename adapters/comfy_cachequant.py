"""CacheQuant and its DP cache schedule calibrated on ComfyUI's own MODEL, through ComfyUI's own sampler.

The calibration generations are what the user's KSampler would run: the MODEL with their positive and
negative CONDITIONING, their LATENT, a few seeds, and the steps, cfg, sampler and scheduler they sample
with (`comfy.sample.sample`, as ComfyUI's `common_ksampler` calls it). The cores then do what they do on
any site (`accel.cachequant.calibrate_cachequant`, `accel.cache_schedule`): the feature recorder and the
quantizer's observers sit on the U-Net ComfyUI loaded, the output objective's segment generations run
the same sampler on a DeepCache clone (the MODEL lane's own DeepCache), and the result is a plan the
registry applies at each run's pre-run like every other technique on a MODEL (`comfy_unet`).

On a DiT MODEL (`comfy_dit`: Flux, SD3, Wan, Qwen-Image, Lumina 2 / Z-Image) the cached feature is the
residual of the family's default block span instead of a skip branch (`CacheQuantConfig.blocks`, the same
core as the diffusers DiT path): the recorder sits on the span, the segment generations run the block
cache with the candidate schedule, and the plan caches that span.

What is calibrated is what ComfyUI computes with: the model is loaded for sampling first (LoRAs and
other weight patches merged into the weights), so the schedule's fingerprint, the quantized weights and
both corrections belong to the patched model; a run whose weights differ (a LoRA chained after the
node) is refused by the fingerprint check when it starts, naming the mismatch. Techniques already on
the MODEL are left out of the calibration runs (it measures the float, uncached model), and every
generation advances ComfyUI's progress bar for the node (which is also where ComfyUI's Cancel lands).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..accel import cachequant
from ..accel.block_cache import BlockCacheConfig
from ..accel.cache_schedule import CalibratedSchedule, calibrated_schedule, max_segment, measure_segments
from ..accel.cachequant import CacheQuantConfig, CacheQuantPlan, Calibration, record_features
from ..accel.deepcache import DeepCacheConfig
from ..accel.schedules import Schedule
from ..accel.site import CacheSite
from .comfy_dit import check_span, layout_of, supported
from .comfy_layers import weights_version
from .comfy_unet import ComfyRunSite, apply_deepcache, apply_technique, deep_modules, without_techniques


@dataclass(frozen=True)
class SamplerRun:
    """What ComfyUI's KSampler takes, for the calibration generations (one per seed)."""

    positive: Any  # CONDITIONING
    negative: Any
    latent: dict[str, Any]  # LATENT: {"samples": [B, C, H, W], optional "noise_mask", "batch_index"}
    seeds: tuple[int, ...]
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("calibration needs at least one seed")
        if not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"calibration needs at least 2 sampler steps, got {self.steps!r}")
        if not isinstance(self.latent, dict) or not isinstance(self.latent.get("samples"), torch.Tensor):
            raise ValueError("latent must be a ComfyUI LATENT ({'samples': tensor})")

    @property
    def label(self) -> str:
        """The sampler and scheduler, as the schedule file records them."""
        return f"{self.sampler_name}/{self.scheduler}"

    def info(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), "cfg": self.cfg, "sampler": self.sampler_name,
                "scheduler": self.scheduler, "denoise": self.denoise,
                "latent": list(self.latent["samples"].shape)}


@dataclass
class Progress:
    """ComfyUI's progress bar over every generation a calibration runs (steps × generations)."""

    steps: int
    generations: int
    done: int = 0
    _bar: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import comfy.utils

        self._bar = comfy.utils.ProgressBar(self.steps * self.generations)

    def step(self, step: int, *_: Any) -> None:
        self._bar.update_absolute(self.done * self.steps + step + 1)

    def generation_done(self) -> None:
        self.done += 1
        self._bar.update_absolute(self.done * self.steps)


def generate(model: Any, run: SamplerRun, seed: int, progress: Progress | None = None) -> torch.Tensor:
    """One generation through ComfyUI's sampler, exactly as its KSampler node runs it; returns the latent."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, run.latent["samples"])
    noise = comfy.sample.prepare_noise(latent, seed, run.latent.get("batch_index"))
    samples = comfy.sample.sample(model, noise, run.steps, run.cfg, run.sampler_name, run.scheduler, run.positive,
                                  run.negative, latent, denoise=run.denoise, noise_mask=run.latent.get("noise_mask"),
                                  callback=None if progress is None else progress.step, disable_pbar=True, seed=seed)
    if progress is not None:
        progress.generation_done()
    return samples


def model_name(model: Any) -> str:
    """What a schedule file calls the model: ComfyUI's model class (SD15, SDXL, ...)."""
    config = getattr(model.model, "model_config", None)
    return type(config if config is not None else model.model).__name__


def span_of(model: Any, branch: int) -> tuple[int, int] | None:
    """What CacheQuant caches on `model`: a DiT's default block span, or None for a U-Net (whose skip branch
    `branch` is checked here, naming the range it lacks)."""
    diffusion_model = model.get_model_object("diffusion_model")
    if layout_of(diffusion_model) is not None:
        return check_span(diffusion_model, None)
    if getattr(diffusion_model, "input_blocks", None) is None:
        raise TypeError(f"CacheQuant does not support this MODEL's diffusion model {type(diffusion_model).__name__}: "
                        f"it needs a U-Net (openaimodel.UNetModel: SD1.x/SD2.x/SDXL) or a DiT of {supported()}")
    deep_modules(diffusion_model, branch)
    return None


def _target(span: tuple[int, int] | None, branch: int) -> dict[str, Any]:
    """What a schedule file records as the cached feature: the U-Net's branch or the DiT's span."""
    return {"cache_branch_id": branch} if span is None else {"blocks": list(span)}


def loaded_site(model: Any, steps: int, branch: int) -> CacheSite:
    """`model` loaded as ComfyUI loads it for sampling (weight patches applied), as a cache site: the U-Net's
    skip branch `branch`, or a DiT's default block span."""
    import comfy.model_management

    span = span_of(model, branch)
    comfy.model_management.load_models_gpu([model])
    site = ComfyRunSite(model.get_model_object("diffusion_model"), steps)
    site.weights_version = weights_version(model)
    return site.cache_site(branch) if span is None else site.span_cache_site(span)


def fingerprint_of(model: Any) -> str:
    """The fingerprint of the weights ComfyUI computes with for `model` (what a schedule is checked against);
    hashed once per patch set (`comfy_layers.weights_version`), so loading schedules and sampling rehash nothing."""
    return loaded_site(without_techniques(model), 2, 0).fingerprint


def _segments(steps: int, full_steps: int) -> int:
    """How many generations the output objective runs: one uncached, one per measured segment."""
    longest = max_segment(steps, full_steps)
    return 1 + sum(min(steps, i + longest + 1) - (i + 1) for i in range(steps - 1))


def _segment_measure(model: Any, run: SamplerRun, full_steps: int, branch: int, objective: str,
                     progress: Progress) -> Callable[[], torch.Tensor] | None:
    """What measures the output objective's segment costs on the first seed (None: the feature objective)."""
    if objective == "feature":
        return None
    span = span_of(model, branch)

    def with_schedule(schedule: Schedule | None) -> torch.Tensor:
        if schedule is None:
            sampled = model
        elif span is None:
            sampled = apply_deepcache(model, DeepCacheConfig(cache_branch_id=branch, schedule="calibrated",
                                                             full_steps_override=schedule))
        else:
            sampled = apply_technique(model, BlockCacheConfig(span=span, schedule="calibrated",
                                                              full_steps_override=schedule))
        return generate(sampled, run, run.seeds[0], progress)

    return lambda: measure_segments(with_schedule, run.steps, max_segment(run.steps, full_steps))


def _check_objective(objective: str) -> None:
    if objective not in ("feature", "output"):
        raise ValueError(f"objective must be 'feature' or 'output', got {objective!r}")


def _calibration(model: Any, run: SamplerRun, branch: int, progress: Progress) -> Calibration:
    runs = [lambda seed=seed: generate(model, run, seed, progress) for seed in run.seeds]
    return Calibration(runs, run.steps, model_name(model), run.label,
                       {**_target(span_of(model, branch), branch), **run.info()})


def calibrate_schedule(model: Any, run: SamplerRun, full_steps: int, cache_branch_id: int,
                       objective: str = "output") -> CalibratedSchedule:
    """The DP cache schedule for ComfyUI `model`, from generations of ComfyUI's sampler with `run`'s inputs."""
    _check_objective(objective)
    if not 1 <= full_steps <= run.steps:
        raise ValueError(f"full_steps must be in [1, {run.steps}] (the steps), got {full_steps}")
    bare = without_techniques(model)
    generations = len(run.seeds) + (_segments(run.steps, full_steps) if objective == "output" else 0)
    progress = Progress(run.steps, generations)
    with torch.inference_mode():
        site = loaded_site(bare, run.steps, cache_branch_id)
        calibration = _calibration(bare, run, cache_branch_id, progress)
        stats = record_features(site, calibration)
        measure = _segment_measure(bare, run, full_steps, cache_branch_id, objective, progress)
        return calibrated_schedule(stats, full_steps, site.fingerprint, calibration.model, calibration.scheduler,
                                   calibration.info, None if measure is None else measure())


def calibrate_cachequant(model: Any, config: CacheQuantConfig, run: SamplerRun,
                         schedule: CalibratedSchedule | None = None, objective: str = "output") -> CacheQuantPlan:
    """CacheQuant for ComfyUI `model`: the schedule (unless given), W8A8 and both corrections, calibrated through
    ComfyUI's sampler with `run`'s inputs. A given schedule must be for this model, step count and branch (on a
    DiT: its default block span, which the plan caches whatever `config.cache_branch_id` says)."""
    _check_objective(objective)
    branch = config.cache_branch_id
    span = span_of(model, branch)
    config = replace(config, blocks=span)
    if schedule is not None:
        ((key, value),) = _target(span, branch).items()
        if schedule.calibration.get(key, value) != value:
            raise ValueError(f"the schedule was calibrated with {key} {schedule.calibration[key]}, not {value}")
    if schedule is None and config.full_steps > run.steps:
        raise ValueError(f"full_steps ({config.full_steps}) cannot exceed steps ({run.steps})")
    bare = without_techniques(model)
    passes = 1 + (config.quant is not None and config.correct_quant)
    measured = schedule is None and objective == "output"
    generations = passes * len(run.seeds) + (_segments(run.steps, config.full_steps) if measured else 0)
    progress = Progress(run.steps, generations)
    with torch.inference_mode():
        site = loaded_site(bare, run.steps, branch)
        if config.quant is not None:
            patched = [name for name, m in site.quant_layers.items() if getattr(m, "weight_function", None)]
            if patched:
                raise ValueError(f"ComfyUI loaded this model in low-VRAM mode (layer {patched[0]} and "
                                 f"{len(patched) - 1} more are patched on the fly): CacheQuant's W8A8 is calibrated "
                                 "from merged weights; free memory or use quantization 'none'")
        measure = _segment_measure(bare, run, config.full_steps, branch, objective, progress) if measured else None
        return cachequant.calibrate_cachequant(config, site, _calibration(bare, run, branch, progress), schedule,
                                               measure)


def apply_cachequant(model: Any, plan: CacheQuantPlan, on_finish: Any = None) -> Any:
    """A clone of ComfyUI `model` with a calibrated CacheQuant; runs on weights of another fingerprint fail."""
    branch = plan.config.cache_branch_id
    span = span_of(model, branch)
    if span != plan.config.blocks:
        raise ValueError(f"this CacheQuant was calibrated for {_target(plan.config.blocks, branch)}, but this MODEL "
                         f"caches {_target(span, branch)}")
    return apply_technique(model, plan, on_finish)
