"""Procedural training video made offline: bouncing digits, bouncing shapes, drifting textures.

Every clip is drawn in code from a seeded generator (no files, no downloads): scikit-learn's bundled
8×8 digits as sprites bouncing off the walls (classes 0-9), a circle and a square bouncing (class 10,
"shapes"), and two sine gratings drifting across each other (class 11, "texture"). Motion is simple
and deterministic given the first frames, which is exactly what an AR model must learn to continue;
positions are sub-pixel (bilinear sprites, soft shape edges) so motion looks smooth.

Why the data is narrow on purpose: a sub-million-parameter model trained for minutes on 2 CPU cores
learns a few clean modes per class, not the spread of 180 handwritings. So each digit is its most
typical scikit-learn sample (`EXEMPLARS`, closest to the class mean: a legible one) in the
class's own colour on a near-black background; shapes and textures keep a fixed colour pair. The
condition then decides the picture, the committed frames only where it is and how it moves.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..models.video import SHAPES, TEXTURE

EXEMPLARS = 1  # digit sprites per class: the most typical scikit-learn samples
BACKGROUND = 0.04
# one colour per digit (RGB 0..1): the class is visible in the colour too, and the model need not
# learn a colour distribution
DIGIT_COLOURS = torch.tensor([
    [1.0, 0.35, 0.3], [1.0, 0.75, 0.2], [0.95, 1.0, 0.3], [0.45, 1.0, 0.35], [0.3, 1.0, 0.85],
    [0.35, 0.7, 1.0], [0.55, 0.45, 1.0], [1.0, 1.0, 1.0], [1.0, 0.45, 0.95], [1.0, 0.6, 0.6],
])  # fmt: skip
SHAPE_COLOURS = torch.tensor([[1.0, 0.55, 0.1], [0.2, 0.85, 1.0]])  # circle, square
TEXTURE_COLOURS = torch.tensor([[0.25, 0.05, 0.4], [1.0, 0.85, 0.3]])  # grating low, high


def sprite_size(size: int) -> int:
    """Digit sprite side for a frame of `size` pixels (5/8 of it: big enough to read, room to move)."""
    return max(4, size * 5 // 8)


@lru_cache(maxsize=4)
def digit_sprites(side: int, exemplars: int = EXEMPLARS) -> torch.Tensor:
    """`[10, exemplars, 1, side, side]` alpha in 0..1: per digit its samples closest to the class mean."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    targets = torch.tensor(data.target, dtype=torch.long)
    picks = []
    for d in range(10):
        own = images[targets == d]
        distance = (own - own.mean(0)).flatten(1).norm(dim=1)
        picks.append(own[distance.argsort()[:exemplars]])
    sprites = torch.stack(picks).reshape(10 * exemplars, 1, 8, 8)
    sprites = F.interpolate(sprites, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)
    return sprites.reshape(10, exemplars, 1, side, side)


def _bounce(start: torch.Tensor, velocity: torch.Tensor, frames: int, span: torch.Tensor | float) -> torch.Tensor:
    """Positions [B, T] of points moving at `velocity` inside [0, span], reflecting off both walls."""
    raw = start[:, None] + velocity[:, None] * torch.arange(frames, dtype=torch.float32)[None]
    span = torch.as_tensor(span, dtype=torch.float32).reshape(-1, 1)
    folded = torch.remainder(raw, 2 * span)
    return torch.where(folded > span, 2 * span - folded, folded)


