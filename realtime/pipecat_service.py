"""A pipecat video service backed by a LiveCache session: the avatar of a pipecat voice agent.

It sits where pipecat's hosted-avatar services sit (after the TTS, before the output transport) and talks to
`livecache serve` over the websocket API (docs/realtime-protocol.md) as one `interactive` session:

* `TTSAudioRawFrame` → the avatar's speech (tagged `a` audio, sent as fast as the TTS makes it: the server
  buffers up to 20 s of speech ahead and plays it on its media clock). The TTS frames stop here; the avatar's
  own audio replaces them, so voice and lips leave the service on one clock.
* `InputAudioRawFrame` (the user's microphone, when `forward_user_audio`) → the user's voice (tagged `u`),
  which drives the avatar's listening state; it is passed on too, since the STT needs it.
* `InterruptionFrame` → `{"type": "interrupt"}`: the server drops the speech not yet played and closes the
  mouth from the next frame on.
* every video frame the server sends → an `OutputImageRawFrame` (RGB) followed by the frame's audio as a
  `SpeechOutputAudioRawFrame` (PCM16 at the engine's rate; silence included, so the output transport plays
  a continuous stream). `frame.metadata["livecache"]` carries the frame header (`seq`, `pts`, `mouth`, `state`).

Event handlers: `on_avatar_ready(service, ready)` with the server's `ready` message (session id, size, fps,
`mouth_box`), `on_avatar_interrupted(service, event)` with its `interrupted` reply (`at`, `dropped_ms`).
Needs the `[pipecat]` extra (`pip install "comfyui-livecache[pipecat]"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import cv2
import numpy as np
import websockets
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

from ..examples.ws_client import unpack_frame
from .audio import INPUT_RATES, MonoResampler

MAX_AUDIO_SAMPLES = 16384  # per websocket message: 32 KiB of PCM16, well under the API's 64 KiB
ROLE_TAGS = {"avatar": b"a", "user": b"u"}


class LiveCacheError(RuntimeError):
    """The LiveCache server refused the session or went away; the message is the server's."""


