"""The causal video stream: the embedded causal video model rendered frame by frame, condition changeable.

Each session owns a `CausalVideoStream` with the causal cache on: when its frame buffer runs dry, the
next clip (the model's chunk of frames) is sampled with the LCM-style few-step sampler while attending
to the cached keys/values of the last `window` frames, and the clip's frames are committed to the
cache. Work per clip is therefore flat however long the stream runs, and memory is bounded by the
window. Frames are small (16×16) and upscaled to the session size for display.

The live engine (`livecache serve --engine video`, `realtime/engines/video.py`) is this renderer; the
runtime still owns time: frames are requested on the session clock and rendered on the engine's
worker thread, off the event loop. A condition (`"7"`, `"a seven"`, `"shapes"`, `"texture"` or a class
index) switches the class for the next clip; the committed frames keep steering the motion, so the
picture changes over a clip or two instead of cutting. The stream draws pictures only: no mouth, no audio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from ..accel.causal_cache import CausalCacheConfig, CausalVideoStream
from ..models.video import (
    CLASS_NAMES,
    FRESH_STEPS,
    SAMPLERS,
    CausalVideoDiT,
    clip_steps,
    load_video_model,
    parse_video_prompt,
)
from .frames import RenderedFrame, RenderRequest, SessionOptions


class VideoStreamSession:
    """One stream: its causal cache, noise generator, current class and the frames of the last clip."""

    def __init__(self, model: CausalVideoDiT, options: SessionOptions, window: int, steps: int,
                 sampler: str, prompt: str | int | None = None) -> None:
        self.model = model
        self.options = options
        self.stream = CausalVideoStream(model, CausalCacheConfig(enabled=True, window=window))
        self.steps, self.sampler = steps, SAMPLERS[sampler]
        self.generator = torch.Generator().manual_seed(options.seed)
        # the first class: the prompt's, else one chosen by the seed
        self.label = options.seed % len(CLASS_NAMES) if prompt is None else parse_video_prompt(prompt)
        self._drawn: int | None = None  # the class of the last clip sampled (None: none yet)
        self._frames: deque[np.ndarray] = deque()

    def set_condition(self, prompt: str | int) -> int:
        """The class of the next clip from a prompt (`"7"`, `"a seven"`, `"shapes"`, `"texture"`) or a class
        index; raises ValueError for one it cannot read. Call it between frames (the live runtime does so on
        the render worker, in turn with this session's frames)."""
        self.label = parse_video_prompt(prompt)
        return self.label

    def next_frame(self) -> np.ndarray:
        """The next RGB uint8 frame at the session size, sampling a new clip when the buffer is empty."""
        if not self._frames:
            cfg = self.model.config
            noise = torch.randn(1, cfg.chunk, cfg.channels, cfg.resolution, cfg.resolution,
                                generator=self.generator)
            steps = clip_steps(self.label != self._drawn, self.steps, max(self.steps, FRESH_STEPS))
            self._drawn = self.label
            clip = self.stream.next_chunk(noise, torch.tensor([self.label]), self.sampler, steps,
                                          self.generator)
            pixels = ((clip[0].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            size = (self.options.size, self.options.size)
            self._frames.extend(cv2.resize(f, size, interpolation=cv2.INTER_CUBIC) for f in pixels)
        return self._frames.popleft()


class VideoRenderer:
    """One shared model; sessions keep their own bounded caches. `weights`: a folder from
    `livecache train video` (default: the shipped model)."""

    session_class: type[VideoStreamSession] = VideoStreamSession  # the live engine substitutes its EngineSession

    def __init__(self, weights: Path | None = None, window: int = 4, steps: int = 3, sampler: str = "lcm",
                 threads: int = 1) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        CausalCacheConfig(window=window)
        self.model = load_video_model(weights)
        # one thread: this model's ops are small, and a second OpenMP thread costs more in synchronisation
        # than it gains
        torch.set_num_threads(threads)
        self.window, self.steps, self.sampler = window, steps, sampler

    def open_session(self, options: SessionOptions, prompt: str | int | None = None) -> VideoStreamSession:
        """A stream generated from the class condition alone, starting from `prompt` (None: chosen by the seed)."""
        return self.session_class(self.model, options, self.window, self.steps, self.sampler, prompt)

    def render_batch(self, requests: Sequence[RenderRequest]) -> list[RenderedFrame]:
        out = []
        for req in requests:
            assert isinstance(req.session, VideoStreamSession)
            out.append(RenderedFrame(req.session.next_frame(), req.t, req.state, None))
        return out
