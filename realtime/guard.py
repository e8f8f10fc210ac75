"""Connection-level limits in front of aiohttp: a cap on open connections per client address and a deadline for
the first request's head.

aiohttp parses a request only once its head is complete, so nothing above the protocol sees a client that
connects and then sends half a header, slowly or never (slowloris): each such connection would hold a socket
and a handler forever. The guard sits between the listening socket and aiohttp's protocol: it refuses a
connection beyond the per-address cap with a 503 before aiohttp sees it, and closes one whose first request
head has not arrived within the deadline with a 408. Later requests on a kept-alive connection are bounded by
aiohttp's keep-alive timeout; request bodies by the server's body deadline (server.py).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from .metrics import ServerCounters


def _reply(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class ConnectionGuard:
    """Counts open connections per address and arms a head deadline on each new one."""

    def __init__(self, counters: ServerCounters, max_per_address: int, head_timeout_s: float) -> None:
        self.counters = counters
        self.max_per_address = max_per_address
        self.head_timeout_s = head_timeout_s
        self.open: Counter[str] = Counter()
        self._deadlines: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """Wrap aiohttp's protocol factory (the runner's `server`) for `loop.create_server`."""
        return lambda: _GuardedProtocol(self, inner)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """A request head arrived: its connection has met the deadline."""
        deadline = self._deadlines.pop(request.transport, None)
        if deadline is not None:
            deadline.cancel()
        return await handler(request)

    def _admit(self, address: str, transport: asyncio.BaseTransport) -> bool:
        if self.open[address] >= self.max_per_address:
            self.counters.refused["connections_per_address"] += 1
            return False
        self.open[address] += 1
        loop = asyncio.get_running_loop()
        self._deadlines[transport] = loop.call_later(self.head_timeout_s, self._expire, transport)
        return True

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        self._deadlines.pop(transport, None)
        self.counters.refused["head_timeout"] += 1
        _close_with(transport, "408 Request Timeout",
                    f"no complete request within {self.head_timeout_s:g} s of connecting")

    def _release(self, address: str, transport: asyncio.BaseTransport) -> None:
        deadline = self._deadlines.pop(transport, None)
        if deadline is not None:
            deadline.cancel()
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


def _close_with(transport: asyncio.BaseTransport, status: str, message: str) -> None:
    if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
        transport.write(_reply(status, message))
    transport.close()


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every protocol callback to aiohttp's handler, created only for an admitted connection."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._address = ""
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
        if not self._guard._admit(self._address, transport):
            _close_with(transport, "503 Service Unavailable", f"too many connections from {self._address} "
                        f"(the limit is {self._guard.max_per_address}); close some and retry")
            return
        self._transport = transport
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None and self._transport is not None:
            self._guard._release(self._address, self._transport)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
