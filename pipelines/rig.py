"""A 2-D face rig: mouth and eyelid poses precomputed as small patches, so a frame costs a few copies.

Each pose is a `cv2.remap` of a small region whose displacement falls to zero at the region border, so
pasting a patch never leaves a seam. Poses are quantised (mouth: opening x width, eyes: closure) and
computed once per portrait; per frame the engine only picks the nearest patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .portrait import FaceLayout

MOUTH_OPEN_LEVELS = 16
MOUTH_WIDTH_LEVELS = 5
MOUTH_WIDTHS = np.linspace(0.86, 1.14, MOUTH_WIDTH_LEVELS)
BLINK_LEVELS = 7

_INTERIOR = np.array([58, 18, 24], np.float32)
_TEETH = np.array([236, 232, 222], np.float32)
_TONGUE = np.array([160, 70, 80], np.float32)


@dataclass(frozen=True)
class Region:
    x: int
    y: int
    w: int
    h: int

    def clip(self, size: int) -> Region:
        x, y = max(0, self.x), max(0, self.y)
        return Region(x, y, min(size, self.x + self.w) - x, min(size, self.y + self.h) - y)

    def view(self, img: np.ndarray) -> np.ndarray:
        return img[self.y : self.y + self.h, self.x : self.x + self.w]


def _segment_map(y: np.ndarray, pts_dst: list[np.ndarray], pts_src: list[float]) -> np.ndarray:
    """Piecewise-linear dest->src y mapping per column (breakpoints may vary by column)."""
    out = np.array(y, np.float32)
    for i in range(len(pts_dst) - 1):
        d0, d1, s0, s1 = pts_dst[i], pts_dst[i + 1], pts_src[i], pts_src[i + 1]
        span = np.maximum(d1 - d0, 1e-3)
        inside = (y >= d0) & (y < d1)
        out = np.where(inside, s0 + (y - d0) * (s1 - s0) / span, out)
    return out


def _remap(roi: np.ndarray, src_x: np.ndarray, src_y: np.ndarray) -> np.ndarray:
    return cv2.remap(roi, src_x.astype(np.float32), src_y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _mouth_patch(base: np.ndarray, region: Region, centre: tuple[float, float], half_w: float,
                 opening: float, width: float) -> np.ndarray:
    roi = region.view(base).astype(np.float32)
    h, w = roi.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = centre[0] - region.x, centre[1] - region.y
    x, y = xx - cx, yy - cy
    top, bottom = -cy, h - 1 - cy
    # lips spread (ee) or purse (oo) around the centre, fading out towards the region border
    fall = np.clip(1 - (x / (w / 2)) ** 2, 0, 1) * np.clip(1 - (y / (h / 2)) ** 2, 0, 1)
    src_x = cx + x / (1 + (width - 1) * fall)
    prof = np.clip(1 - (x / (half_w * width)) ** 2, 0, 1) ** 0.6
    gap = opening * 0.85 * half_w * prof
    up, low = -0.25 * gap, 0.75 * gap
    breaks = [np.full_like(y, top), up, low, np.full_like(y, bottom)]
    src_y = cy + _segment_map(y, breaks, [top, 0.0, 0.0, bottom])
    out = _remap(roi, src_x, src_y)
    # inside of the mouth: dark cavity, upper teeth, a hint of tongue; 1-px soft edges
    alpha = np.clip(np.minimum(y - up, low - y), 0, 1)[..., None]
    depth = np.clip((y - up) / np.maximum(gap, 1e-3), 0, 1)[..., None]
    teeth = (depth < 0.28) & (gap[..., None] > 3)
    cavity = np.where(teeth, _TEETH, _INTERIOR * (1.0 - 0.3 * depth) + _TONGUE * np.clip(depth - 0.6, 0, 1))
    return np.clip(out * (1 - alpha) + cavity * alpha, 0, 255).astype(np.uint8)


def _eye_patch(base: np.ndarray, region: Region, centre: tuple[float, float], radius: float,
               closure: float) -> np.ndarray:
    roi = region.view(base).astype(np.float32)
    h, w = roi.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = centre[0] - region.x, centre[1] - region.y
    top_lid, low_lid = cy - 0.55 * radius, cy + 0.45 * radius
    prof = np.clip(1 - ((xx - cx) / (1.05 * radius)) ** 2, 0, 1) ** 0.5
    drop = closure * (low_lid - top_lid) * prof
    # skin above the eye slides down over it while the eye itself squeezes towards the lower lid
    lid = top_lid - 0.2 * radius  # below the brow: the brow itself stays put
    breaks = [np.full_like(yy, lid), top_lid + drop, np.full_like(yy, low_lid), np.full_like(yy, h)]
    src_y = _segment_map(yy, breaks, [lid, top_lid, low_lid, float(h)])
    return _remap(roi, xx, src_y).astype(np.uint8)


class FaceRig:
    """Precomputed poses for one prepared portrait."""

    def __init__(self, image: np.ndarray, layout: FaceLayout) -> None:
        size = image.shape[0]
        self.image = image
        mw = layout.mouth_width
        mx, my = layout.mouth
        self.mouth_region = Region(int(mx - 0.95 * mw), int(my - 0.45 * mw), int(1.9 * mw), int(1.25 * mw)).clip(size)
        self.lips = Region(int(mx - 0.45 * mw), int(my - 0.2 * mw), int(0.9 * mw), int(0.6 * mw)).clip(size)
        self.mouth = [
            [_mouth_patch(image, self.mouth_region, (mx, my), 0.4 * mw, o, wd) for wd in MOUTH_WIDTHS]
            for o in np.linspace(0, 1, MOUTH_OPEN_LEVELS)
        ]
        r = layout.eye_radius
        self.eye_regions = [Region(int(ex - 1.4 * r), int(ey - 1.3 * r), int(2.8 * r), int(2.3 * r)).clip(size)
                            for ex, ey in (layout.left_eye, layout.right_eye)]
        self.eyes = [
            [_eye_patch(image, reg, eye, r, c) for c in np.linspace(0, 1, BLINK_LEVELS)]
            for reg, eye in zip(self.eye_regions, (layout.left_eye, layout.right_eye), strict=True)
        ]

    def pose(self, out: np.ndarray, opening: float, width: float, closure: float) -> None:
        """Write the posed face into `out` (a copy of the base image) in place."""
        o = int(round(np.clip(opening, 0, 1) * (MOUTH_OPEN_LEVELS - 1)))
        wi = int(np.abs(MOUTH_WIDTHS - width).argmin())
        self.mouth_region.view(out)[:] = self.mouth[o][wi]
        c = int(round(np.clip(closure, 0, 1) * (BLINK_LEVELS - 1)))
        if c:
            for reg, patches in zip(self.eye_regions, self.eyes, strict=True):
                reg.view(out)[:] = patches[c]
