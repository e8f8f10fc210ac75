"""The engine-neutral interface: engines say what they take and give, sessions open from typed sources, and every
control (state, interrupt, condition) reaches the engine through the live session on the engine's worker threads,
never on the event loop and never while that session's frame is rendering."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import pytest
import websockets

from livecache.bench.loopback import ws_url
from livecache.pipelines.portrait import default_portrait
from livecache.realtime.engines import create_engine
from livecache.realtime.engines.base import (
    Condition,
    EngineTraits,
    ForceState,
    Interrupt,
    PortraitSource,
    PromptSource,
    SessionOptions,
)
from livecache.realtime.engines.embedded import EmbeddedEngine, EmbeddedSession


class SpySession(EmbeddedSession):
    """Records the thread of every engine call and whether a control ever overlapped this session's render."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rendering = False
        self.calls: list[tuple[str, str, bool]] = []  # (what, thread name, a render was in progress)

    def render(self, req, rate):
        self.rendering = True
        try:
            time.sleep(0.004)  # long enough that a control arriving mid-render would land inside it
            return super().render(req, rate)
        finally:
            self.rendering = False

    def control(self, control):
        self.calls.append((type(control).__name__, threading.current_thread().name, self.rendering))
        if isinstance(control, Condition):
            return {"condition": control.value}
        return super().control(control)

    def close(self) -> None:
        self.calls.append(("close", threading.current_thread().name, self.rendering))


class SpyEngine(EmbeddedEngine):
    traits = EngineTraits(takes="portrait", states=True, mouth=True, audio=True, conditions=("calm", "lively"))
    session_class = SpySession


def test_engines_describe_what_they_take_and_give():
    assert create_engine("embedded").traits == EngineTraits("portrait", states=True, mouth=True, audio=True)
    video = create_engine("video")
    assert video.traits.takes == "prompt" and not (video.traits.states or video.traits.mouth or video.traits.audio)
    assert len(video.traits.conditions) == 12 and video.traits.as_json()["conditions"][11] == "texture"


def test_sessions_open_from_the_source_the_engine_takes():
    embedded, video = create_engine("embedded"), create_engine("video")
    avatar = embedded.open(PortraitSource(default_portrait(256)), SessionOptions(size=256))
    assert len(avatar.describe()["mouth_box"]) == 4
    with pytest.raises(ValueError, match="takes a portrait, not a prompt"):
        embedded.open(PromptSource("7"), SessionOptions())
    stream = video.open(PromptSource("texture"), SessionOptions(size=256))
    assert stream.describe() == {"condition": {"class": 11, "name": "texture"}} and stream.mouth_box is None
    with pytest.raises(ValueError, match="takes a prompt"):
        video.open(PortraitSource(default_portrait(256)), SessionOptions())
    with pytest.raises(ValueError, match="cannot read 'a cat'"):
        video.open(PromptSource("a cat"), SessionOptions())
    assert stream.control(Condition(3)) == {"class": 3, "name": "digit 3"}
    assert stream.control(Interrupt()) == {} and stream.control(ForceState(None)) == {}
    with pytest.raises(ValueError, match="takes no condition"):
        avatar.control(Condition("7"))


