"""Causal cache sharing (Ca2-VDM) and the AR video model: exactness, bounded memory, samplers, weights,
training, the graph nodes and workflow, and the `video` engine streaming over the websocket API."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from livecache.accel.causal_cache import CausalCacheConfig, CausalVideoStream, TemporalKVCache
from livecache.bench.video_content import classify, content_report
from livecache.cli import main as cli_main
from livecache.models.features import DigitFeatures
from livecache.models.loading import WeightsError
from livecache.models.video import (
    CLASS_NAMES,
    SAMPLERS,
    VIDEO_DIR,
    CausalVideoDiT,
    VideoModelConfig,
    generate,
    load_video_classifier,
    load_video_model,
    parse_video_prompt,
    save_video_model,
)
from livecache.nodes.video_nodes import CausalCache, LoadVideoModel, VideoSampler
from livecache.train.video import train_video, train_video_features
from livecache.train.video_data import DIGIT_COLOURS, make_clips

ROOT = Path(__file__).resolve().parents[1]
TINY = VideoModelConfig(resolution=16, patch=4, dim=32, depth=2, heads=2, chunk=4, context=4)


def tiny_model(seed: int = 0) -> CausalVideoDiT:
    """A small model with every weight random (the real init zeroes the gates, which would hide bugs)."""
    torch.manual_seed(seed)
    model = CausalVideoDiT(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


class FrameCounter(torch.nn.Module):
    """Wraps a denoiser and records how many frames each call runs through the network (the work)."""

    def __init__(self, model: CausalVideoDiT) -> None:
        super().__init__()
        self.model, self.config, self.frames = model, model.config, []

    def forward(self, frames, *args, **kwargs):
        self.frames.append(frames.shape[1])
        return self.model(frames, *args, **kwargs)


def run(model, enabled: bool, window: int, chunks: int = 3, sampler: str = "lcm", steps: int = 2) -> torch.Tensor:
    return generate(model, CausalCacheConfig(enabled, window), torch.tensor([1, 11]), chunks, 4, steps, sampler,
                    seed=5)


def chain_ulps(chunks: int, steps: int) -> int:
    """The reassociation bound for an autoregressive chain: each of its `chunks × (steps + 1)` model calls (the
    denoising steps and the commit) adds its own reordering error to the frames the next call is conditioned on,
    so the bound of one call (64 eps of the magnitude) grows with the number of calls in the chain."""
    return 64 * chunks * (steps + 1)


@pytest.mark.parametrize("sampler", ["lcm", "ddim"])
def test_cache_shared_equals_recompute_while_context_fits(sampler, close_reassociated):
    model = tiny_model()
    cached, recomputed = run(model, True, 16, sampler=sampler), run(model, False, 16, sampler=sampler)
    assert cached.shape == (2, 12, 3, 16, 16)
    assert float(cached.std()) > 0.05  # not a trivial (constant) output
    close_reassociated(cached, recomputed, chain_ulps(3, 2))


def test_after_eviction_the_modes_diverge_so_the_check_above_can_fail(close_reassociated):
    model = tiny_model()
    cached, recomputed = run(model, True, 4, chunks=3), run(model, False, 4, chunks=3)
    close_reassociated(cached[:, :8], recomputed[:, :8], chain_ulps(2, 2))  # clips 1-2: context fits the window
    assert (cached[:, 8:] - recomputed[:, 8:]).abs().max() > 1e-3  # clip 3 sees keys made with evicted context


def test_cache_is_bounded_and_work_per_clip_is_flat():
    counted = FrameCounter(tiny_model())
    stream = CausalVideoStream(counted, CausalCacheConfig(True, window=6))
    generator = torch.Generator().manual_seed(0)
    sizes = set()
    for i in range(10):
        stream.next_chunk(torch.randn(1, 4, 3, 16, 16, generator=generator), torch.tensor([3]),
                          SAMPLERS["lcm"], 2, generator)
        assert stream.cache.frames == min(4 * (i + 1), 6)
        sizes.add(stream.cache.nbytes)
    assert len(sizes) == 1  # memory fixed from the first clip on, however long the stream runs
    assert counted.frames == [4] * 30  # 2 steps + 1 commit per clip, only the new frames every time

    counted.frames.clear()
    recompute = CausalVideoStream(counted, CausalCacheConfig(False, window=6))
    for _ in range(4):
        recompute.next_chunk(torch.randn(1, 4, 3, 16, 16, generator=generator), torch.tensor([3]),
                             SAMPLERS["lcm"], 2, generator)
    assert counted.frames == [4, 4, 8, 8, 10, 10, 10, 10]  # the context is rerun at every step


@pytest.mark.parametrize(("sampler", "steps"), [("lcm", 1), ("lcm", 2), ("lcm", 4), ("ddim", 8)])
def test_samplers_shapes_and_calls(sampler, steps):
    calls = []

    def denoise(x, t):
        calls.append(t)
        return torch.tanh(x)

    noise = torch.randn(2, 4, 3, 16, 16)
    out = SAMPLERS[sampler](denoise, noise, steps, torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and out.abs().max() <= 1
    assert len(calls) == steps and calls[0] == 1.0 and all(a > b for a, b in zip(calls, calls[1:], strict=False))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="window must be a positive"):
        CausalCacheConfig(window=0)
    with pytest.raises(ValueError, match="window must be a positive"):
        TemporalKVCache(-1)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"frames must be \[batch, frames, 3, 16, 16\]"):
        model(torch.zeros(1, 4, 3, 32, 32), torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.bool),
              torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="class ids in 0..11"):
        model(torch.zeros(1, 4, 3, 16, 16), torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.bool),
              torch.tensor([12]), 0)
    with pytest.raises(ValueError, match="unknown keys"):
        VideoModelConfig.from_dict({"dim": 32, "colour": 1})
    assert parse_video_prompt("a seven") == 7 and parse_video_prompt("Shapes") == 10
    assert parse_video_prompt("drifting texture") == 11 and CLASS_NAMES[parse_video_prompt(3)] == "digit 3"
    with pytest.raises(ValueError, match="cannot read 'a cat'"):
        parse_video_prompt("a cat")


def test_weights_round_trip_and_clear_errors(tmp_path):
    model = tiny_model()
    folder = tmp_path / "video"
    save_video_model(model, folder)
    loaded = load_video_model(folder)
    x = torch.randn(1, 4, 3, 16, 16)
    args = (torch.full((1, 4), 0.5), torch.zeros(1, 4, dtype=torch.bool), torch.tensor([2]), 0)
    with torch.no_grad():
        assert (loaded(x, *args) - model(x, *args)).abs().max() < 0.05  # fp16 weights
    with pytest.raises(WeightsError, match="no such video model folder"):
        load_video_model(tmp_path / "nowhere")
    bad_config = tmp_path / "bad_config"
    shutil.copytree(folder, bad_config)
    config = json.loads((bad_config / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**config, "dim": 64}))
    with pytest.raises(WeightsError, match="does not match the model config"):
        load_video_model(bad_config)
    (bad_config / "config.json").write_text(json.dumps({**config, "wings": 2}))
    with pytest.raises(WeightsError, match=r"config\.json: video model config: unknown keys \['wings'\]"):
        load_video_model(bad_config)
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no \.safetensors weight file"):
        load_video_model(folder)


def test_training_runs_a_few_steps_and_writes_a_loadable_model(tmp_path):
    out = train_video(tmp_path / "trained", steps=2, batch=2, frames=6, config=TINY)
    assert load_video_model(out).config == TINY


def test_per_clip_labels_change_the_condition_mid_stream(close_reassociated):
    model = tiny_model()
    fixed = generate(model, CausalCacheConfig(True, 16), torch.tensor([2, 7]), 3, steps=2, seed=4)
    switched = generate(model, CausalCacheConfig(True, 16), torch.tensor([[2, 7], [2, 7], [11, 0]]), 3, steps=2,
                        seed=4)
    close_reassociated(fixed[:, :8], switched[:, :8])  # the same until the change ...
    assert (fixed[:, 8:] - switched[:, 8:]).abs().max() > 1e-2  # ... then the new class steers the clip
    with pytest.raises(ValueError, match=r"labels must be \[batch\] or \[chunks=3, batch\]"):
        generate(model, CausalCacheConfig(True, 16), torch.zeros(2, 2, dtype=torch.long), 3)


def test_centred_clips_start_every_digit_in_the_middle_and_move():
    labels = torch.arange(10).repeat(3)
    clips = make_clips(labels, 4, torch.Generator().manual_seed(2), 16, centred=True)
    alpha = (clips.amax(dim=2) + 1) / 2  # [B, F, H, W] brightness in 0..1
    axis = torch.arange(16, dtype=torch.float32)
    centre_x = (alpha * axis).sum(dim=(2, 3)) / alpha.sum(dim=(2, 3))
    centre_y = (alpha * axis[:, None]).sum(dim=(2, 3)) / alpha.sum(dim=(2, 3))
    # every first frame has its digit's mass within a pixel of where the centred sprite puts it ...
    reference = make_clips(labels, 1, torch.Generator().manual_seed(7), 16, centred=True)
    ref_alpha = (reference.amax(dim=2) + 1) / 2
    ref_x = (ref_alpha * axis).sum(dim=(2, 3)) / ref_alpha.sum(dim=(2, 3))
    assert (centre_x[:, 0] - ref_x[:, 0]).abs().max() < 1e-4
    # ... then moves, as an uncentred clip does; uncentred first frames are spread over the frame
    assert ((centre_x[:, 3] - centre_x[:, 0]).abs() + (centre_y[:, 3] - centre_y[:, 0]).abs()).min() > 0.1
    spread = make_clips(labels, 1, torch.Generator().manual_seed(2), 16)
    spread_alpha = (spread.amax(dim=2) + 1) / 2
    assert ((spread_alpha * axis).sum(dim=(2, 3)) / spread_alpha.sum(dim=(2, 3))).std() > 0.5


def test_shipped_classifier_reads_the_data_colour_blind():
    classifier = load_video_classifier()
    labels = torch.arange(12).repeat(4)
    clips = make_clips(labels, 3, torch.Generator().manual_seed(123), VideoModelConfig().resolution)
    assert (classify(classifier, clips) == labels[:, None]).float().mean() > 0.95
    # a seven recoloured like a zero is still a seven: the colour is not what decides
    seven = make_clips(torch.tensor([7]), 3, torch.Generator().manual_seed(5), VideoModelConfig().resolution)
    zero_coloured = ((seven + 1) / 2 * DIGIT_COLOURS[0][:, None, None]) * 2 - 1
    assert (classify(classifier, zero_coloured) == 7).all()


def test_content_report_scores_every_condition_and_the_change():
    torch.manual_seed(0)
    classifier = DigitFeatures(len(CLASS_NAMES)).eval()
    report = content_report(tiny_model(), classifier, clips=3, chunk_length=2, steps=1, sampler="lcm",
                            switch_at=1)
    assert list(report["per_class"]) == list(CLASS_NAMES)
    assert all(0 <= row["share"] <= 1 and row["data_frame_change"] > 0 for row in report["per_class"].values())
    assert len(report["after_change"]["share_per_clip"]) == 2 and report["after_change"]["pairs"][7] == \
        "digit 7 -> digit 0"
    with pytest.raises(ValueError, match="switch_at must be in 1..2"):
        content_report(tiny_model(), classifier, clips=3, chunk_length=2, steps=1, sampler="lcm", switch_at=3)


def test_video_features_training_writes_a_loadable_classifier(tmp_path):
    out = train_video_features(tmp_path / "features.safetensors", steps=2, batch=4, resolution=16)
    assert load_video_classifier(out).head.out_features == 12
    with pytest.raises(WeightsError, match="no video classifier"):
        load_video_classifier(tmp_path / "missing.safetensors")


def _asked_class_share(labels: torch.Tensor) -> torch.Tensor:
    """Per stream, the share of frames the shipped classifier reads as the asked class (live settings, 12 clips
    as `bench video`, another seed than the bench's)."""
    model, classifier = load_video_model(), load_video_classifier()
    video = generate(model, CausalCacheConfig(True, model.config.context), labels, chunks=12, steps=3, seed=9,
                     fresh_steps=4)
    return (classify(classifier, video) == labels[:, None]).float().mean(dim=1)


def test_shipped_model_shows_every_digit_legibly_and_shapes_and_texture():
    share = _asked_class_share(torch.arange(len(CLASS_NAMES)))
    assert share[:10].min() >= 0.9, share.tolist()  # issue 19's bar: >= 90% of frames read as the asked digit
    assert share[10:].min() >= 0.75, share.tolist()  # shapes take a clip to form from noise


def test_shipped_model_loads_and_moves():
    model = load_video_model()
    assert model.config == VideoModelConfig() and (VIDEO_DIR / "model.safetensors").stat().st_size < 5_000_000
    video = generate(model, CausalCacheConfig(True, 4), torch.tensor([10]), chunks=3, steps=2)
    frames = (video[0] + 1) / 2
    assert (frames[1:] - frames[:-1]).abs().mean() > 0.002  # consecutive frames differ: it moves
    assert (frames[1:] - frames[:-1]).abs().mean() < 0.2  # ... coherently, not as fresh noise each frame


def test_nodes_do_not_mutate_and_sample_image_frames(close_reassociated):
    (loaded,) = LoadVideoModel().load("embedded:video")
    (cached,) = CausalCache().apply(loaded, True, 4)
    assert not loaded.cache.enabled and cached.cache.enabled and cached.model is loaded.model
    (frames,) = VideoSampler().sample(cached, "texture", 2, 4, 2, "lcm", 0)
    assert frames.shape == (8, 16, 16, 3) and 0 <= float(frames.min()) and float(frames.max()) <= 1
    (again,) = VideoSampler().sample(loaded, "texture", 2, 4, 2, "lcm", 0)  # recompute: the same frames
    close_reassociated(frames, again)


@pytest.mark.parametrize("name", ["causal_video_default.json", "causal_video_default_api.json"])
def test_video_workflow_runs_headless(tmp_path, name):
    assert cli_main(["run", str(ROOT / "workflows" / name), "--output", str(tmp_path)]) == 0
    images = sorted(tmp_path.glob("causal_video_default_*.png"))
    assert len(images) == 32
    with Image.open(images[0]) as picture:
        assert picture.size == (128, 128)


async def _video_session(base: str) -> dict:
    import aiohttp
    import websockets

    from livecache.bench.loopback import ws_url
    from livecache.examples.ws_client import unpack_frame

    url = ws_url(base)
    seen: dict = {"frames": [], "conditions": [], "errors": [], "http": [], "headers": [], "audio": 0}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/info") as res:
            seen["info"] = await res.json()
    async with websockets.connect(url, max_size=16 * 1024 * 1024) as ws:
        await ws.send(json.dumps({"type": "start", "portrait": "default"}))  # this engine takes a prompt
        seen["refused"] = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "start", "size": 256, "fps": 12, "seed": 3, "prompt": "shapes"}))
        await ws.send(json.dumps({"type": "state", "state": "speaking"}))  # this engine has no states
        while len(seen["frames"]) < 36:
            message = await asyncio.wait_for(ws.recv(), 20)
            if isinstance(message, bytes):
                header, jpeg, pcm = unpack_frame(message)
                image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                seen["frames"].append((header["seq"], image.shape, float(image.std())))
                seen["headers"].append(header)
                seen["audio"] += len(pcm)
                if len(seen["frames"]) == 12:
                    await ws.send(json.dumps({"type": "condition", "prompt": "texture"}))
                    await ws.send(json.dumps({"type": "condition", "prompt": "a cat"}))
                if len(seen["frames"]) == 24:  # the same over HTTP (what the page uses for WebRTC sessions)
                    async with aiohttp.ClientSession() as http:
                        for prompt in ("5", "a dog"):
                            async with http.post(f"{base}/api/sessions/{seen['session']}/condition",
                                                 json={"prompt": prompt}) as res:
                                seen["http"].append((res.status, await res.json()))
                continue
            event = json.loads(message)
            if event["type"] == "ready":
                seen["session"] = event["session"]
                seen["ready"] = event
            elif event["type"] == "condition":
                seen["conditions"].append(event)
            elif event["type"] == "error":
                seen["errors"].append(event)
        await ws.send(json.dumps({"type": "stop"}))
    return seen


