"""The one small, engine-neutral interface every live engine implements.

The runtime owns time, audio and state: it keeps the audio timeline on the session clock, decides
speaking / listening / idle, and asks the engine for the frame at media time `t` with the audio window
that ends at `t`. Engines are therefore pure renderers of (their session, audio window, state label) — the
LLIA recipe of state class labels as conditioning — which is what lets a GPU engine batch requests from
many sessions (`render_batch`) on its own worker without the server changing.

Engines differ in what they take and give, and say so in `Engine.traits` instead of faking what they lack:
an avatar takes a portrait, follows the states, has a mouth and gives the session's audio back; the video
engine takes a prompt and gives pictures only. Sessions open from a typed `SessionSource`, and controls
arrive as typed `Control` values. Every method here is called on the engine's worker threads, never on the
event loop, and never concurrently for one session (the live session serialises a session's renders and
controls), so engine sessions need no locks of their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from ...pipelines.frames import STATES, RenderedFrame, RenderRequest, SessionOptions, State

__all__ = ["STATES", "Condition", "Control", "Engine", "EngineSession", "EngineTraits", "ForceState", "Interrupt",
           "PortraitEngine", "PortraitSource", "PromptSource", "RenderRequest", "RenderedFrame", "SessionOptions",
           "SessionSource", "State"]


@dataclass(frozen=True)
class EngineTraits:
    """What an engine takes and gives; /api/info reports it and the page shows only the controls that apply."""

    takes: Literal["portrait", "prompt"]  # what a session opens from
    states: bool  # follows (and can be forced into) speaking / listening / idle
    mouth: bool  # has a mouth: sessions report a mouth box, frames a mouth opening
    audio: bool  # gives the session's audio back (the avatar's voice); False: frames carry pictures only
    conditions: tuple[str, ...] = ()  # what a `condition` control can name (empty: the engine takes none)

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "conditions": list(self.conditions)}


@dataclass(frozen=True)
class PortraitSource:
    """An RGB uint8 portrait, already decoded and bounded by the server."""

    image: np.ndarray


@dataclass(frozen=True)
class PromptSource:
    """A prompt (text or a class index); None lets the engine choose from the session's seed."""

    prompt: str | int | None = None


SessionSource = PortraitSource | PromptSource


@dataclass(frozen=True)
class ForceState:
    """Pin speaking / listening / idle, or None to follow voice activity again."""

    state: State | None


@dataclass(frozen=True)
class Interrupt:
    """Barge-in: the audio that had not played yet was dropped."""


@dataclass(frozen=True)
class Condition:
    """What a prompt engine draws from now on: a prompt text or a class index."""

    value: str | int


Control = ForceState | Interrupt | Condition


class EngineSession(ABC):  # noqa: B024 - every method has a sensible default; engines override what applies
    """Per-session engine state (a prepared portrait, a stream's cache)."""

    @property
    def mouth_box(self) -> tuple[int, int, int, int] | None:
        """(x, y, w, h) of the mouth region in output pixels for engines with a mouth; None otherwise."""
        return None

    def describe(self) -> dict[str, object]:
        """What the client's `ready` message tells about this session: the mouth box of an engine with a mouth;
        engines with more to say (the video engine's condition) add it."""
        box = self.mouth_box
        return {} if box is None else {"mouth_box": list(box)}

    def control(self, control: Control) -> dict[str, object]:
        """Apply a control after the runtime applied its own part (state, audio); returns what is now in effect
        for the client. Raises ValueError naming the problem. By default state and interrupt need nothing more
        and a condition is refused."""
        if isinstance(control, Condition):
            raise ValueError("this engine takes no condition; start the server with --engine video")
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-session resources; the default engines hold none beyond memory."""


class Engine(ABC):
    """An engine renders frames for many sessions; the runtime calls it from worker threads only."""

    name: str = "engine"
    traits: EngineTraits
    sample_rate: int = 16000
    audio_context_s: float = 0.064  # how much audio before `t` a request carries
    max_batch: int = 1  # requests the worker may hand over at once (a GPU engine raises this)
    workers: int = 1  # concurrent render_batch calls the engine tolerates
    # the frame size a session gets when the client names none: the largest this engine holds its frame rate at
    # on the device it runs on (the page and /api/info show it); clients may still ask for any size
    default_size: int = 512

    @abstractmethod
    def open(self, source: SessionSource, options: SessionOptions) -> EngineSession:
        """Prepare a session from what the engine takes (`traits.takes`); raise ValueError (PortraitError for an
        unusable portrait) naming the problem."""

    @abstractmethod
    def render_batch(self, requests: Sequence[RenderRequest]) -> list[RenderedFrame]:
        """Render requests (each session's requests arrive in time order, never two at once)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free engine-wide resources (models, devices) at server shutdown."""


class PortraitEngine(Engine):
    """An avatar engine: opens sessions from a portrait with its renderer's `open_session(image, options)`."""

    traits = EngineTraits(takes="portrait", states=True, mouth=True, audio=True)

    @abstractmethod
    def open_session(self, portrait: np.ndarray, options: SessionOptions) -> EngineSession:
        """The renderer's own session for an RGB portrait (the engine's renderer mixin provides it)."""

    def open(self, source: SessionSource, options: SessionOptions) -> EngineSession:
        if not isinstance(source, PortraitSource):
            raise ValueError(f"the {self.name} engine takes a portrait, not a prompt")
        return self.open_session(source.image, options)