class LiveCacheVideoService(FrameProcessor):
    """Turns the pipeline's TTS audio into LiveCache avatar video (and the avatar's voice) frames."""

    def __init__(self, *, url: str = "ws://127.0.0.1:8765/ws", sample_rate: int | None = None,
                 session: dict | None = None, forward_user_audio: bool = True, ready_timeout_s: float = 60.0,
                 **kwargs) -> None:
        """`url`: the server's websocket endpoint. `sample_rate`: the rate audio is sent at (default: the
        pipeline's output rate, which TTS services produce); audio at another rate is resampled to it.
        `session`: further `start` options (`portrait`, `portrait_b64`, `size`, `fps`, `seed`, `jpeg_quality`,
        `auto_interrupt`); the mode is always `interactive`, the one with two audio roles."""
        super().__init__(**kwargs)
        if sample_rate is not None and sample_rate not in INPUT_RATES:
            raise ValueError(f"sample_rate must be one of {list(INPUT_RATES)}, got {sample_rate}")
        for key in ("type", "mode", "sample_rate"):
            if key in (session or {}):
                raise ValueError(f"session must not set {key!r}: the service sets it")
        self._url, self._rate, self._options = url, sample_rate, dict(session or {})
        self._forward_user, self._ready_timeout_s = forward_user_audio, ready_timeout_s
        self._ws: websockets.ClientConnection | None = None
        self._receiver: asyncio.Task | None = None
        self._resamplers: dict[tuple[str, int], MonoResampler] = {}
        self.ready: dict = {}
        self.ended = asyncio.Event()  # set when the session is over, or could not start: see `end_reason`
        self.end_reason = ""
        self._register_event_handler("on_avatar_ready")
        self._register_event_handler("on_avatar_interrupted")

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        if self._rate is None:
            rate = setup.audio_out_sample_rate
            if rate not in INPUT_RATES:
                raise ValueError(f"the pipeline's output rate {rate} is not one LiveCache takes "
                                 f"({list(INPUT_RATES)}); pass sample_rate=")
            self._rate = rate

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            try:
                await self._connect()
            except (OSError, LiveCacheError, asyncio.TimeoutError, websockets.WebSocketException) as exc:
                self._end(f"could not start: {exc}")
                await self.push_error(error_msg=f"LiveCache session could not start: {exc}", exception=exc,
                                      force_treat_as_permanent=True)
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame):
            await self._send_audio(frame, "avatar")
        elif isinstance(frame, InputAudioRawFrame):
            if self._forward_user:
                await self._send_audio(frame, "user")
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            await self._send_json({"type": "interrupt"})
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self._close(graceful=True)
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._close(graceful=False)
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close(graceful=False)

    async def _connect(self) -> None:
        ws = await websockets.connect(self._url, max_size=16 * 1024 * 1024)
        try:
            await ws.send(json.dumps({"type": "start", "mode": "interactive", "sample_rate": self._rate,
                                      **self._options}))
            self.ready = await asyncio.wait_for(self._await_ready(ws), self._ready_timeout_s)
        except BaseException:
            await ws.close()
            raise
        self._ws = ws
        await self._call_event_handler("on_avatar_ready", self.ready)
        self._receiver = self.create_task(self._receive(), name="livecache-receive")

    @staticmethod
    async def _await_ready(ws: websockets.ClientConnection) -> dict:
        """The server's `ready` message; its `error` (bad portrait, busy, ...) as a LiveCacheError."""
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                continue  # no frame comes before `ready`; skip rather than rely on it
            event = json.loads(message)
            if event["type"] == "error":
                raise LiveCacheError(f"{event['code']}: {event['message']}")
            if event["type"] == "ready":
                return event

    async def _receive(self) -> None:
        """Server → pipeline: each frame as an image and its audio; events to the handlers."""
        assert self._ws is not None
        reason = "the server closed the connection"
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    await self._push_media(message)
                    continue
                event = json.loads(message)
                if event["type"] == "interrupted":
                    await self._call_event_handler("on_avatar_interrupted", event)
                elif event["type"] == "error":
                    await self.push_error(error_msg=f"LiveCache {event['code']}: {event['message']}")
                elif event["type"] == "stopped":
                    reason = f"stopped ({event['reason']})"
                    break
        except websockets.ConnectionClosedError as exc:
            reason = f"connection lost: {exc}"
            await self.push_error(error_msg=f"LiveCache {reason}", exception=exc)
        finally:
            self._end(reason)

    def _end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    async def _push_media(self, message: bytes) -> None:
        header, jpeg, pcm = unpack_frame(message)
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        image = OutputImageRawFrame(image=rgb.tobytes(), size=(rgb.shape[1], rgb.shape[0]), format="RGB")
        image.metadata["livecache"] = header
        await self.push_frame(image)
        if pcm:
            audio = SpeechOutputAudioRawFrame(audio=pcm, sample_rate=header["audio_rate"], num_channels=1)
            audio.metadata["livecache"] = header
            await self.push_frame(audio)

    async def _send_audio(self, frame: TTSAudioRawFrame | InputAudioRawFrame, role: str) -> None:
        if self._ws is None:
            return  # the session never started; the error was pushed then
        samples = np.frombuffer(frame.audio, "<i2")
        if frame.num_channels > 1:
            samples = samples.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        if frame.sample_rate != self._rate:
            key = (role, frame.sample_rate)  # one stream per role and rate: the resampler keeps its filter tail
            resampler = self._resamplers.setdefault(key, MonoResampler(self._rate))
            samples = resampler.pcm(np.ascontiguousarray(samples), frame.sample_rate)
        tag = ROLE_TAGS[role]
        for i in range(0, samples.size, MAX_AUDIO_SAMPLES):
            await self._ws.send(tag + samples[i : i + MAX_AUDIO_SAMPLES].astype("<i2").tobytes())

    async def _send_json(self, message: dict) -> None:
        if self._ws is not None:
            await self._ws.send(json.dumps(message))

    async def _close(self, graceful: bool) -> None:
        """End the session: on `EndFrame` ask the server to stop and let the receiver read up to `stopped`;
        on cancel or cleanup just drop the connection (the server frees the session on disconnect)."""
        ws, receiver, self._ws, self._receiver = self._ws, self._receiver, None, None
        if ws is None:
            return
        if graceful and receiver is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(json.dumps({"type": "stop"}))
            await asyncio.wait({receiver}, timeout=10)
        if receiver is not None and not receiver.done():
            await self.cancel_task(receiver)
        await ws.close()
