"""Procedural training video made offline: bouncing digits, bouncing shapes, drifting textures.

Every clip is drawn in code from a seeded generator (no files, no downloads): scikit-learn's bundled
8×8 digits as coloured sprites bouncing off the walls (classes 0-9), a circle and a square bouncing
(class 10, "shapes"), and two sine gratings drifting across each other (class 11, "texture"). Motion
is simple and deterministic given the first frames, which is exactly what an AR model must learn to
continue; positions are sub-pixel (bilinear sprites, soft shape edges) so motion looks smooth.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..models.video import SHAPES, TEXTURE

SPRITE = 12  # digit sprite side in pixels


@lru_cache(maxsize=1)
def _digit_sprites() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as [N, 1, SPRITE, SPRITE] alpha in 0..1, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    sprites = F.interpolate(images, size=(SPRITE, SPRITE), mode="bilinear", align_corners=False).clamp(0, 1)
    return sprites, torch.tensor(data.target, dtype=torch.long)


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


def _colours(n: int, generator: torch.Generator, low: float = 0.35) -> torch.Tensor:
    """Saturated random RGB colours [n, 3] (one channel kept bright so sprites stand out on dark)."""
    colour = low + (1 - low) * torch.rand(n, 3, generator=generator)
    colour[torch.arange(n), torch.randint(0, 3, (n,), generator=generator)] = 1.0
    return colour


def _digits(labels: torch.Tensor, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    sprites, targets = _digit_sprites()
    n = labels.numel()
    picks = torch.stack([
        torch.nonzero(targets == int(d)).flatten()[torch.randint(0, int((targets == int(d)).sum()), (1,),
                                                                  generator=generator)][0] for d in labels])
    sprite = sprites[picks]  # [n, 1, S, S]
    span = float(size - SPRITE)
    vx, vy = _velocity(n, 0.6, 1.5, generator)
    px = _bounce(span * torch.rand(n, generator=generator), vx, frames, span)
    py = _bounce(span * torch.rand(n, generator=generator), vy, frames, span)
    grid_axis = torch.arange(size, dtype=torch.float32)
    gx = 2 * (grid_axis[None, None, None, :] - px[:, :, None, None]) / (SPRITE - 1) - 1  # [n, T, 1, W]
    gy = 2 * (grid_axis[None, None, :, None] - py[:, :, None, None]) / (SPRITE - 1) - 1  # [n, T, H, 1]
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1).reshape(n * frames, size, size, 2)
    alpha = F.grid_sample(sprite.repeat_interleave(frames, 0), grid, align_corners=True, padding_mode="zeros")
    alpha = alpha.reshape(n, frames, 1, size, size)
    background = 0.12 * torch.rand(n, 1, 3, 1, 1, generator=generator)
    colour = _colours(n, generator)[:, None, :, None, None]
    return background * (1 - alpha) + colour * alpha


def _shapes(n: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    out = (0.12 * torch.rand(n, 1, 3, 1, 1, generator=generator)).expand(n, frames, 3, size, size)
    for square in (False, True):
        radius = 3.5 + 3.0 * torch.rand(n, generator=generator)
        span = size - 2 * radius
        vx, vy = _velocity(n, 0.6, 1.5, generator)
        cx = radius[:, None] + _bounce(span * torch.rand(n, generator=generator), vx, frames, span)
        cy = radius[:, None] + _bounce(span * torch.rand(n, generator=generator), vy, frames, span)
        dx = axis[None, None, None, :] - cx[:, :, None, None]
        dy = axis[None, None, :, None] - cy[:, :, None, None]
        dist = torch.maximum(dx.abs(), dy.abs()) if square else torch.sqrt(dx**2 + dy**2)
        alpha = (radius[:, None, None, None] - dist + 0.5).clamp(0, 1)[:, :, None]
        out = out * (1 - alpha) + _colours(n, generator)[:, None, :, None, None] * alpha
    return out


def _textures(n: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float32)
    t = torch.arange(frames, dtype=torch.float32)[None, :, None, None]
    pattern = torch.zeros(n, frames, size, size)
    for _ in range(2):
        freq = 2 * math.pi / (6 + 8 * torch.rand(n, generator=generator))  # wavelength 6..14 px
        angle = math.pi * torch.rand(n, generator=generator)
        speed = 0.4 + 0.8 * torch.rand(n, generator=generator)
        kx, ky = (freq * angle.cos())[:, None, None, None], (freq * angle.sin())[:, None, None, None]
        phase = 2 * math.pi * torch.rand(n, generator=generator)[:, None, None, None]
        pattern = pattern + torch.sin(kx * axis[None, None, None, :] + ky * axis[None, None, :, None]
                                      - (freq * speed)[:, None, None, None] * t + phase)
    mix = (0.5 + 0.25 * pattern)[:, :, None]
    low, high = 0.5 * _colours(n, generator, 0.0), _colours(n, generator)
    return low[:, None, :, None, None] * (1 - mix) + high[:, None, :, None, None] * mix


def make_clips(labels: torch.Tensor, frames: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Clips `[B, frames, 3, size, size]` in [-1, 1] for class ids `labels` (digits 0-9, shapes, texture)."""
    out = torch.empty(labels.numel(), frames, 3, size, size)
    for kind, mask in (("digits", labels < SHAPES), ("shapes", labels == SHAPES), ("texture", labels == TEXTURE)):
        idx = torch.nonzero(mask).flatten()
        if idx.numel() == 0:
            continue
        if kind == "digits":
            out[idx] = _digits(labels[idx], frames, size, generator)
        elif kind == "shapes":
            out[idx] = _shapes(idx.numel(), frames, size, generator)
        else:
            out[idx] = _textures(idx.numel(), frames, size, generator)
    return out.clamp(0, 1) * 2 - 1
