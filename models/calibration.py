"""Calibration generations: what CacheQuant, the DP cache schedule and quantization learn from.

A calibration set is a few prompts × seeds sampled with the same scheduler, step count and
guidance as the generations the result will serve. Each generation is returned as a callable so
the calibrating core decides when to run it (once per pass, under its progress bar) and what to
observe meanwhile; each returns its final latent (the output objective of the cache schedule compares
them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..accel.progress import Progress
from .pipeline import DiffusionModel
from .sampling import initial_noise, make_scheduler, sample


def calibration_runs(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                     scheduler: str, guidance: float, batch_size: int = 1, negative_prompt: str = "",
                     height: int | None = None, width: int | None = None,
                     progress: Progress | None = None) -> list[Callable[[], torch.Tensor]]:
    """One callable per (prompt, seed): a full generation with the model as it is when called.

    Each generation checks `progress`'s stop request at every step (no bar: the calibrating loop
    that calls them owns it).
    """
    prompts = [p for p in (p.strip() for p in prompts) if p]
    if not prompts or not seeds:
        raise ValueError("calibration needs at least one prompt and one seed")
    if steps < 1:
        raise ValueError(f"calibration steps must be >= 1, got {steps}")
    uncond = model.encode_prompt(negative_prompt).repeat(batch_size, 1, 1)

    def one(prompt: str, seed: int) -> Callable[[], torch.Tensor]:
        cond = model.encode_prompt(prompt).repeat(batch_size, 1, 1)

        def run() -> torch.Tensor:
            noise = initial_noise(model, batch_size, seed, height, width)
            return sample(model, make_scheduler(scheduler, model.scheduler_config), cond, uncond, noise, steps,
                          guidance, seed=seed, progress=False if progress is None else progress.nested())

        return run

    return [one(p, s) for p in prompts for s in seeds]
