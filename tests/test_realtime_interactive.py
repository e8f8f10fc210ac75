"""The interactive avatar: two audio roles (the avatar's speech, the user's voice), interruption that silences
the avatar within one frame period, and `say` through espeak-ng. Against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import numpy as np
import pytest
import websockets

from livecache.bench.loopback import spawn_server, ws_url
from livecache.examples.ws_client import unpack_frame
from livecache.pipelines.states import StateTracker
from livecache.pipelines.testsignal import speech_like
from livecache.realtime.audio import AudioTimeline, float_to_pcm16
from livecache.realtime.clock import MediaClock
from livecache.realtime.speech import SpeechUnavailable, check_text, synthesize

RATE = 16000
FPS = 25
PERIOD = 1 / FPS

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def server():
    with spawn_server("--max-sessions", "3") as url:
        yield url


def pcm(seconds: float, seed: int = 0) -> bytes:
    return float_to_pcm16(speech_like(seconds, RATE, seed)).tobytes()


async def start(ws, **options) -> dict:
    await ws.send(json.dumps({"type": "start", "size": 256, "fps": FPS, **options}))
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def next_event(ws, kind: str, frames: list | None = None, timeout_s: float = 5.0) -> dict:
    """The next JSON message of `kind`, keeping the frames that arrive meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        message = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(message, bytes):
            if frames is not None:
                frames.append(unpack_frame(message))
        elif json.loads(message)["type"] == kind:
            return json.loads(message)


async def frames_for(ws, seconds: float) -> list:
    frames: list = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = await asyncio.wait_for(ws.recv(), 5)
        if isinstance(message, bytes):
            frames.append(unpack_frame(message))
    return frames


def test_states_follow_the_two_roles():
    tracker = StateTracker(RATE, follows_user=True)
    voice, quiet = np.full(1024, 0.3, np.float32), np.zeros(1024, np.float32)
    assert tracker.update(0.0, quiet) == "idle"
    tracker.hear_user(0.1, voice)
    assert tracker.update(0.1, quiet) == "listening"  # the user talks, the avatar is silent
    assert tracker.update(0.2, voice) == "speaking"  # the avatar speaks (over the user)
    tracker.hear_user(0.25, voice)
    assert tracker.barge_in(0.25)  # the user has been talking for 0.15 s while the avatar speaks
    tracker.silence(0.25)  # the interruption
    assert tracker.update(0.26, quiet) == "listening" and not tracker.barge_in(0.26)
    assert tracker.update(1.0, quiet) == "idle"  # neither talks
    mirror = StateTracker(RATE)  # one stream: listening is the while after the avatar stopped
    mirror.update(0.0, voice)
    assert mirror.update(1.0, quiet) == "listening" and mirror.update(4.0, quiet) == "idle"


def test_a_flush_cuts_the_timeline_at_now_and_silences_what_straddles_it():
    clock = MediaClock(start=time.monotonic() - 1.0)
    timeline = AudioTimeline(clock, RATE, delay_s=0.04)
    timeline.push(np.full(RATE, 0.5, np.float32))  # 1 s queued from now + 40 ms
    time.sleep(0.1)
    cut = clock.now()
    assert 0.85 < timeline.flush() < 0.97  # the playout delay's worth goes too
    assert np.all(timeline.read(cut - 0.08, cut + 0.5) == 0.0)  # also the played audio a late window would read
    assert timeline.arrival_of(cut) is None


def test_say_text_is_bounded_and_a_missing_espeak_is_named():
    with pytest.raises(ValueError, match="must not be empty"):
        check_text("   ")
    with pytest.raises(ValueError, match="the limit is 300"):
        check_text("a" * 301)
    with pytest.raises(SpeechUnavailable, match="apt-get install no-such-espeak"):
        asyncio.run(synthesize("hello", binary="no-such-espeak"))