def test_controls_run_on_the_worker_in_turn_with_the_sessions_frames(monkeypatch):
    from livecache.realtime import server as server_module

    engine = SpyEngine()
    monkeypatch.setattr(server_module, "create_engine", lambda name, **options: engine)
    sessions: list[SpySession] = []
    original_open = engine.open
    monkeypatch.setattr(engine, "open", lambda source, options: sessions.append(original_open(source, options))
                        or sessions[-1])

    async def run():
        live = await server_module.LiveServer().start()
        loop_thread = threading.current_thread().name
        try:
            async with websockets.connect(ws_url(live.url)) as ws:
                await ws.send(json.dumps({"type": "start", "size": 256}))
                ready = json.loads(await ws.recv())
                replies = []
                for k in range(8):
                    await ws.send(json.dumps({"type": "condition", "prompt": f"calm {k}"}))
                    await ws.send(json.dumps({"type": "state", "state": "listening" if k % 2 else "auto"}))
                    await ws.send(json.dumps({"type": "interrupt"}))
                async with aiohttp.ClientSession() as http:
                    url = f"{live.url}/api/sessions/{ready['session']}"
                    async with http.post(url + "/condition", json={"class": 1}) as res:
                        http_condition = (res.status, await res.json())
                    async with http.post(url + "/state", json={"state": "idle"}) as res:
                        http_state = res.status
                while len(replies) < 16:  # 8 condition and 8 interrupted replies (state events also follow frames)
                    message = await asyncio.wait_for(ws.recv(), 10)
                    if isinstance(message, str) and json.loads(message)["type"] in ("condition", "interrupted"):
                        replies.append(json.loads(message))
                await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(ws.wait_closed(), 10)
        finally:
            await live.stop()
        return loop_thread, replies, http_condition, http_state

    loop_thread, replies, http_condition, http_state = asyncio.run(run())
    assert http_condition == (200, {"condition": 1}) and http_state == 200
    assert [r["condition"] for r in replies if r["type"] == "condition"] == [f"calm {k}" for k in range(8)]
    calls = [c for s in sessions for c in s.calls]
    kinds = [what for what, _, _ in calls]
    assert kinds.count("Condition") == 9 and kinds.count("ForceState") == 9 and kinds.count("Interrupt") == 8
    assert kinds.count("close") >= 1
    assert all(thread.startswith("lc-") and thread != loop_thread for _, thread, _ in calls)
    assert not any(during_render for _, _, during_render in calls)


def test_a_condition_the_engine_refuses_is_named_and_the_session_goes_on(monkeypatch):
    """The embedded avatar takes no condition and no prompt: the client hears why, with the field."""
    from livecache.realtime import server as server_module

    async def run():
        live = await server_module.LiveServer().start()
        try:
            async with websockets.connect(ws_url(live.url)) as ws:
                await ws.send(json.dumps({"type": "start", "size": 256, "prompt": "7"}))
                refused_start = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "start", "size": 256}))
                assert json.loads(await ws.recv())["type"] == "ready"
                answers = []
                for message in ({"type": "condition", "prompt": "7"}, {"type": "condition"},
                                {"type": "condition", "prompt": "7", "class": 7},
                                {"type": "condition", "prompt": "7", "colour": "red"}):
                    await ws.send(json.dumps(message))
                    while True:
                        event = json.loads(m) if isinstance(m := await asyncio.wait_for(ws.recv(), 5), str) else {}
                        if event.get("type") == "error":
                            answers.append(event)
                            break
                async with aiohttp.ClientSession() as http:
                    async with http.get(live.url + "/api/info") as res:
                        info = await res.json()
                return refused_start, answers, info, len(live.hub.sessions)
        finally:
            await live.stop()

    refused_start, answers, info, open_sessions = asyncio.run(run())
    assert refused_start["code"] == "bad_option" and refused_start["field"] == "prompt"
    assert "takes a portrait, not a prompt" in refused_start["message"]
    assert [a["code"] for a in answers] == ["bad_condition"] * 4
    assert "takes no condition" in answers[0]["message"]
    assert "neither" in answers[1]["message"] and "prompt and class" in answers[2]["message"]
    assert answers[3]["field"] == "colour"
    assert info["capabilities"] == {"takes": "portrait", "states": True, "mouth": True, "audio": True,
                                    "conditions": []}
    assert open_sessions == 1


@pytest.mark.parametrize(("engine", "sends_audio"), [("embedded", True), ("video", False)])
def test_webrtc_answer_sends_audio_only_from_engines_that_give_it(engine, sends_audio):
    from aiortc import RTCPeerConnection

    from livecache.realtime.server import LiveServer

    async def run() -> str:
        live = await LiveServer(engine=engine).start()
        pc = RTCPeerConnection()
        try:
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with aiohttp.ClientSession() as http:
                async with http.post(live.url + "/api/offer", json={"type": "offer", "sdp": pc.localDescription.sdp,
                                                                    "size": 256}) as res:
                    answer = await res.json()
            await http_stop(live.url, answer["session"])
            return answer["sdp"]
        finally:
            await pc.close()
            await live.stop()

    audio_section = asyncio.run(run()).split("m=audio", 1)[1].split("m=video", 1)[0]
    assert ("a=sendonly" in audio_section) == sends_audio and ("a=inactive" in audio_section) != sends_audio


async def http_stop(url: str, session: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/sessions/{session}/stop") as res:
            assert res.status == 200
