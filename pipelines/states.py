"""Speaking / listening / idle from voice activity (LLIA's three states), with an API override.

Speaking while the avatar's audio carries voice (plus a short hangover so syllable gaps do not flicker),
listening for a while after it stops (attentive: mouth closed, small nods), idle after longer silence.
Live sessions and offline clips (nodes, benches, the training teacher) label frames with the same tracker.
"""

from __future__ import annotations

import numpy as np

from .frames import STATES, State

VOICE_DB = -42.0  # louder than this (dBFS RMS over 20 ms) counts as voice


def level_db(samples: np.ndarray) -> float:
    """RMS level in dB full scale (float audio in -1..1); silence is about -180."""
    if samples.size == 0:
        return -180.0
    return float(20 * np.log10(np.sqrt(np.mean(samples.astype(np.float64) ** 2)) + 1e-9))



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
