"""The embedded default engine: the procedural avatar (`pipelines/procedural.py`) as a live engine.

No model weights, real time on the CPU; this module only joins the renderer to the runtime's interface.
"""

from __future__ import annotations

from ...pipelines.procedural import ProceduralRenderer, ProceduralSession
from .base import EngineSession, PortraitEngine


class EmbeddedSession(ProceduralSession, EngineSession):
    """A procedural avatar session the runtime can drive (mouth box, controls, close)."""


class EmbeddedEngine(ProceduralRenderer, PortraitEngine):
    name = "embedded"
    workers = 2  # numpy and OpenCV release the GIL, so two sessions render in parallel on 2 cores
    session_class = EmbeddedSession
