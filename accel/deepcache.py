"""DeepCache: reuse the U-Net's deep features across steps, recompute only the shallow branch.

The idea (Ma et al., "DeepCache: Accelerating Diffusion Models for Free"): a U-Net's skip
connection `cache_branch_id` splits it into a shallow branch (the first down layers, the last up
layers and the skip between them) and everything deeper. The deep part's output changes slowly
from one denoising step to the next, so on most steps it is taken from the last full step and only
the shallow branch runs.

How it is applied, for any model family:
- an adapter names the *deep modules* (the largest modules that sit entirely below the branch) and
  tells how to read the noise level from a call; this core knows nothing else about the model;
- on a full step every deep module runs and its output is kept; on a cached step each deep module
  returns what it returned on the last full step, so no deep arithmetic runs at all;
- progress comes from a `StepClock` fed by the noise level of each call, so any sampler works;
- the cache is keyed by the call slot inside a step, so CFG halves or batches evaluated in
  separate calls never read each other's features, and a slot whose inputs changed shape recomputes;
- `remove()` restores every module's original forward: outputs are then bit-identical to before.

A model call is announced either by forward hooks on a root module (`apply`, the diffusers path) or
by the host itself through `begin_call`/`end_call` after `attach` (ComfyUI, whose wrappers already
see every call): the caching logic is the same either way.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

from torch import nn

from .forward_override import Forward, ForwardOverrides, has_approximate_override
from .schedules import Schedule, format_schedule, nonuniform_schedule, uniform_schedule
from .site import LevelReader, Removal, hook_calls, remove_all
from .step_clock import StepClock, Tick, call_signature

ScheduleKind = Literal["uniform", "non-uniform", "calibrated"]


@dataclass(frozen=True)
class CacheSchedule:
    """Which steps compute fully, for every cache that reuses work between full steps (DeepCache's deep
    features, a DiT's block residuals): one set of fields and one validation, so the two cannot drift.

    Only `cache_interval` may be given by position: the fields after it are keyword-only, so a subclass's
    own fields (DeepCache's `cache_branch_id`) follow it positionally as they always have."""

    cache_interval: int = 3
    _: KW_ONLY
    schedule: ScheduleKind = "uniform"
    start: float = 0.0
    end: float = 1.0
    center: float = 0.0
    power: float = 1.4
    # schedule="calibrated": the exact full steps (e.g. chosen by `cache_schedule.dp_schedule`); the
    # generation must then have len(full_steps_override) steps, and cache_interval/start/end are unused
    full_steps_override: Schedule | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cache_interval, int) or self.cache_interval < 1:
            raise ValueError(f"cache_interval must be an integer >= 1, got {self.cache_interval!r}")
        if self.schedule not in ("uniform", "non-uniform", "calibrated"):
            raise ValueError(f"schedule must be 'uniform', 'non-uniform' or 'calibrated', got {self.schedule!r}")
        if (self.schedule == "calibrated") != (self.full_steps_override is not None):
            raise ValueError("schedule='calibrated' needs full_steps_override (one bool per step), and "
                             "full_steps_override needs schedule='calibrated'")
        if self.full_steps_override is not None and not (self.full_steps_override and self.full_steps_override[0]):
            raise ValueError("a calibrated schedule needs at least one step, and step 0 must be a full step")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1, got start={self.start}, end={self.end}")
        if self.full_steps_override is None:
            self.full_steps(1)  # validates center and power through the schedule builder

    def full_steps(self, total: int) -> Schedule:
        """The schedule for a generation of `total` steps."""
        if self.full_steps_override is not None:
            if total != len(self.full_steps_override):
                raise ValueError(f"this calibrated schedule is for {len(self.full_steps_override)} steps, but the "
                                 f"sampler runs {total}: calibrate again for {total} steps")
            return tuple(self.full_steps_override)
        if self.schedule == "uniform":
            return uniform_schedule(total, self.cache_interval, self.start, self.end)
        return nonuniform_schedule(total, self.cache_interval, self.start, self.end, self.center, self.power)


@dataclass(frozen=True)
class DeepCacheConfig(CacheSchedule):
    """What a user picks; validated on creation so bad values fail before any model is touched."""

    cache_branch_id: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.cache_branch_id, int) or self.cache_branch_id < 0:
            raise ValueError(f"cache_branch_id must be an integer >= 0, got {self.cache_branch_id!r}")


@dataclass
class DeepCacheStats:
    """What the last generations did: how many model calls ran the deep modules, how many reused."""

    full_calls: int = 0
    cached_calls: int = 0
    schedule: str = ""


@dataclass
class _SlotCache:
    outputs: dict[int, Any] = field(default_factory=dict)
    signature: tuple[Any, ...] = ()


