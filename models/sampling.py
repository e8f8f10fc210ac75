"""The sampling loop shared by the nodes, the benchmarks and the live engines.

One short loop over any diffusers scheduler (DDIM, Euler, DPM-Solver++, LCM): classifier-free
guidance runs both halves in one batched U-Net call, as Stable Diffusion pipelines do, and the
scheduler is created fresh per call so concurrent users never share scheduler state.
"""

from __future__ import annotations

from typing import Any

import torch

from ..accel.progress import Progress, as_progress
from .pipeline import DiffusionModel

SCHEDULERS = ("ddim", "euler", "dpmpp_2m", "lcm")


def make_scheduler(name: str, config: dict[str, Any]):
    """A fresh scheduler of kind `name` built from the model's scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
               "lcm": LCMScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(config)


def initial_noise(model: DiffusionModel, batch: int, seed: int, height: int | None = None,
                  width: int | None = None) -> torch.Tensor:
    channels, h, w = model.sample_shape
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, channels, height or h, width or w), generator=generator).to(model.dtype)


@torch.no_grad()
def sample(model: DiffusionModel, scheduler: Any, cond: torch.Tensor, uncond: torch.Tensor | None,
           noise: torch.Tensor, steps: int, guidance: float, seed: int = 0,
           progress: Progress | bool = True) -> torch.Tensor:
    """Denoise `noise` in `steps` steps; `cond`/`uncond` are per-sample states `[B, tokens, dim]`.

    `progress`: the host's `Progress` (its bar and stop check, one check per step), or True/False
    for a console bar or none.
    """
    return denoise(model, scheduler, cond, uncond, noise, steps, guidance, seed, progress)


def denoise(model: DiffusionModel, scheduler: Any, cond: torch.Tensor, uncond: torch.Tensor | None,
            noise: torch.Tensor, steps: int, guidance: float, seed: int = 0,
            progress: Progress | bool = True) -> torch.Tensor:
    """`sample`'s loop, recording gradients where they are enabled: a trainer backpropagates through a whole
    generation (`train.ilf`'s rollouts)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if cond.shape[0] != noise.shape[0]:
        raise ValueError(f"{cond.shape[0]} prompt embeddings for a batch of {noise.shape[0]}")
    use_cfg = uncond is not None and guidance != 1.0
    states = torch.cat([uncond, cond]) if use_cfg else cond
    states = states.to(model.dtype)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed + 1)
    x = noise * scheduler.init_noise_sigma
    for t in as_progress(progress).loop(scheduler.timesteps, "sampling", "step", leave=False):
        model_in = scheduler.scale_model_input(torch.cat([x, x]) if use_cfg else x, t)
        eps = model.unet(model_in, t, encoder_hidden_states=states).sample
        if use_cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


@torch.no_grad()
def decode(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents to a ComfyUI `IMAGE`: float [B, H, W, 3] in 0..1 (pixel-space models pass straight through)."""
    images = latents if model.vae is None else model.vae.decode(latents.to(model.dtype) / model.latent_scale).sample
    images = ((images.float() + 1) / 2).clamp(0, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.permute(0, 2, 3, 1).contiguous()
