"""What a renderer takes and gives: per-session options, one frame's request, one rendered frame.

Renderers are pure functions of (portrait, audio window, state label) at a media time `t`; the live
runtime, the ComfyUI nodes, the benches and training all speak these types, so they live below every
front end (the runtime's engine interface, `realtime/engines/base.py`, builds on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

State = Literal["speaking", "listening", "idle"]
STATES: tuple[State, ...] = ("speaking", "listening", "idle")


@dataclass(frozen=True)
class SessionOptions:
    """Per-session choices a client may make; engines may ignore what they cannot honour."""

    size: int = 512
    fps: float = 25.0
    seed: int = 0


@dataclass
class RenderRequest:
    """One frame to render: the audio window (float32 mono, engine rate) ends exactly at media time `t`."""

    session: Any  # the renderer's own per-session state (in the live runtime, the engine's EngineSession)
    t: float
    audio: np.ndarray
    state: State


@dataclass
class RenderedFrame:
    """An RGB uint8 frame for media time `t`; `mouth` (0 closed .. 1 wide open) feeds metrics and clients, and is
    None from renderers that draw no mouth (the video stream)."""

    image: np.ndarray
    t: float
    state: State
    mouth: float | None
