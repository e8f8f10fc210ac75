"""The autoregressive video engine: the causal video stream (`pipelines/video.py`) as a live engine.

It takes a prompt (a digit, "shapes" or "texture"), changeable mid-stream with a condition control, and
gives pictures only: no states, no mouth, no audio. This module only joins the renderer to the runtime's
interface.
"""

from __future__ import annotations

from ...pipelines.video import CLASS_NAMES, VideoRenderer, VideoStreamSession
from .base import Condition, Control, Engine, EngineSession, EngineTraits, PromptSource, SessionOptions, SessionSource


class VideoSession(VideoStreamSession, EngineSession):
    """A video stream the runtime can drive; its condition control sets the next clip's class."""

    def control(self, control: Control) -> dict[str, object]:
        if isinstance(control, Condition):
            label = self.set_condition(control.value)
            return {"class": label, "name": CLASS_NAMES[label]}
        return super().control(control)

    def describe(self) -> dict[str, object]:
        return {"condition": {"class": self.label, "name": CLASS_NAMES[self.label]}}


class VideoEngine(VideoRenderer, Engine):
    name = "video"
    traits = EngineTraits(takes="prompt", states=False, mouth=False, audio=False, conditions=tuple(CLASS_NAMES))
    workers = 1  # torch already uses every core for one clip
    session_class = VideoSession

    def open(self, source: SessionSource, options: SessionOptions) -> EngineSession:
        if not isinstance(source, PromptSource):
            raise ValueError("the video engine takes a prompt (a digit, 'shapes' or 'texture'), not a portrait")
        return self.open_session(options, source.prompt)
