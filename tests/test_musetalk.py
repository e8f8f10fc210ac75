"""MuseTalk-format weights: the folder layout, conversion from the authors' pickles, the engine and its speed-ups.

Every model here is a tiny random one written in code in the authors' exact layout (`write_tiny_musetalk`:
musetalkV15/musetalk.json + unet, sd-vae/ config + weights, whisper/ config + preprocessor_config + weights
from a `transformers.WhisperConfig`), so nothing is downloaded. Random weights cannot lip-sync; what the
tests check is that the audio drives the lower face and only it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from livecache.models.loading import WeightsError
from livecache.models.musetalk import MuseTalkModel, MuseTalkSpec, load_musetalk
from livecache.models.musetalk_files import convert_musetalk, write_tiny_musetalk
from livecache.pipelines.portrait import default_portrait
from livecache.realtime.engines import create_engine
from livecache.realtime.engines.base import RenderRequest, SessionOptions

RATE = 16000
LAYOUT = ["musetalkV15/musetalk.json", "musetalkV15/unet.safetensors", "sd-vae/config.json",
          "sd-vae/diffusion_pytorch_model.safetensors", "whisper/config.json", "whisper/preprocessor_config.json",
          "whisper/pytorch_model.safetensors"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_musetalk(tmp_path_factory.mktemp("mt") / "models")


class _Still:
    """Head motion off, so pixels can be compared frame to frame."""

    def apply(self, frame: np.ndarray, t: float, state: str, opening: float) -> np.ndarray:
        return frame


def _engine(folder: Path, **options):
    options.setdefault("temporal_cache", None)
    options.setdefault("warm_up", False)  # the served engine's start-up frame; counted calls start at zero here
    return create_engine("musetalk", weights=str(folder), resolution=64, **options)


def _speech_then_silence(seconds: float = 1.2, speech_s: float = 0.6) -> np.ndarray:
    """A voiced buzz (150 Hz, level swaying at 3 Hz) for `speech_s`, digital silence after."""
    t = np.arange(int(seconds * RATE)) / RATE
    voice = np.sign(np.sin(2 * np.pi * 150 * t)) * (0.3 + 0.2 * np.sin(2 * np.pi * 3 * t))
    voice *= (t < speech_s)
    return voice.astype(np.float32)


def test_tiny_folder_has_the_authors_layout_and_loads(folder):
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == sorted(LAYOUT)
    assert "_class_name" not in json.loads((folder / "musetalkV15" / "musetalk.json").read_text())
    model = load_musetalk(folder, MuseTalkSpec(resolution=64))
    assert model.spec.version == "1.5" and model.unet.config.in_channels == 8
    assert model.tokens == 10 * 3  # 10 Whisper frames x (embeddings + 2 encoder layers)
    windows = np.random.default_rng(0).normal(0, 0.1, (2, RATE)).astype(np.float32)
    tokens, signal = model.audio_features(windows)
    assert tokens.shape == (2, 30, 32) and signal.shape == (2, 8, 80)
    reference = model.encode_reference(torch.rand(2, 3, 64, 64))
    assert reference.shape == (2, 8, 8, 8)
    assert model.decode(model.predict(reference, tokens)).shape == (2, 3, 64, 64)


def test_window_only_whisper_input_equals_the_extractor_on_the_padded_30_s_input():
    from types import SimpleNamespace

    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor()  # Whisper-tiny's own settings: 80 mels over 30 s
    rng = np.random.default_rng(1)
    late = np.r_[np.zeros(RATE // 2), rng.normal(0, 1, RATE // 2)]  # sound right up to the window's end
    windows = np.stack([rng.normal(0, 0.2, RATE), np.zeros(RATE), late])
    full = extractor(list(windows), sampling_rate=RATE, return_tensors="np").input_features
    short = MuseTalkModel.whisper_input(SimpleNamespace(extractor=extractor), windows.astype(np.float32))
    assert short.shape == full.shape == (3, 80, 3000)
    assert np.abs(short - full).max() <= 1e-5 * np.abs(full).max()


def test_engine_streams_frames_and_the_mouth_region_follows_speech_energy(folder):
    engine = _engine(folder, max_batch=4)
    session = engine.open_session(default_portrait(512), SessionOptions(size=256))
    session.motion = _Still()
    x, y, w, h = session.mouth_box
    fx, fy, fw, fh = session.region
    assert fx <= x and x + w <= fx + fw and fy < y and y + h <= fy + fh  # the mouth lies in MuseTalk's face box
    audio = _speech_then_silence(2.4, 0.8)
    frames = list(engine.render_clip(session, audio, fps=10.0))
    assert len(frames) == 24 and all(f.image.shape == (256, 256, 3) for f in frames)
    mouth = lambda f: f.image[y : y + h, x : x + w].astype(np.float32)  # noqa: E731
    rest = mouth(frames[-1])  # well into the silence
    change = np.array([np.abs(mouth(f) - rest).mean() for f in frames])
    ends = [int((k + 1) / 10 * RATE) for k in range(len(frames))]
    energy = np.array([np.sqrt(np.mean(audio[max(0, e - RATE // 5) : e] ** 2)) for e in ends])  # newest 200 ms
    silent = np.array([not audio[max(0, e - RATE) : e].any() for e in ends])  # the encoder's whole 1 s: silence
    assert np.corrcoef(change, energy)[0, 1] > 0.7
    assert change[energy > 0.1].min() > 1.0 and change[silent].max() <= 0.05  # batches round differently
    assert engine.silent_windows == int(silent.sum()) > 0
    # the blend mask keeps the upper face: eyes and forehead are the portrait's own pixels in every frame
    upper = slice(0, fy + fh // 3)
    assert all(np.array_equal(f.image[upper], session.image[upper]) for f in frames)


def test_batching_pipeline_and_temporal_cache_keep_the_frames(folder):
    audio = _speech_then_silence(1.0)
    clips, reused = [], []
    for options in ({"max_batch": 1, "pipeline": False}, {"max_batch": 4, "pipeline": True},
                    {"max_batch": 1, "pipeline": False, "temporal_cache": None, "reference_cache": False}):
        engine = _engine(folder, **options)
        session = engine.open_session(default_portrait(512), SessionOptions(size=128))
        session.motion = _Still()
        clips.append(np.stack([f.image for f in engine.render_clip(session, audio, fps=10.0)]).astype(np.float32))
        engine.close()
    for other in clips[1:]:
        assert np.abs(other - clips[0]).max() <= 2.0  # batched / re-encoded: the same frames to rounding
    from livecache.pipelines.musetalk import MUSETALK_REUSE

    for cache in (None, MUSETALK_REUSE):
        engine = _engine(folder, max_batch=1, temporal_cache=cache)
        session = engine.open_session(default_portrait(512), SessionOptions(size=128))
        list(engine.render_clip(session, audio, fps=10.0))
        reused.append(engine.cache_stats)
        engine.close()
    assert reused[0] == (0, 0)
    full, cached = reused[1]
    assert full + cached == 10 and cached >= 2  # the silent half holds still: its deep features are reused


def test_w8a8_bf16_and_the_cpu_compile_guard_still_render(folder):
    engine = _engine(folder, w8a8=True, bf16=True, compile=True, device="cpu")
    assert engine.quant_backend.startswith(("int8", "simulated")) and engine.model.dtype == torch.bfloat16
    assert engine.compiled is False  # torch.compile / CUDA graphs apply on CUDA devices only
    session = engine.open_session(default_portrait(512), SessionOptions(size=128))
    rng = np.random.default_rng(0)
    frames = engine.render_batch([RenderRequest(session, 0.1 * k, rng.normal(0, 0.1, RATE).astype(np.float32),
                                                "speaking") for k in range(2)])
    assert [f.image.shape for f in frames] == [(128, 128, 3)] * 2
    engine.close()


def test_conversion_from_the_authors_pickles(tmp_path, folder):
    src = write_tiny_musetalk(tmp_path / "authors", authors_format=True)
    assert (src / "musetalkV15" / "unet.pth").is_file() and (src / "whisper" / "pytorch_model.bin").is_file()
    with pytest.raises(WeightsError, match=r"unet\.pth \(pickle\).*livecache convert musetalk SRC DST"):
        load_musetalk(src)
    written = convert_musetalk(src, tmp_path / "converted", log=lambda line: None)
    assert sorted(str(p.relative_to(tmp_path / "converted")) for p in written) == sorted(LAYOUT)
    converted = load_musetalk(tmp_path / "converted", MuseTalkSpec(resolution=64))
    same_seed = load_musetalk(folder, MuseTalkSpec(resolution=64))
    for a, b in ((converted.unet, same_seed.unet), (converted.vae, same_seed.vae),
                 (converted.encoder, same_seed.encoder)):
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())  # renamed VAE keys too
    before = (tmp_path / "converted" / "sd-vae" / "config.json").read_bytes()
    with pytest.raises(WeightsError, match="refusing to overwrite"):
        convert_musetalk(src, tmp_path / "converted", log=lambda line: None)
    assert (tmp_path / "converted" / "sd-vae" / "config.json").read_bytes() == before


class Payload:
    """Any object a pickle could carry: weights_only loading must refuse it, never construct it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_conversion_refuses_arbitrary_objects_and_wrong_shapes_naming_the_file(tmp_path):
    src = write_tiny_musetalk(tmp_path / "authors", authors_format=True)
    unet_file = src / "musetalkV15" / "unet.pth"
    state = torch.load(unet_file, weights_only=True)
    torch.save({**state, "extra": Payload()}, unet_file)
    with pytest.raises(WeightsError, match=r"unet\.pth: refused: not a plain tensor checkpoint"):
        convert_musetalk(src, tmp_path / "out", log=lambda line: None)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()] if (tmp_path / "out").exists() else True
    key = "conv_in.weight"
    torch.save({**state, key: torch.zeros(3, 3)}, unet_file)
    with pytest.raises(WeightsError, match=r"unet\.pth: does not match the model config \(shape of conv_in\.weight"):
        convert_musetalk(src, tmp_path / "out", log=lambda line: None)
    torch.save(state, unet_file)
    whisper = src / "whisper" / "pytorch_model.bin"
    torch.save({k: v for k, v in torch.load(whisper, weights_only=True).items() if "layers.1." not in k}, whisper)
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin: does not match the model config \(missing"):
        convert_musetalk(src, tmp_path / "out", log=lambda line: None)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # the U-Net and VAE written before: removed
    result = subprocess.run([sys.executable, "-m", "livecache.cli", "convert", "musetalk", str(src),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "cannot convert" in result.stderr and "pytorch_model.bin" in result.stderr


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / "sd-vae" / "config.json").unlink(), r"sd-vae/config\.json: missing"),
    (lambda f: (f / "whisper" / "preprocessor_config.json").unlink(), r"whisper/preprocessor_config\.json: missing"),
    (lambda f: (f / "musetalkV15" / "unet.safetensors").unlink(), r"musetalkV15: no \.safetensors weight file"),
    (lambda f: (f / "musetalkV15" / "musetalk.json").write_text(json.dumps(
        {**json.loads((f / "musetalkV15" / "musetalk.json").read_text()), "cross_attention_dim": 48})),
     r"musetalk\.json: cross_attention_dim 48 must equal the Whisper d_model 32"),
    (lambda f: (f / "musetalkV15" / "musetalk.json").write_text(json.dumps(
        {**json.loads((f / "musetalkV15" / "musetalk.json").read_text()), "block_out_channels": [16, 32, 64]})),
     r"unet\.safetensors: does not match the model config"),
    (lambda f: __import__("shutil").rmtree(f / "musetalkV15"), r"no U-Net folder \(musetalkV15/ or musetalk/"),
])
def test_wrong_or_missing_files_are_named(tmp_path, damage, message):
    folder = write_tiny_musetalk(tmp_path / "models")
    damage(folder)
    with pytest.raises(WeightsError, match=message):
        load_musetalk(folder, MuseTalkSpec(resolution=64))


