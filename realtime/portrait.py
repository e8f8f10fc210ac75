"""Reference portraits: the default face drawn in code, validation of uploads, and face finding.

The default portrait is painted procedurally so the project ships no image assets and no weights,
yet it is realistic enough (shaded skin, eye sockets, nose bridge) for OpenCV's stock Haar cascade to
find it: the same face-finding path then serves both the default and uploaded portraits.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageOps

MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MIN_SIDE = 128
MAX_SIDE = 4096  # so at most 16.8 million pixels (50 MB as RGB) are ever decoded from one upload
KEEP_SIDE = 1024
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what browsers and phones produce; no other decoder sees uploads


class PortraitError(ValueError):
    """An uploaded portrait was rejected; the message is shown to the user as is."""


@dataclass(frozen=True)
class FaceLayout:
    """Where the animated parts are, in pixels of the prepared (square) portrait."""

    face: tuple[int, int, int, int]  # x, y, w, h
    left_eye: tuple[int, int]
    right_eye: tuple[int, int]
    mouth: tuple[int, int]
    eye_radius: int
    mouth_width: int


def _radial(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)


@lru_cache(maxsize=4)
def default_portrait(size: int = 512) -> np.ndarray:
    """Paint a frontal face (RGB uint8, size x size); deterministic so tests and benches agree."""
    s = size / 512.0
    h = w = size
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32) / h
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.array([70, 110, 150], np.float32)  # blue-grey backdrop
    img *= (0.75 + 0.35 * (1 - yy))[..., None]
    # shoulders and neck
    cv2.ellipse(img, (int(256 * s), int(560 * s)), (int(230 * s), int(140 * s)), 0, 0, 360, (60, 70, 90), -1)
    cv2.rectangle(img, (int(215 * s), int(330 * s)), (int(297 * s), int(440 * s)), (190, 140, 115), -1)
    # hair behind the head
    cv2.ellipse(img, (int(256 * s), int(215 * s)), (int(150 * s), int(170 * s)), 0, 0, 360, (45, 30, 25), -1)
    # skin with soft shading towards the rim
    r = _radial(h, w, 256 * s, 250 * s, 118 * s, 150 * s)
    skin = np.array([225, 175, 145], np.float32)
    shade = np.clip(1.05 - 0.35 * r**2, 0.55, 1.05)[..., None]
    img = np.where((r <= 1.0)[..., None], skin * shade, img)
    # fringe
    cv2.ellipse(img, (int(256 * s), int(135 * s)), (int(125 * s), int(55 * s)), 0, 180, 360, (45, 30, 25), -1)
    cv2.ellipse(img, (int(256 * s), int(130 * s)), (int(118 * s), int(35 * s)), 0, 0, 180, (45, 30, 25), -1)
    # eye sockets: the dark band the cascade looks for
    for ex in (205, 307):
        sock = _radial(h, w, ex * s, 222 * s, 38 * s, 22 * s)
        img *= np.clip(0.72 + 0.28 * sock, 0.72, 1.0)[..., None]
    for ex in (205, 307):
        c = (int(ex * s), int(222 * s))
        cv2.ellipse(img, c, (int(24 * s), int(12 * s)), 0, 0, 360, (235, 230, 225), -1)
        cv2.circle(img, c, int(10 * s), (90, 60, 40), -1)
        cv2.circle(img, c, int(5 * s), (15, 10, 10), -1)
        cv2.ellipse(img, c, (int(25 * s), int(13 * s)), 0, 180, 360, (60, 40, 35), max(1, int(3 * s)))
        cv2.ellipse(img, (c[0], int(192 * s)), (int(30 * s), int(8 * s)), 0, 190, 350, (50, 35, 30), max(2, int(6 * s)))
    # nose: bright bridge, shadowed sides, nostrils
    bridge = _radial(h, w, 256 * s, 255 * s, 12 * s, 45 * s)
    img *= np.clip(1.12 - 0.12 * bridge, 1.0, 1.12)[..., None]
    cv2.ellipse(img, (int(256 * s), int(292 * s)), (int(22 * s), int(10 * s)), 0, 0, 180, (170, 115, 95), -1)
    for nx in (246, 266):
        cv2.circle(img, (int(nx * s), int(296 * s)), int(4 * s), (95, 55, 50), -1)
    # closed lips, slightly smiling
    cv2.ellipse(img, (int(256 * s), int(338 * s)), (int(38 * s), int(9 * s)), 0, 180, 360, (175, 80, 80), -1)
    cv2.ellipse(img, (int(256 * s), int(338 * s)), (int(36 * s), int(12 * s)), 0, 0, 180, (195, 95, 95), -1)
    cv2.line(img, (int(218 * s), int(338 * s)), (int(294 * s), int(338 * s)), (110, 45, 50), max(1, int(3 * s)))
    img = cv2.GaussianBlur(img, (0, 0), 1.6 * s)
    rng = np.random.default_rng(7)
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)  # a little skin texture
    return np.clip(img, 0, 255).astype(np.uint8)


def decode_upload(data: bytes) -> np.ndarray:
    """Decode and bound an uploaded image, with a message that says what to fix.

    The header is read first and the pixels only once its format and dimensions are within the limits, so a
    small file that claims a huge image (a decompression bomb) costs microseconds, not gigabytes. JPEGs are
    decoded at a reduced scale when that still leaves KEEP_SIDE pixels; animated images give their first
    frame; the EXIF orientation is applied, so phone photos stand upright.
    """
    if not data:
        raise PortraitError("portrait is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise PortraitError(f"portrait is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES} bytes")
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning becomes a refusal, not a line in the log
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise PortraitError(f"portrait claims far more pixels than allowed; sides must be between {MIN_SIDE} and "
                            f"{MAX_SIDE} pixels") from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise PortraitError(f"portrait is not a decodable image (use {', '.join(UPLOAD_FORMATS)})") from None
    w, h = image.size
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:
        raise PortraitError(f"portrait is {w}x{h}; sides must be between {MIN_SIDE} and {MAX_SIDE} pixels")
    image.draft("RGB", (KEEP_SIDE, KEEP_SIDE))  # JPEG only: let the decoder downscale by 2, 4 or 8
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit greyscale: scale, do not clip
            image = image.convert("I").point(lambda v: v / 256).convert("L")
        rgb = np.asarray(image.convert("RGB"))
    except MemoryError:
        raise
    except Exception as exc:  # decoders of untrusted bytes raise many types; all mean a broken file
        raise PortraitError(f"portrait could not be decoded (truncated or corrupt {image.format}): {exc}") from None
    if max(rgb.shape[:2]) > KEEP_SIDE:  # output is at most 512 px: keeping more only costs memory per upload
        k = KEEP_SIDE / max(rgb.shape[:2])
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * k), round(rgb.shape[0] * k)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


@lru_cache(maxsize=1)
def _cascades() -> tuple[cv2.CascadeClassifier, cv2.CascadeClassifier]:
    root = cv2.data.haarcascades
    face = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
    eye = cv2.CascadeClassifier(root + "haarcascade_eye.xml")
    if face.empty() or eye.empty():
        raise RuntimeError(f"OpenCV Haar cascades missing under {root!r}; install opencv-python-headless<5")
    return face, eye


def find_face(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """Largest frontal face box (x, y, w, h); raises PortraitError when there is none."""
    gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    scale = 512.0 / max(gray.shape)
    small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else gray
    faces = _cascades()[0].detectMultiScale(small, scaleFactor=1.1, minNeighbors=4, minSize=(48, 48))
    if len(faces) == 0:
        raise PortraitError("no face found: use a well-lit, frontal portrait with the whole face visible")
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    inv = 1.0 / scale if scale < 1 else 1.0
    return int(x * inv), int(y * inv), int(w * inv), int(h * inv)


def prepare(rgb: np.ndarray, size: int) -> tuple[np.ndarray, FaceLayout]:
    """Crop a square around the face, resize to `size`, and place eyes and mouth.

    Eye and mouth positions follow the Haar box proportions (stable across faces); the eye cascade
    refines the eyes when it finds exactly two, which matters for tilted or oddly framed crops.
    """
    fx, fy, fw, fh = find_face(rgb)
    side = int(max(fw, fh) * 1.7)
    cx, cy = fx + fw / 2, fy + fh / 2 + 0.1 * fh
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    pad = max(0, -x0, -y0, x0 + side - rgb.shape[1], y0 + side - rgb.shape[0])
    src = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT_101) if pad else rgb
    crop = src[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
    img = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    k = size / side
    box = (int((fx - x0) * k), int((fy - y0) * k), int(fw * k), int(fh * k))
    bx, by, bw, bh = box
    left, right = (bx + int(0.31 * bw), by + int(0.40 * bh)), (bx + int(0.69 * bw), by + int(0.40 * bh))
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    upper = gray[by : by + bh // 2, bx : bx + bw]
    eyes = _cascades()[1].detectMultiScale(upper, 1.1, 5, minSize=(max(8, bw // 10),) * 2)
    if len(eyes) == 2:
        (ax, ay, aw, ah), (qx, qy, qw, qh) = sorted(eyes.tolist())
        left = (bx + ax + aw // 2, by + ay + ah // 2)
        right = (bx + qx + qw // 2, by + qy + qh // 2)
    mouth = ((left[0] + right[0]) // 2, by + int(0.80 * bh))
    layout = FaceLayout(
        face=box, left_eye=left, right_eye=right, mouth=mouth,
        eye_radius=max(6, int(0.11 * bw)), mouth_width=max(16, int(0.36 * bw)),
    )
    return img, layout
