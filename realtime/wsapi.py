"""The websocket streaming API: JSON control messages, PCM16 audio in, JPEG frames (with their audio) out.

One connection carries one session. A binary audio message is PCM16 (an even number of bytes) for the default
role — the avatar's speech — or, tagged, one role byte (`AUDIO_TAGS`) followed by PCM16 (so an odd number of
bytes, which untagged audio never has: clients from before the roles keep working unchanged).

The protocol is specified in docs/realtime-protocol.md; the framing of an
outgoing frame message is `pack_frame` below. A slow client never grows server memory: at most
`SEND_QUEUE` frames (plus a bounded socket buffer) wait for it, older ones are dropped and counted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import socket
import struct

import cv2
import numpy as np
from aiohttp import WSMsgType, web

from .audio import INPUT_RATES, float_to_pcm16
from .engines.base import STATES, RenderedFrame
from .hub import (
    CONDITION_FIELDS,
    SESSION_FIELDS,
    LimitError,
    SessionHub,
    condition_value,
    session_interaction,
    session_options,
)
from .portrait import MAX_UPLOAD_BYTES, PortraitError
from .schema import Field, Schema, SchemaError, validate
from .session import LiveSession, cancel_tasks
from .speech import MAX_SAY_CHARS, SpeechUnavailable

MAX_MESSAGE = 8 * 1024 * 1024  # hard cap (the connection is closed with 1009 above it)
MAX_AUDIO_MESSAGE = 64 * 1024  # one binary audio chunk; larger chunks are refused with an error
SEND_QUEUE = 2
MAX_FRAME_AUDIO_S = 1.0  # a frame carries the audio since the previous one sent, at most this much (after drops)
SEND_BUFFER = 256 * 1024  # about half a second of 512x512 JPEG frames
STATS_EVERY_S = 1.0
AUDIO_TAGS = {ord("a"): "avatar", ord("u"): "user"}  # first byte of a tagged (odd-length) audio message
SAY_FIELDS = {"text": Field("string", max_len=4 * MAX_SAY_CHARS, code="bad_say")}  # checked again, stripped

_TYPE = {"type": Field("string")}
# message type -> (its fields, the error code for a bad field unless the field names its own)
MESSAGES: dict[str, tuple[Schema, str]] = {
    "start": ({**_TYPE, **SESSION_FIELDS,
               "sample_rate": Field("integer", 16000, choices=INPUT_RATES, code="bad_sample_rate"),
               "jpeg_quality": Field("integer", 80, low=10, high=95),
               "portrait_b64": Field("string", None, max_len=4 * (MAX_UPLOAD_BYTES // 3 + 1), code="bad_portrait")},
              "bad_option"),
    "state": ({**_TYPE, "state": Field("string", choices=(*STATES, "auto"))}, "bad_state"),
    "condition": ({**_TYPE, **CONDITION_FIELDS}, "bad_condition"),  # the engine reads the prompt
    "interrupt": (_TYPE, "bad_message"),
    "say": ({**_TYPE, **SAY_FIELDS}, "bad_say"),
    "stats": (_TYPE, "bad_message"),
    "stop": (_TYPE, "bad_message"),
}
# how the connection closes after its session ends, by end reason (1000 normal, 1001 going away, 1011 error)
CLOSE_CODES = {"shutdown": 1001, "engine_error": 1011}


def pack_frame(header: dict[str, object], jpeg: bytes, pcm: bytes) -> bytes:
    """[u32 big-endian header length][header JSON][JPEG bytes][PCM16 LE mono bytes]."""
    head = json.dumps({**header, "jpeg": len(jpeg), "audio": len(pcm)}, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + jpeg + pcm


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def frame_header(session: LiveSession, frame: RenderedFrame, seq: int, audio_pts: float) -> dict[str, object]:
    """A frame's header: `state` only from engines with states, `mouth` only from engines with a mouth."""
    header: dict[str, object] = {"type": "frame", "seq": seq, "pts": round(frame.t, 6),
                                 "audio_pts": round(audio_pts, 6), "audio_rate": session.audio_rate}
    if session.traits.states:
        header["state"] = frame.state
    if frame.mouth is not None:
        header["mouth"] = round(frame.mouth, 3)
    return header


