"""Runs engine work off the event loop, batching concurrent requests from all sessions.

Each of the engine's `workers` loops takes whatever requests are waiting (up to `max_batch`) and hands
them to `render_batch` in a worker thread. The CPU engine renders one at a time on two threads; a GPU
engine sets one worker and a larger batch — the server code is the same either way.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from statistics import median
from typing import TypeVar

from .engines.base import Control, Engine, EngineSession, RenderedFrame, RenderRequest, SessionOptions, SessionSource

T = TypeVar("T")


class RenderWorker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.executor = ThreadPoolExecutor(max(1, engine.workers), thread_name_prefix=f"lc-{engine.name}")
        self._queue: asyncio.Queue[tuple[RenderRequest, asyncio.Future[RenderedFrame]]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._serve()) for _ in range(max(1, engine.workers))]
        self._batches: deque[tuple[float, int]] = deque(maxlen=256)  # recent (seconds, frames) of render_batch

    def render_stats(self) -> dict[str, float | int | None]:
        """Recent render time per batch and per frame (the capacity arithmetic in docs/ray.md starts here)."""
        if not self._batches:
            return {"batches": 0, "batch_ms": None, "frame_ms": None, "batch_size": None}
        return {"batches": len(self._batches), "batch_ms": round(1000 * median(s for s, _ in self._batches), 2),
                "frame_ms": round(1000 * median(s / n for s, n in self._batches), 2),
                "batch_size": round(sum(n for _, n in self._batches) / len(self._batches), 2)}

    async def open(self, source: SessionSource, options: SessionOptions) -> EngineSession:
        return await self.run(self.engine.open, source, options)

    async def control(self, session: EngineSession, control: Control) -> dict[str, object]:
        """A control for `session` on the engine's threads (the live session keeps it in turn with its frames)."""
        return await self.run(session.control, control)

    async def render(self, request: RenderRequest) -> RenderedFrame:
        future: asyncio.Future[RenderedFrame] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((request, future))
        return await future

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Engine calls besides rendering, and other per-frame CPU work (encoding), on the same threads, so they
        are bounded by the same pool and never run on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.engine.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(req, fut) for req, fut in batch if not fut.done()]
            if not live:
                continue
            try:
                started = time.perf_counter()
                frames = await loop.run_in_executor(self.executor, self.engine.render_batch, [r for r, _ in live])
                self._batches.append((time.perf_counter() - started, len(live)))
            except Exception as exc:  # one bad batch fails its sessions, never the worker
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), frame in zip(live, frames, strict=True):
                if not fut.done():
                    fut.set_result(frame)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.engine.close()