def test_interrupt_closes_the_mouth_and_silences_audio_within_one_frame(server):
    """Speech sent ahead of real time, interrupted mid-word: no frame from the cut on shows an open mouth or
    carries the avatar's voice, and the session reports the latency it measured."""

    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            ready = await start(ws, mode="interactive")
            assert ready["mode"] == "interactive" and ready["auto_interrupt"] is False
            speech = pcm(3.0)
            for i in range(0, len(speech), 32000):
                await ws.send(speech[i : i + 32000])
            before = await frames_for(ws, 1.2)
            await ws.send(json.dumps({"type": "interrupt"}))
            after: list = []
            event = await next_event(ws, "interrupted", after)
            after += await frames_for(ws, 0.6)
            await ws.send(json.dumps({"type": "stats"}))
            return before, event, after, await next_event(ws, "stats")

    before, event, after, stats = asyncio.run(asyncio.wait_for(run(), 30))
    assert max(h["mouth"] for h, _, _ in before) > 0.3 and before[-1][0]["state"] == "speaking"
    assert 1200 < event["dropped_ms"] < 2000 and event["auto"] is False
    cut = event["at"]
    late = [h for h, _, _ in after if h["pts"] >= cut]
    assert len(late) > 10
    assert all(h["mouth"] <= 0.05 for h in late), [(h["pts"] - cut, h["mouth"]) for h in late[:4]]
    assert all(h["state"] != "speaking" for h in late)
    for header, _, audio in after:  # every sample from the cut on is silence
        samples = np.frombuffer(audio, "<i2")
        times = header["audio_pts"] + np.arange(samples.size) / header["audio_rate"]
        assert not np.any(samples[times >= cut]), header
    assert stats["interrupts"] == 1 and 0 < stats["interrupt_latency_ms"] < 1000 * PERIOD + 100


def test_the_user_talking_over_the_avatar_interrupts_it(server):
    """Interactive with auto_interrupt: the avatar speaks an agent's audio, the user's voice (tagged) starts,
    the server interrupts on its own and tells the agent; the avatar then listens."""

    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await start(ws, mode="interactive", auto_interrupt=True)
            speech = pcm(4.0)  # 4 s of the avatar's speech, untagged: the default role
            for i in range(0, len(speech), 32000):
                await ws.send(speech[i : i + 32000])
            frames = await frames_for(ws, 1.0)
            user = pcm(1.5, seed=3)
            sent = time.monotonic()
            events: list = []

            async def talk():
                for i in range(0, len(user), 640):  # 20 ms chunks in real time, tagged as the user's voice
                    await ws.send(b"u" + user[i : i + 640])
                    await asyncio.sleep(0.02)

            talker = asyncio.create_task(talk())
            while time.monotonic() - sent < 1.5:
                message = await asyncio.wait_for(ws.recv(), 5)
                if isinstance(message, bytes):
                    frames.append(unpack_frame(message))
                elif json.loads(message)["type"] == "interrupted":
                    events.append((time.monotonic() - sent, json.loads(message)))
            await talker
            return frames, events

    frames, events = asyncio.run(asyncio.wait_for(run(), 30))
    assert len(events) == 1, events
    delay, event = events[0]
    assert event["auto"] is True and event["dropped_ms"] > 1500 and delay < 0.5
    states = [h["state"] for h, _, _ in frames]
    assert states.index("speaking") < states.index("listening")
    later = [h for h, _, _ in frames if h["pts"] >= event["at"] + 0.3]
    assert later and all(h["state"] == "listening" and h["mouth"] <= 0.05 for h in later)


def test_audio_roles_and_modes_are_checked(server):
    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"type": "start", "auto_interrupt": True}))
            refused = await next_event(ws, "error")
            await start(ws)  # the mirror mode of before
            replies = []
            for message in (b"u" + pcm(0.02), b"x" + pcm(0.02), json.dumps({"type": "say", "text": "hi"})):
                await ws.send(message)
                replies.append(await next_event(ws, "error"))
            return refused, replies

    refused, (user_in_mirror, bad_tag, say_in_mirror) = asyncio.run(asyncio.wait_for(run(), 20))
    assert refused["code"] == "bad_option" and refused["field"] == "auto_interrupt"
    assert user_in_mirror["code"] == "bad_audio" and "interactive" in user_in_mirror["message"]
    assert bad_tag["code"] == "bad_audio" and "role byte" in bad_tag["message"]
    assert say_in_mirror["code"] == "bad_say" and "interactive" in say_in_mirror["message"]