def _velocity(n: int, low: float, high: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    speed = low + (high - low) * torch.rand(n, generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    return speed * angle.cos(), speed * angle.sin()


def _digits(labels: torch.Tensor, frames: int, size: int, generator: torch.Generator, exemplars: int,
            centred: torch.Tensor) -> torch.Tensor:
    side = sprite_size(size)
    n = labels.numel()
    sprite = digit_sprites(side, exemplars)[labels, torch.randint(0, exemplars, (n,), generator=generator)]
    span = float(size - side)
    vx, vy = _velocity(n, 0.3 * size / 16, 0.7 * size / 16, generator)
    x0, y0 = span * torch.rand(n, generator=generator), span * torch.rand(n, generator=generator)
    x0, y0 = torch.where(centred, span / 2, x0), torch.where(centred, span / 2, y0)
    px = _bounce(x0, vx, frames, span)
    py = _bounce(y0, vy, frames, span)
    grid_axis = torch.arange(size, dtype=torch.float32)
    gx = 2 * (grid_axis[None, None, None, :] - px[:, :, None, None]) / (side - 1) - 1  # [n, T, 1, W]
    gy = 2 * (grid_axis[None, None, :, None] - py[:, :, None, None]) / (side - 1) - 1  # [n, T, H, 1]
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1).reshape(n * frames, size, size, 2)
    alpha = F.grid_sample(sprite.repeat_interleave(frames, 0), grid, align_corners=True, padding_mode="zeros")
    alpha = alpha.reshape(n, frames, 1, size, size)
    colour = DIGIT_COLOURS[labels][:, None, :, None, None]
    return BACKGROUND * (1 - alpha) + colour * alpha


def _shapes(n: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """An orange circle and a cyan square bouncing independently (the square drawn on top)."""
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    out = torch.full((n, frames, 3, size, size), BACKGROUND)
    for square, colour in ((False, SHAPE_COLOURS[0]), (True, SHAPE_COLOURS[1])):
        radius = size * (0.14 + 0.08 * torch.rand(n, generator=generator))
        span = size - 2 * radius
        vx, vy = _velocity(n, 0.3 * size / 16, 0.7 * size / 16, generator)
        cx = radius[:, None] + _bounce(span * torch.rand(n, generator=generator), vx, frames, span)
        cy = radius[:, None] + _bounce(span * torch.rand(n, generator=generator), vy, frames, span)
        dx = axis[None, None, None, :] - cx[:, :, None, None]
        dy = axis[None, None, :, None] - cy[:, :, None, None]
        dist = torch.maximum(dx.abs(), dy.abs()) if square else torch.sqrt(dx**2 + dy**2)
        alpha = (radius[:, None, None, None] - dist + 0.5).clamp(0, 1)[:, :, None]
        out = out * (1 - alpha) + colour[None, None, :, None, None] * alpha
    return out


def _textures(n: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Two sine gratings (random direction and wavelength) drifting across each other, purple to gold."""
    axis = torch.arange(size, dtype=torch.float32)
    t = torch.arange(frames, dtype=torch.float32)[None, :, None, None]
    pattern = torch.zeros(n, frames, size, size)
    for _ in range(2):
        wavelength = size * (0.3 + 0.25 * torch.rand(n, generator=generator))
        freq = 2 * math.pi / wavelength
        angle = math.pi * torch.rand(n, generator=generator)
        speed = (0.3 + 0.4 * torch.rand(n, generator=generator)) * size / 16  # pixels per frame
        kx, ky = (freq * angle.cos())[:, None, None, None], (freq * angle.sin())[:, None, None, None]
        phase = 2 * math.pi * torch.rand(n, generator=generator)[:, None, None, None]
        pattern = pattern + torch.sin(kx * axis[None, None, None, :] + ky * axis[None, None, :, None]
                                      - (freq * speed)[:, None, None, None] * t + phase)
    mix = (0.5 + 0.25 * pattern)[:, :, None]
    low, high = TEXTURE_COLOURS
    return low[None, None, :, None, None] * (1 - mix) + high[None, None, :, None, None] * mix


def make_clips(labels: torch.Tensor, frames: int, generator: torch.Generator, size: int = 16,
               exemplars: int = EXEMPLARS, centred: bool = False) -> torch.Tensor:
    """Clips `[B, frames, 3, size, size]` in [-1, 1] for class ids `labels` (digits 0-9, shapes, texture);
    `exemplars`: how many handwritings per digit to draw from (the classifier reads more than the model
    is taught); `centred`: digits start in the middle of the frame (how a stream, or a new condition,
    begins; see `train/video.py`), else anywhere."""
    out = torch.empty(labels.numel(), frames, 3, size, size)
    for kind, mask in (("digits", labels < SHAPES), ("shapes", labels == SHAPES), ("texture", labels == TEXTURE)):
        idx = torch.nonzero(mask).flatten()
        if idx.numel() == 0:
            continue
        if kind == "digits":
            out[idx] = _digits(labels[idx], frames, size, generator, exemplars,
                               torch.full((idx.numel(),), centred))
        elif kind == "shapes":
            out[idx] = _shapes(idx.numel(), frames, size, generator)
        else:
            out[idx] = _textures(idx.numel(), frames, size, generator)
    return out.clamp(0, 1) * 2 - 1
