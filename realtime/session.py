"""A live session: one clock, one audio timeline, one state tracker, and a paced stream of frames.

Transports (WebRTC tracks, the websocket API) and the HTTP control API talk to a session only through its
methods: they feed audio in, send controls (state, interrupt, condition) and take frames and the audio to
play out. Everything about time lives here, so both transports behave and measure the same way, and every
engine call (render, control) runs on the engine's worker, one at a time per session, never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import av
import numpy as np

from ..pipelines.states import StateTracker
from .audio import AudioTimeline, MonoResampler, pcm16_to_float
from .clock import MediaClock
from .engines.base import (
    Condition,
    Control,
    EngineSession,
    EngineTraits,
    ForceState,
    Interrupt,
    RenderedFrame,
    RenderRequest,
    SessionOptions,
)
from .metrics import SessionMetrics
from .worker import RenderWorker

# transport -> (playout delay s, how far ahead of the clock audio may be buffered s, live source).
# WebRTC audio is a live microphone: keep latency bounded and let pauses absorb bursts. Websocket
# clients may legitimately send faster than real time (text-to-speech output), so their audio is
# buffered as sent, pauses included; the slightly longer delay absorbs TCP and scheduling jitter.
PLAYOUT = {"webrtc": (0.03, 0.15, True), "websocket": (0.04, 8.0, False)}

# Why a session ended, as `stopped` messages and the server counters report it. Every way a session can end
# goes through `LiveSession.close(reason)`, so every transport tears down the same way whichever side ends it.
END_REASONS = ("client", "api", "disconnect", "connect_timeout", "engine_error", "shutdown", "bad_offer")

log = logging.getLogger(__name__)
T = TypeVar("T")


async def cancel_tasks(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel and await `tasks`, except the one running this (a task that ends its own session)."""
    current = asyncio.current_task()
    others = [t for t in tasks if t is not current]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class LiveSession:
    def __init__(self, engine_session: EngineSession, worker: RenderWorker, options: SessionOptions,
                 transport: str, metrics: SessionMetrics) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.transport = transport
        self.options = options
        self.engine_session = engine_session
        self.worker = worker
        self.traits: EngineTraits = worker.engine.traits
        self.metrics = metrics
        # one engine call at a time for this session: a control waits for the frame being rendered, so engine
        # sessions need no locks and never see a control from the event loop
        self._engine_turn = asyncio.Lock()
        self.clock = MediaClock()
        rate = worker.engine.sample_rate
        delay_s, max_ahead_s, live = PLAYOUT[transport]
        self.timeline = AudioTimeline(self.clock, rate, delay_s=delay_s, max_ahead_s=max_ahead_s, live=live)
        self.states = StateTracker(rate)
        self._resampler = MonoResampler(rate)
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.closed = asyncio.Event()
        self.connected = transport != "webrtc"  # a WebRTC session is connecting until ICE and DTLS complete
        self.end_reason: str | None = None

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
            async with self._engine_turn:
                frame = await self.worker.render(request)
            yield frame
            k += 1

    @property
    def audio_rate(self) -> int:
        return self.timeline.rate

    def audio_out(self, start: float, end: float) -> np.ndarray:
        """The audio to play from media time `start` to `end` (float mono at `audio_rate`): the session timeline
        for an engine that gives audio; nothing for one that gives pictures only (the video engine)."""
        if not self.traits.audio:
            return np.zeros(0, np.float32)
        return self.timeline.read(start, end)

    @property
    def forced(self) -> bool:
        return self.states.forced is not None

    async def offload(self, fn: Callable[..., T], *args: object) -> T:
        """Other per-frame CPU work of a transport (JPEG encoding) on the engine's threads, bounded with them."""
        return await self.worker.run(fn, *args)

    def frame_dropped(self) -> None:
        """A transport dropped a rendered frame (its client was too slow)."""
        self.metrics.drop_frames()

    async def _control(self, control: Control) -> dict[str, object]:
        async with self._engine_turn:
            return await self.worker.control(self.engine_session, control)

    async def force_state(self, state: str) -> dict[str, object]:
        """Pin a state ("auto" returns to voice activity); ValueError for an unknown one or an engine without
        states. Returns the state now in effect."""
        if not self.traits.states:
            raise ValueError(f"the {self.worker.engine.name} engine has no states")
        self.states.force(state)
        await self._control(ForceState(self.states.forced))
        return {"state": self.states.forced or self.states.state, "forced": self.forced}

    async def interrupt(self) -> float:
        """Barge-in: drop the audio that has not played yet (at once, on the loop, so the avatar falls silent
        within a frame), then tell the engine. Returns the seconds dropped."""
        dropped = self.timeline.flush()
        await self._control(Interrupt())
        return dropped

    async def condition(self, value: str | int) -> dict[str, object]:
        """Change what a prompt engine draws; ValueError for an unreadable prompt or an engine without one."""
        if not self.traits.conditions:
            raise ValueError(f"the {self.worker.engine.name} engine takes no condition; start the server with "
                             "--engine video")
        return await self._control(Condition(value))

    def delivered(self, frame: RenderedFrame) -> None:
        """A transport handed `frame` to the client: count it and its audio-to-mouth latency."""
        self.metrics.frame_delivered(self.timeline.arrival_of(frame.t))

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(callback)

    async def close(self, reason: str) -> None:
        """End the session once, for `reason` (one of END_REASONS): stop its frames, then run the closers the
        hub and the transport registered (newest first), so the client hears why and every resource goes."""
        if self.closed.is_set():
            return
        if reason not in END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}")
        self.end_reason = reason
        self.closed.set()
        for callback in reversed(self._closers):
            try:
                await callback()
            except Exception:  # one failing teardown step must not leak the others' resources
                log.exception("closing session %s (%s)", self.id, reason)
        try:
            async with self._engine_turn:  # after the frame in flight, on the worker like every engine call
                await self.worker.run(self.engine_session.close)
        except Exception:
            log.exception("closing the engine session of %s", self.id)

    def info(self) -> dict[str, object]:
        return {
            "session": self.id,
            "transport": self.transport,
            "size": self.options.size,
            "fps": self.options.fps,
            "audio_rate": self.timeline.rate,
            **self.engine_session.describe(),
        }

    def stats(self) -> dict[str, object]:
        phase = "ended" if self.closed.is_set() else "live" if self.connected else "connecting"
        states = self.traits.states  # an engine without states reports none (not the voice activity it ignores)
        return {"session": self.id, "state": self.states.state if states else None,
                "forced": self.states.forced if states else None, "phase": phase, "ended": self.end_reason,
                **self.metrics.snapshot()}