def test_video_engine_streams_over_websocket_and_changes_condition_mid_stream():
    from livecache.bench.loopback import spawn_server

    with spawn_server("--engine", "video") as base:
        seen = asyncio.run(_video_session(base))
    assert seen["info"]["capabilities"]["takes"] == "prompt" and not seen["info"]["capabilities"]["mouth"]
    assert seen["refused"]["code"] == "bad_portrait" and seen["refused"]["field"] == "portrait"
    assert "mouth_box" not in seen["ready"] and seen["ready"]["condition"] == {"class": 10, "name": "shapes"}
    assert seen["conditions"] == [{"type": "condition", "class": 11, "name": "texture"}]
    # no states to force; the session survives a condition it cannot read
    assert [(e["code"], e.get("field")) for e in seen["errors"]] == [("bad_state", "state"), ("bad_condition", None)]
    assert "no states" in seen["errors"][0]["message"]
    assert not any("mouth" in h or "state" in h for h in seen["headers"])  # no fake mouth or state
    assert seen["audio"] == 0 and all(h["audio"] == 0 for h in seen["headers"])  # pictures only
    assert seen["http"][0] == (200, {"class": 5, "name": "digit 5"})
    assert seen["http"][1][0] == 400 and "cannot read 'a dog'" in seen["http"][1][1]["error"]
    seqs = [s for s, _, _ in seen["frames"]]
    assert seqs == sorted(seqs) and len(seqs) == 36
    assert all(shape == (256, 256, 3) for _, shape, _ in seen["frames"])
    assert all(std > 1.0 for _, _, std in seen["frames"])  # pictures, not blank frames


