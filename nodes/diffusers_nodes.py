"""Nodes for diffusers-format models: load, apply DeepCache, sample, decode, save.

Each node validates its inputs, calls one function of the cores, and returns new values; none
mutates its inputs (applying DeepCache returns a new `LC_PIPE` carrying one more config).
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..accel.deepcache import DeepCacheConfig
from ..adapters.diffusers_site import accelerated
from ..adapters.diffusers_slicing import sliced_decoder
from ..adapters.diffusers_unet import deep_modules
from ..files import write_numbered
from ..models.dit import EMBEDDED_DIT, load_dit
from ..models.loading import resolve_inside
from ..models.pipeline import DiffusionModel, load_model
from ..models.sampling import SCHEDULERS, decode, initial_noise, make_scheduler, sample
from .context import host_progress, model_roots, output_dir
from .fields import PIPE_MODEL, choice_field, declare, float_field, int_field, link, seed_field, text_field
from .kinds import Node, PipeTechnique
from .ui_messages import send_stats
from .validation import verdict

LOG = logging.getLogger("livecache")
EMBEDDED = "embedded:digits"


@lru_cache(maxsize=4)
def _load_cached(source: str) -> DiffusionModel:
    """`source`: an embedded model's name or a folder. Loading is the slow part of a re-run; models are
    immutable values, so sharing them is safe."""
    if source == EMBEDDED_DIT:
        return load_dit()
    return load_model(None if source == EMBEDDED else Path(source))


class LoadDiffusersModel(Node, category="loaders", returns={"model": "LC_PIPE"}, function="load"):
    """Load the embedded digits model, or a diffusers folder (safetensors only) from the model folders."""

    DESCRIPTION = ("Loads a diffusers-format model: an embedded model (the digits U-Net or the digits DiT; no "
                   "download) or a local folder.")
    INPUT_TYPES = declare({"source": text_field(
        EMBEDDED, "'embedded:digits' (U-Net) or 'embedded:dit' (transformer) for the models that ship with "
                  "LiveCache, or a folder name inside your diffusers model folders (unet/, scheduler/, optional "
                  "vae/, text encoder).")})

    @classmethod
    def VALIDATE_INPUTS(cls, source: str | None = None) -> bool | str:
        return verdict(cls, {"source": source}, lambda: isinstance(source, str) and _model_folder(source))

    def load(self, source: str) -> tuple[DiffusionModel]:
        return (_load_cached(str(_model_folder(source))),)


def _model_folder(source: str) -> Path | str:
    """An embedded model's name, else the folder inside the model roots (refused outside them)."""
    source = source.strip()
    if source in ("", EMBEDDED, EMBEDDED_DIT):
        return source or EMBEDDED
    return resolve_inside(source, model_roots())


class ApplyDeepCache(PipeTechnique):
    """DeepCache: reuse the U-Net's deep features across steps and recompute only the shallow branch."""

    DESCRIPTION = "Feature caching (DeepCache): full U-Net every N steps, only the shallow branch in between."
    INPUT_TYPES = declare({
        "model": PIPE_MODEL,
        "cache_interval": int_field(3, 1, 50, "A full U-Net pass every this many steps (1 = no caching)."),
        "cache_branch_id": int_field(0, 0, 15, "Which skip branch stays live: 0 is the shallowest and fastest; "
                                               "higher keeps more layers live and is closer to uncached."),
        "schedule": choice_field(["uniform", "non-uniform"], "uniform", "uniform: a full step every N; non-uniform: "
                                 "the same number of full steps, denser early (closer to uncached on SD-shaped "
                                 "U-Nets)."),
        "start": float_field(0.0, 0.0, 1.0, "Fraction of the steps before which every step is full."),
        "end": float_field(1.0, 0.0, 1.0, "Fraction of the steps after which every step is full."),
    }, unique_id=True)

    def apply(self, model: DiffusionModel, cache_interval: int, cache_branch_id: int, schedule: str,
              start: float, end: float, unique_id: str | None = None) -> tuple[DiffusionModel]:
        config = DeepCacheConfig(cache_interval, cache_branch_id, schedule=schedule, start=start, end=end)
        deep_modules(model.unet, cache_branch_id)  # a branch this U-Net lacks fails here, naming the range
        return (model.with_acceleration(config, unique_id),)


