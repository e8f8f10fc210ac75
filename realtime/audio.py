"""Audio on the session clock: resampling to the engine rate and a timeline that video and audio both read.

Incoming audio is written at (arrival time + a small playout delay) on the media clock, with silence
filling any gap, so sample `n` of the timeline always plays at media time `n / rate`. The video frame for
media time `t` reads the window ending at `t`, and the outgoing audio plays the same samples at `t`:
lips and sound share one clock by construction.
"""

from __future__ import annotations

import time
from collections import deque

import av
import numpy as np

from ..pipelines.states import VOICE_DB, level_db
from .clock import MediaClock

ENGINE_RATE = 16000
INPUT_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


class MonoResampler:
    """Any input (PCM16 at a known rate, or decoded WebRTC frames) to PCM16 mono at one output rate."""

    def __init__(self, out_rate: int = ENGINE_RATE) -> None:
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=out_rate)

    def frame(self, frame: av.AudioFrame) -> np.ndarray:
        """Resample a decoded frame; returns int16 samples (possibly a few fewer: the filter keeps a tail)."""
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

    def pcm(self, samples: np.ndarray, rate: int) -> np.ndarray:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        return self.frame(frame)


def pcm16_to_float(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


class AudioTimeline:
    """A bounded ring of float audio indexed by absolute sample position on the media clock.

    Audio that arrives faster than real time is buffered up to `max_ahead_s` and the rest is dropped
    (reported to the caller), so a client that floods the server costs bounded memory. For a `live`
    source (a microphone) a burst after a network or scheduling stall would otherwise add its size to
    the latency for good; instead, silent chunks that arrive while the timeline runs ahead of the
    playout delay are skipped, so pauses in speech bring the latency back down.
    """

    def __init__(self, clock: MediaClock, rate: int = ENGINE_RATE, delay_s: float = 0.06,
                 capacity_s: float = 16.0, max_ahead_s: float = 8.0, live: bool = False) -> None:
        self.clock = clock
        self.rate = rate
        self.delay = int(delay_s * rate)
        self.capacity = int(capacity_s * rate)
        self.max_ahead = int(max_ahead_s * rate)
        self.live = live
        self._slack = int(0.01 * rate)
        self._buf = np.zeros(self.capacity, np.float32)
        self.write_pos = 0
        self.cut = 0  # samples before the last interruption's cut read as silence from then on
        self._arrivals: deque[tuple[int, int, float]] = deque(maxlen=1024)

    def _ring_write(self, pos: int, data: np.ndarray) -> None:
        idx = np.arange(pos, pos + data.size) % self.capacity
        self._buf[idx] = data

    def push(self, samples: np.ndarray) -> float:
        """Append float samples at the engine rate; returns the seconds dropped for running too far ahead."""
        now_pos = int(self.clock.now() * self.rate)
        floor = now_pos + self.delay
        if self.write_pos < floor:  # the source paused: the timeline kept running in silence
            gap = min(floor - self.write_pos, self.capacity)
            self._ring_write(floor - gap, np.zeros(gap, np.float32))
            self.write_pos = floor
        elif self.live and self.write_pos > floor + self._slack and level_db(samples) < VOICE_DB:
            return 0.0  # a pause while running behind the live source: skip it to catch up
        room = max(0, now_pos + self.max_ahead - self.write_pos)
        kept = samples[:room]
        if kept.size:
            self._ring_write(self.write_pos, kept)
            self._arrivals.append((self.write_pos, self.write_pos + kept.size, time.monotonic()))
            self.write_pos += kept.size
        return (samples.size - kept.size) / self.rate

    def start_of_next(self) -> float:
        """Media time at which audio pushed now would start playing (after what is queued)."""
        return max(self.write_pos, int(self.clock.now() * self.rate) + self.delay) / self.rate

    def flush(self) -> float:
        """Barge-in: cut the audio off at the current media time; returns the seconds dropped.

        Everything from now on is gone, the playout delay's worth included, and what lies before the cut reads as
        silence too: a frame whose audio window straddles the cut, or the outgoing audio of a frame not sent yet,
        would otherwise carry the interrupted voice for up to one more frame period."""
        self.cut = int(self.clock.now() * self.rate)
        dropped = max(0, self.write_pos - self.cut)
        self.write_pos -= dropped
        return dropped / self.rate

    def read(self, t0: float, t1: float) -> np.ndarray:
        """Samples for media times [t0, t1); anything not (or no longer) written reads as silence."""
        a, b = int(round(t0 * self.rate)), int(round(t1 * self.rate))
        pos = np.arange(a, b)
        valid = (pos >= self.cut) & (pos < self.write_pos) & (pos >= self.write_pos - self.capacity)
        out = np.zeros(pos.size, np.float32)
        out[valid] = self._buf[pos[valid] % self.capacity]
        return out

    def arrival_of(self, t: float) -> float | None:
        """Monotonic time at which the audio playing at media time `t` reached the server (None: silence fill)."""
        p = int(round(t * self.rate)) - 1
        if p >= self.write_pos or p < self.cut:  # not written, flushed or cut off: silence arrived from nowhere
            return None
        for start, end, arrived in reversed(self._arrivals):
            if start <= p < end:
                return arrived
            if end <= p:
                return None
        return None
