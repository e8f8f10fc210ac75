"""The embedded model's domain: handwritten digits that ship inside scikit-learn (no download).

scikit-learn's `load_digits` holds 1,797 8×8 scans in 17 grey levels. Upsampled to 16×16 they make
a small image domain with ten labelled classes: enough for a class-conditional diffusion model
that trains in minutes on 2 CPU cores, and for a feature extractor whose statistics give an
FID-style score that means something on this domain.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

RESOLUTION = 16
NUM_CLASSES = 10
UNCONDITIONAL = NUM_CLASSES  # the extra class index used for classifier-free guidance

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as images in [-1, 1], shape [N, 1, 16, 16], and their labels [N]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def parse_digit_prompt(prompt: str) -> int:
    """The class a prompt asks for: "7", "digit 7", "a seven"; empty means unconditional.

    Raises a ValueError that names the prompt when it names no digit or several, instead of
    silently drawing something else.
    """
    text = prompt.strip().lower()
    if not text:
        return UNCONDITIONAL
    found = {int(d) for d in re.findall(r"\b\d\b", text)}
    found |= {i for i, word in enumerate(_WORDS) if re.search(rf"\b{word}\b", text)}
    if len(found) != 1:
        raise ValueError(
            f"the embedded digits model draws one digit 0-9; the prompt {prompt!r} names "
            f"{'none' if not found else sorted(found)} (try '7' or 'a seven', or '' for any digit)"
        )
    return found.pop()
