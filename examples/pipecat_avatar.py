"""A pipecat pipeline with a LiveCache avatar: TTS audio in, talking-head video frames (and voice) out.

    livecache serve                  # in one terminal
    python -m livecache.examples.pipecat_avatar --text "Hello there, I am your avatar." --interrupt-after 1.0

The pipeline is `SpeechSource → LiveCacheVideoService → FrameCollector`: the source plays the part of a TTS
service (espeak-ng speaking the text, or a WAV file) and pushes `TTSAudioRawFrame`s; the service sends them to
the server as the avatar's speech and pushes the avatar's frames downstream; the collector stands where a
transport's output would (`transport.output()` in a real agent) and keeps what it receives. With
`--interrupt-after S` the example queues an `InterruptionFrame` once the avatar has spoken for S seconds of
media time, as a user barging in would. Needs the `[pipecat]` extra and, for `--text`, espeak-ng.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from ..realtime.pipecat_service import LiveCacheError, LiveCacheVideoService
from ..realtime.speech import check_text, synthesize
from .ws_client import read_wav

CHUNK_S = 0.02  # TTS services push audio in small chunks; 20 ms is typical
REPLY_S = 5.0  # media time the server has to answer an interrupt (it answers at once; this bounds a broken one)


class SpeechSource(FrameProcessor):
    """A stand-in TTS service: each `TTSSpeakFrame` becomes TTSStarted, 20 ms `TTSAudioRawFrame`s, TTSStopped.

    It speaks the frame's text with espeak-ng, or plays `wav` (samples, rate) whatever the text; like a real
    TTS it pushes the audio as fast as it has it, not in real time."""

    def __init__(self, wav: tuple[np.ndarray, int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._wav = wav

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, TTSSpeakFrame):
            await self.push_frame(frame, direction)
            return
        samples, rate = self._wav or await synthesize(check_text(frame.text))
        await self.push_frame(TTSStartedFrame())
        step = int(CHUNK_S * rate)
        for i in range(0, samples.size, step):
            chunk = samples[i : i + step].astype("<i2").tobytes()
            await self.push_frame(TTSAudioRawFrame(audio=chunk, sample_rate=rate, num_channels=1))
        await self.push_frame(TTSStoppedFrame())


@dataclass
class AvatarFrame:
    """One video frame as the pipeline's output saw it: the LiveCache header, RGB pixels, the audio after it."""

    header: dict
    image: np.ndarray
    audio: list[np.ndarray] = field(default_factory=list)  # int16 chunks, at header["audio_rate"]


class FrameCollector(FrameProcessor):
    """Where the output transport would be: keeps every avatar frame with its audio, wakes waiters on each."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.frames: list[AvatarFrame] = []
        self._changed = asyncio.Condition()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        header = frame.metadata.get("livecache")
        if isinstance(frame, OutputImageRawFrame) and header is not None:
            w, h = frame.size
            self.frames.append(AvatarFrame(header, np.frombuffer(frame.image, np.uint8).reshape(h, w, 3)))
            async with self._changed:
                self._changed.notify_all()
        elif header is not None and self.frames:  # the audio of the frame just above
            self.frames[-1].audio.append(np.frombuffer(frame.audio, "<i2"))
        await self.push_frame(frame, direction)

    async def wait_for(self, done: Callable[[list[AvatarFrame]], bool], ended: asyncio.Event) -> bool:
        """Until `done(frames)` holds (checked on each new frame: media time decides, never wall time);
        False when `ended` is set first (the avatar's session is over)."""

        async def condition() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: done(self.frames))

        waiter, stop = asyncio.ensure_future(condition()), asyncio.ensure_future(ended.wait())
        await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stop):
            task.cancel()
        await asyncio.gather(waiter, stop, return_exceptions=True)
        return done(self.frames)


@dataclass
class Run:
    """What one pipeline run produced."""

    frames: list[AvatarFrame]
    ready: dict
    interrupted: dict | None = None


