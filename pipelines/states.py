"""Speaking / listening / idle from voice activity (LLIA's three states), with an API override.

Speaking while the avatar's audio carries voice (plus a short hangover so syllable gaps do not flicker).
With one audio stream (the mirror mode, offline clips) listening is the while after the avatar stops
(attentive: mouth closed, small nods) and idle the longer silence after it. With the user's voice heard
separately (an interactive session) listening means what it says: the user is talking and the avatar is
silent; idle is neither. Live sessions and offline clips (nodes, benches, the training teacher) label frames
with the same tracker.
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


def voiced(window: np.ndarray, rate: int) -> bool:
    """Whether the last 20 ms of `window` carry voice."""
    return level_db(window[-int(0.02 * rate) :]) > VOICE_DB


class StateTracker:
    """`update(t, avatar_window)` per frame; an interactive session also calls `hear_user(t, user_window)` first.

    `barge_in_s` is how long the user must have been talking over the avatar before `barge_in` says so: long
    enough that a click or a cough does not cut the avatar off, short enough to feel immediate.
    """

    def __init__(self, rate: int, hangover_s: float = 0.3, listening_s: float = 3.0, follows_user: bool = False,
                 user_hangover_s: float = 0.5, barge_in_s: float = 0.1) -> None:
        self.rate = rate
        self.hangover_s = hangover_s
        self.listening_s = listening_s
        self.follows_user = follows_user
        self.user_hangover_s = user_hangover_s
        self.barge_in_s = barge_in_s
        self.forced: State | None = None
        self._last_voice = float("-inf")
        self._last_user = float("-inf")
        self._user_onset = float("-inf")  # start of the user's current stretch of talking
        self.state: State = "idle"

    def force(self, state: str | None, t: float | None = None) -> State:
        """Pin a state (None or "auto" returns to voice activity); unknown names raise ValueError.

        Returns the state now in effect. With the media time `t` that is what voice activity says at `t` after
        an "auto" (not the state that was pinned until now), so a client told it sees no stale state that the
        next frame then corrects; without `t` it is the last frame's state until the next `update`.
        """
        if state in (None, "auto"):
            self.forced = None
        elif state in STATES:
            self.forced = state  # type: ignore[assignment]
        else:
            raise ValueError(f"unknown state {state!r}; use one of {', '.join(STATES)} or 'auto'")
        if self.forced is not None:
            self.state = self.forced
        elif t is not None:
            self.state = self._auto(t)
        return self.state

    def hear_user(self, t: float, window: np.ndarray) -> None:
        """The user's audio window ending at `t` (interactive sessions): voice activity only, never lip-synced."""
        if voiced(window, self.rate):
            if t - self._last_user > self.user_hangover_s:
                self._user_onset = t
            self._last_user = t

    def user_talking(self, t: float) -> bool:
        return t - self._last_user <= self.user_hangover_s

    def avatar_speaking(self, t: float) -> bool:
        return t - self._last_voice <= self.hangover_s

    def barge_in(self, t: float) -> bool:
        """The user has been talking for `barge_in_s` while the avatar speaks: time to interrupt it."""
        return self.avatar_speaking(t) and self.user_talking(t) and t - self._user_onset >= self.barge_in_s

    def silence(self, t: float) -> None:
        """The avatar's speech was cut off at `t` (an interruption): it stops speaking now, without the hangover."""
        self._last_voice = min(self._last_voice, t - self.hangover_s - 1e-6)

    def update(self, t: float, window: np.ndarray) -> State:
        if voiced(window, self.rate):
            self._last_voice = t
        self.state = self.forced or self._auto(t)
        return self.state

    def _auto(self, t: float) -> State:
        """What voice activity heard so far says at `t`."""
        quiet = t - self._last_voice
        if quiet <= self.hangover_s:
            return "speaking"
        if self.follows_user:
            return "listening" if self.user_talking(t) else "idle"
        return "listening" if quiet <= self.hangover_s + self.listening_s else "idle"
