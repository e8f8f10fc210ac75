"""WebRTC transport (aiortc): the offer/answer exchange and the avatar's paced video and audio tracks.

Both outgoing tracks stamp their frames from the session's media clock (video at 90 kHz, audio at
48 kHz) and read the same audio timeline, so the browser's A/V sync lines the lips up with the sound.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import math

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket
from av import AudioFrame, VideoFrame

from .audio import float_to_pcm16
from .hub import SESSION_FIELDS, SessionHub, session_interaction, session_options
from .schema import Field, validate
from .session import LiveSession, cancel_tasks

VIDEO_CLOCK = 90000
AUDIO_RATE = 48000
AUDIO_PTIME = 0.02
MAX_SDP = 64 * 1024
OFFER = {"type": Field("string", choices=("offer",)), "sdp": Field("string", max_len=MAX_SDP), **SESSION_FIELDS}


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, session: LiveSession) -> None:
        super().__init__()
        self.session = session
        self._frames = session.frames()

    async def recv(self) -> VideoFrame:
        try:
            frame = await anext(self._frames)
        except StopAsyncIteration:
            self.stop()
            raise MediaStreamError from None
        out = VideoFrame.from_ndarray(frame.image, format="rgb24")
        out.pts = round(frame.t * VIDEO_CLOCK)
        out.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.session.delivered(frame)
        return out


class AvatarAudioTrack(MediaStreamTrack):
    """The avatar's voice: the session timeline played out in 20 ms packets on the media clock."""

    kind = "audio"

    def __init__(self, session: LiveSession) -> None:
        super().__init__()
        self.session = session
        self._n: int | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live" or self.session.closed.is_set():
            raise MediaStreamError
        clock = self.session.clock
        if self._n is None:
            self._n = math.ceil(clock.now() / AUDIO_PTIME)
        t = self._n * AUDIO_PTIME
        await clock.sleep_until(t)
        self._n += 1
        src = self.session.audio_out(t, t + AUDIO_PTIME)
        n_out = round(AUDIO_PTIME * AUDIO_RATE)
        # linear interpolation is plenty for 16 kHz speech and costs nothing next to Opus
        up = np.interp(np.arange(n_out) * self.session.audio_rate / AUDIO_RATE, np.arange(src.size), src)
        frame = AudioFrame.from_ndarray(float_to_pcm16(up).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = round(t * AUDIO_RATE)
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        return frame


class _ReleaseAtOnce(JitterBuffer):
    """Hands each audio packet to the decoder on arrival.

    One Opus packet is one whole 20 ms frame, and the session timeline already absorbs jitter, so
    aiortc's default of holding four packets first only adds 80 ms of audio-to-mouth latency.
    """

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]


def _low_latency(receiver: RTCRtpReceiver) -> None:
    """Swap the receiver's (private) audio jitter buffer; aiortc has no option for it. Should the
    attribute ever move, aiortc's default stays and only latency suffers."""
    name = "_RTCRtpReceiver__jitter_buffer"
    if isinstance(getattr(receiver, name, None), JitterBuffer):
        setattr(receiver, name, _ReleaseAtOnce(capacity=16))


async def _consume(track: MediaStreamTrack, session: LiveSession) -> None:
    """Microphone audio from the browser onto the session (the user's voice, or the mirrored speech) until the
    track ends."""
    with contextlib.suppress(MediaStreamError):
        while not session.closed.is_set():
            session.push_frame(await track.recv())


def _validate_offer(body: object) -> dict[str, object]:
    offer = validate(body, OFFER, "the offer")
    if not str(offer["sdp"]).startswith("v=0") or "m=" not in str(offer["sdp"]):
        raise ValueError("malformed SDP offer: expected an SDP document (v=0 ... m=...)")
    return offer


async def _negotiate(pc: RTCPeerConnection, sdp: str, session: LiveSession) -> None:
    """Apply the offer and create the answer; every failure becomes a ValueError for a 400 reply."""
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:  # aiortc raises many types for bad SDP; all mean the same to the client
        raise ValueError(f"malformed SDP offer: {exc}") from None
    kinds = {t.kind for t in pc.getTransceivers()}
    if "video" not in kinds:
        raise ValueError("the offer has no video: add a recvonly video transceiver to receive the avatar")
    # without a microphone the avatar still idles, listens and blinks; an engine that gives no audio (the video
    # engine) sends no audio track, whatever the offer has
    if "audio" in kinds and session.traits.audio:
        pc.addTrack(AvatarAudioTrack(session))
    pc.addTrack(AvatarVideoTrack(session))
    try:
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:
        raise ValueError(f"cannot answer this offer: {exc}") from None


async def answer_offer(hub: SessionHub, body: object) -> dict[str, object]:
    """Open a session for a browser offer and return the answer plus the session's info.

    The session counts against the server's limit from the offer on, so one that does not connect
    (ICE never completes, the client vanished after the answer) is closed after `hub.connect_timeout_s`,
    which also closes its peer connection and releases its UDP sockets.
    """
    offer = _validate_offer(body)
    session = await hub.open(session_options(offer, hub.engine), "webrtc", offer["portrait"], offer["prompt"],  # type: ignore[arg-type]
                             session_interaction(offer))
    pc = RTCPeerConnection()
    tasks: set[asyncio.Task[None]] = set()
    connected = asyncio.Event()

    async def shutdown() -> None:
        await cancel_tasks(tasks)
        await pc.close()

    session.on_close(shutdown)

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            for transceiver in pc.getTransceivers():
                if transceiver.receiver.track is track:
                    _low_latency(transceiver.receiver)
            tasks.add(asyncio.create_task(_consume(track, session)))

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState == "connected":
            session.connected = True
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            await session.close("disconnect")

    async def deadline() -> None:
        try:
            await asyncio.wait_for(connected.wait(), hub.connect_timeout_s)
        except asyncio.TimeoutError:
            await session.close("connect_timeout")

    try:
        await _negotiate(pc, sdp=str(offer["sdp"]), session=session)
    except Exception:
        await session.close("bad_offer")
        raise
    tasks.add(asyncio.create_task(deadline()))
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, **session.info()}
