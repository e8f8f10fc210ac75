"""Nodes for Inner Loop Feedback: load a trained module (`LC_ILF`), apply it to our own pipeline (`LC_PIPE`) or to
ComfyUI's own `MODEL` (U-Nets and single-stream DiT spans: `adapters.comfy_ilf`), one core for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..accel.cache_schedule import model_fingerprint
from ..accel.ilf import FeedbackWeights, ILFConfig
from ..adapters.comfy_ilf import apply_ilf
from ..models.embedded import ILF_FILES
from ..models.loading import resolve_inside
from ..models.pipeline import DiffusionModel
from ..train.ilf import ILFTraining, comfy_teacher, train_ilf
from .comfy_model_nodes import sampler_inputs, sampler_run
from .comfy_nodes import on_model, stats_reporter
from .context import model_roots
from .fields import PIPE_MODEL, declare, int_field, link, schema
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


def module_path(save_as: str) -> Path:
    """Where Train ILF Module for MODEL saves `save_as`: inside the first model folder (where Load ILF Module finds
    it), a relative path without `..`, with the .safetensors suffix."""
    relative = Path(save_as.strip())
    if not save_as.strip() or relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"module path {save_as!r} must be a relative path inside the model folders")
    return model_roots()[0] / relative.with_suffix(".safetensors")


class TrainILFModel(Node, category="train", returns={"ilf_module": "LC_ILF"}, function="train"):
    """Train an ILF module for a ComfyUI MODEL by distillation from its own sampling: no data set, seeds only."""

    DESCRIPTION = ("Samples a few seeds with your MODEL, conditioning and latent as KSampler would (uncached: the "
                   "teacher), then trains a feedback module (a copy of one block, its scale starting at zero) to "
                   "correct the reused features of cached steps; the backbone stays frozen. The module fits these "
                   "weights only (a LoRA makes other weights). Connect it to Apply ILF for MODEL; save it to load "
                   "it later with Load ILF Module.")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (the name ComfyUI calls)
        inputs = {"model": ("MODEL", {"tooltip": "The model to train for (the module only fits these weights)."}),
                  **sampler_inputs()}
        inputs["seed"] = int_field(0, 0, 2**31 - 1, "The training seed: the teacher's seeds (seed x 1000 + k), the "
                                                     "pairs' order and the initial module come from it.")
        inputs["calibration_seeds"] = int_field(6, 1, 64, "Teacher generations to distil from (one more, unseen, "
                                                          "measures the module against plain reuse).")
        return schema({**inputs,
                       "training_steps": int_field(300, 1, 100000, "Optimizer steps (two model calls each)."),
                       "cache_interval": int_field(2, 2, 50, "The cache interval the module is trained for: "
                                                             "apply it with this interval."),
                       "save_as": ("STRING", {"default": "", "tooltip": "Optional file inside your model folders "
                                                                        "(e.g. ilf/my_model.safetensors), never "
                                                                        "written over; empty: not saved."})})

    def train(self, model: Any, positive: Any, negative: Any, latent_image: dict[str, Any], seed: int,
              calibration_seeds: int, steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
              training_steps: int, cache_interval: int, save_as: str) -> tuple[FeedbackWeights]:
        out = module_path(save_as) if save_as.strip() else None  # a bad path fails before training
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        settings = ILFTraining(steps=int(training_steps), interval=int(cache_interval),
                               generations=int(calibration_seeds), held_out=1, seed=int(seed))
        run = sampler_run(positive, negative, latent_image, seed, 1, steps, cfg, sampler_name, scheduler, denoise)
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs autograd
            return (train_ilf(comfy_teacher(model, run), out, settings),)
