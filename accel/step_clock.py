"""Sampler progress read from the noise levels the sampler feeds the model.

Caches must know "which step is this, of how many" without looking timesteps up in a scheduler
table (that breaks for LCM, Euler, Heun, ComfyUI samplers…). Every sampler walks the noise level
(timestep or sigma) downwards, so the clock counts distinct levels: a repeated level is another
call in the same step (a CFG half run separately, a second batch), a higher level than the last
one starts a new generation. Front ends that know when a generation starts call `begin()` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Tick:
    """Where one model call sits: step index in the generation and call slot inside the step."""

    step: int
    slot: int
    total_steps: int | None


class StepClock:
    """Counts steps and per-step call slots from a stream of noise levels."""

    def __init__(self) -> None:
        self.total_steps: int | None = None
        self._last_level: float | None = None
        self._step = -1
        self._slot = 0

    def begin(self, total_steps: int | None = None) -> None:
        """Start a new generation; `total_steps` is the number of distinct levels it will use."""
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self._last_level = None
        self._step = -1
        self._slot = 0

    def tick(self, level: float) -> Tick:
        """Register one model call at noise level `level` and say where it sits."""
        if self._last_level is not None and level > self._last_level:
            # The sampler jumped back to high noise: a new generation began without begin().
            self.begin(None)
        if self._last_level is None or level != self._last_level:
            self._step += 1
            self._slot = 0
        else:
            self._slot += 1
        self._last_level = level
        return Tick(self._step, self._slot, self.total_steps)


def call_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Shapes, dtypes and devices of a call's tensor inputs: state kept for one call slot is only
    reused by a later call of the same kind (a slot whose batch or resolution changed recomputes)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [v for _, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor)]
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
