"""Nodes for Streamlined Inference's techniques: step rehash and feature slicing.

Like DeepCache's node, each validates its settings, checks that the technique stacks with what the
model already carries (the registry's rules: one per technique, no extrapolating rehash over DeepCache), and
returns a new `LC_PIPE` with one more config; the sampler (and, for slicing, the decoder) apply it.
"""

from __future__ import annotations

from ..accel.rehash import StepRehashConfig
from ..accel.slicing import SlicingConfig
from ..accel.techniques import check_stack
from ..models.pipeline import DiffusionModel


def _with(model: DiffusionModel, config: object, unique_id: str | None) -> tuple[DiffusionModel]:
    check_stack(model.accelerations + (config,))  # refuse a combination that cannot work, naming it
    return (model.with_acceleration(config, unique_id),)


class ApplyStepRehash:
    """Step rehash: skip a denoising step's U-Net evaluation when it would nearly repeat the last one."""

    CATEGORY = "LiveCache/accelerate"
    RETURN_TYPES = ("LC_PIPE",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Step rehash (Streamlined Inference): reuses the last U-Net output on steps whose predicted "
                   "output change is below the threshold, never more than max_skips steps in a row.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LC_PIPE", {"tooltip": "The model to accelerate; it is not modified, a copy is returned."}),
            "threshold": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01,
                                    "tooltip": "Skip a step when its predicted relative output change is below "
                                               "this (0 computes every step; higher skips more)."}),
            "max_skips": ("INT", {"default": 1, "min": 1, "max": 100, "step": 1,
                                  "tooltip": "Most consecutive steps that may be skipped (bounds the drift)."}),
            "mode": (["reuse", "extrapolate"], {
                "default": "reuse",
                "tooltip": "reuse: a skipped step returns the last output; extrapolate: continues the last two "
                           "outputs along the noise level (not with DeepCache)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model: DiffusionModel, threshold: float, max_skips: int, mode: str,
              unique_id: str | None = None) -> tuple[DiffusionModel]:
        return _with(model, StepRehashConfig(float(threshold), int(max_skips), mode), unique_id)


class ApplySlicing:
    """Feature slicing: run groups of operators slice by slice, cutting peak memory with identical results."""

    CATEGORY = "LiveCache/accelerate"
    RETURN_TYPES = ("LC_PIPE",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Feature slicer + operator grouping (Streamlined Inference): lower peak memory for large "
                   "batches, long videos and big images; the results stay the same.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LC_PIPE", {"tooltip": "The model to slice; it is not modified, a copy is returned."}),
            "axis": (["batch", "spatial"], {
                "default": "batch",
                "tooltip": "batch: samples, CFG halves and video frames one slice at a time; spatial: attention "
                           "queries and feed-forward tokens one slice at a time."}),
            "slices": ("INT", {"default": 4, "min": 1, "max": 4096, "step": 1,
                               "tooltip": "Slices per call (at most one sample/frame/token each); peak memory "
                                          "inside sliced layers falls about this many times."}),
            "vae": ("BOOLEAN", {"default": True, "tooltip": "Also decode one slice of latents at a time "
                                                            "(batch axis only; ignored for spatial)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model: DiffusionModel, axis: str, slices: int, vae: bool,
              unique_id: str | None = None) -> tuple[DiffusionModel]:
        return _with(model, SlicingConfig(axis, int(slices), bool(vae) and axis == "batch"), unique_id)
