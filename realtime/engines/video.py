"""The autoregressive video engine: the causal video stream (`pipelines/video.py`) as a live engine.

A `condition` control message (`{"prompt": "7"}`, `"shapes"`, `"texture"`) switches the class for the
next clip; audio is silence for this engine. This module only joins the renderer to the runtime's interface.
"""

from __future__ import annotations

from ...pipelines.video import VideoRenderer, VideoStreamSession
from .base import AvatarEngine, EngineSession


class VideoSession(VideoStreamSession, EngineSession):
    """A video stream the runtime can drive; its `control` takes the condition."""


class VideoEngine(VideoRenderer, AvatarEngine):
    name = "video"
    workers = 1  # torch already uses every core for one clip
    session_class = VideoSession
