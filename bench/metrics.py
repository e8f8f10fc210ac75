"""Fidelity measures used beside every speed ratio."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(test: torch.Tensor, reference: torch.Tensor, peak: float | None = None) -> float:
    """PSNR in dB; `peak` defaults to the reference's own range (max − min), as for latents."""
    test, reference = test.double(), reference.double()
    peak = float(reference.max() - reference.min()) if peak is None else peak
    mse = float(F.mse_loss(test, reference))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def ssim(test: torch.Tensor, reference: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM of images [B, H, W, C] in 0..1 (Gaussian window, σ = 1.5, per channel)."""
    x = test.double().permute(0, 3, 1, 2)
    y = reference.double().permute(0, 3, 1, 2)
    channels = x.shape[1]
    coords = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(channels, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=channels)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(score.mean())
