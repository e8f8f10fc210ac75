"""The MuseTalk engine: MuseTalk-format weights through the shared avatar renderer (`pipelines/musetalk.py`).

`livecache serve --engine musetalk --weights DIR` streams a portrait lip-synced by real talking-head weights
with the same accelerations as the diffusion avatar; this module only joins the renderer to the runtime's
interface, and renders one silent frame at start-up: a MuseTalk model's first call (kernel selection for
every new shape, Whisper's lazy set-up) takes seconds, which would otherwise be the first client's first frame.
"""

from __future__ import annotations

import numpy as np

from ...pipelines.frames import RenderRequest, SessionOptions
from ...pipelines.musetalk import MuseTalkRenderer, MuseTalkSession
from ...pipelines.portrait import default_portrait
from .base import EngineSession, PortraitEngine


class MuseTalkEngineSession(MuseTalkSession, EngineSession):
    """A MuseTalk session the runtime can drive (mouth box, controls, close)."""


class MuseTalkEngine(MuseTalkRenderer, PortraitEngine):
    name = "musetalk"
    workers = 1  # one U-Net; concurrency comes from batching and the stage pipeline
    session_class = MuseTalkEngineSession

    def __init__(self, *args, warm_up: bool = True, **options) -> None:
        super().__init__(*args, **options)
        if warm_up:
            session = self.open_session(default_portrait(256), SessionOptions(size=256))
            silence = np.zeros(int(self.audio_context_s * self.sample_rate), np.float32)
            self.render_batch([RenderRequest(session, self.audio_context_s, silence, "idle")])
            self.clock.seconds.clear()
            self.clock.frames.clear()
