"""The avatar node's memory: clips that cannot fit are refused up front, the rest fill one output tensor."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from livecache.nodes import avatar_nodes, memory
from livecache.pipelines.frames import RenderedFrame

RATE = 16000


def _audio(seconds: float) -> dict:
    return {"waveform": torch.zeros(1, 1, int(seconds * RATE)), "sample_rate": RATE}


class _Renderer:
    """Stands in for the avatar renderer: frame k is filled with k % 256, made only when asked for."""

    def open_session(self, portrait, options):
        return options

    def render_clip(self, session, audio, fps, frames=None, progress=None):
        count = int(len(audio) / RATE * fps) if frames is None else frames
        for k in range(count):
            yield RenderedFrame(np.full((session.size, session.size, 3), k % 256, np.uint8), (k + 1) / fps, "idle", 0.0)


def _render(seconds: float, fps: int, size: str) -> torch.Tensor:
    portrait = torch.zeros(1, 64, 64, 3)
    return avatar_nodes.AvatarDiffusion().render(portrait, _audio(seconds), "embedded:avatar", size, fps, 1, True, 4)[0]


def test_a_clip_that_cannot_fit_is_refused_before_the_model_loads(monkeypatch):
    def no_engine(*_args):
        raise AssertionError("the model was loaded for a clip that cannot fit")

    monkeypatch.setattr(avatar_nodes, "_engine", no_engine)
    monkeypatch.setattr(memory, "available_memory", lambda: (8 * 10**9, "the test limit"))
    # the case: 180 s at 60 fps and 512 px is 10800 float32 frames, 34 GB, under an 8 GB limit
    with pytest.raises(MemoryError) as refused:
        _render(180.0, 60, "512")
    message = str(refused.value)
    assert "10800 frames of 512x512" in message and "34.0 GB" in message
    assert "the test limit leaves 8.0 GB" in message and "shorten the audio, or lower fps or size" in message

    monkeypatch.setattr(avatar_nodes, "_engine", lambda *_args: _Renderer())
    assert _render(1.0, 60, "512").shape == (60, 512, 512, 3)  # what fits still renders under the same limit


def test_frames_stream_into_one_preallocated_output(monkeypatch):
    monkeypatch.setattr(avatar_nodes, "_engine", lambda *_args: _Renderer())
    count, side = 50, 256
    out_bytes, frame_bytes = count * side * side * 3 * 4, side * side * 3
    _render(0.04, 25, str(side))  # first-call imports (scipy) are not the node's frames
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        frames = _render(count / 25, 25, str(side))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frames.shape == (count, side, side, 3) and frames.dtype == torch.float32
    expected = (torch.arange(count, dtype=torch.float32) / 255.0).view(-1, 1, 1, 1).expand_as(frames)
    assert torch.equal(frames, expected)
    # the output itself plus a few frames in flight; a list of frames + stack + float copies costs > 2x the output
    assert peak < out_bytes + 8 * frame_bytes, f"peak {peak / 1e6:.1f} MB for a {out_bytes / 1e6:.1f} MB output"


def test_available_memory_reads_the_address_space_limit():
    # the module and what it imports (the standard library), without the repository's ComfyUI entry
    # (__init__.py, which imports torch), so the child starts in a blink
    root = str(Path(memory.__file__).parents[1])
    script = (
        "import importlib, resource, sys, types\n"
        "package = sys.modules['lc'] = types.ModuleType('lc')\n"
        f"package.__path__ = [{root!r}]\n"
        "module = importlib.import_module('lc.nodes.memory')\n"
        "status_kib = importlib.import_module('lc.procfs').status_kib\n"
        "available_memory = module.available_memory\n"
        "room, hard = 2 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (status_kib('VmSize') * 1024 + room, hard))\n"
        "free, source = available_memory()\n"
        "print(free, source)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    free, source = out.stdout.split(" ", 1)
    assert 1.5 * 2**30 < int(free) <= 2 * 2**30 and "ulimit -v" in source
