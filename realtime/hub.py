"""Sessions and portraits shared by every transport, with the limits that keep one server serving many."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import cv2
import numpy as np

from ..pipelines.portrait import default_portrait, find_face
from .engines.base import Engine, EngineSession, PortraitSource, PromptSource, SessionOptions, SessionSource
from .metrics import ServerCounters, SessionMetrics
from .portrait import PortraitError, decode_upload
from .schema import Field, SchemaError
from .session import MODES, Interaction, LiveSession
from .worker import RenderWorker

SIZES = (256, 384, 512)
MAX_FPS = 30.0
MAX_PENDING_DECODES = 4  # uploads decoding or waiting to; more at once are refused as busy
DECODE_NICENESS = 10  # the decode thread yields the CPU to the render threads (Linux: niceness is per thread)
CONNECT_TIMEOUT_S = 20.0  # a WebRTC session must connect (ICE + DTLS) within this, or it is closed

MAX_PROMPT = 200  # characters of a prompt (the embedded video model reads a few words)

# The client's session choices, shared by the websocket `start` message and the WebRTC offer. `portrait` is for
# engines that take one (unset: the default portrait), `prompt` for engines that take a prompt.
SESSION_FIELDS = {
    "size": Field("integer", None, choices=SIZES),  # unset: the engine's default_size
    "fps": Field("number", 25, low=1, high=MAX_FPS),
    "seed": Field("integer", 0, low=0, high=2**32 - 1),
    "portrait": Field("string", None, max_len=64, code="bad_portrait"),
    "prompt": Field("string", None, max_len=MAX_PROMPT),
    "mode": Field("string", "mirror", choices=MODES),
    "auto_interrupt": Field("boolean", False),
}
# A condition (the websocket `condition` message, the HTTP condition body): a prompt or a class index.
CONDITION_FIELDS = {
    "prompt": Field("string", None, max_len=MAX_PROMPT, code="bad_condition"),
    "class": Field("integer", None, code="bad_condition"),  # the engine checks its own range of classes
}

T = TypeVar("T")


class LimitError(RuntimeError):
    """A request exceeds a server limit; the message says which and what to do."""


def session_options(fields: dict[str, object], engine: Engine) -> SessionOptions:
    """SessionOptions from a message already validated against SESSION_FIELDS; no size: the engine's default."""
    size = engine.default_size if fields["size"] is None else fields["size"]
    return SessionOptions(size=int(size), fps=float(fields["fps"]), seed=int(fields["seed"]))  # type: ignore[arg-type]


def session_interaction(fields: dict[str, object]) -> Interaction:
    """How the session hears (mode, automatic interruption) from a message validated against SESSION_FIELDS;
    SchemaError naming the field for auto_interrupt without the interactive mode."""
    try:
        return Interaction(str(fields["mode"]), bool(fields["auto_interrupt"]))
    except ValueError as exc:
        raise SchemaError("auto_interrupt", str(exc)) from None


def condition_value(fields: dict[str, object]) -> str | int:
    """The prompt or class of a body already validated against CONDITION_FIELDS: exactly one of them."""
    given = [k for k in CONDITION_FIELDS if fields.get(k) is not None]
    if len(given) != 1:
        raise SchemaError(None, 'a condition needs either "prompt" (e.g. "7", "shapes", "texture") or "class" '
                          f"(a class index), got {' and '.join(given) or 'neither'}", "bad_condition")
    return fields[given[0]]  # type: ignore[return-value] - validated: a string or an integer


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # elsewhere setpriority would renice the whole process
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)


