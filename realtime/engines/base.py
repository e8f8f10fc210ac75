"""The one small interface every avatar engine implements.

The runtime owns time, audio and state: it keeps the audio timeline on the session clock, decides
speaking / listening / idle, and asks the engine for the frame at media time `t` with the audio window
that ends at `t`. Engines are therefore pure renderers of (portrait, audio window, state label) — the
LLIA recipe of state class labels as conditioning — which is what lets a GPU engine batch requests from
many sessions (`render_batch`) on its own worker without the server changing. Each engine is one of the
shared renderers in `pipelines/` plus these two classes, so what the server streams is what the nodes and
benches render.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ...pipelines.frames import STATES, RenderedFrame, RenderRequest, SessionOptions, State

# The frame vocabulary is the renderers' (pipelines/frames.py); the runtime reads it through this interface.
__all__ = ["STATES", "AvatarEngine", "EngineSession", "RenderRequest", "RenderedFrame", "SessionOptions", "State"]


class EngineSession(ABC):
    """Per-session engine state (prepared portrait, smoothing, blink schedule)."""

    @property
    @abstractmethod
    def mouth_box(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the mouth region in output pixels, so clients and tests can watch it."""

    def control(self, message: dict[str, object]) -> dict[str, object]:
        """Apply an engine-specific client control (e.g. the video engine's condition); returns what is
        now in effect. Raises ValueError naming the problem; engines without controls refuse them."""
        raise ValueError("this engine takes no condition; start the server with --engine video")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-session resources; the default engine holds none beyond memory."""


class AvatarEngine(ABC):
    """An engine renders frames for many sessions; the runtime calls it from worker threads only."""

    name: str = "engine"
    sample_rate: int = 16000
    audio_context_s: float = 0.064  # how much audio before `t` a request carries
    max_batch: int = 1  # requests the worker may hand over at once (a GPU engine raises this)
    workers: int = 1  # concurrent render_batch calls the engine tolerates

    @abstractmethod
    def open_session(self, portrait: np.ndarray, options: SessionOptions) -> EngineSession:
        """Prepare a session from an RGB portrait; raise portrait.PortraitError for unusable images."""

    @abstractmethod
    def render_batch(self, requests: Sequence[RenderRequest]) -> list[RenderedFrame]:
        """Render requests (each session's requests arrive in time order, never two at once)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free engine-wide resources (models, devices) at server shutdown."""
