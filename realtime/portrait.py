"""Uploaded portraits: decoding and bounding what a client sends before any renderer sees it.

Face finding and the default portrait are the renderers' (`pipelines/portrait.py`); the server only
turns bytes into a bounded RGB image here, with a message that says what to fix.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

from ..pipelines.portrait import PortraitError

MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MIN_SIDE = 128
MAX_SIDE = 4096  # so at most 16.8 million pixels (50 MB as RGB) are ever decoded from one upload
KEEP_SIDE = 1024
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what browsers and phones produce; no other decoder sees uploads


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
