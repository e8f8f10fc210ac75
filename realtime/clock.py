"""One media clock per session: audio and video timestamps both derive from it, so they cannot drift apart."""

from __future__ import annotations

import asyncio
import time


class MediaClock:
    """Media time in seconds since the session started, on the monotonic wall clock.

    Pacing waits for an absolute target (`start + t`) rather than sleeping a period after each frame, so
    scheduling jitter never accumulates into drift.
    """

    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start

    def now(self) -> float:
        return time.monotonic() - self.start

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
