"""Pipeline parallelism for per-frame work: each stage on its own thread, items flowing in order.

A renderer's stages (audio features → U-Net → VAE decode and paste) depend on each other per item but
not across items, so while the U-Net works on chunk `i` the decoder can finish chunk `i - 1` and the
feature stage prepare chunk `i + 1`. torch releases the GIL inside its kernels, so Python threads are
enough to overlap them. Queues between stages are bounded (`depth`), so a fast producer never runs
far ahead of a slow consumer, and results come out in input order as soon as each is ready — which is
what lets a short first chunk reach the viewer before later chunks are done.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def run_stages(items: Iterable[Any], stages: Sequence[Callable[[Any], Any]], parallel: bool = True,
               depth: int = 2) -> Iterator[Any]:
    """Yield `stages[-1](...stages[0](item))` for each item in order; stages overlap when `parallel`.

    An exception in any stage stops the pipeline and is raised to the consumer; abandoning the
    iterator (e.g. a closed session) lets the threads drain and exit on their own.
    """
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    if not parallel:
        for item in items:
            for stage in stages:
                item = stage(item)
            yield item
        return
    queues: list[queue.Queue] = [queue.Queue(maxsize=depth) for _ in range(len(stages) + 1)]
    stop = threading.Event()

    def put(q: queue.Queue, value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        try:
            for item in items:
                if not put(queues[0], item):
                    return
            put(queues[0], _DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(queues[0], _Failure(err))

    def work(stage: Callable[[Any], Any], inbox: queue.Queue, outbox: queue.Queue) -> None:
        while not stop.is_set():
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE or isinstance(item, _Failure):
                put(outbox, item)
                return
            try:
                result = stage(item)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                put(outbox, _Failure(err))
                return
            if not put(outbox, result):
                return

    threads = [threading.Thread(target=feed, daemon=True, name="lc-stage-feed")]
    threads += [threading.Thread(target=work, args=(stage, queues[i], queues[i + 1]), daemon=True,
                                 name=f"lc-stage-{i}") for i, stage in enumerate(stages)]
    for thread in threads:
        thread.start()
    try:
        while True:
            item = queues[-1].get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
