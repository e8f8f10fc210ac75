"""Loopback clients on 127.0.0.1: a server subprocess and an aiortc WebRTC client.

`livecache bench realtime` and the tests drive real sessions through these, the same way a remote user
would: over TCP on 127.0.0.1, with the server in its own process (so it has its own interpreter lock, as
in production) and the client timing what it receives. The server is started as a command, never
imported: benches measure what a user runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from av import AudioFrame

from ..examples.ws_client import to_pcm16

RTC_RATE = 48000
PTIME = 0.02
DARK_LUMA = 70


def mouth_openness(rgb: np.ndarray, box: list[int] | tuple[int, ...]) -> float:
    """Fraction of dark pixels (the open mouth's cavity) in the mouth box; ~0 when the lips are closed.

    Read from decoded pixels, it checks what the client actually sees, independent of server reports.
    """
    x, y, w, h = box
    crop = rgb[y : y + h, x : x + w].astype(np.float32)
    luma = crop @ np.array([0.299, 0.587, 0.114], np.float32)
    return float((luma < DARK_LUMA).mean())


def ws_url(base: str) -> str:
    """The websocket endpoint of the server at `base` (http → ws, https → wss)."""
    return re.sub(r"^http", "ws", base.rstrip("/")) + "/ws"


@contextlib.contextmanager
def spawn_server(*args: str, timeout_s: float = 60.0) -> Iterator[str]:
    """Run `livecache serve --port 0 ARGS` in a subprocess; yields its base URL, stops it with SIGINT."""
    proc = subprocess.Popen([sys.executable, "-m", "livecache.realtime.cli", "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True)
    try:
        match, line = None, ""
        for line in proc.stdout if proc.stdout else ():  # with --ray, Ray may print before the server's line
            if (match := re.search(r"(https?://[\d.]+:\d+)/", line)) is not None:
                break
        if match is None:
            raise RuntimeError(f"server did not start: {line!r}")
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGINT)  # the same clean shutdown as Ctrl-C
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ArrayAudioTrack(MediaStreamTrack):
    """Plays float audio (48 kHz) as a microphone would: 20 ms frames paced by timestamps, then silence."""

    kind = "audio"

    def __init__(self, audio: np.ndarray) -> None:
        super().__init__()
        self.audio = to_pcm16(audio)
        self.started: float | None = None
        self._n = 0

    async def recv(self) -> AudioFrame:
        if self.started is None:
            self.started = time.monotonic()
        step = int(PTIME * RTC_RATE)
        delay = self.started + self._n * PTIME - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = self.audio[self._n * step : (self._n + 1) * step]
        chunk = np.pad(chunk, (0, step - chunk.size))
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RTC_RATE
        frame.pts = self._n * step
        frame.time_base = fractions.Fraction(1, RTC_RATE)
        self._n += 1
        return frame


@dataclass
class RtcResult:
    """What one WebRTC client saw; times are `time.monotonic()` seconds."""

    offered: float = 0.0
    info: dict = field(default_factory=dict)
    frames: list[tuple[float, float]] = field(default_factory=list)  # (received, measure(rgb, mouth box))
    media: list[float] = field(default_factory=list)  # each frame's RTP time in seconds (an arbitrary origin)
    audio_started: float | None = None
    stats: dict = field(default_factory=dict)


async def rtc_session(base_url: str, audio: np.ndarray, seconds: float, options: dict | None = None,
                      measure: Callable[[np.ndarray, list[int]], float] = mouth_openness) -> RtcResult:
    """One WebRTC session: offer with `audio` as the microphone, receive video for `seconds`, stop.

    Each decoded frame is reduced to `measure(rgb, mouth_box)` on arrival (by default the dark-pixel mouth
    openness), so a long session keeps no pictures."""
    result = RtcResult(offered=time.monotonic())
    pc = RTCPeerConnection()
    mic = ArrayAudioTrack(audio)
    pc.addTrack(mic)
    pc.addTransceiver("video", direction="recvonly")
    video: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "video" and not video.done():
            video.set_result(track)

    try:
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", **(options or {})}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base_url}/api/offer", json=body) as res:
                answer = await res.json()
                if res.status != 200:
                    raise RuntimeError(answer.get("error", res.reason))
            result.info = answer
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            track = await asyncio.wait_for(video, 10)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                frame = await asyncio.wait_for(track.recv(), 5)
                rgb = frame.to_ndarray(format="rgb24")
                result.frames.append((time.monotonic(), measure(rgb, answer["mouth_box"])))
                result.media.append(float(frame.pts * frame.time_base))
            result.audio_started = mic.started
            async with http.get(f"{base_url}/api/sessions/{answer['session']}") as res:
                result.stats = await res.json()
            async with http.post(f"{base_url}/api/sessions/{answer['session']}/stop") as res:
                await res.read()
    finally:
        await pc.close()
    return result
