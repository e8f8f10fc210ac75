"""A small digit classifier whose penultimate features give an FID-style score on our domain.

Why our own: Inception features (real FID) need downloaded weights and mean little on 16×16 grey
digits. The same Fréchet distance over features from a network trained on this very domain
measures whether generated samples have the real data's statistics: lower is better, 0 is equal.

The same network with 12 classes is the video content classifier (`video_features.safetensors`, trained
by `livecache train video-features`): digits 0-9, shapes, texture, on a colour-blind view of a frame
(`colour_blind`), so a frame counts as a 7 by its shape, not by the colour the data gives sevens.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import nn


class DigitFeatures(nn.Module):
    """Conv net for 16×16 digits in [-1, 1]; `features()` is the 64-d embedding used for the score."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def colour_blind(frames: torch.Tensor) -> torch.Tensor:
    """`[N, 3, H, W]` RGB in [-1, 1] → `[N, 1, H, W]` brightest channel: drops hue, keeps shape and shading."""
    return frames.amax(dim=1, keepdim=True)


@torch.no_grad()
def embed(model: DigitFeatures, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    chunks = [model.features(images[i : i + batch].float()) for i in range(0, len(images), batch)]
    return torch.cat(chunks).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
