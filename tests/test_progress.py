"""Long loops report progress and stop at once when their host's check raises (headless twin of the
real-ComfyUI interrupt test in tests/comfy/test_comfy_progress.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livecache.accel.cache_schedule import measure_segments
from livecache.accel.progress import Progress
from livecache.models.sampling import initial_noise, make_scheduler, sample
from livecache.models.video import CausalVideoDiT, generate
from livecache.nodes import cachequant_nodes, context
from livecache.nodes.cachequant_nodes import CalibrateSchedule
from livecache.nodes.diffusers_nodes import LoadDiffusersModel

from .test_causal_video import TINY


class Stop(Exception):
    """What the host's check raises (ComfyUI raises its InterruptProcessingException)."""


class Host:
    """A host that asks for a stop once `after` steps of the outer loop are done, and counts what ran since."""

    def __init__(self, after: int | None = None) -> None:
        self.after = after
        self.reports: list[tuple[int, int]] = []
        self.stopping = False
        self.work_after_stop = 0  # model calls (or items) that ran after the stop was asked for

    def update(self, done: int, total: int) -> None:
        self.reports.append((done, total))
        if self.after is not None and done >= self.after:
            self.stopping = True

    def check(self) -> None:
        if self.stopping:
            raise Stop

    def progress(self) -> Progress:
        return Progress(self.update, self.check, bar=False)

    def count(self, *_args) -> None:
        self.work_after_stop += self.stopping


@pytest.fixture(scope="module")
def digits():
    return LoadDiffusersModel().load("embedded:digits")[0]


def test_a_raising_check_ends_the_loop_before_the_next_item_and_closes_a_lazy_source():
    host, ran, closed = Host(after=3), [], []

    def source():
        try:
            for k in range(10):
                ran.append(k)
                yield k
        finally:
            closed.append(True)

    with pytest.raises(Stop):
        for _ in host.progress().loop(source(), "test", "item", total=10):
            pass
    assert ran == [0, 1, 2] and host.reports == [(0, 10), (1, 10), (2, 10), (3, 10)] and closed == [True]


def test_sampling_reports_every_step_and_stops_within_one(digits):
    cond, uncond = digits.encode_prompt("3"), digits.encode_prompt("")
    noise = initial_noise(digits, 1, 0)
    full = Host()
    sample(digits, make_scheduler("ddim", digits.scheduler_config), cond, uncond, noise, 4, 2.0,
           progress=full.progress())
    assert full.reports == [(k, 4) for k in range(5)]
    host = Host(after=2)
    handle = digits.unet.register_forward_pre_hook(host.count)
    try:
        with pytest.raises(Stop):
            sample(digits, make_scheduler("ddim", digits.scheduler_config), cond, uncond, noise, 4, 2.0,
                   progress=host.progress())
    finally:
        handle.remove()
    assert host.reports[-1] == (2, 4) and host.work_after_stop == 0


def test_segment_measurement_stops_between_generations_and_returns_nothing():
    host, calls = Host(after=2), []

    def generate_one(schedule):
        calls.append(schedule)
        return torch.ones(4)

    with pytest.raises(Stop):
        measure_segments(generate_one, 6, 3, progress=host.progress())
    assert len(calls) == 1 + 2  # the reference and the two segments done before the stop


def test_an_interrupted_calibration_node_stops_at_once_and_writes_no_schedule(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("LIVECACHE_OUTPUT", str(tmp_path))
    host = Host(after=1)  # one calibration run recorded, then Cancel
    monkeypatch.setattr(cachequant_nodes, "host_progress", host.progress)
    handle = digits.unet.register_forward_pre_hook(host.count)
    try:
        with pytest.raises(Stop):
            CalibrateSchedule().calibrate(digits, 3, 0, "1, 7", 1, 6, "ddim", 2.0, "output", save_as="s/digits")
    finally:
        handle.remove()
    assert host.work_after_stop == 0 and not list(tmp_path.rglob("*"))


def test_video_generation_stops_between_chunks():
    host, model = Host(after=1), CausalVideoDiT(TINY).eval()
    with pytest.raises(Stop):
        generate(model, _cache(), torch.tensor([1]), 4, progress=host.progress())
    assert host.reports == [(0, 4), (1, 4)]
    done = Host()
    video = generate(model, _cache(), torch.tensor([1]), 3, progress=done.progress())
    assert video.shape[1] == 3 * TINY.chunk and done.reports[-1] == (3, 3)


def test_avatar_clip_stops_before_the_next_chunk_is_rendered():
    from livecache.pipelines.portrait import default_portrait
    from livecache.realtime.engines.base import SessionOptions

    from .test_avatar_diffusion import _clip, _engine

    engine = _engine(max_batch=2)
    session = engine.open_session(default_portrait(256), SessionOptions(size=128))
    host = Host(after=1)
    handle = engine.model.unet.register_forward_pre_hook(host.count)
    frames = []
    try:
        with pytest.raises(Stop):
            for frame in engine.render_clip(session, _clip()[:16000], 10.0, progress=host.progress()):
                frames.append(frame)
    finally:
        handle.remove()
        engine.close()
    assert len(frames) == 1 and host.reports[-1] == (1, 10)
    assert host.work_after_stop <= 1  # at most the chunk a pipelined stage had already started


def test_headless_progress_is_a_console_bar_without_a_stop_check():
    progress = context.host_progress()
    assert progress.check is None and progress.update is None and progress.bar
    assert list(progress.loop(np.arange(3), "test", "item")) == [0, 1, 2]


def _cache():
    from livecache.accel.causal_cache import CausalCacheConfig

    return CausalCacheConfig(enabled=True, window=4)