class UploadDecoder:
    """Decodes uploaded portraits on one low-priority thread of its own, never on the render workers, and
    refuses uploads beyond `max_pending` in flight: a burst of uploads then costs bounded memory and CPU and
    cannot stall a live session's frames."""

    def __init__(self, counters: ServerCounters, max_pending: int = MAX_PENDING_DECODES) -> None:
        self.counters = counters
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lc-decode", initializer=_lower_priority)
        self._pending = 0

    async def run(self, fn: Callable[[bytes], T], data: bytes) -> T:
        if self._pending >= self.max_pending:
            self.counters.refused["decode_busy"] += 1
            raise LimitError(f"{self._pending} portraits are being decoded already (the limit is "
                             f"{self.max_pending}); try again in a moment")
        loop = asyncio.get_running_loop()
        self._pending += 1
        job = self._executor.submit(fn, data)
        # released when the thread is done with it (not when a caller gives up), so the bound is real
        job.add_done_callback(lambda _: self._finished(loop))
        return await asyncio.wrap_future(job)

    def _finished(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first (server shutdown): nothing to release
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _validated(data: bytes) -> np.ndarray:
    """Decode and check an upload (run on a worker thread: large images take tens of milliseconds)."""
    rgb = decode_upload(data)
    find_face(rgb)
    return rgb


class SessionHub:
    def __init__(self, engine: Engine, max_sessions: int = 4, max_portraits: int = 16,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, counters: ServerCounters | None = None) -> None:
        self.engine = engine
        self.max_sessions = max_sessions
        self.max_portraits = max_portraits
        self.connect_timeout_s = connect_timeout_s
        self.counters = counters or ServerCounters()
        self.worker = RenderWorker(engine)
        self.decoder = UploadDecoder(self.counters)
        self.sessions: dict[str, LiveSession] = {}
        self._portraits: OrderedDict[str, np.ndarray] = OrderedDict({"default": default_portrait(512)})
        self._pending = 0

    async def warm_up(self) -> None:
        """Open (and close) a default session before the first client, so its first frame is not the slow one
        (for an avatar engine this prepares the default portrait)."""
        default = PortraitSource(self._portraits["default"]) if self.engine.traits.takes == "portrait" else \
            PromptSource()
        session = await self.worker.open(default, SessionOptions())
        await self.worker.run(session.close)

    async def add_portrait(self, data: bytes) -> str:
        """Validate an upload (size, decodable, a face in it) and keep it under a fresh id."""
        rgb = await self.decoder.run(_validated, data)
        pid = uuid.uuid4().hex[:12]
        self._portraits[pid] = rgb
        while len(self._portraits) > self.max_portraits:
            oldest = next(k for k in self._portraits if k != "default")
            del self._portraits[oldest]
        return pid

    def portrait(self, pid: str) -> np.ndarray:
        if pid not in self._portraits:
            raise PortraitError(f"unknown portrait {pid!r}; upload one to /api/portraits or use 'default'")
        return self._portraits[pid]

    def default_png(self) -> bytes:
        return cv2.imencode(".png", cv2.cvtColor(self._portraits["default"], cv2.COLOR_RGB2BGR))[1].tobytes()

    async def open(self, options: SessionOptions, transport: str, portrait: str | bytes | None = None,
                   prompt: str | None = None, interaction: Interaction | None = None) -> LiveSession:
        """Start a session from what the client sent: a portrait (an id or uploaded bytes) for an engine that
        takes one, a prompt for one that takes a prompt. Raises LimitError, PortraitError or ValueError
        (SchemaError naming the field when the client sent the wrong kind of source) with a client-facing
        message."""
        if len(self.sessions) + self._pending >= self.max_sessions:
            self.counters.refused["busy"] += 1
            raise LimitError(f"server is at its limit of {self.max_sessions} sessions; try again later")
        self._pending += 1
        try:
            metrics = SessionMetrics()
            engine_session = await self._open_engine_session(options, portrait, prompt)
        finally:
            self._pending -= 1
        session = LiveSession(engine_session, self.worker, options, transport, metrics, interaction)
        self.sessions[session.id] = session
        self.counters.opened += 1
        session.on_close(self._forget(session))
        return session

    async def _open_engine_session(self, options: SessionOptions, portrait: str | bytes | None,
                                   prompt: str | None) -> EngineSession:
        name = self.engine.name
        if self.engine.traits.takes == "prompt":
            if portrait is not None:
                raise SchemaError("portrait", f"the {name} engine takes a prompt, not a portrait", "bad_portrait")
            try:
                return await self.worker.open(PromptSource(prompt), options)
            except ValueError as exc:  # the engine cannot read the prompt
                raise SchemaError("prompt", str(exc)) from None
        if prompt is not None:
            raise SchemaError("prompt", f"the {name} engine takes a portrait, not a prompt")
        source: SessionSource = PortraitSource(await self.decoder.run(decode_upload, portrait)
                                               if isinstance(portrait, bytes) else self.portrait(portrait or "default"))
        return await self.worker.open(source, options)

    def _forget(self, session: LiveSession):
        async def forget() -> None:
            self.sessions.pop(session.id, None)
            self.counters.ended[str(session.end_reason)] += 1
        return forget

    async def end_sessions(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self.sessions.values())), return_exceptions=True)

    async def close(self) -> None:
        await self.end_sessions("shutdown")
        self.decoder.close()
        await self.worker.close()
