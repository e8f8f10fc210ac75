"""Nodes for Streamlined Inference's techniques: step rehash and feature slicing.

Like DeepCache's node, each validates its settings, checks that the technique stacks with what the
model already carries (the registry's rules: one per technique, no extrapolating rehash over DeepCache), and
returns a new `LC_PIPE` with one more config; the sampler (and, for slicing, the decoder) apply it.
"""

from __future__ import annotations

from ..accel.rehash import StepRehashConfig
from ..accel.slicing import SlicingConfig
from ..models.pipeline import DiffusionModel
from .fields import PIPE_MODEL, bool_field, choice_field, declare, float_field, int_field, link
from .kinds import PipeTechnique


class ApplyStepRehash(PipeTechnique):
    """Step rehash: skip a denoising step's U-Net evaluation when it would nearly repeat the last one."""

    DESCRIPTION = ("Step rehash (Streamlined Inference): reuses the last U-Net output on steps whose predicted "
                   "output change is below the threshold, never more than max_skips steps in a row.")
    INPUT_TYPES = declare({
        "model": PIPE_MODEL,
        "threshold": float_field(0.1, 0.0, 10.0, "Skip a step when its predicted relative output change is below "
                                                 "this (0 computes every step; higher skips more)."),
        "max_skips": int_field(1, 1, 100, "Most consecutive steps that may be skipped (bounds the drift)."),
        "mode": choice_field(["reuse", "extrapolate"], "reuse",
                             "reuse: a skipped step returns the last output; extrapolate: continues the last two "
                             "outputs along the noise level (not with DeepCache)."),
    }, unique_id=True)

    def apply(self, model: DiffusionModel, threshold: float, max_skips: int, mode: str,
              unique_id: str | None = None) -> tuple[DiffusionModel]:
        return self.stacked(model, StepRehashConfig(float(threshold), int(max_skips), mode), unique_id)


class ApplySlicing(PipeTechnique):
    """Feature slicing: run groups of operators slice by slice, cutting peak memory with identical results."""

    DESCRIPTION = ("Feature slicer + operator grouping (Streamlined Inference): lower peak memory for large "
                   "batches, long videos and big images; the results stay the same.")
    INPUT_TYPES = declare({
        "model": link("LC_PIPE", "The model to slice; it is not modified, a copy is returned."),
        "axis": choice_field(["batch", "spatial"], "batch",
                             "batch: samples, CFG halves and video frames one slice at a time; spatial: attention "
                             "queries and feed-forward tokens one slice at a time."),
        "slices": int_field(4, 1, 4096, "Slices per call (at most one sample/frame/token each); peak memory inside "
                                        "sliced layers falls about this many times."),
        "vae": bool_field(True, "Also decode one slice of latents at a time (batch axis only; ignored for spatial)."),
    }, unique_id=True)

    def apply(self, model: DiffusionModel, axis: str, slices: int, vae: bool,
              unique_id: str | None = None) -> tuple[DiffusionModel]:
        return self.stacked(model, SlicingConfig(axis, int(slices), bool(vae) and axis == "batch"), unique_id)
