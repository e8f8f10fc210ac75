"""`livecache serve` end to end: websocket and WebRTC sessions, portraits, and garbage on every input.

One server subprocess serves the whole module, so every bad input below is also a check that the server
keeps serving the next test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time

import aiohttp
import cv2
import numpy as np
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription

from livecache.bench.loopback import RTC_RATE, mouth_openness, rtc_session, spawn_server, ws_url
from livecache.examples.ws_client import stream, unpack_frame
from livecache.pipelines.testsignal import talk_and_pause
from livecache.realtime.audio import float_to_pcm16, level_db

LEAD, TALK, PAUSE = 1.0, 1.0, 2.0


@pytest.fixture(scope="module")
def server():
    with spawn_server("--max-sessions", "3") as url:
        yield url


async def http_json(method: str, url: str, **kwargs) -> tuple[int, object]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, **kwargs) as res:
            return res.status, await res.json(content_type=None)


async def wait_for_sessions(base: str, count: int, timeout_s: float = 8.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        _, info = await http_json("GET", base + "/api/info")
        if info["sessions"] == count or time.monotonic() > deadline:
            return info["sessions"]
        await asyncio.sleep(0.1)


async def expect_error(ws, code: str) -> dict:
    """Next JSON error on `ws`, skipping frames and stats."""
    while True:
        message = await asyncio.wait_for(ws.recv(), 5)
        if isinstance(message, str) and json.loads(message)["type"] == "error":
            event = json.loads(message)
            assert event["code"] == code, event
            assert event["message"]
            return event


def collect(frames: list):
    return lambda header, jpeg, pcm: frames.append((header, jpeg, pcm))


def test_websocket_mouth_moves_with_speech_and_rests_in_silence(server):
    audio = float_to_pcm16(talk_and_pause(TALK, PAUSE, 1, 16000, lead_s=LEAD))
    frames: list = []
    result = asyncio.run(stream(ws_url(server), audio, 16000, LEAD + TALK + PAUSE, on_frame=collect(frames)))
    assert not result.errors
    assert result.ready["mouth_box"] and result.ready["size"] == 512
    assert len(frames) > 0.8 * 25 * (LEAD + TALK + PAUSE)
    assert [h["seq"] for h, _, _ in frames] == list(range(1, len(frames) + 1))
    assert result.stats["time_to_first_frame_ms"] is not None
    assert result.stats["dropped_frames"] <= 5
    # every frame carries the audio it belongs to: judge the mouth against that audio
    levels = [level_db(np.frombuffer(pcm, "<i2") / 32768.0) for _, _, pcm in frames]
    voiced = [h["mouth"] for (h, _, _), level in zip(frames, levels, strict=True) if level > -30]
    silent = [h["mouth"] for i, (h, _, _) in enumerate(frames)
              if i >= 8 and max(levels[i - 8 : i + 1]) < -80]  # a third of a second of silence
    assert len(voiced) > 10 and len(silent) > 10
    assert np.median(voiced) > 0.3
    assert np.percentile(silent, 90) < 0.05


def test_websocket_frames_are_jpeg_and_show_the_mouth(server):
    audio = float_to_pcm16(talk_and_pause(TALK, 0.5, 1, 16000, lead_s=0.5))
    frames: list = []
    result = asyncio.run(stream(ws_url(server), audio, 16000, 2.0, {"size": 256, "jpeg_quality": 70},
                                on_frame=collect(frames)))
    box = result.ready["mouth_box"]
    images = [cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
              for _, jpeg, _ in frames]
    assert images[0].shape == (256, 256, 3)
    openness = [mouth_openness(img, box) for img in images]
    assert max(openness) > 0.03 and min(openness) < 0.01


def test_webrtc_session_mouth_moves_with_speech_and_rests(server):
    audio = talk_and_pause(TALK, PAUSE, 1, RTC_RATE, lead_s=LEAD)
    result = asyncio.run(rtc_session(server, audio, LEAD + TALK + PAUSE))
    assert result.frames and result.audio_started is not None
    assert result.frames[0][0] - result.offered < 3.0
    assert len(result.frames) > 0.7 * 25 * (LEAD + TALK + PAUSE)
    t0 = result.audio_started

    def window(a: float, b: float) -> list[float]:
        return [o for t, o in result.frames if a <= t - t0 < b]

    assert np.median(window(LEAD + 0.35, LEAD + TALK - 0.05)) > 0.03
    assert max(window(0.0, LEAD - 0.2)) < 0.01
    # the rest window starts a second after the speech ends: frames are stamped on arrival, and on a loaded
    # machine they arrive up to several hundred ms after the audio they show
    assert max(window(LEAD + TALK + 1.0, LEAD + TALK + PAUSE)) < 0.01
    assert result.stats["frames"] >= len(result.frames) and 0 < result.stats["steady_fps"] <= 1.1 * 25


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("this is not json", "must be JSON"),
        ("[" * 100_000, "must be JSON"),
        (b"\xff\xfe\x00garbage", "must be JSON"),
        (json.dumps({"type": "offer"}), "sdp"),
        (json.dumps({"type": "answer", "sdp": "v=0\r\n"}), "type"),
        (json.dumps({"type": "offer", "sdp": "hello"}), "malformed SDP"),
        (json.dumps({"type": "offer", "sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nbogus\r\n"}), "malformed SDP"),
        (json.dumps({"type": "offer", "sdp": "v=0\r\nm=x", "size": 999}), "size must be one of"),
        (json.dumps({"type": "offer", "sdp": "v=0\r\nm=x", "portrait": "missing"}), "unknown portrait"),
    ],
)
def test_bad_offers_get_clear_errors(server, body, fragment):
    status, reply = asyncio.run(http_json("POST", server + "/api/offer", data=body))
    assert status == 400 and fragment in reply["error"]
    assert asyncio.run(wait_for_sessions(server, 0)) == 0


def test_non_http_bytes_on_the_port_leave_the_server_serving(server):
    host, port = server.removeprefix("http://").split(":")
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 50, b"GET / HTTP/9.9\r\n\r\n",
                    b"POST /api/offer HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{"):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(garbage)
            raw.shutdown(socket.SHUT_WR)
            raw.recv(4096)  # whatever the server answers (or nothing), it must not hang us
    status, info = asyncio.run(http_json("GET", server + "/api/info"))
    assert status == 200 and info["engine"] == "embedded"


def test_websocket_garbage_gets_errors_and_the_connection_survives(server):
    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            for garbage in ("{not json", "[" * 100_000, "1" * 5000):
                await ws.send(garbage)
                await expect_error(ws, "bad_json")
            await ws.send(json.dumps([1, 2]))
            await expect_error(ws, "bad_message")
            await ws.send(b"\x00\x01")
            await expect_error(ws, "no_session")
            await ws.send(json.dumps({"type": "stats"}))
            await expect_error(ws, "no_session")
            await ws.send(json.dumps({"type": "start", "sample_rate": 12345}))
            await expect_error(ws, "bad_sample_rate")
            await ws.send(json.dumps({"type": "start", "fps": "fast"}))
            await expect_error(ws, "bad_option")
            await ws.send(json.dumps({"type": "start", "portrait_b64": "!!!"}))
            await expect_error(ws, "bad_portrait")
            await ws.send(json.dumps({"type": "start", "portrait_b64": base64.b64encode(b"GIF89a....").decode()}))
            await expect_error(ws, "bad_portrait")
            # after all that, the same connection still starts a session
            await ws.send(json.dumps({"type": "start", "sample_rate": 48000}))
            ready = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert ready["type"] == "ready"
            await ws.send(b"\x00" * (64 * 1024 + 2))
            await expect_error(ws, "too_large")
            await ws.send(b"\x00\x00\x00")
            await expect_error(ws, "bad_audio")
            await ws.send(json.dumps({"type": "state", "state": "sleeping"}))
            await expect_error(ws, "bad_state")
            await ws.send(json.dumps({"type": "start"}))
            await expect_error(ws, "already_started")
            await ws.send(json.dumps({"type": "dance"}))
            await expect_error(ws, "bad_type")
            await ws.send(json.dumps({"type": "state", "state": "idle"}))
            await ws.send(b"\x00" * 1920)
            deadline = time.monotonic() + 5
            frame = None
            while frame is None or frame["state"] != "idle":
                message = await asyncio.wait_for(ws.recv(), 5)
                if isinstance(message, bytes):
                    frame = unpack_frame(message)[0]
                assert time.monotonic() < deadline
            await ws.send(json.dumps({"type": "stop"}))
            stopped = None
            async for message in ws:
                if isinstance(message, str) and json.loads(message)["type"] == "stopped":
                    stopped = json.loads(message)
            assert stopped is not None and stopped["frames"] > 0

    asyncio.run(run())
    assert asyncio.run(wait_for_sessions(server, 0)) == 0


def test_oversized_message_closes_only_that_connection(server):
    async def run():
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            await ws.send(b"\x00" * (9 * 1024 * 1024))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd.code if closed.value.rcvd else None

    assert asyncio.run(run()) == 1009
    result = asyncio.run(stream(ws_url(server), np.zeros(8000, np.int16), 16000, 0.5))
    assert result.frames and not result.errors


def test_abrupt_disconnects_free_their_sessions(server):
    async def run():
        ws = await websockets.connect(ws_url(server))
        await ws.send(json.dumps({"type": "start"}))
        await ws.send(b"\x10\x00" * 1600)
        await asyncio.wait_for(ws.recv(), 5)
        assert await wait_for_sessions(server, 1) == 1
        ws.transport.abort()  # no close handshake: like a crashed client or a pulled cable
        return await wait_for_sessions(server, 0)

    assert asyncio.run(run()) == 0
    result = asyncio.run(stream(ws_url(server), np.zeros(8000, np.int16), 16000, 0.5))
    assert result.frames


def test_webrtc_viewer_without_microphone_and_hang_up_frees_the_session(server):
    async def run():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        tracks: asyncio.Queue = asyncio.Queue()
        pc.on("track", tracks.put_nowait)
        await pc.setLocalDescription(await pc.createOffer())
        status, answer = await http_json("POST", server + "/api/offer",
                                         json={"sdp": pc.localDescription.sdp, "type": "offer"})
        assert status == 200, answer
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        frame = await asyncio.wait_for((await asyncio.wait_for(tracks.get(), 5)).recv(), 5)
        assert await wait_for_sessions(server, 1) == 1
        await pc.close()  # hang up without the stop endpoint
        return frame, await wait_for_sessions(server, 0)

    frame, remaining = asyncio.run(run())
    assert frame.width == 512 and remaining == 0


def test_session_limit_is_enforced_with_a_clear_error(server):
    async def run():
        clients = [await websockets.connect(ws_url(server)) for _ in range(4)]
        for ws in clients:
            await ws.send(json.dumps({"type": "start", "size": 256}))
        replies = []
        for ws in clients:
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        for ws in clients:
            await ws.close()
        return replies

    replies = asyncio.run(run())
    assert [r["type"] for r in replies].count("ready") == 3
    busy = [r for r in replies if r["type"] == "error"]
    assert len(busy) == 1 and busy[0]["code"] == "busy" and "limit of 3" in busy[0]["message"]
    assert asyncio.run(wait_for_sessions(server, 0)) == 0


def test_portrait_upload_is_validated_and_usable(server):
    async def run():
        async with aiohttp.ClientSession() as http:
            async with http.get(server + "/api/portraits/default.png") as res:
                face = await res.read()
        no_face = cv2.imencode(".png", np.full((300, 300, 3), 128, np.uint8))[1].tobytes()
        outcomes = [await http_json("POST", server + "/api/portraits", data=data)
                    for data in (b"garbage", no_face, b"\x00" * (5 * 1024 * 1024), face)]
        return outcomes

    (s1, r1), (s2, r2), (s3, r3), (s4, r4) = asyncio.run(run())
    assert s1 == 400 and "decodable" in r1["error"]
    assert s2 == 400 and "no face" in r2["error"]
    assert s3 == 413 and "larger than" in r3["error"]
    assert s4 == 200 and r4["portrait"]
    result = asyncio.run(stream(ws_url(server), np.zeros(8000, np.int16), 16000, 0.5, {"portrait": r4["portrait"]}))
    assert result.frames and not result.errors


def test_state_can_be_forced_over_http(server):
    audio = float_to_pcm16(talk_and_pause(2.0, 0.0, 1, 16000))

    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"type": "start"}))
            ready = json.loads(await ws.recv())
            status, stats = await http_json("POST", f"{server}/api/sessions/{ready['session']}/state",
                                            json={"state": "listening"})
            bad, error = await http_json("POST", f"{server}/api/sessions/{ready['session']}/state",
                                         json={"state": "sulking"})
            missing, _ = await http_json("GET", f"{server}/api/sessions/nope")
            mouths = []
            for i in range(0, audio.size, 320):
                await ws.send(audio[i : i + 320].tobytes())
                await asyncio.sleep(0.02)
            await ws.send(json.dumps({"type": "stop"}))
            async for message in ws:
                if isinstance(message, bytes):
                    mouths.append(unpack_frame(message)[0])
            return status, stats, bad, error, missing, mouths

    status, stats, bad, error, missing, frames = asyncio.run(run())
    assert status == 200 and stats["forced"] == "listening"
    assert bad == 400 and error["field"] == "state"
    assert "must be one of" in error["error"] and "sulking" in error["error"]
    assert missing == 404
    assert all(f["state"] == "listening" and f["mouth"] < 0.05 for f in frames[-10:])


def test_slow_client_loses_frames_not_memory(server):
    """A client that stops reading: the server drops (and counts) frames instead of queueing them."""

    host, port = server.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # a slow link: the kernel buffers little
    sock.connect((host, int(port)))

    async def run():
        async with websockets.connect(ws_url(server), sock=sock, max_queue=1) as ws:
            await ws.send(json.dumps({"type": "start"}))
            ready = json.loads(await ws.recv())
            await asyncio.sleep(4.0)  # read nothing; the TCP buffers fill up
            _, stats = await http_json("GET", f"{server}/api/sessions/{ready['session']}")
            ws.transport.abort()
            return stats

    stats = asyncio.run(run())
    assert stats["dropped_frames"] > 10
    assert asyncio.run(wait_for_sessions(server, 0)) == 0


def test_audio_sent_ahead_is_buffered_and_interrupt_drops_it(server):
    """Text-to-speech clients may send faster than real time; a barge-in flushes what is not yet played."""
    speech = float_to_pcm16(talk_and_pause(3.0, 0.0, 1, 16000))

    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
            for i in range(0, speech.size, 16000):  # 3 s of speech in a burst
                await ws.send(speech[i : i + 16000].tobytes())
            mouths, interrupted = [], None
            while interrupted is None or len(mouths) < 25:
                message = await asyncio.wait_for(ws.recv(), 5)
                if isinstance(message, bytes):
                    mouths.append(unpack_frame(message)[0]["mouth"])
                    if len(mouths) == 15 and interrupted is None:
                        await ws.send(json.dumps({"type": "interrupt"}))
                elif json.loads(message)["type"] == "interrupted":
                    interrupted, mouths = json.loads(message), []
            return interrupted, mouths

    interrupted, after = asyncio.run(asyncio.wait_for(run(), 30))
    assert 1500 < interrupted["dropped_ms"] < 3000
    assert max(after[-10:]) < 0.05  # the avatar stopped talking


def test_example_client_runs_as_a_script(server, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "livecache.examples.ws_client", "--url", ws_url(server),
         "--seconds", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "session metrics" in out.stdout and "steady_fps" in out.stdout
    assert len(list(tmp_path.glob("*.jpg"))) > 30
