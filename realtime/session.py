"""A live session: one clock, the avatar's speech and the user's voice, one state tracker, and paced frames.

Transports (WebRTC tracks, the websocket API) and the HTTP control API talk to a session only through its
methods: they feed audio in, send controls (state, interrupt, condition, say) and take frames and the audio to
play out. Everything about time lives here, so both transports behave and measure the same way, and every
engine call (render, control) runs on the engine's worker, one at a time per session, never on the loop.

Two audio roles, two timelines: the *avatar's speech* is what the engine lip-syncs and what goes out as the
avatar's voice; the *user's voice* only feeds voice activity (listening, and the automatic interruption). In the
`mirror` mode (the default, as before) the one stream a client sends is both: the avatar says back what it
hears. In the `interactive` mode a WebRTC microphone is the user, and the avatar speaks what an agent sends
(websocket audio, sent ahead of real time) or what `say` synthesises.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
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
from .speech import check_text, synthesize
from .worker import RenderWorker

# transport -> (playout delay s, how far ahead of the clock audio may be buffered s, live source).
# WebRTC audio is a live microphone: keep latency bounded and let pauses absorb bursts. Websocket
# clients may legitimately send faster than real time (text-to-speech output), so their audio is
# buffered as sent, pauses included; the slightly longer delay absorbs TCP and scheduling jitter.
PLAYOUT = {"webrtc": (0.03, 0.15, True), "websocket": (0.04, 8.0, False)}
# The avatar's speech in an interactive session comes ahead of real time whatever the transport (an agent's TTS, a
# `say`), so it is buffered like websocket audio, with room for a long `say` (speech.MAX_SAY_CHARS).
SPEECH_PLAYOUT = (0.04, 20.0, False)
SPEECH_CAPACITY_S = 24.0

MODES = ("mirror", "interactive")
ROLES = ("avatar", "user")
MOUTH_CLOSED = 0.05  # a frame's mouth opening at or below this counts as closed (the interruption latency)

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


@dataclass(frozen=True)
class Interaction:
    """How a session hears: `mode` (MODES) and whether the user talking over the avatar interrupts it."""

    mode: str = "mirror"
    auto_interrupt: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.auto_interrupt and self.mode != "interactive":
            raise ValueError('auto_interrupt needs mode "interactive" (in the mirror mode the user\'s voice is the '
                             "avatar's speech)")


class LiveSession:
    def __init__(self, engine_session: EngineSession, worker: RenderWorker, options: SessionOptions,
                 transport: str, metrics: SessionMetrics, interaction: Interaction | None = None) -> None:
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
        self.interaction = interaction or Interaction()
        self.interactive = self.interaction.mode == "interactive"
        self.clock = MediaClock()
        rate = worker.engine.sample_rate
        delay_s, max_ahead_s, live = PLAYOUT[transport]
        # the avatar's speech: lip-synced and played out
        if self.interactive:
            speech_delay, speech_ahead, _ = SPEECH_PLAYOUT
            self.timeline = AudioTimeline(self.clock, rate, delay_s=speech_delay, max_ahead_s=speech_ahead,
                                          capacity_s=SPEECH_CAPACITY_S)
        else:
            self.timeline = AudioTimeline(self.clock, rate, delay_s=delay_s, max_ahead_s=max_ahead_s, live=live)
        # the user's voice (interactive only): voice activity, never played out or lip-synced
        self.user_timeline = AudioTimeline(self.clock, rate, delay_s=delay_s, max_ahead_s=max_ahead_s,
                                           capacity_s=2.0, live=live) if self.interactive else None
        self.states = StateTracker(rate, follows_user=self.interactive)
        self._resamplers = {role: MonoResampler(rate) for role in ROLES}
        self._say_turn = asyncio.Lock()  # `say`s are spoken in the order they came
        self._pending_interrupt: tuple[float, float] | None = None  # (monotonic request time, media time)
        self._interrupt_listeners: list[Callable[[dict[str, object]], None]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.closed = asyncio.Event()
        self.connected = transport != "webrtc"  # a WebRTC session is connecting until ICE and DTLS complete
        self.end_reason: str | None = None

    @property
    def microphone_role(self) -> str:
        """What a WebRTC microphone is: the user in an interactive session, the mirrored speech otherwise."""
        return "user" if self.interactive else "avatar"

    def push_pcm16(self, samples: np.ndarray, rate: int, role: str = "avatar") -> None:
        """Client audio (PCM16 mono at `rate`) onto the timeline of `role`; overflow is counted, not stored.
        ValueError for the user's role in the mirror mode, which has one stream."""
        self._push(self._resamplers[self._role(role)].pcm(samples, rate), role)

    def push_frame(self, frame: av.AudioFrame) -> None:
        """A decoded WebRTC microphone frame (any layout and rate) onto the microphone's timeline."""
        role = self.microphone_role
        self._push(self._resamplers[role].frame(frame), role)

    def _role(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown audio role {role!r}; use one of {', '.join(ROLES)}")
        if role == "user" and not self.interactive:
            raise ValueError('the user\'s voice is a separate stream only in mode "interactive"; in the mirror '
                             "mode send untagged audio")
        return role

    def _push(self, pcm16: np.ndarray, role: str) -> None:
        timeline = self.user_timeline if role == "user" else self.timeline
        assert timeline is not None
        dropped = timeline.push(pcm16_to_float(pcm16))
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
            if self.user_timeline is not None:
                self.states.hear_user(t, self.user_timeline.read(t - ctx, t))
                if self.interaction.auto_interrupt and self.states.forced is None and self.states.barge_in(t):
                    await self.interrupt(auto=True)
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
    def forced(self) -> str | None:
        """The pinned state, or None while voice activity decides (the `forced` field of every reply)."""
        return self.states.forced

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
        states. Returns the state now in effect at the current media time (after "auto": what voice activity says
        now, not the state pinned until now) and the pinned state (`forced`, None after "auto")."""
        if not self.traits.states:
            raise ValueError(f"the {self.worker.engine.name} engine has no states")
        applied = self.states.force(state, self.clock.now())
        await self._control(ForceState(self.states.forced))
        return {"state": applied, "forced": self.forced}

    async def interrupt(self, auto: bool = False) -> dict[str, object]:
        """Barge-in: cut the avatar's speech off now (at once, on the loop, so no frame or audio after this carries
        it), stop its speaking state, then tell the engine (which closes the mouth). Returns the `interrupted`
        event: the speech dropped, the media time of the cut, and whether the user's voice triggered it (`auto`).
        The interruption latency is measured up to the first delivered frame from the cut on with a closed mouth.
        """
        requested, at = time.monotonic(), self.clock.now()
        dropped = self.timeline.flush()
        self.states.silence(at)
        self._pending_interrupt = (requested, at)
        self.metrics.interrupted()
        await self._control(Interrupt())
        event: dict[str, object] = {"dropped_ms": round(1000 * dropped, 1), "at": round(at, 6), "auto": auto}
        if auto:
            for listener in self._interrupt_listeners:
                listener(event)
        return event

    def on_auto_interrupt(self, listener: Callable[[dict[str, object]], None]) -> None:
        """Tell `listener` (on the loop, without waiting for it) of interruptions the user's voice triggered, so
        an agent client learns it was cut off."""
        self._interrupt_listeners.append(listener)

    async def say(self, text: str) -> dict[str, object]:
        """Speak `text` (espeak-ng) as the avatar: queued on the speech timeline after what is already there.
        ValueError for bad text, the mirror mode or an engine without a voice; SpeechUnavailable without espeak-ng.
        Returns when the speech starts and how long it is."""
        if not self.traits.audio:
            raise ValueError(f"the {self.worker.engine.name} engine gives no audio, so it cannot speak")
        if not self.interactive:
            raise ValueError('say needs mode "interactive" (in the mirror mode the avatar speaks what it hears)')
        text = check_text(text)
        async with self._say_turn:
            samples, rate = await synthesize(text)
            pcm16 = await self.offload(MonoResampler(self.timeline.rate).pcm, samples, rate)
            start = self.timeline.start_of_next()
            self._push(pcm16, "avatar")
        return {"at": round(start, 6), "duration_ms": round(1000 * pcm16.size / self.timeline.rate, 1)}

    async def condition(self, value: str | int) -> dict[str, object]:
        """Change what a prompt engine draws; ValueError for an unreadable prompt or an engine without one."""
        if not self.traits.conditions:
            raise ValueError(f"the {self.worker.engine.name} engine takes no condition; start the server with "
                             "--engine video")
        return await self._control(Condition(value))

    def delivered(self, frame: RenderedFrame) -> None:
        """A transport handed `frame` to the client: count it, its audio-to-mouth latency, and the end of an
        interruption (the first frame from the cut on whose mouth is closed)."""
        self.metrics.frame_delivered(self.timeline.arrival_of(frame.t))
        pending = self._pending_interrupt
        if pending is not None and frame.t >= pending[1] and (frame.mouth is None or frame.mouth <= MOUTH_CLOSED):
            self._pending_interrupt = None
            self.metrics.interrupt_done(time.monotonic() - pending[0])

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
            "mode": self.interaction.mode,
            "auto_interrupt": self.interaction.auto_interrupt,
            **self.engine_session.describe(),
        }

    def stats(self) -> dict[str, object]:
        phase = "ended" if self.closed.is_set() else "live" if self.connected else "connecting"
        states = self.traits.states  # an engine without states reports none (not the voice activity it ignores)
        return {"session": self.id, "state": self.states.state if states else None,
                "forced": self.states.forced if states else None, "phase": phase, "ended": self.end_reason,
                **self.metrics.snapshot()}
