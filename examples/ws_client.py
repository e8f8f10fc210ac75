"""Reference websocket client for `livecache serve` (protocol: docs/realtime-protocol.md).

It needs only `websockets` and `numpy`, so it can be copied out of the project:

    python -m livecache.examples.ws_client --url ws://127.0.0.1:8765/ws --wav speech.wav --out frames/

It streams PCM16 audio in real time (20 ms chunks paced by the clock), receives JPEG frames with their
audio, optionally saves them, and prints the session's metrics. Without --wav it sends a synthetic vowel
burst so it runs anywhere. `stream()` is also the websocket driver of `livecache bench realtime` and the
tests: this module is the one client side of the wire format (`unpack_frame`, `to_pcm16`), kept free of
the rest of the package so that what the benches measure is what a user's client does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import websockets

CHUNK_S = 0.02


def unpack_frame(message: bytes) -> tuple[dict, bytes, bytes]:
    """Split a binary frame message into (header, JPEG bytes, PCM16 bytes)."""
    (n,) = struct.unpack(">I", message[:4])
    header = json.loads(message[4 : 4 + n])
    jpeg_end = 4 + n + header["jpeg"]
    return header, message[4 + n : jpeg_end], message[jpeg_end : jpeg_end + header["audio"]]


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float audio (-1..1) as the PCM16 samples the API carries."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """PCM16 mono samples and the rate of a 16-bit WAV file (stereo is averaged)."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise SystemExit(f"{path}: need 16-bit PCM WAV")
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
        return data.mean(axis=1).astype(np.int16), w.getframerate()


def demo_audio(rate: int = 16000) -> np.ndarray:
    """1 s silence, 2 s of a buzzing vowel with a syllable rhythm, 2 s silence (PCM16)."""
    t = np.arange(2 * rate) / rate
    voice = sum(np.sin(2 * np.pi * 120 * k * t) / k for k in range(1, 20)) * np.abs(np.sin(2 * np.pi * 2.5 * t))
    silence = np.zeros(rate)
    return (np.concatenate([silence, 0.2 * voice / np.abs(voice).max(), silence, silence]) * 32767).astype(np.int16)


@dataclass
class Result:
    """What one client saw; times are `time.monotonic()` seconds."""

    started: float = 0.0
    ready: dict = field(default_factory=dict)
    frames: list[tuple[float, dict]] = field(default_factory=list)  # (received, header)
    chunks_sent: list[float] = field(default_factory=list)  # send time of each 20 ms chunk
    stats: dict = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)


async def stream(url: str, pcm: np.ndarray, rate: int, seconds: float, options: dict | None = None,
                 on_frame: Callable[[dict, bytes, bytes], None] | None = None, connect: dict | None = None) -> Result:
    """Run one session: start, send `pcm` paced in real time for `seconds`, collect frames, stop.

    `on_frame(header, jpeg, pcm)` sees every frame (to save or display it); `Result` keeps the headers.
    `connect` passes extra arguments to `websockets.connect` (e.g. `{"ssl": context}` for wss://).
    """
    result = Result(started=time.monotonic())
    async with websockets.connect(url, max_size=16 * 1024 * 1024, **(connect or {})) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, **(options or {})}))

        async def send_audio() -> None:
            step = int(CHUNK_S * rate)
            t0 = time.monotonic()
            for i in range(int(seconds / CHUNK_S)):
                await asyncio.sleep(max(0.0, t0 + i * CHUNK_S - time.monotonic()))  # absolute pacing
                chunk = pcm[i * step : (i + 1) * step]
                if chunk.size < step:
                    chunk = np.zeros(step, np.int16)
                result.chunks_sent.append(time.monotonic())
                await ws.send(chunk.astype("<i2").tobytes())
            await ws.send(json.dumps({"type": "stop"}))

        sender: asyncio.Task | None = None
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    header, jpeg, audio = unpack_frame(message)
                    result.frames.append((time.monotonic(), header))
                    if on_frame is not None:
                        on_frame(header, jpeg, audio)
                    continue
                event = json.loads(message)
                if event["type"] == "ready":
                    result.ready = event
                    sender = asyncio.create_task(send_audio())
                elif event["type"] in ("stats", "stopped"):
                    result.stats = event
                elif event["type"] == "error":
                    result.errors.append(event)
                    if sender is None:  # the session never started
                        break
        finally:
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
    return result


TAIL_S = 1.0  # how long a session goes on after the audio, so the last words' frames arrive


def session_seconds(requested: float | None, pcm: np.ndarray, rate: int) -> float:
    """How long to run: `requested`, or by default the whole audio plus TAIL_S. A shorter request is kept (the
    user asked for it) but said out loud, since the audio is then cut."""
    audio_s = pcm.size / rate
    if requested is None:
        return audio_s + TAIL_S
    if requested < audio_s:
        print(f"note: --seconds {requested:g} stops before the end of the {audio_s:.1f} s of audio",
              file=sys.stderr)
    return requested


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/ws")
    parser.add_argument("--wav", help="16-bit PCM WAV to speak (default: a synthetic vowel)")
    parser.add_argument("--seconds", type=float, help=f"session length (default: the audio plus {TAIL_S:g} s)")
    parser.add_argument("--out", type=Path, help="folder to save received JPEG frames")
    args = parser.parse_args(argv)
    pcm, rate = read_wav(args.wav) if args.wav else (demo_audio(), 16000)
    seconds = session_seconds(args.seconds, pcm, rate)
    save = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

        def save(header: dict, jpeg: bytes, _audio: bytes) -> None:
            (args.out / f"{header['seq']:05d}.jpg").write_bytes(jpeg)

    result = asyncio.run(stream(args.url, pcm, rate, seconds, on_frame=save))
    for error in result.errors:
        print(f"error {error['code']}: {error['message']}", file=sys.stderr)
    print(f"received {len(result.frames)} frames; session metrics: {json.dumps(result.stats)}")
    return 0 if result.frames else 1


if __name__ == "__main__":
    sys.exit(main())
