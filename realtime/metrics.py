"""Per-session numbers every transport reports: time to first frame, steady FPS, audio-to-mouth latency, drops,
and how fast an interruption silences the avatar."""

from __future__ import annotations

import time
from collections import Counter, deque
from statistics import median


class SessionMetrics:
    """Counters fed by the session's frame loop and its sinks; `snapshot()` is what clients see.

    Steady FPS is measured over the last few seconds of delivered frames (not since the start), so a slow
    first frame does not hide in the average and a stall shows up at once.
    """

    def __init__(self, window_s: float = 5.0) -> None:
        self.created = time.monotonic()
        self.first_frame: float | None = None
        self.frames = 0
        self.dropped_frames = 0
        self.dropped_audio_ms = 0.0
        self._window_s = window_s
        self._sent: deque[float] = deque(maxlen=1024)
        self._latency: deque[float] = deque(maxlen=256)
        self.interrupts = 0
        self._interrupt_latency: deque[float] = deque(maxlen=64)

    def frame_delivered(self, audio_arrival: float | None) -> None:
        """A frame left for the client; `audio_arrival` is when the audio it shows reached the server."""
        now = time.monotonic()
        if self.first_frame is None:
            self.first_frame = now
        self.frames += 1
        self._sent.append(now)
        if audio_arrival is not None:
            self._latency.append(now - audio_arrival)

    def interrupted(self) -> None:
        self.interrupts += 1

    def interrupt_done(self, seconds: float) -> None:
        """An interruption took effect: its frame (mouth closed, audio cut) left `seconds` after the request."""
        self._interrupt_latency.append(seconds)

    def drop_frames(self, n: int = 1) -> None:
        self.dropped_frames += n

    def drop_audio(self, seconds: float) -> None:
        self.dropped_audio_ms += 1000.0 * seconds

    def steady_fps(self) -> float:
        if len(self._sent) < 2:
            return 0.0
        last = self._sent[-1]
        recent = [t for t in self._sent if t >= last - self._window_s]
        span = recent[-1] - recent[0]
        return (len(recent) - 1) / span if span > 0 else 0.0

    def snapshot(self) -> dict[str, float | int | None]:
        ttff = None if self.first_frame is None else round(1000.0 * (self.first_frame - self.created), 1)
        lat = round(1000.0 * median(self._latency), 1) if self._latency else None
        cut = round(1000.0 * median(self._interrupt_latency), 1) if self._interrupt_latency else None
        return {
            "time_to_first_frame_ms": ttff,
            "steady_fps": round(self.steady_fps(), 2),
            "audio_to_mouth_ms": lat,
            "frames": self.frames,
            "dropped_frames": self.dropped_frames,
            "dropped_audio_ms": round(self.dropped_audio_ms, 1),
            "interrupts": self.interrupts,
            "interrupt_latency_ms": cut,
        }


class ServerCounters:
    """Server-wide counts behind /api/info: sessions opened, how each one ended, and what was refused.

    They make the slow leaks visible that per-session numbers cannot: WebRTC offers that never connected
    (`ended["connect_timeout"]`), clients refused for a full server, connections cut for sending too slowly.
    """

    def __init__(self) -> None:
        self.opened = 0
        self.ended: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def snapshot(self) -> dict[str, object]:
        return {"sessions_opened": self.opened, "sessions_ended": dict(self.ended), "refused": dict(self.refused)}
