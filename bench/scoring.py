"""How a bench row is scored against the baseline of the same run: one place for every speed/fidelity bench.

Each bench times its methods in interleaved rounds and keeps one output per method; then every row
gets the median of its timed runs, the speed against the baseline's median, and the fidelity of
its output against the baseline's (PSNR of the latent; SSIM, and PSNR, of the decoded image where
the model has one, else SSIM of the latent scaled into the reference's range).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models.pipeline import DiffusionModel
from ..models.sampling import decode
from .metrics import psnr, ssim


@dataclass(kw_only=True)
class Measured:
    """What every speed/fidelity row carries (keyword-only, so each bench's own fields stay positional)."""

    seconds: float | None = None
    speed: float | None = None
    latent_psnr: float | None = None
    times: list[float] = field(default_factory=list)

    def score(self, base_seconds: float, out: torch.Tensor, reference: torch.Tensor) -> None:
        """The median of the timed runs, the speed against the baseline's median, the latent PSNR."""
        self.seconds = statistics.median(self.times)
        self.speed = base_seconds / self.seconds
        self.latent_psnr = psnr(out, reference)


@dataclass
class MethodRow(Measured):
    """A row per method: the work it ran on, the method's name and its family (baseline / ours / peer: the plot's
    markers), and a note (why a peer did not run, what a row's setting means)."""

    work: str
    method: str
    family: str
    note: str = field(default="", kw_only=True)


def timed_rounds(rows: dict[str, Measured], names: list[str], run: Callable[[str], object], runs: int, work: str,
                 log: Callable[[str], None]) -> None:
    """`runs` interleaved rounds, each running every method in `names` once (so load drift hits all methods alike),
    appending each run's wall time to its row."""
    for round_index in range(runs):
        for name in names:
            started = time.perf_counter()
            run(name)
            rows[name].times.append(time.perf_counter() - started)
            log(f"  [{work} round {round_index + 1}/{runs}] {name}: {rows[name].times[-1]:.2f} s")


def channels_last(latent: torch.Tensor) -> torch.Tensor:
    return latent.permute(0, 2, 3, 1)


def image_fidelity(model: DiffusionModel, out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """PSNR (peak 1) and SSIM of the decoded images."""
    image, ref_image = decode(model, out), decode(model, reference)
    return psnr(image, ref_image, peak=1.0), ssim(image, ref_image)


def fidelity_ssim(out: torch.Tensor, reference: torch.Tensor, model: DiffusionModel | None = None,
                  as_image: Callable[[torch.Tensor], torch.Tensor] = channels_last) -> float:
    """SSIM of the decoded images when `model` is given; else of the latents, both scaled by the reference's range
    into 0..1 and laid out as images by `as_image` (a latent with no decoder still has structure to compare)."""
    if model is not None:
        return ssim(decode(model, out), decode(model, reference))
    low, span = reference.min(), (reference.max() - reference.min()).clamp_min(1e-12)
    return ssim(*(as_image(((t - low) / span).clamp(0, 1)) for t in (out, reference)))