class DeepCache:
    """The DeepCache core applied to one model through the modules an adapter names."""

    def __init__(self, config: CacheSchedule) -> None:
        self.config = config
        self.clock = StepClock()
        self.stats = DeepCacheStats()
        self._overrides = ForwardOverrides()
        self._root_hooks: list[Removal] = []
        self._slots: dict[Hashable, _SlotCache] = {}
        self._reuse = False
        self._slot: _SlotCache | None = None
        self._schedule: Schedule | None = None
        self.tick: Tick | None = None  # where the current root call sits (read by stacked corrections)

    # -- lifecycle -------------------------------------------------------------------------
    def apply(self, root: nn.Module, deep_modules: Sequence[nn.Module], read_level: LevelReader) -> DeepCache:
        """Start caching `deep_modules` inside `root`; `read_level(args, kwargs)` gives the noise level.

        Each call of `root` is one model call: forward hooks on it drive `begin_call`/`end_call`.
        """
        self.attach(deep_modules)
        self._root_hooks = [hook_calls(root, read_level, self.begin_call, self.end_call)]
        return self

    def attach(self, deep_modules: Sequence[nn.Module]) -> DeepCache:
        """Override the deep modules' forwards without hooking a root.

        For hosts that announce model calls themselves (ComfyUI's wrappers): the host calls
        `begin_call` before each model call and `end_call` after it.
        """
        if len(self._overrides):
            raise RuntimeError("this DeepCache is already applied; remove() it first")
        if not deep_modules:
            raise ValueError("the adapter named no deep modules to cache")
        overridden = [type(m).__name__ for m in deep_modules if has_approximate_override(m)]
        if overridden:
            raise ValueError(f"{overridden[0]} already has an override of its forward: another feature cache is "
                             "applied to this model; remove it first (two caches on one block cannot both hold)")
        for index, module in enumerate(deep_modules):
            self._overrides.install(module, lambda original, i=index: self._cached_forward(i, original))
        self.reset()
        return self

    def remove(self) -> None:
        """Restore the model exactly as it was and drop every cached tensor."""
        self._overrides.restore()
        remove_all(self._root_hooks)
        self._forget()

    def reset(self, total_steps: int | None = None) -> None:
        """Start a generation of `total_steps` (if known): adapters call it when the sampler starts."""
        self._forget()
        self.clock.begin(total_steps)
        self._schedule = self.config.full_steps(total_steps) if total_steps else None
        self.stats.schedule = "" if self._schedule is None else format_schedule(self._schedule)

    def _forget(self) -> None:
        """Drop every cached tensor (the stats of the last generation stay readable)."""
        self._slots.clear()
        self._slot = None
        self._reuse = False

    # -- per call --------------------------------------------------------------------------
    def begin_call(self, level: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A model call at noise level `level` starts: decide whether its deep modules compute or reuse."""
        tick = self.tick = self.clock.tick(level)
        key, signature = self._slot_key(tick, call_signature(args, kwargs))
        slot = self._slots.setdefault(key, _SlotCache())
        self._reuse = self._is_cached_step(tick) and slot.signature == signature and bool(slot.outputs)
        if slot.signature != signature:
            # Another kind of call: nothing kept is valid. Otherwise a full step overwrites every entry as
            # its deep modules run, so a step an outer technique skips (step rehash) keeps the last features.
            slot.outputs = {}
            slot.signature = signature
        self._slot = slot
        if self._reuse:
            self.stats.cached_calls += 1
        else:
            self.stats.full_calls += 1

    def _slot_key(self, tick: Tick, signature: tuple[Any, ...]) -> tuple[Hashable, tuple[Any, ...]]:
        """Which cache slot serves this call, and what must match for it to be reused.

        Slots are the call's place inside a step (CFG halves apart); a generation's first call drops them all.
        """
        if tick.step == 0 and tick.slot == 0:
            self._slots.clear()
        return tick.slot, signature

    def end_call(self) -> None:
        """The model call ended; outside a model call the deep modules behave normally (a user probing a block)."""
        self._slot = None

    @property
    def reusing(self) -> bool:
        """True while the current root call returns cached deep features (stacked cores read it)."""
        return self._slot is not None and self._reuse

    def _is_cached_step(self, tick: Tick) -> bool:
        if self._schedule is not None:
            return tick.step < len(self._schedule) and not self._schedule[tick.step]
        if self.config.full_steps_override is not None:
            override = self.config.full_steps_override
            return tick.step < len(override) and not override[tick.step]
        if self.config.schedule != "uniform" or self.config.start > 0.0 or self.config.end < 1.0:
            return False  # without the generation's length only the plain uniform schedule is known
        return tick.step % self.config.cache_interval != 0

    def _cached_forward(self, index: int, original: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            slot = self._slot
            if slot is None:  # called outside a root call
                return original(*args, **kwargs)
            if self._reuse:
                return slot.outputs[index]
            out = original(*args, **kwargs)
            slot.outputs[index] = out
            return out

        return forward

