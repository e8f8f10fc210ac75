"""A loaded diffusion model as the front ends pass it around, plus how to load one from a folder.

`DiffusionModel` is immutable: applying an acceleration returns a new value with one more entry
in `accelerations`, and the modules are only patched while a sampler runs (see
`adapters.diffusers_site.accelerated`). So a node never mutates its input, and the same loaded
model can feed an uncached and a cached branch of one workflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .embedded import DIGITS_DIR, DigitPromptEncoder
from .loading import (
    WeightsError,
    cast,
    load_scheduler_config,
    load_state_into,
    load_unet,
    read_config,
    weight_file,
)


@dataclass(frozen=True)
class DiffusionModel:
    """U-Net, scheduler config, prompt encoding and (optionally) a VAE; travels as `LC_PIPE`."""

    name: str
    unet: nn.Module
    scheduler_config: dict[str, Any]
    encode_prompt: Callable[[str], torch.Tensor]  # one prompt -> [1, tokens, dim]
    vae: nn.Module | None = None
    latent_scale: float = 1.0
    default_guidance: float = 7.5
    accelerations: tuple[Any, ...] = field(default=())
    # who applied each acceleration (a ComfyUI node id, None: unknown): that node shows its stats
    applied_by: tuple[str | None, ...] = field(default=())

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the U-Net's input at its native size."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def with_acceleration(self, config: Any, applied_by: str | None = None) -> DiffusionModel:
        return replace(self, accelerations=self.accelerations + (config,),
                       applied_by=self.sources() + (applied_by,))

    def sources(self) -> tuple[str | None, ...]:
        """`applied_by` with one entry per acceleration (None where a model was built with configs directly)."""
        missing = len(self.accelerations) - len(self.applied_by)
        return self.applied_by[:len(self.accelerations)] + (None,) * max(0, missing)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def load_model(folder: Path | None = None, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """Load a diffusers-layout folder (`unet/`, `scheduler/`, optional `vae/`, and `prompt_encoder/` or
    `text_encoder/` + `tokenizer/`); `None` loads the embedded digits model that ships with the pack."""
    root = DIGITS_DIR if folder is None else Path(folder)
    if not root.is_dir():
        raise WeightsError(f"{root}: not a folder")
    unet = load_unet(root / "unet", dtype)
    scheduler_config = load_scheduler_config(root / "scheduler")
    encode, guidance = _prompt_encoder(root, dtype)
    vae, scale = _vae(root, dtype)
    name = "embedded:digits" if folder is None else root.name
    return DiffusionModel(name, unet, scheduler_config, encode, vae, scale, guidance)


def _prompt_encoder(root: Path, dtype: torch.dtype) -> tuple[Callable[[str], torch.Tensor], float]:
    if (root / "prompt_encoder").is_dir():
        encoder = load_state_into(DigitPromptEncoder(), weight_file(root / "prompt_encoder")).to(dtype).eval()
        return (lambda prompt: encoder.encode(prompt).detach()), 2.0
    if (root / "text_encoder").is_dir():
        return _clip_prompt_encoder(root, dtype), 7.5
    raise WeightsError(f"{root}: needs prompt_encoder/ (embedded format) or text_encoder/ + tokenizer/")


def _clip_prompt_encoder(root: Path, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """A CLIP text encoder and tokenizer read from local files only (transformers, safetensors)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise WeightsError(f"{root / 'text_encoder'}: loading it needs `pip install transformers`") from err
    folder = root / "text_encoder"
    config = CLIPTextConfig(**read_config(folder))
    model = load_state_into(CLIPTextModel(config), weight_file(folder)).to(dtype).eval()
    if not (root / "tokenizer").is_dir():
        raise WeightsError(f"{root / 'tokenizer'}: missing (vocab.json and merges.txt for the CLIP tokenizer)")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)

    @torch.no_grad()
    def encode(prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return model(ids)[0]

    return encode


def _vae(root: Path, dtype: torch.dtype) -> tuple[nn.Module | None, float]:
    folder = root / "vae"
    if not folder.is_dir():
        return None, 1.0
    from diffusers import AutoencoderKL

    config = read_config(folder)
    vae = cast(load_state_into(AutoencoderKL.from_config(config), weight_file(folder)), dtype).eval()
    return vae, float(config.get("scaling_factor", 0.18215))