class DiffusersSampler(Node, category="sampling", returns=("LATENT",), function="sample"):
    """Sample latents with the model's U-Net and any of the supported schedulers."""

    DESCRIPTION = "Denoises seeded noise; DDIM, Euler, DPM-Solver++ 2M or LCM; classifier-free guidance."
    INPUT_TYPES = declare({
        "model": link("LC_PIPE"),
        "prompt": text_field("7", "What to draw. The embedded model draws a digit: '7' or 'a seven'.", multiline=True),
        "negative_prompt": text_field("", "What to steer away from (empty: unconditional).", multiline=True),
        "seed": seed_field("Noise seed; the same seed and settings give the same image."),
        "steps": int_field(20, 1, 200, "Denoising steps."),
        "guidance": float_field(2.0, 0.0, 30.0, step=0.1,
                                tooltip="Classifier-free guidance scale (1 = off, one U-Net half per step). "
                                        "2 suits the embedded digits model; SD checkpoints like 5-8."),
        "scheduler": choice_field(SCHEDULERS, "ddim", "Sampler family."),
        "batch_size": int_field(4, 1, 64, "Images per run."),
    }, unique_id=True)

    @classmethod
    def VALIDATE_INPUTS(cls, prompt: str | None = None, negative_prompt: str | None = None,
                        model: DiffusionModel | None = None) -> bool | str:
        """A prompt the model cannot read fails before anything runs (the digits model reads digits only)."""
        return verdict(cls, {"prompt": prompt, "negative_prompt": negative_prompt},
                       *[lambda p=p: model.encode_prompt(p) for p in (prompt, negative_prompt)
                         if isinstance(p, str) and model is not None])

    def sample(self, model: DiffusionModel, prompt: str, negative_prompt: str, seed: int, steps: int,
               guidance: float, scheduler: str, batch_size: int, unique_id: str | None = None) -> tuple[dict]:
        cond = model.encode_prompt(prompt).repeat(batch_size, 1, 1)
        uncond = model.encode_prompt(negative_prompt).repeat(batch_size, 1, 1)
        noise = initial_noise(model, batch_size, seed)
        sched = make_scheduler(scheduler, model.scheduler_config)
        started = time.perf_counter()
        with accelerated(model.unet, sched, model.accelerations) as handles:
            latents = sample(model, sched, cond, uncond, noise, steps, guidance, seed=seed,
                             progress=host_progress())
        seconds = time.perf_counter() - started
        for handle, applied_by in zip(handles, model.sources(), strict=True):  # each on the node that applied it
            send_stats(applied_by or unique_id, *handle.report(seconds))
        return ({"samples": latents},)


class DecodeImages(Node, category="sampling", returns=("IMAGE",), function="decode"):
    """Latents to images through the model's VAE (pixel-space models pass straight through)."""

    DESCRIPTION = "Decodes LATENT to IMAGE with the model's VAE."
    INPUT_TYPES = declare({"model": link("LC_PIPE"), "samples": link("LATENT")})

    def decode(self, model: DiffusionModel, samples: dict) -> tuple[torch.Tensor]:
        latents = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError("samples must be a LATENT: a dict with a [B, C, H, W] tensor under 'samples'")
        expected = model.vae.config.latent_channels if model.vae is not None else model.unet.config.out_channels
        if latents.shape[1] != expected:
            raise ValueError(f"this model decodes {expected}-channel latents, got {latents.shape[1]} channels")
        with sliced_decoder(model.vae, model.accelerations):
            return (decode(model, latents),)


class SaveImages(Node, category="io", returns=(), function="save"):
    """Save images as PNG files in the output folder."""

    OUTPUT_NODE = True
    DESCRIPTION = "Writes each image as a PNG; small images can be enlarged (nearest neighbour) for viewing."
    INPUT_TYPES = declare({
        "images": link("IMAGE"),
        "filename_prefix": text_field("livecache", "File name prefix; a counter and .png are added."),
        "upscale": int_field(1, 1, 16, "Enlarge by this integer factor (nearest neighbour) before saving."),
    })

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None, upscale: int | None = None) -> bool | str:
        return verdict(cls, {"filename_prefix": filename_prefix, "upscale": upscale},
                       lambda: filename_prefix is None or _output_prefix(filename_prefix))

    def save(self, images: torch.Tensor, filename_prefix: str, upscale: int) -> dict:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ValueError("images must be an IMAGE: a float [B, H, W, C] tensor with C in 1, 3, 4")
        prefix = _output_prefix(filename_prefix)
        folder = output_dir() / prefix.parent
        written = []
        for image in images:
            array = (image.float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            picture = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
            if upscale > 1:
                picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
            written.append(write_numbered(folder, prefix.name, ".png",
                                          lambda stream, picture=picture: picture.save(stream, format="PNG")))
        LOG.info("saved %d image(s) to %s", len(written), folder)
        subfolder = "" if prefix.parent == Path(".") else prefix.parent.as_posix()
        return {"ui": {"images": [{"filename": p.name, "subfolder": subfolder, "type": "output"} for p in written]},
                "result": ()}


def _output_prefix(filename_prefix: str) -> Path:
    """The prefix as a relative path inside the output folder: no absolute paths, no `..`, no NUL."""
    prefix = Path(filename_prefix.strip() or "livecache")
    if prefix.is_absolute() or ".." in prefix.parts or "\0" in filename_prefix:
        raise ValueError(f"filename_prefix {filename_prefix[:80]!r} must stay inside the output folder")
    return prefix
