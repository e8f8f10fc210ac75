"""The embedded default engine: the procedural avatar (`pipelines/procedural.py`) as a live engine.

No model weights, real time on the CPU; this module only joins the renderer to the runtime's interface.
"""

from __future__ import annotations

from ...pipelines.procedural import ProceduralRenderer, ProceduralSession
from .base import Control, EngineSession, Interrupt, PortraitEngine


class EmbeddedSession(ProceduralSession, EngineSession):
    """A procedural avatar session the runtime can drive (mouth box, controls, close)."""

    def control(self, control: Control) -> dict[str, object]:
        """An interruption closes the mouth at once: left to its smoothing, it would take several frames."""
        if isinstance(control, Interrupt):
            self.close_mouth()
        return super().control(control)


class EmbeddedEngine(ProceduralRenderer, PortraitEngine):
    name = "embedded"
    workers = 2  # numpy and OpenCV release the GIL, so two sessions render in parallel on 2 cores
    session_class = EmbeddedSession
