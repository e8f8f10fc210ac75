"""The pipecat video service and example pipeline against a real `livecache serve` on 127.0.0.1.

Each test runs pipecat's own PipelineWorker and WorkerRunner in-process: a stand-in TTS (espeak-ng, or a
WAV) → `LiveCacheVideoService` → a collecting sink where the output transport would be. Every judgement
reads the frames' media time (`pts`) and their own audio, never wall time.
"""

from __future__ import annotations

import asyncio
import wave

import numpy as np
import pytest

from livecache.bench.loopback import mouth_openness, spawn_server, ws_url
from livecache.examples import pipecat_avatar
from livecache.examples.pipecat_avatar import AvatarFrame, run_pipeline
from livecache.pipelines.testsignal import talk_and_pause
from livecache.realtime.audio import float_to_pcm16, level_db
from livecache.realtime.pipecat_service import LiveCacheError, LiveCacheVideoService

TEXT = "Hello there, I am your avatar, and I will keep on talking for a while so that you can interrupt me."
CLOSED = 0.05  # the protocol's closed mouth (interrupt_latency_ms counts frames at or below it)


@pytest.fixture(scope="module")
def server():
    with spawn_server("--max-sessions", "2") as url:
        yield ws_url(url)


def audio_of(frame: AvatarFrame) -> np.ndarray:
    return np.concatenate(frame.audio) if frame.audio else np.zeros(0, np.int16)


def level(frame: AvatarFrame) -> float:
    return level_db(audio_of(frame) / 32768.0)


def test_the_pipeline_lip_syncs_tts_audio_and_an_interruption_silences_the_avatar_within_a_frame(server):
    run = asyncio.run(run_pipeline(server, TEXT, interrupt_after_s=1.0, session={"size": 256}))
    frames, box, period = run.frames, run.ready["mouth_box"], 1.0 / run.ready["fps"]
    assert run.ready["mode"] == "interactive" and frames[0].image.shape == (256, 256, 3)
    assert [f.header["seq"] for f in frames] == list(range(1, len(frames) + 1))
    cut = run.interrupted["at"]
    assert run.interrupted["dropped_ms"] > 1000  # most of the sentence was still to come

    # before the cut the mouth follows the energy of the voice each frame carries (the TTS audio played back)
    spoken = [f for f in frames if f.header["pts"] < cut and f.header["state"] == "speaking"]
    assert len(spoken) >= 20  # a second of speech at 25 fps
    rms = np.array([np.sqrt(np.mean((audio_of(f) / 32768.0) ** 2)) for f in spoken])
    mouth = np.array([f.header["mouth"] for f in spoken])
    pixels = np.array([mouth_openness(f.image, box) for f in spoken])  # what the pipeline's output shows
    assert np.corrcoef(mouth, rms)[0, 1] > 0.5
    assert np.corrcoef(pixels, mouth)[0, 1] > 0.9 and pixels.max() > 0.1
    assert all(f.header["mouth"] <= CLOSED for f in frames[: 3])  # idle before the TTS spoke

    # the first frame from the cut on is within one frame period of it, and it and every later one are
    # closed and carry no voice from the cut on
    after = [f for f in frames if f.header["pts"] >= cut]
    assert len(after) >= 20 and after[0].header["pts"] - cut <= period + 1e-6
    assert max(f.header["mouth"] for f in frames if cut - 4 * period <= f.header["pts"] < cut) > 0.3
    assert sum(f.header["mouth"] > CLOSED for f in after) == 0
    assert sum(mouth_openness(f.image, box) > 0.01 for f in after) == 0
    first = after[0]
    from_cut = audio_of(first)[max(0, int(round((cut - first.header["audio_pts"]) * first.header["audio_rate"]))):]
    assert not from_cut.any() and not np.concatenate([audio_of(f) for f in after[1:]]).any()


def write_wav(path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def test_wav_speech_runs_to_completion_and_the_mouth_rests_where_the_wav_is_silent(server, tmp_path):
    """A 16 kHz WAV into a 24 kHz pipeline: the service resamples it, the avatar speaks it, then rests."""
    wav = float_to_pcm16(talk_and_pause(1.0, 0.0, 1, 16000))
    run = asyncio.run(run_pipeline(server, wav=(wav, 16000), tail_s=1.0, session={"size": 256}))
    assert run.interrupted is None
    levels = [level(f) for f in run.frames]
    voiced = [f.header["mouth"] for f, lv in zip(run.frames, levels, strict=True) if lv > -30]
    rested = [f.header["mouth"] for i, f in enumerate(run.frames) if i >= 8 and max(levels[i - 8 : i + 1]) < -80]
    assert len(voiced) > 15 and len(rested) > 10
    assert np.median(voiced) > 0.3 and max(rested) <= CLOSED
    assert run.frames[-1].header["state"] != "speaking"
    # the voice came back whole: about as long as the WAV (frames carry 40 ms each)
    assert abs(sum(lv > -50 for lv in levels) * 0.04 - 1.0) < 0.25

    write_wav(tmp_path / "speech.wav", wav, 16000)
    assert pipecat_avatar.main(["--url", server, "--wav", str(tmp_path / "speech.wav"), "--out",
                                str(tmp_path / "frames")]) == 0
    assert len(list((tmp_path / "frames").glob("*.png"))) > 25


def test_a_refused_session_ends_the_run_with_the_servers_reason(server):
    with pytest.raises(LiveCacheError, match=r"could not start: bad_option: size must be one of"):
        asyncio.run(run_pipeline(server, TEXT, session={"size": 999}))
    with pytest.raises(ValueError, match="session must not set 'mode'"):
        LiveCacheVideoService(url=server, session={"mode": "mirror"})
    with pytest.raises(ValueError, match="sample_rate must be one of"):
        LiveCacheVideoService(url=server, sample_rate=11025)