class CountingModel(torch.nn.Module):
    """A video model that counts its calls: a clip costs its sampler steps plus one commit call."""

    def __init__(self, model: CausalVideoDiT) -> None:
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_a_fresh_clip_takes_fresh_steps_and_a_continuation_steps():
    """First clip and the first after a class change: `fresh_steps`; the rest: `steps` (the calls counted)."""
    model, per_clip = CountingModel(tiny_model()), []
    labels = torch.tensor([[3], [3], [5], [5]])  # a change at clip 2
    generate(model, CausalCacheConfig(True, 4), labels, chunks=4, steps=2, fresh_steps=4,
             on_chunk=lambda index, stream: per_clip.append(model.calls - sum(per_clip)))
    assert per_clip == [4 + 1, 2 + 1, 4 + 1, 2 + 1]
    with pytest.raises(ValueError, match="fresh_steps"):
        generate(model, CausalCacheConfig(True, 4), labels, chunks=4, fresh_steps=0)


def test_live_session_samples_a_fresh_clip_with_more_steps_after_a_change():
    from livecache.pipelines.frames import SessionOptions
    from livecache.pipelines.video import VideoStreamSession

    model = CountingModel(tiny_model())
    session = VideoStreamSession(model, SessionOptions(size=32), window=4, steps=3, sampler="lcm", prompt="7")
    calls = []
    for change in (None, None, "shapes", None):
        if change:
            session.set_condition(change)
        before = model.calls
        for _ in range(TINY.chunk):  # one clip's frames
            session.next_frame()
        calls.append(model.calls - before)
    assert calls == [4 + 1, 3 + 1, 4 + 1, 3 + 1]
