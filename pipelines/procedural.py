"""The procedural avatar: animates a portrait from audio with no model weights, on the CPU.

Mouth opening follows loudness, its width follows the spectrum (bright fricatives and front vowels
spread the lips, dark back vowels purse them); eyes blink on a seeded random schedule; the head sways,
nods with speech and breathes. Per frame the work is choosing precomputed rig patches, one affine warp
and the session's share of smoothing — a few milliseconds at 512x512 on one core. It is the embedded
default engine (`realtime/engines/embedded.py`) and the teacher the diffusion avatar is distilled from.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import cv2
import numpy as np

from .frames import RenderedFrame, RenderRequest, SessionOptions, State
from .portrait import prepare
from .rig import FaceRig

SILENCE_DB = -48.0  # loudness that keeps the mouth closed
FULL_DB = -12.0  # loudness that opens it fully
_BLINK_EVERY = {"speaking": 3.2, "listening": 4.0, "idle": 5.5}  # mean seconds between blinks
_SWAY = {"speaking": 1.0, "listening": 0.7, "idle": 0.45}  # head motion amplitude per state
BLINK_S = 0.16


def mouth_targets(audio: np.ndarray, rate: int) -> tuple[float, float]:
    """(opening 0..1, width ~0.86..1.14) from the most recent ~40 ms of float audio."""
    window = audio[-int(0.04 * rate) :]
    rms = float(np.sqrt(np.mean(window.astype(np.float64) ** 2))) if window.size else 0.0
    db = 20 * np.log10(rms + 1e-9)
    opening = float(np.clip((db - SILENCE_DB) / (FULL_DB - SILENCE_DB), 0, 1))
    if opening == 0.0:
        return 0.0, 1.0
    spec = np.abs(np.fft.rfft(window * np.hanning(window.size)))
    freqs = np.fft.rfftfreq(window.size, 1 / rate)
    low = spec[(freqs >= 200) & (freqs < 1000)].sum()
    high = spec[(freqs >= 1800) & (freqs < 5000)].sum()
    brightness = high / (low + high + 1e-9)
    return opening, float(np.clip(0.86 + 0.5 * brightness, 0.86, 1.14))


class ProceduralSession:
    """One animated portrait: mouth smoothing, blink schedule and head motion, seeded per session."""

    def __init__(self, rig: FaceRig, options: SessionOptions) -> None:
        self.rig = rig
        self.options = options
        rng = np.random.default_rng(options.seed)
        self._rng = rng
        self.motion = HeadMotion(rig.image.shape[0], rng)
        self._opening = 0.0
        self._width = 1.0
        self._next_blink = float(rng.uniform(0.8, 2.5))

    @property
    def mouth_box(self) -> tuple[int, int, int, int]:
        r = self.rig.lips
        return r.x, r.y, r.w, r.h

    def _blink(self, t: float, state: State) -> float:
        if t > self._next_blink + BLINK_S:
            self._next_blink = t + float(self._rng.exponential(_BLINK_EVERY[state] - 1.0)) + 1.0
        phase = (t - self._next_blink) / BLINK_S
        return float(np.clip(1 - abs(2 * phase - 1), 0, 1)) if 0 <= phase <= 1 else 0.0

    def pose(self, req: RenderRequest, rate: int) -> np.ndarray:
        """The face for `req` before head motion: mouth from the audio, eyelids from the blink schedule."""
        opening, width = mouth_targets(req.audio, rate) if req.state == "speaking" else (0.0, 1.0)
        # fast attack, slower release: lips snap open on onsets and settle without flicker
        k = 0.75 if opening > self._opening else 0.45
        self._opening += k * (opening - self._opening)
        self._width += 0.5 * (width - self._width)
        frame = self.rig.image.copy()
        self.rig.pose(frame, self._opening, self._width, self._blink(req.t, req.state))
        return frame

    def close_mouth(self) -> None:
        """Shut the mouth now instead of letting the release smoothing close it over several frames (the avatar's
        speech was cut off)."""
        self._opening = 0.0

    def render(self, req: RenderRequest, rate: int) -> RenderedFrame:
        frame = self.motion.apply(self.pose(req, rate), req.t, req.state, self._opening)
        return RenderedFrame(frame, req.t, req.state, self._opening)


class HeadMotion:
    """Sway, nods with speech and breathing about the neck, seeded per session.

    Shared by the renderers that animate a prepared portrait, so a diffusion-rendered mouth moves with
    the same head as the procedural one.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self._phases = rng.uniform(0, 2 * np.pi, 6)
        self._nod = 0.0
        self._pivot = (size / 2, size * 0.8)

    def apply(self, frame: np.ndarray, t: float, state: State, opening: float) -> np.ndarray:
        """`frame` warped for media time `t`; `opening` (0..1) drives the nod, so call once per frame."""
        self._nod += 0.15 * (opening - self._nod)
        p, amp = self._phases, _SWAY[state]
        angle = amp * (0.9 * np.sin(0.9 * t + p[0]) + 0.5 * np.sin(2.3 * t + p[1]))
        dx = amp * (2.5 * np.sin(0.6 * t + p[2]) + 1.0 * np.sin(1.7 * t + p[3]))
        dy = amp * 1.5 * np.sin(0.8 * t + p[4]) + 6.0 * self._nod
        breath = 1.0 + 0.006 * np.sin(2 * np.pi * t / 4.2 + p[5])
        m = cv2.getRotationMatrix2D(self._pivot, float(angle), float(breath))
        m[:, 2] += (dx, dy)
        return cv2.warpAffine(frame, m, frame.shape[1::-1], flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)


class ProceduralRenderer:
    """Weight-free renderer; prepared rigs are cached per portrait so repeat sessions start instantly."""

    sample_rate = 16000
    session_class: type[ProceduralSession] = ProceduralSession  # an engine substitutes its EngineSession

    def __init__(self, cache_size: int = 8) -> None:
        self._rigs: OrderedDict[tuple[str, int], FaceRig] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _rig(self, portrait: np.ndarray, size: int) -> FaceRig:
        key = (hashlib.blake2b(portrait.tobytes(), digest_size=16).hexdigest(), size)
        with self._lock:
            if key in self._rigs:
                self._rigs.move_to_end(key)
                return self._rigs[key]
        rig = FaceRig(*prepare(portrait, size))
        with self._lock:
            self._rigs[key] = rig
            while len(self._rigs) > self._cache_size:
                self._rigs.popitem(last=False)
        return rig

    def open_session(self, portrait: np.ndarray, options: SessionOptions) -> ProceduralSession:
        return self.session_class(self._rig(portrait, options.size), options)

    def render_batch(self, requests: Sequence[RenderRequest]) -> list[RenderedFrame]:
        out = []
        for req in requests:
            assert isinstance(req.session, ProceduralSession)
            out.append(req.session.render(req, self.sample_rate))
        return out
