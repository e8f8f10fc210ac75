"""The transformers `livecache bench dit` runs on, built the same way every time from fixed seeds.

- `flux`: a Flux-shaped `FluxTransformer2DModel` (double-stream blocks, then single-stream blocks,
  rotary 3-axis positions, the same block types and order as FLUX.1) with random weights from
  `torch.manual_seed(0)`, scaled down (`FLUX_CONFIG`: width 512 = 16 heads × 32, 3 double + 9
  single blocks, 65.4 M parameters) so a step takes about a second on 2 CPU cores (measured on an
  idle 2-core VM: 1.78 s on one thread; the width-384, 2 + 6 block, 48×48 configuration before it
  took 0.38 s on one thread and 0.20 s on two); a 64×64×16 latent packed into 1,024 tokens of 64, 64
  text tokens, flow-matching Euler, no CFG (as FLUX.1-schnell), 20 steps.
- `flux-tiny`: the same structure with 1 + 3 blocks of width 64 on a 16×16 latent, for tests.
- `dit`: the embedded digits DiT (`models/dit.py`), all ten digits, DDIM with CFG 3, FID-style score.

A `DitWork` samples itself: `sample(scheduler)` runs its loop and returns the final latent.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..models.dit import DIT_DIR, load_dit
from ..models.pipeline import DiffusionModel
from ..models.sampling import make_scheduler, sample

FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 3, "num_single_layers": 9, "attention_head_dim": 32,
    "num_attention_heads": 16, "joint_attention_dim": 512, "pooled_projection_dim": 128, "guidance_embeds": False,
    "axes_dims_rope": (4, 14, 14),
}
FLUX_TINY_CONFIG: dict[str, Any] = dict(FLUX_CONFIG, num_layers=1, num_single_layers=3, attention_head_dim=16,
                                        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                                        axes_dims_rope=(4, 6, 6))
LATENT_SIDE, TEXT_TOKENS = 64, 64  # a 64×64×16 latent in 2×2 patches: 1,024 image tokens


@dataclass
class DitWork:
    """A transformer plus the exact inputs of one generation."""

    name: str
    transformer: torch.nn.Module
    steps: int
    sample: Callable[[Any], torch.Tensor]  # scheduler -> the final latent
    new_scheduler: Callable[[], Any]
    is_image: bool  # the embedded DiT: the latent is the image (image SSIM and FID* apply)
    calibrate: Callable[[Any], torch.Tensor]  # scheduler -> one generation on other noise (calibration)
    timestep_scale: float  # the transformer's level argument times this is diffusers' 0..1000 timestep
    as_image: Callable[[torch.Tensor], torch.Tensor]  # a latent as [B, H, W, C] (for SSIM)
    model: DiffusionModel | None = None  # the embedded DiT as the samplers see it (decode)
    bf16: Callable[[], DitWork] | None = None  # the same work in bf16


def flux_work(steps: int = 20, tiny: bool = False, dtype: torch.dtype = torch.float32) -> DitWork:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    config = FLUX_TINY_CONFIG if tiny else FLUX_CONFIG
    model = FluxTransformer2DModel(**config).eval()
    side = 16 if tiny else LATENT_SIDE
    generator = torch.Generator().manual_seed(1)
    tokens = (side // 2) ** 2
    noise = torch.randn(1, tokens, config["in_channels"], generator=generator)
    text = torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator)
    calibration_noise = torch.randn(1, tokens, config["in_channels"], generator=torch.Generator().manual_seed(101))
    rows, cols = torch.meshgrid(torch.arange(side // 2), torch.arange(side // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    txt_ids = torch.zeros(TEXT_TOKENS, 3)
    return _flux(model, steps, side, (noise, calibration_noise, text, pooled, img_ids, txt_ids), dtype,
                 lambda: FlowMatchEulerDiscreteScheduler(shift=3.0))


def _flux(model: torch.nn.Module, steps: int, side: int, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype,
          new_scheduler: Callable[[], Any]) -> DitWork:
    model = model.to(dtype)
    noise, calibration_noise, text, pooled, img_ids, txt_ids = inputs
    text, pooled = text.to(dtype), pooled.to(dtype)

    @torch.no_grad()
    def run(scheduler: Any, start: torch.Tensor = noise) -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = start.to(dtype)
        for t in scheduler.timesteps:
            velocity = model(hidden_states=x, timestep=(t / 1000).expand(1).to(dtype), encoder_hidden_states=text,
                             pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids).sample
            x = scheduler.step(velocity, t, x).prev_sample
        return x

    def as_image(latent: torch.Tensor) -> torch.Tensor:  # [1, tokens, 64] -> [1, side/2, side/2, 64]
        return latent.reshape(1, side // 2, side // 2, -1)

    work = DitWork("flux" if side == LATENT_SIDE else "flux-tiny", model, steps, run, new_scheduler, False,
                   lambda scheduler: run(scheduler, calibration_noise), 1000.0, as_image)
    if dtype == torch.float32:
        work.bf16 = lambda: replace(_flux(copy.deepcopy(model), steps, side, inputs, torch.bfloat16, new_scheduler),
                                    bf16=None)
    return work


def dit_work(steps: int = 20, per_class: int = 10, dtype: torch.dtype = torch.float32) -> DitWork:
    """All ten digits, `per_class` samples each, guidance 3 (the model's default), DDIM."""
    if not (DIT_DIR / "transformer").is_dir():
        raise FileNotFoundError(f"{DIT_DIR}: the embedded DiT is missing; run `livecache train dit`")
    model = load_dit(DIT_DIR, dtype)
    cond = torch.cat([model.encode_prompt(str(d % 10)) for d in range(10 * per_class)]).to(dtype)
    uncond = model.encode_prompt("").repeat(len(cond), 1, 1).to(dtype)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((len(cond), *model.sample_shape), generator=generator).to(dtype)
    shown = min(20, len(cond))  # calibration: the first digits (two of each) on other noise
    calibration = torch.randn((shown, *model.sample_shape), generator=torch.Generator().manual_seed(101)).to(dtype)

    def run(scheduler: Any) -> torch.Tensor:
        return sample(model, scheduler, cond, uncond, noise, steps, model.default_guidance, progress=False)

    def calibrate(scheduler: Any) -> torch.Tensor:
        return sample(model, scheduler, cond[:shown], uncond[:shown], calibration, steps, model.default_guidance,
                      progress=False)

    work = DitWork("dit", model.unet, steps, run, lambda: make_scheduler("ddim", model.scheduler_config), True,
                   calibrate, 1.0, lambda images: images.permute(0, 2, 3, 1), model)
    if dtype == torch.float32:
        work.bf16 = lambda: replace(dit_work(steps, per_class, torch.bfloat16), bf16=None)
    return work
