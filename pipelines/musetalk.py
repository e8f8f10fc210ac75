"""The MuseTalk renderer: MuseTalk-format weights (`models/musetalk.py`) behind the shared avatar renderer.

Everything that makes the diffusion avatar fast (`pipelines/avatar.py`: batching across sessions, the
overlapped audio → U-Net → VAE stages, the temporal DeepCache, W8A8, bf16/fp16, the per-session reference
latents) applies unchanged; this module supplies what MuseTalk does differently:

- framing: MuseTalk's face box (landmark extent from the chin up to as far above the nose as the chin is
  below it, `bbox_shift` moving that nose point, v1.5's `extra_margin` below the chin), here placed from
  OpenCV's bundled Haar face box (`pipelines/portrait.py`, no downloaded detector) with the landmark
  positions as fixed fractions of it; the box is resized to a square `resolution` crop as MuseTalk does;
- the model: the lower half of the crop blacked out, both latents once per session, one U-Net call at
  timestep 0 per frame, conditioned on the Whisper features of the newest 200 ms (live frames cannot look
  ahead; MuseTalk's offline windows reach 120 ms past the frame);
- blending: MuseTalk's `get_image_prepare_material` — the decoded face pasted into a 1.5x square around the
  box, a mask of the face's lower part (an ellipse in the face box standing in for face parsing, rows above
  half the square cut) blurred with a kernel of a tenth of its side;
- `compile`: `torch.compile` with CUDA graphs on the U-Net, on CUDA devices only (on a CPU it stays off:
  compile time dwarfs any gain at these sizes and CUDA graphs need CUDA; `compiled` says which).

speaking / listening / idle come from the runtime as for every engine: MuseTalk has no state input, so the
states reach it through the audio (a listening avatar's own audio is silence, served from the silence
cache) and through the head motion shared with the other avatars.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..accel.temporal_cache import TemporalReuseConfig
from ..models.loading import WeightsError
from ..models.musetalk import MuseTalkModel, MuseTalkSpec, load_musetalk
from .avatar import AvatarRenderer, AvatarSession, _to_tensor, lips_box
from .frames import SessionOptions
from .portrait import FaceLayout, prepare
from .procedural import HeadMotion

# The default reuse threshold of the diffusion avatar (0.25 in natural-log mel) in Whisper's log-mel units
# (log10, divided by 4): the same change of the sound, so the cache reuses on the same audio.
MUSETALK_REUSE = TemporalReuseConfig(threshold=0.25 / (4 * np.log(10)))
# Where MuseTalk's landmarks fall in a Haar face box (fractions of its width / height), read off the
# default portrait and frontal photos: jaw extent, nose point 29, chin; v1.5's 10 px margin at ~250 px faces.
JAW_X = (0.10, 0.90)
NOSE_Y, CHIN_Y, MARGIN_Y = 0.57, 0.98, 0.04
EXPAND = 1.5  # MuseTalk's blending `expand`
UPPER_BOUNDARY = 0.5  # MuseTalk's `upper_boundary_ratio`


@dataclass(frozen=True)
class FaceGeometry:
    """MuseTalk's face box (x1, y1, x2, y2) and the square blending box around it, in portrait pixels."""

    face: tuple[int, int, int, int]
    blend: tuple[int, int, int, int]


def face_geometry(layout: FaceLayout, size: int, spec: MuseTalkSpec, bbox_shift: int = 0) -> FaceGeometry:
    """MuseTalk's `get_landmark_and_bbox` + `get_crop_box` on a Haar box; `bbox_shift` in portrait pixels
    (+ moves the upper edge down, as in MuseTalk, where it moves the nose point down)."""
    fx, fy, fw, fh = layout.face
    nose, chin = fy + NOSE_Y * fh + bbox_shift, fy + CHIN_Y * fh
    upper = max(0.0, nose - (chin - nose))
    lower = chin + (MARGIN_Y * fh if spec.version == "1.5" else 0.0)
    x1, x2 = int(fx + JAW_X[0] * fw), int(fx + JAW_X[1] * fw)
    y1, y2 = int(upper), int(min(size, lower))
    if y2 - y1 < 8 or x2 - x1 < 8 or x1 < 0:
        raise ValueError(f"bbox_shift {bbox_shift} leaves no face box ({x1}, {y1}, {x2}, {y2}); use a smaller shift")
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * EXPAND)
    return FaceGeometry((x1, y1, x2, y2), (cx - s, cy - s, cx + s, cy + s))


