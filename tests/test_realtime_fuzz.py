"""Property-based tests (hypothesis): hostile websocket message sequences and HTTP bodies against a live server.

Whatever arrives — wrong types, NaN, huge numbers, unknown fields, binary frames of any size, messages in any
order — the server answers with a clear error or closes the connection cleanly, never logs a traceback, never
stops serving, and frees every session it opened. The server runs in-process on its own thread and loop, so
its log records reach `caplog`; the examples are few and bounded (a few seconds each test).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecache.bench.loopback import ws_url
from livecache.realtime.engines.base import SessionOptions
from livecache.realtime.server import LiveServer, ServerLimits
from livecache.realtime.wsapi import MAX_AUDIO_MESSAGE, MESSAGES

SERVER_EVENTS = {"ready", "error", "state", "interrupted", "stats", "condition", "stopped"}
CLEAN_CLOSE = {1000, 1001, 1009, 1011}
FUZZ = settings(max_examples=20, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class ThreadedServer:
    """A LiveServer on its own event loop thread, so synchronous tests can drive it with asyncio.run()."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        limits = ServerLimits(max_sessions=3, connect_timeout_s=2.0)
        self.server = self.call(LiveServer(limits=limits).start())

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live() -> Iterator[ThreadedServer]:
    server = ThreadedServer()
    yield server
    server.stop()


def problems(caplog) -> list[str]:
    """Log records that mean the server mishandled something: errors and anything with a traceback."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def wait_idle(live: ThreadedServer, timeout_s: float = 8.0) -> int:
    deadline = time.monotonic() + timeout_s
    while live.server.hub.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(live.server.hub.sessions)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELD_NAMES = sorted({name for schema, _ in MESSAGES.values() for name in schema} - {"type"})
KINDS = sorted(MESSAGES) + ["dance", ""]
control_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(KINDS)},
    optional={name: json_values for name in FIELD_NAMES},
)
# plausible messages now and then, so sessions really start, stream and are stopped mid-sequence
good_messages = st.sampled_from([{"type": "start", "size": 256}, {"type": "stats"}, {"type": "interrupt"},
                                 {"type": "state", "state": "speaking"}, {"type": "stop"}])
frames = st.one_of(
    control_messages.map(lambda m: json.dumps(m, allow_nan=True)),
    good_messages.map(json.dumps),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.text(max_size=40),
    st.binary(max_size=3000),
    st.integers(MAX_AUDIO_MESSAGE - 2, MAX_AUDIO_MESSAGE + 2).map(lambda n: b"\x00" * n),
)


async def drive(url: str, sequence: list[str | bytes]) -> tuple[list[dict], int | None]:
    """Send `sequence` (reading what comes back after each), then leave; returns the JSON events seen."""
    events: list[dict] = []

    async def read_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(ws.recv(), left)
            except asyncio.TimeoutError:
                return
            if isinstance(message, str):
                events.append(json.loads(message))

    async with websockets.connect(url, max_size=None) as ws:
        try:
            for item in sequence:
                await ws.send(item)
                await read_for(0.03)
            await read_for(0.1)
        except websockets.ConnectionClosed:
            pass
        return events, ws.close_code


@FUZZ
@given(sequence=st.lists(frames, min_size=1, max_size=8))
def test_hostile_websocket_sequences_get_clear_answers(live, caplog, sequence):
    caplog.set_level(logging.WARNING)
    url = ws_url(live.server.url)
    events, code = asyncio.run(drive(url, sequence))
    for event in events:
        assert event["type"] in SERVER_EVENTS, event
        if event["type"] == "error":
            assert isinstance(event["code"], str) and isinstance(event["message"], str) and event["message"]
    assert code is None or code in CLEAN_CLOSE
    assert wait_idle(live) == 0
    assert problems(caplog) == []


bodies = st.one_of(json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()), st.binary(max_size=300),
                   st.fixed_dictionaries({}, optional={"state": json_values, "type": json_values, "sdp": json_values,
                                                       "size": json_values, "fps": json_values,
                                                       "seed": json_values, "portrait": json_values,
                                                       "prompt": json_values})
                   .map(lambda v: json.dumps(v, allow_nan=True).encode()))
ENDPOINTS = ["/api/offer", "/api/portraits", "/api/sessions/{sid}/state", "/api/sessions/{sid}/condition",
             "/api/sessions/nope/state"]


@FUZZ
@given(requests=st.lists(st.tuples(st.sampled_from(ENDPOINTS), bodies), min_size=1, max_size=5))
def test_hostile_http_bodies_get_clear_errors(live, caplog, requests):
    caplog.set_level(logging.WARNING)
    session = live.call(live.server.hub.open(SessionOptions(size=256), "websocket", "default"))

    async def run() -> list[tuple[int, object]]:
        out = []
        async with aiohttp.ClientSession() as http:
            for path, body in requests:
                async with http.post(live.server.url + path.format(sid=session.id), data=body) as res:
                    out.append((res.status, await res.json(content_type=None)))
        return out

    try:
        replies = asyncio.run(run())
    finally:
        live.call(session.close("client"))
    for status, reply in replies:
        assert status in (200, 400, 404, 413, 503), (status, reply)
        if status != 200:
            assert isinstance(reply, dict) and isinstance(reply["error"], str) and reply["error"]
    assert wait_idle(live) == 0
    assert problems(caplog) == []
