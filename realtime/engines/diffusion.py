"""The diffusion avatar engine: the shared avatar renderer (`pipelines/avatar.py`) as a live engine.

The renderer holds the model, the stages and every acceleration (reference cache, temporal DeepCache,
batching, the stage pipeline, W8A8, bf16); this module only joins it to the runtime's interface, so
`livecache serve --engine diffusion` streams exactly what the ComfyUI node and `livecache bench avatar`
render.
"""

from __future__ import annotations

from ...pipelines.avatar import AvatarRenderer, AvatarSession
from .base import EngineSession, PortraitEngine


class DiffusionSession(AvatarSession, EngineSession):
    """An avatar session the runtime can drive (mouth box, controls, close)."""


class DiffusionEngine(AvatarRenderer, PortraitEngine):
    name = "diffusion"
    workers = 1  # one U-Net; concurrency comes from batching and the stage pipeline
    session_class = DiffusionSession