def blend_mask(geometry: FaceGeometry, size: int) -> np.ndarray:
    """Full-frame soft mask [size, size, 1]: the face box's lower face, cut above half the blending square,
    blurred with MuseTalk's kernel (odd, a tenth of the square's side)."""
    x1, y1, x2, y2 = geometry.face
    bx1, by1, bx2, _ = geometry.blend
    side = bx2 - bx1
    mask = np.zeros((side, side), np.uint8)
    centre = ((x1 + x2) // 2 - bx1, (y1 + y2) // 2 - by1)
    cv2.ellipse(mask, centre, ((x2 - x1) // 2, (y2 - y1) // 2), 0, 0, 360, 255, -1)
    mask[: int(side * UPPER_BOUNDARY)] = 0
    kernel = int(0.1 * side // 2 * 2) + 1
    mask = cv2.GaussianBlur(mask, (kernel, kernel), 0).astype(np.float32) / 255.0
    full = np.zeros((size, size), np.float32)
    sx, sy = max(0, bx1), max(0, by1)
    ex, ey = min(size, bx1 + side), min(size, by1 + side)
    full[sy:ey, sx:ex] = mask[sy - by1 : ey - by1, sx - bx1 : ex - bx1]
    return full[..., None]


class MuseTalkSession(AvatarSession):
    """One portrait prepared for MuseTalk: face box, its crop, both reference latents and the blend mask."""

    def __init__(self, image: np.ndarray, layout: FaceLayout, geometry: FaceGeometry, crop: np.ndarray,
                 reference: torch.Tensor, options: SessionOptions) -> None:
        self.image, self.layout, self.options, self.geometry = image, layout, options, geometry
        self.key = next(AvatarSession._serial)
        self.crop = crop  # the face box at model resolution: what the reference latents were encoded from
        self.reference = reference
        mask = blend_mask(geometry, image.shape[0])
        ys, xs = np.nonzero(mask[..., 0])
        self._window = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        y0, y1, x0, x1 = self._window
        self.mask = mask[y0:y1, x0:x1]
        fx1, fy1, fx2, fy2 = geometry.face
        kx, ky = crop.shape[1] / (fx2 - fx1), crop.shape[0] / (fy2 - fy1)
        lx, ly, lw, lh = lips_box(layout)
        self.lips_in_crop = (int((lx - fx1) * kx), int((ly - fy1) * ky), max(1, int(lw * kx)), max(1, int(lh * ky)))
        self.motion = HeadMotion(image.shape[0], np.random.default_rng(options.seed))
        self._closed = self._dark_share(crop.astype(np.float32) / 255.0)

    @property
    def region(self) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = self.geometry.face
        return x1, y1, x2 - x1, y2 - y1

    def paste(self, crop: np.ndarray) -> np.ndarray:
        """The portrait with the decoded face (float RGB 0..1) resized into the face box, blended softly."""
        x1, y1, x2, y2 = self.geometry.face
        composed = self.image.astype(np.float32)
        composed[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR) * 255.0
        y0, ye, x0, xe = self._window
        frame = self.image.copy()
        region = frame[y0:ye, x0:xe].astype(np.float32)
        frame[y0:ye, x0:xe] = np.clip(region + (composed[y0:ye, x0:xe] - region) * self.mask, 0, 255).astype(np.uint8)
        return frame


class MuseTalkRenderer(AvatarRenderer):
    """The avatar renderer with a MuseTalk model; options as `AvatarRenderer` plus MuseTalk's own."""

    session_class: type[MuseTalkSession] = MuseTalkSession

    def __init__(self, weights: str | Path | None = None, model: MuseTalkModel | None = None, *,
                 resolution: int = 256, bbox_shift: int = 0, compile: bool = False,
                 temporal_cache: TemporalReuseConfig | None = MUSETALK_REUSE, device: str | None = None,
                 bf16: bool | None = None, dtype: torch.dtype | None = None, steps: int | None = None,
                 **options) -> None:
        if model is None:
            if not weights:
                raise WeightsError("the musetalk engine needs --weights DIR: a MuseTalk folder in safetensors "
                                   "(docs/avatar.md, MuseTalk; convert the authors' files with "
                                   "livecache convert musetalk SRC DST)")
            model = load_musetalk(weights, MuseTalkSpec(resolution=resolution))
        if steps not in (None, 1):
            raise ValueError(f"MuseTalk renders in one U-Net call per frame; steps must be 1, got {steps}")
        self.bbox_shift = int(bbox_shift)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None and bf16 is None and device != "cpu":
            dtype = torch.float16  # the authors' --use_float16
        super().__init__(model=model, device=device, bf16=bool(bf16), dtype=dtype, temporal_cache=temporal_cache,
                         **options)
        self.compiled = bool(compile) and self.device.type == "cuda"
        if self.compiled:  # CUDA graphs replay the U-Net's kernels: the launch overhead goes
            self.model.unet = torch.compile(self.model.unet, mode="reduce-overhead")

    def open_session(self, portrait: np.ndarray, options: SessionOptions) -> MuseTalkSession:
        image, layout = prepare(portrait, options.size)
        geometry = face_geometry(layout, options.size, self.model.spec, self.bbox_shift)
        x1, y1, x2, y2 = geometry.face
        side = self.model.spec.resolution
        crop = cv2.resize(image[y1:y2, x1:x2], (side, side), interpolation=cv2.INTER_LANCZOS4)
        reference = self.model.encode_reference(_to_tensor([crop]))
        return self.session_class(image, layout, geometry, crop, reference, options)

    def _audio_features(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.audio_features(windows)

    def _latents(self, reference: torch.Tensor, features: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.model.predict(reference, features)  # no state input: states reach MuseTalk via its audio

    @property
    def silent_windows(self) -> int:
        """Audio windows served from the silence cache since the model loaded."""
        return self.model.silent_windows