def _speaking_since(frames: list[AvatarFrame]) -> float | None:
    """Media time of the first frame the avatar spoke in, or None."""
    return next((f.header["pts"] for f in frames if f.header.get("state") == "speaking"), None)


async def run_pipeline(url: str, text: str = "", wav: tuple[np.ndarray, int] | None = None,
                       interrupt_after_s: float | None = None, tail_s: float = 1.0,
                       session: dict | None = None) -> Run:
    """Speak once through the pipeline and run to completion.

    Without an interruption it ends `tail_s` of media time after the avatar stopped speaking; with one, it
    interrupts `interrupt_after_s` after the avatar began to speak and ends `tail_s` after the cut."""
    avatar = LiveCacheVideoService(url=url, session=session)
    collector = FrameCollector()
    worker = PipelineWorker(Pipeline([SpeechSource(wav), avatar, collector]), cancel_on_idle_timeout=False)
    interrupted: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

    @avatar.event_handler("on_avatar_interrupted")
    async def _on_interrupted(_service: LiveCacheVideoService, event: dict) -> None:
        if not interrupted.done():
            interrupted.set_result(event)

    async def until(done: Callable[[list[AvatarFrame]], bool]) -> None:
        if not await collector.wait_for(done, avatar.ended):
            raise LiveCacheError(f"the avatar session ended early: {avatar.end_reason}")

    async def drive() -> None:
        try:
            await until(lambda frames: bool(frames))  # the session is live
            await worker.queue_frame(TTSSpeakFrame(text or "wav"))
            await until(lambda frames: _speaking_since(frames) is not None)
            if interrupt_after_s is not None:
                begun = _speaking_since(collector.frames)
                await until(lambda frames: frames[-1].header["pts"] >= begun + interrupt_after_s)
                await worker.queue_frame(InterruptionFrame())
                asked = collector.frames[-1].header["pts"]
                await until(lambda frames: interrupted.done() or frames[-1].header["pts"] > asked + REPLY_S)
                if not interrupted.done():
                    raise LiveCacheError(f"no `interrupted` reply within {REPLY_S:g} s of media time")
                cut = interrupted.result()["at"]
            else:
                await until(lambda frames: frames[-1].header.get("state") != "speaking")
                cut = collector.frames[-1].header["pts"]
            await until(lambda frames: frames[-1].header["pts"] >= cut + tail_s)
        except BaseException as exc:  # the avatar may not take an EndFrame's orderly stop any more
            await worker.cancel(reason=f"{type(exc).__name__}: {exc}")
            raise
        else:
            await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    for outcome in await asyncio.gather(runner.run(), drive(), return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
    return Run(collector.frames, avatar.ready, interrupted.result() if interrupted.done() else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="the server's websocket endpoint")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default="Hello! I am a LiveCache avatar, speaking through pipecat.",
                        help="what the avatar says (espeak-ng speaks it)")
    source.add_argument("--wav", help="a 16-bit PCM WAV to speak instead of --text")
    parser.add_argument("--interrupt-after", type=float, metavar="S",
                        help="interrupt the avatar after it has spoken S seconds (default: let it finish)")
    parser.add_argument("--size", type=int, default=256, help="frame size (256, 384 or 512)")
    parser.add_argument("--out", type=Path, help="folder to save the received frames as PNG")
    args = parser.parse_args(argv)
    run = asyncio.run(run_pipeline(args.url, args.text, read_wav(args.wav) if args.wav else None,
                                   args.interrupt_after, session={"size": args.size}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for frame in run.frames:
            cv2.imwrite(str(args.out / f"{frame.header['seq']:05d}.png"), cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
    spoke = sum(f.header.get("state") == "speaking" for f in run.frames)
    print(f"received {len(run.frames)} frames ({spoke} speaking) from session {run.ready.get('session')}")
    if run.interrupted:
        print(f"interrupted at {run.interrupted['at']:.2f} s, {run.interrupted['dropped_ms']:.0f} ms of speech dropped")
    return 0 if run.frames else 1


if __name__ == "__main__":
    sys.exit(main())
