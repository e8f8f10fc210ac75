"""What the diffusers U-Net and DiT sites share: the model, the scheduler that samples with it, and the one
patch of a diffusers scheduler (`GenerationWatch` on `set_timesteps`), shared by every technique on it and
restored exactly. Its own module so that both site modules build on it without importing each other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

from torch import nn

from ..accel.site import Removable, Removal, Site

_WATCH = "_livecache_generation_watch"


class GenerationWatch:
    """The one patch of a diffusers scheduler's `set_timesteps`: tells listeners a generation of n steps starts.

    Installed when the first listener joins and taken off when the last one leaves, putting back exactly
    what was there (the class method, or an instance override someone else set).
    """

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler
        self._listeners: list[Callable[[int], None]] = []
        self._previous = scheduler.__dict__.get("set_timesteps")
        original = scheduler.set_timesteps

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            for listener in list(self._listeners):
                listener(len(scheduler.timesteps))
            return result

        setattr(set_timesteps, _WATCH, self)
        self._patch = set_timesteps
        scheduler.set_timesteps = set_timesteps

    @classmethod
    def listen(cls, scheduler: Any, start: Callable[[int], None]) -> Removal:
        """Call `start(num_steps)` after each `scheduler.set_timesteps(...)` until the removal is removed."""
        current = scheduler.__dict__.get("set_timesteps")
        watch = getattr(current, _WATCH, None) or cls(scheduler)
        watch._listeners.append(start)
        return Removal(lambda: watch._leave(start))

    def _leave(self, start: Callable[[int], None]) -> None:
        self._listeners.remove(start)
        if self._listeners or self._scheduler.__dict__.get("set_timesteps") is not self._patch:
            return  # still listened to, or someone patched over us: an empty watch just passes calls through
        if self._previous is None:
            del self._scheduler.set_timesteps
        else:
            self._scheduler.set_timesteps = self._previous


class ScheduledSite(Site):
    """A diffusers model and, when given, the scheduler that samples with it, which announces each generation
    and its length (`GenerationWatch`): what the U-Net and DiT sites share."""

    component = "unet"  # the pipeline attribute that holds the model

    def __init__(self, root: nn.Module, scheduler: Any | None = None) -> None:
        super().__init__(root)
        self.scheduler = scheduler

    @classmethod
    def of(cls, target: Any) -> Self:
        """The site of a pipeline (its `component` and its scheduler) or of a bare model."""
        model = getattr(target, cls.component, target)
        return cls(model, getattr(target, "scheduler", None) if model is not target else None)

    def watch_generations(self, start: Callable[[int], None]) -> Removable:
        # without a scheduler nobody announces generations: call `handle.core.reset(num_steps)` yourself
        # (uniform caching works from the noise levels alone)
        return Removal() if self.scheduler is None else GenerationWatch.listen(self.scheduler, start)
