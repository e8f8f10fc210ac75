"""The live server under misbehaving clients: every way a session ends, clients that vanish, WebRTC offers that
never connect, slow or half-sent HTTP requests, and bodies or messages of the wrong shape.

One server subprocess (short deadlines, its stderr in a file) serves the module; every test also checks that the
server logged no traceback while it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest
import websockets
from aiortc import RTCPeerConnection

from livecache.bench.loopback import RTC_RATE, rtc_session, ws_url
from livecache.examples.ws_client import stream
from livecache.pipelines.testsignal import talk_and_pause
from livecache.realtime.audio import float_to_pcm16

LOG_PROBLEMS = ("Traceback", "Error handling request", "exception was never retrieved", "Unhandled exception")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def ws(self) -> str:
        return ws_url(self.url)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def assert_clean_log(self) -> None:
        text = self.log.read_text()
        assert not any(p in text for p in LOG_PROBLEMS), text[-4000:]


@contextlib.contextmanager
def serve(log: Path, *args: str) -> Iterator[Server]:
    """`livecache serve --port 0 ARGS` with its stderr in `log`; stopped with SIGINT like Ctrl-C."""
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "livecache.realtime.cli", "--port", "0", *args],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"(http://[\d.]+:\d+)/", line)
        if match is None:
            raise RuntimeError(f"server did not start: {line!r} {log.read_text()[-2000:]}")
        yield Server(match.group(1), proc, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    with serve(log, "--max-sessions", "3", "--connect-timeout", "3", "--request-timeout", "1",
               "--body-timeout", "1", "--max-connections-per-address", "12") as srv:
        yield srv


async def http_json(method: str, url: str, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, **kwargs) as res:
            return res.status, await res.json(content_type=None)


def info(server: Server) -> dict:
    return asyncio.run(http_json("GET", server.url + "/api/info"))[1]


async def wait_for_sessions(server: Server, count: int, timeout_s: float = 8.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        _, body = await http_json("GET", server.url + "/api/info")
        if body["sessions"] == count or time.monotonic() > deadline:
            return body["sessions"]
        await asyncio.sleep(0.1)


async def messages_until_closed(ws, timeout_s: float = 5.0) -> list[str | bytes]:
    """Everything the server sends until it closes the connection (fails if it does not within the timeout)."""
    out: list[str | bytes] = []

    async def drain() -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                out.append(await ws.recv())

    await asyncio.wait_for(drain(), timeout_s)
    return out


async def next_event(ws, kind: str, timeout_s: float = 5.0) -> dict:
    """The next JSON message of type `kind` within `timeout_s`, skipping frames and other events."""

    async def find() -> dict:
        while True:
            message = await ws.recv()
            if isinstance(message, str) and json.loads(message)["type"] == kind:
                return json.loads(message)

    return await asyncio.wait_for(find(), timeout_s)


def test_http_stop_ends_a_websocket_session_for_its_client(server):
    async def run():
        async with websockets.connect(server.ws) as ws:
            await ws.send(json.dumps({"type": "start", "size": 256}))
            ready = json.loads(await ws.recv())
            await ws.send(b"\x00\x00" * 1600)
            await asyncio.sleep(1.2)  # frames and a stats message flow
            status, stopped_stats = await http_json("POST", f"{server.url}/api/sessions/{ready['session']}/stop")
            rest = await messages_until_closed(ws)
            return status, stopped_stats, rest, ws.close_code

    status, stats, rest, code = asyncio.run(run())
    texts = [json.loads(m) for m in rest if isinstance(m, str)]
    stopped = [m for m in texts if m["type"] == "stopped"]
    assert status == 200 and stats["phase"] == "ended" and stats["ended"] == "api"
    assert len(stopped) == 1 and stopped[0]["reason"] == "api" and stopped[0]["frames"] > 0
    after = rest[rest.index(next(m for m in rest if isinstance(m, str) and '"stopped"' in m)) + 1 :]
    assert after == []  # no frame or stats once the client heard `stopped`
    assert code == 1000
    assert asyncio.run(wait_for_sessions(server, 0)) == 0
    assert info(server)["counters"]["sessions_ended"]["api"] >= 1
    server.assert_clean_log()


def test_client_stop_and_disconnect_are_counted_by_reason(server):
    async def run():
        async with websockets.connect(server.ws) as ws:
            await ws.send(json.dumps({"type": "start", "size": 256}))
            await ws.recv()
            await ws.send(json.dumps({"type": "stop"}))
            rest = await messages_until_closed(ws)
        ws = await websockets.connect(server.ws)
        await ws.send(json.dumps({"type": "start", "size": 256}))
        await ws.recv()
        ws.transport.abort()
        return rest, await wait_for_sessions(server, 0)

    before = info(server)["counters"]["sessions_ended"]
    rest, remaining = asyncio.run(run())
    after = info(server)["counters"]["sessions_ended"]
    assert [json.loads(m)["reason"] for m in rest if isinstance(m, str) and '"stopped"' in m] == ["client"]
    assert remaining == 0
    assert after.get("client", 0) == before.get("client", 0) + 1
    assert after.get("disconnect", 0) == before.get("disconnect", 0) + 1
    server.assert_clean_log()


def test_client_that_resets_right_after_start_leaves_no_traceback(server):
    async def run():
        for _ in range(6):
            ws = await websockets.connect(server.ws)
            await ws.send(json.dumps({"type": "start", "size": 256}))
            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
            ws.transport.abort()
            await asyncio.sleep(0.05)
        return await wait_for_sessions(server, 0)

    assert asyncio.run(run()) == 0
    time.sleep(0.5)  # let the server finish logging whatever it would log
    server.assert_clean_log()


def udp_sockets(pid: int) -> int:
    return len(psutil.Process(pid).net_connections(kind="udp"))


def test_webrtc_offer_that_never_connects_is_closed_at_the_deadline(server):
    """The client offers and walks away (never applies the answer, so ICE never completes)."""
    baseline = udp_sockets(server.proc.pid)

    async def run():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        status, answer = await http_json("POST", server.url + "/api/offer",
                                         json={"sdp": pc.localDescription.sdp, "type": "offer"})
        _, pending = await http_json("GET", f"{server.url}/api/sessions/{answer['session']}")
        _, during = await http_json("GET", server.url + "/api/info")
        held = udp_sockets(server.proc.pid)
        remaining = await wait_for_sessions(server, 0, timeout_s=8.0)
        await pc.close()
        return status, pending, during["connecting"], held, remaining

    ended_before = info(server)["counters"]["sessions_ended"].get("connect_timeout", 0)
    started = time.monotonic()
    status, pending, connecting, held, remaining = asyncio.run(run())
    assert status == 200 and pending["phase"] == "connecting" and pending["frames"] == 0 and connecting == 1
    assert held > baseline  # the peer connection had bound its ICE sockets
    assert remaining == 0 and time.monotonic() - started < 8.0
    deadline = time.monotonic() + 3
    while udp_sockets(server.proc.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert udp_sockets(server.proc.pid) == baseline
    assert info(server)["counters"]["sessions_ended"]["connect_timeout"] == ended_before + 1
    server.assert_clean_log()


def test_partial_request_heads_are_timed_out_and_each_address_is_capped(server):
    """Slowloris: connections that never finish their request head are closed after --request-timeout (1 s);
    meanwhile one address holds at most --max-connections-per-address (12) and the rest are refused."""
    held = []
    for _ in range(12):
        raw = socket.create_connection(server.address, timeout=5)
        raw.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        held.append(raw)
    extra = socket.create_connection(server.address, timeout=5)
    refused = extra.recv(4096)
    extra.close()
    started = time.monotonic()
    closed_after = []
    for raw in held:
        reply = raw.recv(4096)  # the server's 408 (or nothing) and then the end of the stream
        while raw.recv(4096):
            pass
        closed_after.append(time.monotonic() - started)
        raw.close()
        assert reply.startswith(b"HTTP/1.1 408") or reply == b"", reply
    assert refused.startswith(b"HTTP/1.1 503") and b"too many connections" in refused
    assert max(closed_after) < 3.0
    counters = info(server)["counters"]["refused"]
    assert counters["head_timeout"] >= 12 and counters["connections_per_address"] >= 1
    server.assert_clean_log()


def test_a_body_that_stops_arriving_gets_408(server):
    with socket.create_connection(server.address, timeout=5) as raw:
        raw.sendall(b"POST /api/portraits HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\x89PNG" * 10)
        started = time.monotonic()
        reply = raw.recv(4096)
        elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in reply
    assert elapsed < 3.0
    assert info(server)["counters"]["refused"]["body_timeout"] >= 1
    server.assert_clean_log()


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ("[]", None, "must be a JSON object, got an array"),
        ('{"state": null}', "state", "must be a string, got null"),
        ("{}", "state", "needs state"),
        ('{"state": 3}', "state", "must be a string"),
        ('{"state": "auto", "extra": 1}', "extra", "unknown field 'extra'"),
    ],
)
def test_http_state_bodies_are_validated_by_field(server, body, field, fragment):
    async def run():
        async with websockets.connect(server.ws) as ws:
            await ws.send(json.dumps({"type": "start", "size": 256}))
            ready = json.loads(await ws.recv())
            url = f"{server.url}/api/sessions/{ready['session']}/state"
            forced, _ = await http_json("POST", url, json={"state": "listening"})
            status, reply = await http_json("POST", url, data=body)
            _, stats = await http_json("GET", f"{server.url}/api/sessions/{ready['session']}")
            return forced, status, reply, stats

    forced, status, reply, stats = asyncio.run(run())
    assert forced == 200 and status == 400
    assert reply.get("field") == field and fragment in reply["error"], reply
    assert stats["forced"] == "listening"  # the refused body changed nothing
    server.assert_clean_log()


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"fps": float("nan")}, "fps"), ({"fps": 1e308}, "fps"), ({"seed": -1}, "seed"), ({"size": "512"}, "size"),
     ({"portrait": 7}, "portrait"), ({"sdp_typo": "x"}, "sdp_typo")],
)
def test_offer_fields_are_validated_by_name(server, extra, field):
    body = json.dumps({"type": "offer", "sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", **extra})
    status, reply = asyncio.run(http_json("POST", server.url + "/api/offer", data=body))
    assert status == 400 and reply["field"] == field, reply
    assert asyncio.run(wait_for_sessions(server, 0)) == 0


@pytest.mark.parametrize(
    ("message", "code", "field"),
    [
        ({"type": "start", "size": "512"}, "bad_option", "size"),
        ({"type": "start", "jpeg_quality": True}, "bad_option", "jpeg_quality"),
        ({"type": "start", "fps": 1e400}, "bad_option", "fps"),
        ({"type": "start", "sample_rate": 16000.5}, "bad_sample_rate", "sample_rate"),
        ({"type": "start", "portrait": ["default"]}, "bad_portrait", "portrait"),
        ({"type": "start", "sampel_rate": 16000}, "bad_option", "sampel_rate"),
        ({"type": "stats", "verbose": True}, "bad_message", "verbose"),
    ],
)
def test_websocket_messages_are_validated_by_field(server, message, code, field):
    async def run():
        async with websockets.connect(server.ws) as ws:
            await ws.send(json.dumps(message))
            return json.loads(await asyncio.wait_for(ws.recv(), 5))

    reply = asyncio.run(run())
    assert reply["type"] == "error" and reply["code"] == code and reply["field"] == field, reply


def test_websocket_state_null_is_refused_not_auto(server):
    async def run():
        async with websockets.connect(server.ws) as ws:
            await ws.send(json.dumps({"type": "start", "size": 256}))
            await ws.recv()
            await ws.send(json.dumps({"type": "state", "state": "listening"}))
            state = await next_event(ws, "state")
            await ws.send(json.dumps({"type": "state", "state": None}))
            error = await next_event(ws, "error")
            await ws.send(json.dumps({"type": "stats"}))
            return state, error, await next_event(ws, "stats")

    state, error, stats = asyncio.run(run())
    assert state["state"] == "listening" and state["forced"]
    assert error["code"] == "bad_state" and error["field"] == "state"
    assert stats["forced"] == "listening"


def test_info_reports_limits_and_counters(server):
    body = info(server)
    limits = body["limits"]
    assert limits["connect_timeout_s"] == 3.0 and limits["head_timeout_s"] == 1.0
    assert limits["body_timeout_s"] == 1.0 and limits["max_connections_per_address"] == 12
    assert limits["portrait_sides"] == [128, 4096] and "PNG" in limits["portrait_formats"]
    assert set(body["counters"]) == {"sessions_opened", "sessions_ended", "refused"}


def test_server_shutdown_tells_websocket_clients_why(tmp_path):
    with serve(tmp_path / "stderr.log") as srv:
        async def run():
            async with websockets.connect(srv.ws) as ws:
                await ws.send(json.dumps({"type": "start", "size": 256}))
                await ws.recv()
                srv.proc.send_signal(signal.SIGINT)
                rest = await messages_until_closed(ws, 10)
                return rest, ws.close_code

        rest, code = asyncio.run(run())
        srv.proc.wait(15)
        srv.assert_clean_log()
    stopped = [json.loads(m) for m in rest if isinstance(m, str) and '"stopped"' in m]
    assert [m["reason"] for m in stopped] == ["shutdown"] and code == 1001


def test_engine_failure_ends_the_session_with_a_reason(monkeypatch, caplog):
    """An engine that fails mid-stream: the client hears engine_error and `stopped`, the slot is freed."""
    from livecache.realtime import server as server_module
    from livecache.realtime.engines import create_engine

    embedded = type(create_engine("embedded"))

    class FailingEngine(embedded):
        def render_batch(self, requests):
            raise RuntimeError("the device went away")

    monkeypatch.setattr(server_module, "create_engine", lambda name, **options: FailingEngine())

    async def run():
        live = await server_module.LiveServer().start()
        try:
            async with websockets.connect(ws_url(live.url)) as ws:
                await ws.send(json.dumps({"type": "start", "size": 256}))
                rest = await messages_until_closed(ws)
                return rest, ws.close_code, len(live.hub.sessions), live.hub.counters.snapshot()
        finally:
            await live.stop()

    rest, code, remaining, counters = asyncio.run(run())
    events = [json.loads(m) for m in rest if isinstance(m, str)]
    assert [e["type"] for e in events] == ["ready", "error", "stopped"]
    assert events[1]["code"] == "engine_error" and "the device went away" in events[1]["message"]
    assert events[2]["reason"] == "engine_error" and code == 1011
    assert remaining == 0 and counters["sessions_ended"] == {"engine_error": 1}
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.slow
def test_soak_sessions_come_and_go_without_leaking(server):
    """About a minute of rounds of two websocket sessions and one WebRTC session at once: afterwards no session
    is left, every opened session ended, the UDP sockets are back, and resident memory is near its baseline."""
    ws_audio = float_to_pcm16(talk_and_pause(1.0, 1.0, 2, 16000, lead_s=0.2))
    rtc_audio = talk_and_pause(1.0, 1.0, 2, RTC_RATE, lead_s=0.2)
    proc = psutil.Process(server.proc.pid)

    async def round_of_sessions(seconds: float) -> None:
        results = await asyncio.gather(stream(server.ws, ws_audio, 16000, seconds, {"size": 256}),
                                       stream(server.ws, ws_audio, 16000, seconds, {"size": 384}),
                                       rtc_session(server.url, rtc_audio, seconds, {"size": 256}))
        assert all(r.frames for r in results)
        assert await wait_for_sessions(server, 0) == 0

    asyncio.run(round_of_sessions(3.0))  # warm-up: first-use allocations are not a leak
    baseline_rss, baseline_udp = proc.memory_info().rss, udp_sockets(proc.pid)
    opened_before = info(server)["counters"]["sessions_opened"]
    rounds, end = 0, time.monotonic() + 45
    while time.monotonic() < end:
        asyncio.run(round_of_sessions(4.0))
        rounds += 1
    counters = info(server)["counters"]
    grown_mb = (proc.memory_info().rss - baseline_rss) / 2**20
    assert rounds >= 5 and counters["sessions_opened"] - opened_before == 3 * rounds
    assert sum(counters["sessions_ended"].values()) == counters["sessions_opened"]
    assert udp_sockets(proc.pid) == baseline_udp
    print(f"soak: {rounds} rounds of 3 sessions, resident memory {baseline_rss / 2**20:.0f} MB {grown_mb:+.1f} MB")
    assert grown_mb < 40, f"resident memory grew by {grown_mb:.0f} MB over {rounds} rounds"
    server.assert_clean_log()
