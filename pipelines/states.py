"""Speaking / listening / idle from voice activity (LLIA's three states), with an API override.

Speaking while the avatar's audio carries voice (plus a short hangover so syllable gaps do not flicker),
listening for a while after it stops (attentive: mouth closed, small nods), idle after longer silence.
"""

from __future__ import annotations

import numpy as np

from .audio import VOICE_DB, level_db
from .engines.base import STATES, State


class StateTracker:
    def __init__(self, rate: int, hangover_s: float = 0.3, listening_s: float = 3.0) -> None:
        self.rate = rate
        self.hangover_s = hangover_s
        self.listening_s = listening_s
        self.forced: State | None = None
        self._last_voice = float("-inf")
        self.state: State = "idle"

    def force(self, state: str | None) -> None:
        """Pin a state (None or "auto" returns to voice activity); unknown names raise ValueError."""
        if state in (None, "auto"):
            self.forced = None
        elif state in STATES:
            self.forced = state  # type: ignore[assignment]
        else:
            raise ValueError(f"unknown state {state!r}; use one of {', '.join(STATES)} or 'auto'")

    def update(self, t: float, window: np.ndarray) -> State:
        if level_db(window[-int(0.02 * self.rate) :]) > VOICE_DB:
            self._last_voice = t
        quiet = t - self._last_voice
        auto: State = "speaking" if quiet <= self.hangover_s else (
            "listening" if quiet <= self.hangover_s + self.listening_s else "idle")
        self.state = self.forced or auto
        return self.state
