"""The diffusion avatar: model, weights folder errors, engine, caches, pipeline, training, nodes, server."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from livecache.accel.temporal_cache import TemporalReuse, TemporalReuseConfig
from livecache.models.avatar import AVATAR_DIR, AvatarSpec, load_model, random_model, save_model
from livecache.models.loading import WeightsError
from livecache.pipelines.portrait import default_portrait
from livecache.pipelines.stages import run_stages
from livecache.realtime.engines import create_engine
from livecache.realtime.engines.base import RenderRequest, SessionOptions

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "workflows" / "hello_avatar.wav"


def _clip() -> np.ndarray:
    import soundfile

    audio, rate = soundfile.read(str(CLIP), dtype="float32")
    assert rate == 16000
    return audio


def _engine(model=None, **options):
    options.setdefault("temporal_cache", None)
    return create_engine("diffusion", model=model or random_model(), **options)


def test_random_model_renders_frames_through_the_engine_interface():
    engine = _engine(max_batch=4)
    session = engine.open_session(default_portrait(512), SessionOptions(size=256))
    assert engine.audio_context_s == 0.2 and engine.workers == 1 and engine.max_batch == 4
    x, y, w, h = session.mouth_box
    assert 0 < x < 256 and 0 < y < 256 and w > 0 and h > 0
    rng = np.random.default_rng(0)
    requests = [RenderRequest(session, 0.04 * k, rng.normal(0, 0.1, 3200).astype(np.float32), state)
                for k, state in enumerate(["speaking", "listening", "idle"])]
    frames = engine.render_batch(requests)
    assert [f.image.shape for f in frames] == [(256, 256, 3)] * 3
    assert all(f.image.dtype == np.uint8 and 0.0 <= f.mouth <= 1.0 for f in frames)
    assert [f.t for f in frames] == [r.t for r in requests] and [f.state for f in frames] == ["speaking",
                                                                                              "listening", "idle"]
    short = engine.render_batch([RenderRequest(session, 0.0, np.zeros(10, np.float32), "idle")])  # session start
    assert short[0].image.shape == (256, 256, 3)


def test_pipeline_and_chunking_give_the_same_frames_as_sequential_rendering():
    audio = _clip()[:16000]
    clips = []
    for pipeline in (False, True):
        engine = _engine(pipeline=pipeline, max_batch=4, first_chunk=1)
        session = engine.open_session(default_portrait(512), SessionOptions(size=256))
        clips.append([f.image for f in engine.render_clip(session, audio, fps=10.0)])
        assert engine.clock.frames["U-Net"] == 10
    assert len(clips[0]) == 10
    assert all(np.array_equal(a, b) for a, b in zip(*clips, strict=True))


def test_run_stages_keeps_order_and_raises_stage_errors():
    stages = (lambda x: x + 1, lambda x: x * 10)
    assert list(run_stages(range(20), stages)) == list(run_stages(range(20), stages, parallel=False))
    assert list(run_stages(range(3), stages)) == [10, 20, 30]

    def boom(x):
        if x == 2:
            raise RuntimeError("stage failed on 2")
        return x

    with pytest.raises(RuntimeError, match="stage failed on 2"):
        list(run_stages(range(5), (boom,)))


def test_temporal_cache_reuses_deep_features_only_while_audio_holds_still():
    reuse = TemporalReuse(TemporalReuseConfig(threshold=0.1, max_reuse=2))
    a = torch.zeros(1, 4, 32)
    assert [reuse.decide("s", a) for _ in range(4)] == [False, True, True, False]  # capped at max_reuse
    assert reuse.decide("s", a + 1.0) is False  # moved: computed in full, new anchor
    assert reuse.decide("other", a) is False  # keys never share anchors

    cached = _engine(temporal_cache=TemporalReuseConfig(threshold=0.1, max_reuse=2))
    plain = _engine()
    silence = np.zeros(3200, np.float32)
    outputs = []
    for engine in (cached, plain):
        session = engine.open_session(default_portrait(512), SessionOptions(size=256))
        outputs.append([engine.render_batch([RenderRequest(session, 0.04 * k, silence, "idle")])[0].image
                        for k in range(3)])
    full, reused = cached.cache_stats
    steps = cached.steps
    assert (full, reused) == (steps, 2 * steps)  # frame 1 computes, frames 2-3 reuse every step
    # identical conditioning: reused deep features are exactly what a full pass computes
    assert all(np.array_equal(a, b) for a, b in zip(*outputs, strict=True))
    speech = np.random.default_rng(1).normal(0, 0.2, 3200).astype(np.float32)
    session = cached.open_session(default_portrait(512), SessionOptions(size=256))
    cached.render_batch([RenderRequest(session, 0.0, silence, "speaking")])
    cached.render_batch([RenderRequest(session, 0.04, speech, "speaking")])
    assert cached.cache_stats == (full + 2 * steps, reused)  # speech onset: computed in full
    cached.close()
    assert "forward" not in cached.model.unet.mid_block.__dict__  # hooks removed


def test_w8a8_toggle_quantizes_the_unet_and_still_renders():
    engine = _engine(w8a8=True, max_batch=2)
    assert engine.quant_backend is not None
    session = engine.open_session(default_portrait(512), SessionOptions(size=256))
    before = engine._quant.stats.calls
    frames = engine.render_batch([RenderRequest(session, 0.0, np.zeros(3200, np.float32), "idle")] * 2)
    assert [f.image.shape for f in frames] == [(256, 256, 3)] * 2
    assert engine._quant.stats.calls == before + 2 * engine.steps  # both pipelined halves ran quantized
    engine.close()
    assert "forward" not in engine.model.unet.down_blocks[0].resnets[0].conv1.__dict__


def _folder(tmp_path: Path) -> Path:
    return save_model(random_model(), tmp_path / "avatar")


def test_weights_folder_round_trips_and_bad_folders_name_the_file(tmp_path):
    folder = _folder(tmp_path)
    model = load_model(folder)
    reference = random_model()
    for a, b in zip(model.unet.state_dict().values(), reference.unet.state_dict().values(), strict=True):
        assert torch.allclose(a, b.half().float())

    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"unet: no \.safetensors weight file"):
        load_model(folder)

    folder = _folder(tmp_path / "b")
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["block_out_channels"] = [8, 16, 32, 32]
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"vae/diffusion_pytorch_model\.safetensors: does not match"):
        load_model(folder)

    folder = _folder(tmp_path / "c")
    (folder / "audio_encoder" / "model.safetensors").rename(folder / "audio_encoder" / "model.bin")
    with pytest.raises(WeightsError, match=r"audio_encoder: no \.safetensors weight file \(found model\.bin"):
        load_model(folder)

    folder = _folder(tmp_path / "d")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(WeightsError, match=r"scheduler_config\.json: missing"):
        load_model(folder)

    folder = _folder(tmp_path / "e")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "steps": 9}))
    with pytest.raises(WeightsError, match=r"model_index\.json: steps must be 1\.\.4"):
        load_model(folder)

    with pytest.raises(WeightsError, match="not a folder"):
        load_model(tmp_path / "nowhere")


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="resolution must be a multiple of 8"):
        AvatarSpec(resolution=60)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        TemporalReuseConfig(threshold=-1.0)


def test_shipped_model_opens_the_mouth_in_speech_and_closes_it_in_silence():
    audio = np.concatenate([np.zeros(8000, np.float32), _clip(), np.zeros(16000, np.float32)])
    engine = create_engine("diffusion", max_batch=8)  # the shipped weights, every acceleration on
    session = engine.open_session(default_portrait(512), SessionOptions(size=256))
    frames = list(engine.render_clip(session, audio, fps=25.0))
    rate = engine.sample_rate
    energy = np.array([np.sqrt(np.mean(audio[max(0, int((k + 1) * rate / 25) - 640) : int((k + 1) * rate / 25)] ** 2))
                       for k in range(len(frames))])
    mouth = np.array([f.mouth for f in frames])
    voiced, silent = energy > 10 ** (-36 / 20), energy < 10 ** (-60 / 20)
    assert voiced.sum() > 10 and silent.sum() > 10
    assert mouth[voiced].mean() > mouth[silent].mean() + 0.2, (mouth[voiced].mean(), mouth[silent].mean())
    loudness = (20 * np.log10(energy + 1e-9)).clip(-48, -12)
    assert np.corrcoef(mouth, loudness)[0, 1] > 0.4, (mouth, loudness)
    # the pixels move too: the mouth crop differs more between speech frames than between silent ones
    x, y, side = session.box
    crops = np.stack([f.image[y : y + side, x : x + side].astype(np.float32) for f in frames])
    change = np.abs(np.diff(crops, axis=0)).mean(axis=(1, 2, 3))
    assert change[voiced[1:]].mean() > 1.5 * change[silent[1:]].mean()


def test_training_runs_on_teacher_frames_and_the_result_loads(tmp_path):
    from livecache.train.avatar import TrainSettings, train_avatar
    from livecache.train.distill import make_dataset

    data = make_dataset(sentences=1, sizes=(256,))
    assert data.crops.shape[1:] == (64, 64, 3) and len(data.crops) == len(data.windows) == len(data.states)
    assert set(data.states.tolist()) >= {0}  # speech frames are labelled speaking
    settings = TrainSettings(vae_steps=2, unet_steps=2, vae_batch=2, batch=2)
    train_avatar(data.crops, data.windows, data.states, data.reference_index, data.references, tmp_path / "m",
                 settings)
    engine = create_engine("diffusion", weights=str(tmp_path / "m"), temporal_cache=None)
    session = engine.open_session(default_portrait(512), SessionOptions(size=256))
    assert engine.render_batch([RenderRequest(session, 0.0, data.windows[0], "idle")])[0].image.shape == (256, 256, 3)


def test_workflow_renders_the_clip_headless(tmp_path):
    from livecache.cli import main as cli_main

    assert cli_main(["run", str(ROOT / "workflows" / "avatar_diffusion_api.json"), "--output", str(tmp_path)]) == 0
    frames = sorted(tmp_path.glob("avatar_diffusion_*.png"))
    assert len(frames) == int(len(_clip()) / 16000 * 12)
    from PIL import Image

    with Image.open(frames[0]) as picture:
        assert picture.size == (256, 256)


def test_audio_node_confines_paths_and_avatar_node_checks_inputs(tmp_path, monkeypatch):
    from livecache.nodes.avatar_nodes import AvatarDiffusion, LoadAudioFile

    monkeypatch.setenv("LIVECACHE_INPUT", str(tmp_path))
    (audio,) = LoadAudioFile().load("hello_avatar.wav")  # falls back to the shipped examples
    assert audio["sample_rate"] == 16000 and audio["waveform"].shape[:2] == (1, 1)
    with pytest.raises(WeightsError, match="not found inside"):
        LoadAudioFile().load("../../etc/passwd")
    shutil.copy(CLIP, tmp_path / "mine.wav")
    assert LoadAudioFile().load("mine.wav")[0]["waveform"].shape == audio["waveform"].shape
    portrait = torch.zeros(1, 64, 64, 3)
    with pytest.raises(ValueError, match="audio must be an AUDIO"):
        AvatarDiffusion().render(portrait, {"waveform": torch.zeros(5)}, "embedded:avatar", "256", 25, 1, True, 4)


def test_server_streams_diffusion_frames_over_the_websocket(tmp_path):
    from livecache.bench.loopback import spawn_server, ws_url
    from livecache.examples.ws_client import stream
    from livecache.realtime.audio import float_to_pcm16

    folder = _folder(tmp_path)
    frames: list = []
    with spawn_server("--engine", "diffusion", "--weights", str(folder), "--max-sessions", "1") as url:
        pcm = float_to_pcm16(_clip())
        result = asyncio.run(stream(ws_url(url), pcm, 16000, 1.5,
                                    options={"size": 256, "fps": 10},
                                    on_frame=lambda header, jpeg, audio: frames.append((header, jpeg))))
    assert not result.errors
    assert result.ready["size"] == 256 and len(result.ready["mouth_box"]) == 4
    assert len(frames) >= 3
    header, jpeg = frames[-1]
    assert header["type"] == "frame" and 0.0 <= header["mouth"] <= 1.0 and jpeg[:2] == b"\xff\xd8"


def test_serve_refuses_a_bad_weights_folder(tmp_path):
    import subprocess
    import sys

    folder = _folder(tmp_path)
    (folder / "vae" / "config.json").unlink()
    result = subprocess.run([sys.executable, "-m", "livecache.realtime.cli", "--port", "0", "--engine", "diffusion",
                             "--weights", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "vae/config.json: missing" in result.stderr


def test_shipped_weights_folder_is_small_and_safetensors_only():
    files = [p for p in AVATAR_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert load_model(AVATAR_DIR).spec.resolution == 64


def test_on_a_cpu_sessions_default_to_the_size_that_holds_the_frame_rate():
    """Old behaviour: every session without a size ran at 512 px, 6-10 fps on a CPU with frames dropping."""
    from livecache.realtime.hub import SESSION_FIELDS, SessionHub, session_options
    from livecache.realtime.schema import validate

    engine = _engine(device="cpu")
    assert engine.default_size == 256 and create_engine("embedded").default_size == 512

    async def run():
        hub = SessionHub(engine)
        try:
            unnamed = await hub.open(session_options(validate({}, SESSION_FIELDS, "x"), engine), "websocket")
            named = await hub.open(session_options(validate({"size": 512}, SESSION_FIELDS, "x"), engine), "websocket")
            return unnamed.info()["size"], named.info()["size"]
        finally:
            await hub.close()

    assert asyncio.run(run()) == (256, 512)  # the default follows the device; a client's choice is kept