class ProtocolError(ValueError):
    """A client message broke the protocol; reported as an error message, the connection stays open."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def parse_message(text: str) -> dict[str, object]:
    """A control message checked against its type's schema (defaults filled in), or ProtocolError."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:  # syntax errors, 5000-digit numbers, [[[[... nesting
        raise ProtocolError("bad_json", f"control messages must be JSON objects: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'control messages are JSON objects with a string "type"', "type")
    kind = message["type"]
    if kind not in MESSAGES:
        raise ProtocolError("bad_type", f"unknown type {kind[:40]!r}; use {', '.join(MESSAGES)}", "type")
    schema, code = MESSAGES[kind]
    try:
        return validate(message, schema, f'a "{kind}" message')
    except SchemaError as exc:
        raise ProtocolError(exc.code or code, str(exc), exc.field) from None


class Connection:
    """One websocket client: control handling, audio intake, and the frame sender with drop-oldest.

    Every send goes through `_send`, which treats a client that has gone as the end of its session
    instead of an error; every way the session ends goes through `LiveSession.close`, whose closer
    registered here (`_session_ended`) stops the tasks, tells the client why and closes the connection.
    """

    def __init__(self, ws: web.WebSocketResponse, hub: SessionHub) -> None:
        self.ws = ws
        self.hub = hub
        self.session: LiveSession | None = None
        self.sample_rate = 16000
        self.quality = 80
        self._send_lock = asyncio.Lock()
        self._queue: asyncio.Queue[RenderedFrame] = asyncio.Queue(SEND_QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self._notices: set[asyncio.Task[bool]] = set()  # messages sent without the sender waiting (auto interrupts)
        # the state last announced and the media time it took effect: frames rendered before a `state` reply still
        # carry the old state, and announcing them would flip the client back and forth (and announce twice)
        self._announced: object = None
        self._announced_at = float("-inf")

    async def _send(self, data: str | bytes) -> bool:
        """Send to a client that may have gone; False (never an exception) when it has."""
        if self.ws.closed:
            return False
        try:
            async with self._send_lock:
                if isinstance(data, str):
                    await self.ws.send_str(data)
                else:
                    await self.ws.send_bytes(data)
        except ConnectionError:  # reset or closing transport: the reader sees the disconnect and ends the session
            return False
        return True

    async def send_json(self, message: dict[str, object]) -> bool:
        return await self._send(json.dumps(message))

    async def error(self, code: str, message: str, field: str | None = None) -> bool:
        event: dict[str, object] = {"type": "error", "code": code, "message": message}
        if field is not None:
            event["field"] = field
        return await self.send_json(event)

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                try:
                    if msg.type == WSMsgType.TEXT:
                        await self._control(parse_message(msg.data))
                    elif msg.type == WSMsgType.BINARY:
                        self._audio(msg.data)
                    elif msg.type == WSMsgType.ERROR:
                        break
                except ProtocolError as exc:
                    await self.error(exc.code, str(exc), exc.field)
        finally:
            if self.session is not None:
                await self.session.close("disconnect")

    async def _control(self, message: dict[str, object]) -> None:
        kind = message["type"]
        if kind == "start":
            await self._start(message)
        elif kind == "stop":
            if self.session is not None:
                await self.session.close("client")
            else:
                await self.ws.close()
        elif self.session is None:
            raise ProtocolError("no_session", f'"{kind}" needs a session: send {{"type": "start"}} first')
        elif kind == "state":
            try:
                applied = await self.session.force_state(str(message["state"]))
            except ValueError as exc:
                raise ProtocolError("bad_state", str(exc), "state") from None
            self._announced, self._announced_at = applied["state"], self.session.clock.now()
            await self.send_json({"type": "state", **applied})
        elif kind == "interrupt":
            await self.send_json({"type": "interrupted", **await self.session.interrupt()})
        elif kind == "say":
            try:
                spoken = await self.session.say(str(message["text"]))
            except SpeechUnavailable as exc:
                raise ProtocolError("tts_unavailable", str(exc)) from None
            except ValueError as exc:
                raise ProtocolError("bad_say", str(exc), "text") from None
            await self.send_json({"type": "say", **spoken})
        elif kind == "stats":
            await self.send_json({"type": "stats", **self.session.stats()})
        elif kind == "condition":
            try:
                applied = await self.session.condition(condition_value(message))
            except SchemaError as exc:
                raise ProtocolError("bad_condition", str(exc), exc.field) from None
            except ValueError as exc:
                raise ProtocolError("bad_condition", str(exc)) from None
            await self.send_json({"type": "condition", **applied})

    async def _start(self, message: dict[str, object]) -> None:
        if self.session is not None:
            raise ProtocolError("already_started", "this connection already has a session; open another one")
        portrait: str | bytes | None = message["portrait"]  # type: ignore[assignment] - validated
        if message["portrait_b64"] is not None:
            try:
                portrait = base64.b64decode(str(message["portrait_b64"]), validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError("bad_portrait", "portrait_b64 is not valid base64", "portrait_b64") from None
        try:
            options = session_options(message, self.hub.engine)
            session = await self.hub.open(options, "websocket", portrait, message["prompt"],
                                          session_interaction(message))
        except LimitError as exc:
            raise ProtocolError("busy", str(exc)) from None
        except SchemaError as exc:  # the wrong kind of source for this engine, or a prompt it cannot read
            raise ProtocolError(exc.code or "bad_option", str(exc), exc.field) from None
        except PortraitError as exc:
            field = "portrait_b64" if isinstance(portrait, bytes) else "portrait"
            raise ProtocolError("bad_portrait", str(exc), field) from None
        except ValueError as exc:
            raise ProtocolError("bad_option", str(exc)) from None
        self.session = session
        session.on_close(self._session_ended)
        session.on_auto_interrupt(self._auto_interrupted)
        self.sample_rate, self.quality = int(message["sample_rate"]), int(message["jpeg_quality"])
        if not await self.send_json({"type": "ready", **session.info()}):
            await session.close("disconnect")  # the client left while its session was being prepared
            return
        self._tasks = [asyncio.create_task(t) for t in (self._produce(), self._send_frames(), self._report())]

    async def _session_ended(self) -> None:
        """This connection's half of ending a session, whoever ended it: no frame or stats after `stopped`."""
        session, self.session = self.session, None
        await cancel_tasks([*self._tasks, *self._notices])
        self._tasks = []
        if session is None:
            return
        reason = str(session.end_reason)
        await self.send_json({"type": "stopped", "reason": reason, **session.stats()})
        if not self.ws.closed:
            await self.ws.close(code=CLOSE_CODES.get(reason, 1000), message=f"session ended: {reason}".encode())

    def _auto_interrupted(self, event: dict[str, object]) -> None:
        """The user's voice cut the avatar off: tell the client (an agent stops its speech), without holding up
        the frame loop that noticed it."""
        task = asyncio.create_task(self.send_json({"type": "interrupted", **event}))
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    def _audio(self, data: bytes) -> None:
        if self.session is None:
            raise ProtocolError("no_session", 'send {"type": "start"} before audio')
        if len(data) > MAX_AUDIO_MESSAGE:
            raise ProtocolError("too_large", f"audio chunk of {len(data)} bytes exceeds {MAX_AUDIO_MESSAGE}; "
                                "send chunks of 20-100 ms")
        role = "avatar"
        if len(data) % 2:
            if data[0] not in AUDIO_TAGS:
                raise ProtocolError("bad_audio", "audio must be PCM16 little-endian mono (an even number of bytes), "
                                    "or one role byte (a: the avatar's speech, u: the user's voice) and PCM16")
            role, data = AUDIO_TAGS[data[0]], data[1:]
        if data:
            try:
                self.session.push_pcm16(np.frombuffer(data, "<i2"), self.sample_rate, role)
            except ValueError as exc:
                raise ProtocolError("bad_audio", str(exc)) from None

    async def _produce(self) -> None:
        session = self.session
        assert session is not None
        try:
            async for frame in session.frames():
                if self._queue.full():  # the client is not keeping up: drop the oldest, never buffer more
                    self._queue.get_nowait()
                    session.frame_dropped()
                self._queue.put_nowait(frame)
        except Exception as exc:  # an engine failure ends the session with a reason instead of silence
            await self.error("engine_error", f"rendering failed: {exc}")
            await session.close("engine_error")

    async def _send_frames(self) -> None:
        session = self.session
        assert session is not None
        audio_t, seq = 0.0, 0
        while True:
            frame = await self._queue.get()
            jpeg = await session.offload(encode_jpeg, frame.image, self.quality)
            start = max(audio_t, frame.t - MAX_FRAME_AUDIO_S)
            pcm = float_to_pcm16(session.audio_out(start, frame.t)).tobytes()
            audio_t = frame.t
            seq += 1
            header = frame_header(session, frame, seq, start if pcm else frame.t)
            if not await self._send(pack_frame(header, jpeg, pcm)):
                return
            session.delivered(frame)
            if session.traits.states and frame.t >= self._announced_at and frame.state != self._announced:
                self._announced = frame.state
                await self.send_json({"type": "state", "state": frame.state, "forced": session.forced})

    async def _report(self) -> None:
        session = self.session
        assert session is not None
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            if not await self.send_json({"type": "stats", **session.stats()}):
                return


async def handle(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:  # bound the kernel's queue too: stale frames there are latency, not smoothness
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    hub: SessionHub = request.app["hub"]
    connection = Connection(ws, hub)
    request.app["connections"].add(connection)
    try:
        await connection.run()
    finally:
        request.app["connections"].discard(connection)
    return ws