def test_serve_streams_musetalk_over_the_websocket_and_refuses_unconverted_folders(tmp_path, folder):
    from livecache.bench.loopback import spawn_server, ws_url
    from livecache.examples.ws_client import stream
    from livecache.realtime.audio import float_to_pcm16

    frames: list = []
    with spawn_server("--engine", "musetalk", "--weights", str(folder), "--max-sessions", "1") as url:
        result = asyncio.run(stream(ws_url(url), float_to_pcm16(_speech_then_silence(5.0, 2.0)), RATE, 5.0,
                                    options={"size": 256, "fps": 5},
                                    on_frame=lambda header, jpeg, audio: frames.append((header, jpeg))))
    assert not result.errors and len(result.ready["mouth_box"]) == 4 and frames
    assert frames[-1][0]["type"] == "frame" and frames[-1][1][:2] == b"\xff\xd8"
    src = write_tiny_musetalk(tmp_path / "authors", authors_format=True)
    refused = subprocess.run([sys.executable, "-m", "livecache.realtime.cli", "--port", "0", "--engine", "musetalk",
                              "--weights", str(src)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "livecache convert musetalk SRC DST" in refused.stderr


def test_serve_streams_musetalk_over_webrtc(folder):
    """The tiny model's frames reach a WebRTC peer at the session's size, and the speech sent as the microphone
    reaches the renderer: `audio_to_mouth_ms` is set once a frame rendered from received audio has left the server.
    (Whether the mouth follows the speech is judged on exact pixels in the tests above: a random model's
    lower face changes by a few grey levels, below what the VP8 encoder keeps.)"""
    from livecache.bench.loopback import RTC_RATE, rtc_session, spawn_server

    t = np.arange(int(2.0 * RTC_RATE)) / RTC_RATE
    voice = np.sign(np.sin(2 * np.pi * 150 * t)) * (0.3 + 0.2 * np.sin(2 * np.pi * 3 * t))
    audio = np.concatenate([np.zeros(RTC_RATE // 2), voice, np.zeros(RTC_RATE)]).astype(np.float32)
    with spawn_server("--engine", "musetalk", "--weights", str(folder), "--max-sessions", "1") as url:
        result = asyncio.run(rtc_session(url, audio, 4.0, {"size": 256, "fps": 5},
                                         measure=lambda rgb, box: float(rgb.shape[0] == rgb.shape[1] == 256)))
    assert len(result.info["mouth_box"]) == 4 and result.info["size"] == 256
    assert len(result.frames) >= 3 and all(ok for _, ok in result.frames)
    assert result.stats["frames"] >= len(result.frames) and result.stats["audio_to_mouth_ms"] is not None
