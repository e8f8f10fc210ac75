"""Nodes for Inner Loop Feedback: load a trained module (`LC_ILF`), apply it to our own pipeline (`LC_PIPE`) or to
ComfyUI's own `MODEL` (U-Nets and single-stream DiT spans: `adapters.comfy_ilf`), one core for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..accel.cache_schedule import model_fingerprint
from ..accel.ilf import FeedbackWeights, ILFConfig
from ..adapters.comfy_ilf import apply_ilf
from ..models.embedded import ILF_FILES
from ..models.loading import resolve_inside
from ..models.pipeline import DiffusionModel
from .comfy_nodes import on_model, stats_reporter
from .context import model_roots
from .fields import PIPE_MODEL, declare, int_field, link
from .kinds import ModelTechnique, Node, PipeTechnique
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


class LoadILFModule(Node, category="loaders", returns={"ilf_module": "LC_ILF"}, function="load"):
    """Load a trained ILF feedback module (safetensors only), tied to the backbone it was trained on."""

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


class ApplyILF(PipeTechnique):
    """ILF: a full model pass every N steps; in between the reused features are corrected by the trained module."""

    DESCRIPTION = "Inner Loop Feedback: feature caching whose reused features a small trained module moves to the step."

    INPUT_TYPES = declare({
        "model": PIPE_MODEL,
        "ilf_module": link("LC_ILF", "A module trained for this very model (Load ILF Module)."),
        "cache_interval": int_field(2, 1, 50, "A full pass every this many steps (1 = no caching); use the "
                                              "interval the module was trained for."),
    }, unique_id=True)

    def apply(self, model: DiffusionModel, ilf_module: FeedbackWeights, cache_interval: int,
              unique_id: str | None = None) -> tuple[DiffusionModel]:
        config = ILFConfig(cache_interval, module=ilf_module)
        ilf_module.check(model_fingerprint(model.unet))  # another model's module fails here, naming both
        return self.stacked(model, config, unique_id)


class ApplyILFModel(ModelTechnique):
    """ILF for a ComfyUI MODEL (SD1.x/SD2.x/SDXL U-Nets; Flux, Wan, Lumina 2 / Z-Image DiTs), any sampler."""

    DESCRIPTION = ("Inner Loop Feedback on a ComfyUI MODEL: a full pass every N steps; in between the deep layers "
                   "(U-Net) or the cached block span (DiT) are skipped and their reused output is corrected by a "
                   "module trained for this very MODEL (its weights as loaded, LoRAs included). Connect the result "
                   "to KSampler (or any sampler node).")
    INPUT_TYPES = declare(on_model(ApplyILF), unique_id=True)

    def apply(self, model: Any, ilf_module: FeedbackWeights, cache_interval: int,
              unique_id: str | None = None) -> tuple[Any]:
        config = ILFConfig(cache_interval, module=ilf_module)
        return (apply_ilf(model, config, stats_reporter(unique_id)),)
