"""Sessions and portraits shared by every transport, with the limits that keep one server serving many."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict

import cv2
import numpy as np

from ..pipelines.portrait import default_portrait, find_face
from .engines.base import AvatarEngine, SessionOptions
from .metrics import SessionMetrics
from .portrait import PortraitError, decode_upload
from .session import LiveSession
from .worker import RenderWorker

SIZES = (256, 384, 512)
MAX_FPS = 30.0


class LimitError(RuntimeError):
    """A request exceeds a server limit; the message says which and what to do."""


def parse_options(raw: dict[str, object]) -> SessionOptions:
    """Validate client options with messages that name the field and the allowed values."""
    size, fps, seed = raw.get("size", 512), raw.get("fps", 25), raw.get("seed", 0)
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 1 <= fps <= MAX_FPS:
        raise ValueError(f"fps must be a number between 1 and {MAX_FPS:g}, got {fps!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return SessionOptions(size=int(size), fps=float(fps), seed=seed)


def _validated(data: bytes) -> np.ndarray:
    """Decode and check an upload (run on a worker thread: large images take tens of milliseconds)."""
    rgb = decode_upload(data)
    find_face(rgb)
    return rgb


class SessionHub:
    def __init__(self, engine: AvatarEngine, max_sessions: int = 4, max_portraits: int = 16) -> None:
        self.engine = engine
        self.max_sessions = max_sessions
        self.max_portraits = max_portraits
        self.worker = RenderWorker(engine)
        self.sessions: dict[str, LiveSession] = {}
        self._portraits: OrderedDict[str, np.ndarray] = OrderedDict({"default": default_portrait(512)})
        self._pending = 0

    async def warm_up(self) -> None:
        """Prepare the default portrait before the first client, so its first frame is not the slow one."""
        await self.worker.open_session(self._portraits["default"], SessionOptions())

    async def add_portrait(self, data: bytes) -> str:
        """Validate an upload (size, decodable, a face in it) and keep it under a fresh id."""
        rgb = await self.worker.run(_validated, data)
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

    async def open(self, portrait: str | bytes, options: SessionOptions, transport: str) -> LiveSession:
        """Start a session; raises LimitError, PortraitError or ValueError with a client-facing message."""
        if len(self.sessions) + self._pending >= self.max_sessions:
            raise LimitError(f"server is at its limit of {self.max_sessions} sessions; try again later")
        self._pending += 1
        try:
            metrics = SessionMetrics()
            rgb = await self.worker.run(decode_upload, portrait) if isinstance(portrait, bytes) else \
                self.portrait(portrait)
            engine_session = await self.worker.open_session(rgb, options)
        finally:
            self._pending -= 1
        session = LiveSession(engine_session, self.worker, options, transport, metrics)
        self.sessions[session.id] = session
        session.on_close(self._forget(session.id))
        return session

    def _forget(self, sid: str):
        async def forget() -> None:
            self.sessions.pop(sid, None)
        return forget

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())), return_exceptions=True)
        await self.worker.close()
