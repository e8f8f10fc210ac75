"""Uploaded portraits: decoding and bounding what a client sends before any renderer sees it.

Face finding and the default portrait are the renderers' (`pipelines/portrait.py`); the server only
turns bytes into a bounded RGB image here, with a message that says what to fix.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..pipelines.portrait import PortraitError

MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MIN_SIDE = 128
MAX_SIDE = 4096
KEEP_SIDE = 1024


def decode_upload(data: bytes) -> np.ndarray:
    """Decode and bound an uploaded image, with a message that says what to fix."""
    if not data:
        raise PortraitError("portrait is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise PortraitError(f"portrait is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES} bytes")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise PortraitError("portrait is not a decodable image (use PNG or JPEG)")
    h, w = bgr.shape[:2]
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise PortraitError(f"portrait is {w}x{h}; sides must be between {MIN_SIDE} and {MAX_SIDE} pixels")
    if max(h, w) > KEEP_SIDE:  # output is at most 512 px: keeping more only costs memory per stored upload
        k = KEEP_SIDE / max(h, w)
        bgr = cv2.resize(bgr, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
