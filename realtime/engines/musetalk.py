"""The MuseTalk engine: MuseTalk-format weights through the shared avatar renderer (`pipelines/musetalk.py`).

`livecache serve --engine musetalk --weights DIR` streams a portrait lip-synced by real talking-head weights
with the same accelerations as the diffusion avatar; this module only joins the renderer to the runtime's
interface.
"""

from __future__ import annotations

from ...pipelines.musetalk import MuseTalkRenderer, MuseTalkSession
from .base import EngineSession, PortraitEngine


class MuseTalkEngineSession(MuseTalkSession, EngineSession):
    """A MuseTalk session the runtime can drive (mouth box, controls, close)."""


class MuseTalkEngine(MuseTalkRenderer, PortraitEngine):
    name = "musetalk"
    workers = 1  # one U-Net; concurrency comes from batching and the stage pipeline
    session_class = MuseTalkEngineSession
