"""A live session: one clock, one audio timeline, one state tracker, and a paced stream of frames.

Transports (WebRTC tracks, the websocket API) only feed audio in and take frames out; everything about
time lives here, so both transports behave and measure the same way.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import av
import numpy as np

from ..pipelines.states import StateTracker
from .audio import AudioTimeline, MonoResampler, pcm16_to_float
from .clock import MediaClock
from .engines.base import EngineSession, RenderedFrame, RenderRequest, SessionOptions
from .metrics import SessionMetrics
from .worker import RenderWorker

# transport -> (playout delay s, how far ahead of the clock audio may be buffered s, live source).
# WebRTC audio is a live microphone: keep latency bounded and let pauses absorb bursts. Websocket
# clients may legitimately send faster than real time (text-to-speech output), so their audio is
# buffered as sent, pauses included; the slightly longer delay absorbs TCP and scheduling jitter.
PLAYOUT = {"webrtc": (0.03, 0.15, True), "websocket": (0.04, 8.0, False)}


class LiveSession:
    def __init__(self, engine_session: EngineSession, worker: RenderWorker, options: SessionOptions,
                 transport: str, metrics: SessionMetrics) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.transport = transport
        self.options = options
        self.engine_session = engine_session
        self.worker = worker
        self.metrics = metrics
        self.clock = MediaClock()
        rate = worker.engine.sample_rate
        delay_s, max_ahead_s, live = PLAYOUT[transport]
        self.timeline = AudioTimeline(self.clock, rate, delay_s=delay_s, max_ahead_s=max_ahead_s, live=live)
        self.states = StateTracker(rate)
        self._resampler = MonoResampler(rate)
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.closed = asyncio.Event()

    def push_pcm16(self, samples: np.ndarray, rate: int) -> None:
        """Client audio (PCM16 mono at `rate`) onto the timeline; overflow is counted, not stored."""
        self._push(self._resampler.pcm(samples, rate))

    def push_frame(self, frame: av.AudioFrame) -> None:
        """A decoded WebRTC audio frame (any layout and rate) onto the timeline."""
        self._push(self._resampler.frame(frame))

    def _push(self, pcm16: np.ndarray) -> None:
        dropped = self.timeline.push(pcm16_to_float(pcm16))
        if dropped:
            self.metrics.drop_audio(dropped)

    async def frames(self) -> AsyncIterator[RenderedFrame]:
        """Frames on the media clock from now on; when rendering falls behind, late frames are skipped
        (and counted) so the stream stays on time instead of queueing up latency."""
        period = 1.0 / self.options.fps
        k = math.floor(self.clock.now() / period)
        ctx = self.worker.engine.audio_context_s
        while not self.closed.is_set():
            t = k * period
            await self.clock.sleep_until(t)
            behind = int((self.clock.now() - t) / period)
            if behind >= 1:
                self.metrics.drop_frames(behind)
                k += behind
                t = k * period
            window = self.timeline.read(t - ctx, t)
            request = RenderRequest(self.engine_session, t, window, self.states.update(t, window))
            yield await self.worker.render(request)
            k += 1

    def delivered(self, frame: RenderedFrame) -> None:
        """A transport handed `frame` to the client: count it and its audio-to-mouth latency."""
        self.metrics.frame_delivered(self.timeline.arrival_of(frame.t))

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(callback)

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for callback in reversed(self._closers):
            await callback()
        self.engine_session.close()

    def info(self) -> dict[str, object]:
        return {
            "session": self.id,
            "transport": self.transport,
            "size": self.options.size,
            "fps": self.options.fps,
            "mouth_box": list(self.engine_session.mouth_box),
            "audio_rate": self.timeline.rate,
        }

    def stats(self) -> dict[str, object]:
        return {"session": self.id, "state": self.states.state, "forced": self.states.forced,
                **self.metrics.snapshot()}
