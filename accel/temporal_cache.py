"""DeepCache on the time axis: reuse a U-Net's deep features across consecutive video frames.

A talking-head renderer calls the same U-Net at the same few noise levels for every frame, and the
conditioning (a short audio window, a state label) often barely moves from one frame to the next —
silence, a held vowel, listening. DeepCache's observation holds along time as it does along the
denoising steps: the deep features of step `s` of the last fully computed frame are a good stand-in
for step `s` of the next one, so only the shallow branch runs.

This is the DeepCache core (`accel/deepcache.py`: the same deep-module overrides, slot caches, stats
and exact `remove()`) with two changes of policy:
- slots are keyed by the step index inside a frame and survive across frames (the base core drops
  them at each generation's first step);
- whether a frame may reuse is decided by `TemporalReuse` from how far the conditioning has drifted
  from the frame whose features are cached (the *anchor*), with a cap on consecutive reuses, so drift
  is bounded by the threshold rather than accumulating frame after frame.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from .deepcache import DeepCache, DeepCacheConfig
from .step_clock import Tick


@dataclass(frozen=True)
class TemporalReuseConfig:
    """`threshold`: largest mean absolute change of the conditioning features (vs the anchor) that still
    reuses; `max_reuse`: consecutive frames that may reuse before one is computed in full."""

    threshold: float = 0.25
    max_reuse: int = 2
    cache_branch_id: int = 0

    def __post_init__(self) -> None:
        if not self.threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")
        if not isinstance(self.max_reuse, int) or self.max_reuse < 1:
            raise ValueError(f"max_reuse must be an integer >= 1, got {self.max_reuse!r}")
        if not isinstance(self.cache_branch_id, int) or self.cache_branch_id < 0:
            raise ValueError(f"cache_branch_id must be an integer >= 0, got {self.cache_branch_id!r}")


class TemporalReuse:
    """Decides per frame (or per batch of frames) whether the cached deep features may serve it."""

    def __init__(self, config: TemporalReuseConfig) -> None:
        self.config = config
        self._anchor: dict[Hashable, torch.Tensor] = {}
        self._age: dict[Hashable, int] = {}

    def decide(self, key: Hashable, features: torch.Tensor) -> bool:
        """True to reuse; False means compute in full, and `features` become the new anchor for `key`."""
        anchor = self._anchor.get(key)
        age = self._age.get(key, 0)
        if (anchor is not None and anchor.shape == features.shape and age < self.config.max_reuse
                and float((features - anchor).abs().mean()) <= self.config.threshold):
            self._age[key] = age + 1
            return True
        self._anchor[key] = features.detach().clone()
        self._age[key] = 0
        return False

    def forget(self, key: Hashable) -> None:
        self._anchor.pop(key, None)
        self._age.pop(key, None)


class TemporalDeepCache(DeepCache):
    """The DeepCache core with slots kept across frames; call `begin_frame` before each frame's steps."""

    def __init__(self, config: TemporalReuseConfig) -> None:
        super().__init__(DeepCacheConfig(cache_interval=1, cache_branch_id=config.cache_branch_id))
        self._allow = False
        self._key: Hashable = None

    def begin_frame(self, reuse: bool, key: Hashable) -> None:
        """A new frame (or batch of frames identified by `key`): its steps restart at step 0."""
        self.clock.begin(None)
        self._allow = reuse
        self._key = key

    def _slot_key(self, tick: Tick, signature: tuple[Any, ...]) -> tuple[Hashable, tuple[Any, ...]]:
        """Slots live across frames, one per step inside a frame, valid only for the same key and call slot."""
        return tick.step, (signature, self._key, tick.slot)

    def _is_cached_step(self, tick: Tick) -> bool:
        return self._allow
