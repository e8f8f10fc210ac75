"""MuseTalk-format weights: the folder layout, conversion from the authors' pickles, the engine and its speed-ups.

Every model here is a tiny random one written in code in the authors' exact layout (`write_tiny_musetalk`:
musetalkV15/musetalk.json + unet, sd-vae/ config + weights, whisper/ config + preprocessor_config + weights
from a `transformers.WhisperConfig`), so nothing is downloaded. Random weights cannot lip-sync; what the
tests check is that the audio drives the lower face and only it (the tiny model's audio path carries fixed
gains, `TINY_STEM_GAIN` and `TINY_CROSS_ATTENTION_GAIN`, so that it does so visibly, through a video codec too).
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
    # what the model hears: the encoder's whole 1 s window (a random encoder's attention spreads any sound in
    # it over the newest frames the U-Net reads, so the face stays moved until the speech leaves the window)
    energy = np.array([np.sqrt(np.mean(audio[max(0, e - RATE) : e] ** 2)) for e in ends])
    silent = energy == 0
    assert np.corrcoef(change, energy)[0, 1] > 0.8
    assert change[energy > 0.1].min() > 10.0 and change[silent].max() <= 0.05  # batches round differently
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


def test_serve_streams_musetalk_over_webrtc_and_the_mouth_follows_the_speech(folder):
    """Two bursts of speech sent as the microphone come back over WebRTC (VP8, head motion on) as frames
    whose mouth box changes colour far beyond what the codec and the head motion (which nods with speech)
    do in the same frames to a box of the upper face (the portrait's own pixels), and rests in the silences.

    The tiny model's frame depends on the encoder's whole 1 s window, so a frame "hears speech" when its
    window holds any. Frames are matched to the sent audio by their RTP time, whose origin is unknown: the
    offset between the two clocks is the lag, searched over -1..3 s, that fits best. A 64² face crop
    (`--resolution 64`) keeps the renderer near real time on a loaded 2-core machine; late frames are
    skipped, so fewer frames arrive there, never late ones. Measured on such a machine (load ~11): 18
    frames, r = 0.92, the mouth box 20 grey levels from rest while hearing speech, 0.5 (90th percentile) in
    silence, the upper box 3.8 (median) in the same speech frames."""
    from livecache.bench.loopback import RTC_RATE, rtc_session, spawn_server

    fps, context = 4, 1.0
    blocks = [(False, 1.5), (True, 1.5), (False, 2.5), (True, 1.5), (False, 2.5)]  # (speaking, seconds)
    edges = np.cumsum([0.0] + [s for _, s in blocks])
    t = np.arange(int(edges[-1] * RTC_RATE)) / RTC_RATE
    talking = np.zeros(t.size, bool)
    for (speaking, _), a, b in zip(blocks, edges[:-1], edges[1:], strict=True):
        talking |= speaking & (a <= t) & (t < b)
    voice = np.sign(np.sin(2 * np.pi * 150 * t)) * (0.3 + 0.2 * np.sin(2 * np.pi * 3 * t))
    colours: dict[str, list[np.ndarray]] = {"mouth": [], "upper": []}

    def keep(rgb: np.ndarray, box: list[int]) -> float:
        x, y, w, h = box
        for name, top in (("mouth", y), ("upper", y - 3 * h)):  # three mouth heights up: fringe and forehead
            colours[name].append(rgb[top : top + h, x : x + w].reshape(-1, 3).mean(axis=0))
        return 0.0

    with spawn_server("--engine", "musetalk", "--weights", str(folder), "--resolution", "64",
                      "--max-sessions", "1") as url:
        result = asyncio.run(rtc_session(url, (voice * talking).astype(np.float32), edges[-1],
                                         {"size": 256, "fps": fps}, measure=keep))
    assert len(result.info["mouth_box"]) == 4 and result.info["size"] == 256
    assert result.stats["frames"] >= len(result.frames) >= 10 and result.stats["audio_to_mouth_ms"] is not None
    mouth, upper = np.array(colours["mouth"]), np.array(colours["upper"])
    media = np.array(result.media) - result.media[0]

    def heard(lag: float) -> np.ndarray:
        ends = np.round((media + lag) * RTC_RATE).astype(int)
        return np.array([talking[max(0, e - int(context * RTC_RATE)) : max(0, e)].any() for e in ends])

    def shift(lag: float) -> np.ndarray:
        """Each frame's mouth-box colour distance (grey levels) from its median in the frames that hear none."""
        return np.abs(mouth - np.median(mouth[~heard(lag)], axis=0)).mean(axis=1)

    lags = [lag for lag in np.arange(-1.0, 3.0, 0.05) if 0 < heard(lag).sum() < len(media)]
    fits = [np.corrcoef(shift(lag), heard(lag))[0, 1] for lag in lags]
    lag = lags[int(np.argmax(fits))]
    speech, change = heard(lag), shift(lag)
    noise = np.abs(upper - np.median(upper, axis=0)).mean(axis=1)  # codec + head motion on unrendered pixels
    assert max(fits) > 0.8 and speech.sum() >= 4 and (~speech).sum() >= 4
    assert np.median(change[speech]) > max(8.0, 2 * np.median(noise[speech]))
    assert np.percentile(change[~speech], 90) < 0.25 * np.median(change[speech])


def test_bench_avatar_musetalk_shows_each_acceleration_with_its_ratio_and_fidelity(tmp_path, capsys):
    """`livecache bench avatar --engine musetalk` on the tiny model: every acceleration's row in one run,
    each with its speed ratio to the all-off baseline and its crop PSNR against that baseline."""
    import argparse

    from livecache.bench import avatar_bench

    parser = argparse.ArgumentParser()
    avatar_bench.configure(parser)
    out = tmp_path / "rows.json"
    args = parser.parse_args(["--engine", "musetalk", "--resolution", "64", "--size", "256", "--fps", "5",
                              "--seconds", "2", "--rounds", "1", "--batch", "2", "--json", str(out)])
    assert avatar_bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0].startswith("baseline") and rows[0]["crop_psnr"] == float("inf")
    for needed in ("+ bf16", "+ reference cache", "+ batch 2", "+ pipeline", "+ temporal DeepCache", "W8A8"):
        assert any(needed in n for n in names), needed
    frames = rows[0]["frames"]
    assert frames == 10 and all(r["frames"] == frames and len(r["seconds"]) == 1 for r in rows)
    assert all(np.isfinite(r["crop_psnr"]) and r["crop_psnr"] > 10 for r in rows[1:])  # each costs some fidelity
    table = capsys.readouterr().out
    assert "tiny random MuseTalk-layout model (ratios only)" in table
    assert all(f"| {name} |" in table for name in names) and table.count("x |") >= len(rows)  # the speed ratios