@needs_espeak
def test_say_speaks_through_espeak_and_the_mouth_moves(server):
    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await start(ws, mode="interactive")
            await ws.send(json.dumps({"type": "say", "text": "Hello, I am your avatar. How can I help you today?"}))
            frames: list = []
            spoken = await next_event(ws, "say", frames, timeout_s=15)
            frames += await frames_for(ws, 2.0)
            await ws.send(json.dumps({"type": "say", "text": " " * 5}))
            return spoken, frames, await next_event(ws, "error")

    spoken, frames, empty = asyncio.run(asyncio.wait_for(run(), 40))
    assert spoken["duration_ms"] > 1500
    talking = [h for h, _, audio in frames if h["pts"] >= spoken["at"] + 0.2]
    assert talking and max(h["mouth"] for h in talking) > 0.3
    assert "speaking" in {h["state"] for h in talking}
    assert sum(len(audio) for h, _, audio in frames if h["pts"] > spoken["at"]) > 0
    assert empty["code"] == "bad_say" and empty["field"] == "text"


def test_say_without_espeak_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the server process finds no espeak-ng

    async def run(url):
        async with websockets.connect(ws_url(url)) as ws:
            await start(ws, mode="interactive")
            await ws.send(json.dumps({"type": "say", "text": "hello"}))
            return await next_event(ws, "error")

    with spawn_server() as url:
        error = asyncio.run(asyncio.wait_for(run(url), 20))
    assert error["code"] == "tts_unavailable" and "espeak-ng" in error["message"]


def test_a_forced_state_is_announced_once_and_auto_does_not_flicker(server):
    """Old behaviour: the reply to a `state` message announced the state and the first frame in it announced it
    again; after "auto" the reply named the state pinned until then (listening) and the next frame idle."""

    async def states_after(ws, message: dict | None, seconds: float) -> list[dict]:
        if message is not None:
            await ws.send(json.dumps(message))
        seen, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            reply = await asyncio.wait_for(ws.recv(), 5)
            if isinstance(reply, str) and json.loads(reply)["type"] == "state":
                seen.append(json.loads(reply))
        return seen

    async def run():
        async with websockets.connect(ws_url(server)) as ws:
            await start(ws)  # no audio: voice activity says idle
            first = await states_after(ws, None, 0.5)
            pinned = await states_after(ws, {"type": "state", "state": "listening"}, 0.5)
            released = await states_after(ws, {"type": "state", "state": "auto"}, 0.5)
            return first, pinned, released

    first, pinned, released = asyncio.run(asyncio.wait_for(run(), 20))
    assert first == [{"type": "state", "state": "idle", "forced": None}]
    assert pinned == [{"type": "state", "state": "listening", "forced": "listening"}]
    assert released == [{"type": "state", "state": "idle", "forced": None}]


def test_auto_names_the_state_voice_activity_gives_now():
    tracker = StateTracker(RATE)
    quiet = np.zeros(1024, np.float32)
    tracker.update(0.0, np.full(1024, 0.3, np.float32))
    assert tracker.force("listening", 0.1) == "listening" and tracker.update(0.2, quiet) == "listening"
    assert tracker.force("auto", 5.0) == "idle"  # 5 s after the avatar spoke: idle, not the pinned listening
    assert tracker.forced is None and tracker.update(5.04, quiet) == "idle"


def test_webrtc_voice_is_silent_from_the_cut_on():
    """The WebRTC audio track of an interactive session: 20 ms packets carry the avatar's speech until the
    interruption, and no packet from the cut's media time on carries any of it (counted in packets)."""
    from livecache.realtime.engines import create_engine
    from livecache.realtime.engines.base import SessionOptions
    from livecache.realtime.hub import SessionHub
    from livecache.realtime.session import Interaction
    from livecache.realtime.webrtc import AUDIO_PTIME, AvatarAudioTrack

    async def run():
        hub = SessionHub(create_engine("embedded"))
        try:
            session = await hub.open(SessionOptions(size=256), "webrtc", interaction=Interaction("interactive"))
            session.push_pcm16(np.frombuffer(pcm(2.0), "<i2"), RATE)  # the agent's speech, ahead of real time
            track = AvatarAudioTrack(session)
            before = [await track.recv() for _ in range(15)]
            event = await session.interrupt()
            after = [await track.recv() for _ in range(15)]
            await session.close("api")
            return before, event, after
        finally:
            await hub.close()

    before, event, after = asyncio.run(asyncio.wait_for(run(), 20))
    assert any(np.abs(f.to_ndarray()).max() > 1000 for f in before)  # it was speaking
    cut = event["at"]
    late = [f for f in after if float(f.pts * f.time_base) >= cut - AUDIO_PTIME]  # every packet that ends after it
    assert len(late) >= 14
    assert all(not np.any(f.to_ndarray()) for f in late), [np.abs(f.to_ndarray()).max() for f in late]
