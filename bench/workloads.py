"""The models and inputs benchmarks run on, built the same way every time from fixed seeds.

- `sd15`: an SD1.5-shaped `UNet2DConditionModel` (320/640/1280/1280 channels, cross-attention 768)
  with random weights from `torch.manual_seed(0)`, a 32×32 latent, DDIM, guidance 7.5 (a U-Net
  batch of 2), seeded prompt embeddings and latents. A fair CPU proxy for Stable Diffusion's cost.
- `sd15-tiny`: the same block structure with small channels, for smoke tests and CI.
- `embedded`: the trained digits model that ships with the pack, with real class prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.embedded import DIGITS_DIR
from ..models.loading import cast
from ..models.pipeline import DiffusionModel, load_model

SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass
class Workload:
    """A model plus the exact inputs of one generation."""

    name: str
    model: DiffusionModel
    cond: torch.Tensor
    uncond: torch.Tensor
    noise: torch.Tensor
    steps: int
    guidance: float
    is_image: bool  # pixel-space: the sample is the image (image PSNR/SSIM and the FID-style score apply)


def sd15_workload(steps: int = 20, tiny: bool = False, dtype: torch.dtype = torch.float32, size: int = 32) -> Workload:
    """`size` is the latent side (32 by default; smaller runs faster with the same network)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
                                    attention_head_dim=8, norm_num_groups=16, sample_size=32)
    else:
        # diffusers' default config is SD1.5's block structure; SD1.5's text states are 768-wide
        unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768)
    unet = cast(unet, dtype).eval()
    dim = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(1)
    cond = torch.randn(1, 77, dim, generator=generator).to(dtype)
    uncond = torch.randn(1, 77, dim, generator=generator).to(dtype)
    noise = torch.randn(1, 4, size, size, generator=generator).to(dtype)
    model = DiffusionModel("sd15-tiny" if tiny else "sd15", unet, dict(SD15_SCHEDULER), lambda p: cond)
    return Workload(model.name, model, cond, uncond, noise, steps, 7.5, is_image=False)


def embedded_workload(steps: int = 20, per_class: int = 20, dtype: torch.dtype = torch.float32) -> Workload:
    """All ten digits, `per_class` samples each, guidance 3 (the model's default)."""
    if not (DIGITS_DIR / "unet").is_dir():
        raise FileNotFoundError(f"{DIGITS_DIR}: the embedded model is missing; run `livecache train digits`")
    model = load_model(None, dtype)
    cond = torch.cat([model.encode_prompt(str(d % 10)) for d in range(10 * per_class)])
    uncond = model.encode_prompt("").repeat(len(cond), 1, 1)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((len(cond), *model.sample_shape), generator=generator).to(dtype)
    return Workload("embedded", model, cond.to(dtype), uncond.to(dtype), noise, steps, model.default_guidance,
                    is_image=True)
