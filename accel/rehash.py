"""Step rehash: skip a whole denoising step's network evaluation when it would nearly repeat the last one.

The idea (Streamlined Inference, "Step Rehash"): adjacent denoising steps feed the network almost the
same input, so on many steps its output is almost the last one. Where that holds, the step reuses the
last output (or extrapolates it along the noise level) instead of running the network at all.

How the decision is made, with nothing but what every sampler passes the model — the input `x` and
the noise level — so the same core serves diffusers U-Nets, ComfyUI model functions and video models:
- the *input change* `d_in` is the relative L1 distance between this step's input and the input of the
  last step that really computed (accumulated, because skipped steps keep comparing to that anchor);
- the model's *sensitivity* `k` is measured online from the last two computed steps: relative output
  change divided by relative input change. So `k · d_in` predicts the relative change of the output
  — the quantity that decides whether reuse is safe — on each model and scheduler without calibration;
- a step is skipped when that prediction is below `threshold`, at most `max_skips` steps in a row
  (the guard that bounds drift). The first two steps of every generation always compute (they give
  the first sensitivity), and threshold 0 never skips;
- the decision is taken once per step, at the step's first call; CFG halves or batches evaluated in
  separate calls keep separate state per call slot (as DeepCache does) and follow that decision;
- progress and new generations come from a `StepClock` fed by the noise level, so DDIM, Euler, LCM and
  ComfyUI samplers all work.

Model families plug in through `StepRehash.call(compute, x, level, context)`: "call the model on `x`
at `level`", where `compute()` runs the real network. The diffusers adapter wraps `unet.forward`
with it; a ComfyUI model-function wrapper does the same around `apply_model(input, timestep, **c)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .step_clock import StepClock, call_signature

RehashMode = Literal["reuse", "extrapolate"]


@dataclass(frozen=True)
class StepRehashConfig:
    """What a user picks; validated on creation so bad values fail before any model is touched.

    `threshold`: largest predicted relative change of the model output (mean |Δout| / mean |out|) at
    which a step is still skipped; 0 computes every step. `max_skips`: most consecutive skipped steps.
    `mode`: "reuse" returns the last output; "extrapolate" continues the last two outputs linearly in
    the noise level (better on smooth ε-prediction trajectories, riskier on few-step samplers).
    """

    threshold: float = 0.1
    max_skips: int = 1
    mode: RehashMode = "reuse"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= self.threshold <= 10.0:
            raise ValueError(f"threshold must be a number in [0, 10] (0 computes every step), got {self.threshold!r}")
        if isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or not 1 <= self.max_skips <= 100:
            raise ValueError(f"max_skips must be an integer in [1, 100] (consecutive skipped steps), "
                             f"got {self.max_skips!r}")
        if self.mode not in ("reuse", "extrapolate"):
            raise ValueError(f"mode must be 'reuse' or 'extrapolate', got {self.mode!r}")


@dataclass
class StepRehashStats:
    """What the last generations did: computed vs skipped model calls and the per-step pattern."""

    computed_calls: int = 0
    skipped_calls: int = 0
    pattern: str = ""  # one character per step of the last generation: F computed, . skipped

    @property
    def skipped_steps(self) -> int:
        return self.pattern.count(".")


@dataclass
class _Computed:
    """One computed call of a slot: its input, output and noise level."""

    x: torch.Tensor
    out: torch.Tensor
    level: float


@dataclass
class _Slot:
    signature: tuple = ()
    history: list[_Computed] = field(default_factory=list)  # the last two computed calls, oldest first


class StepRehash:
    """The step-rehash core: decides per step whether to run the model, and answers for it when not."""

    def __init__(self, config: StepRehashConfig) -> None:
        self.config = config
        self.clock = StepClock()
        self.stats = StepRehashStats()
        self._slots: dict[int, _Slot] = {}
        self._skip_step = False
        self._run = 0  # consecutive skipped steps

    def reset(self, total_steps: int | None = None) -> None:
        """Start a generation (adapters call it when the sampler starts); drops every kept tensor."""
        self.clock.begin(total_steps)
        self.forget()
        self.stats.pattern = ""

    def forget(self) -> None:
        """Drop every kept tensor (the stats of the last generation stay readable)."""
        self._slots.clear()
        self._skip_step = False
        self._run = 0

    def call(self, compute: Callable[[], torch.Tensor], x: torch.Tensor, level: float,
             context: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The model's answer at (`x`, `level`): `compute()` runs the network, unless this step is skipped.

        `context` lists the other tensor inputs (conditioning…): kept state is only reused by calls whose
        inputs have the same shapes, dtypes and devices.
        """
        tick = self.clock.tick(float(level))
        if tick.step == 0 and tick.slot == 0:
            self.forget()
            self.stats.pattern = ""
        slot = self._slots.setdefault(tick.slot, _Slot())
        signature = call_signature((x, *context), {})
        if slot.signature != signature:
            slot.signature, slot.history = signature, []
        if tick.slot == 0:
            self._skip_step = self._should_skip(slot, x)
            self._run = self._run + 1 if self._skip_step else 0
            self.stats.pattern += "." if self._skip_step else "F"
        if self._skip_step and slot.history:
            self.stats.skipped_calls += 1
            return self._answer(slot, float(level))
        out = compute()
        self.stats.computed_calls += 1
        slot.history = (slot.history + [_Computed(x.detach().clone(), out.detach().clone(), float(level))])[-2:]
        return out

    def _should_skip(self, slot: _Slot, x: torch.Tensor) -> bool:
        if self.config.threshold <= 0.0 or self._run >= self.config.max_skips or len(slot.history) < 2:
            return False
        before, last = slot.history
        sensitivity = relative_change(last.out, before.out) / max(relative_change(last.x, before.x), 1e-12)
        return sensitivity * relative_change(x, last.x) < self.config.threshold

    def _answer(self, slot: _Slot, level: float) -> torch.Tensor:
        last = slot.history[-1]
        if self.config.mode == "reuse" or len(slot.history) < 2 or slot.history[0].level == last.level:
            return last.out.clone()
        before = slot.history[0]
        step = (level - last.level) / (last.level - before.level)
        return last.out + (last.out - before.out) * step


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """Mean |new − old| / mean |old| (0 when both are zero): the cheap similarity signal of a step."""
    scale = float(old.float().abs().mean())
    diff = float((new.float() - old.float()).abs().mean())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
