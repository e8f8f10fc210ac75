"""Nodes for Inner Loop Feedback on our own pipeline (`LC_PIPE`): load a trained module, apply it.

ComfyUI `MODEL` nodes for ILF are not here yet (the MODEL lane's DiT nodes are being reworked).
"""

from __future__ import annotations

from pathlib import Path

from ..accel.cache_schedule import model_fingerprint
from ..accel.ilf import FeedbackWeights, ILFConfig
from ..accel.techniques import check_stack
from ..models.embedded import ILF_FILES
from ..models.loading import resolve_inside
from ..models.pipeline import DiffusionModel
from .context import model_roots
from .validation import verdict

EMBEDDED = "embedded:digits"


def _module_file(source: str) -> Path:
    """The shipped module of an embedded model, or a file inside the model folders (refused outside them)."""
    source = source.strip()
    if source in ILF_FILES:
        if not ILF_FILES[source].is_file():
            raise ValueError(f"{ILF_FILES[source]}: the module for {source} is missing; run "
                             f"`livecache train ilf --model {source}`")
        return ILF_FILES[source]
    return resolve_inside(source, model_roots())


class LoadILFModule:
    """Load a trained ILF feedback module (safetensors only), tied to the backbone it was trained on."""

    CATEGORY = "LiveCache/loaders"
    RETURN_TYPES = ("LC_ILF",)
    RETURN_NAMES = ("ilf_module",)
    FUNCTION = "load"
    DESCRIPTION = "Loads an Inner Loop Feedback module: one shipped for an embedded model, or your own file."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("STRING", {
            "default": EMBEDDED,
            "tooltip": "'embedded:digits' or 'embedded:dit' for the module that ships for that embedded model, or a "
                       ".safetensors file "
                       "inside your model folders (from `livecache train ilf --model FOLDER`).",
        })}}

    @classmethod
    def VALIDATE_INPUTS(cls, source: str | None = None) -> bool | str:
        return verdict(cls, {"source": source}, lambda: isinstance(source, str) and _module_file(source))

    def load(self, source: str) -> tuple[FeedbackWeights]:
        return (FeedbackWeights.load(_module_file(source)),)


class ApplyILF:
    """ILF: a full model pass every N steps; in between the reused features are corrected by the trained module."""

    CATEGORY = "LiveCache/accelerate"
    RETURN_TYPES = ("LC_PIPE",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = "Inner Loop Feedback: feature caching whose reused features a small trained module moves to the step."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LC_PIPE", {"tooltip": "The model to accelerate; it is not modified, a copy is returned."}),
            "ilf_module": ("LC_ILF", {"tooltip": "A module trained for this very model (Load ILF Module)."}),
            "cache_interval": ("INT", {"default": 2, "min": 1, "max": 50, "step": 1,
                                       "tooltip": "A full pass every this many steps (1 = no caching); use the "
                                                  "interval the module was trained for."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model: DiffusionModel, ilf_module: FeedbackWeights, cache_interval: int,
              unique_id: str | None = None) -> tuple[DiffusionModel]:
        config = ILFConfig(cache_interval, module=ilf_module)
        ilf_module.check(model_fingerprint(model.unet))  # another model's module fails here, naming both
        check_stack(model.accelerations + (config,))
        return (model.with_acceleration(config, unique_id),)
