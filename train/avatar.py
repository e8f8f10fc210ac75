"""Training the diffusion avatar from arrays (crops, audio windows, states), seeded, on 2 CPU cores.

Two phases, both with bf16 autocast:
1. the VAE (`AutoencoderKL`) learns to reconstruct the face crops (L1 + a small KL term, the mouth
   weighted up); its `scaling_factor` is then set so latents have unit standard deviation;
2. the U-Net and the audio encoder learn to predict the clean latent of each frame from a noised copy
   at the timesteps the LCM scheduler visits with 1–4 steps, given the masked reference latent, the
   audio tokens and the state label (`prediction_type="sample"`: a direct few-step x0 predictor, the
   consistency-model boundary condition, rather than a distillation of a many-step teacher).
The error inside the mouth mask is weighted 8x: that is where the frames differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.avatar import (
    LCM_SCHEDULER,
    AudioConfig,
    AvatarModel,
    AvatarSpec,
    build_components,
    mel_features,
    mouth_mask,
    save_model,
)


@dataclass(frozen=True)
class TrainSettings:
    vae_steps: int = 300
    unet_steps: int = 1000
    vae_batch: int = 12
    batch: int = 24
    seed: int = 0
    lr: float = 2e-3


def _to_images(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def _lr(step: int, total: int) -> float:
    return min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / total))


def train_avatar(crops: np.ndarray, windows: np.ndarray, states: np.ndarray, reference_index: np.ndarray,
                 references: np.ndarray, out_dir: Path | None, settings: TrainSettings = TrainSettings(),
                 spec: AvatarSpec | None = None, unet_config: dict | None = None,
                 vae_config: dict | None = None) -> AvatarModel:
    """Fit the model on the arrays of `train.distill.AvatarDataset`; writes `out_dir` when given."""
    from diffusers import DDPMScheduler

    spec = spec or AvatarSpec()
    if crops.shape[1:] != (spec.resolution, spec.resolution, 3):
        raise ValueError(f"crops must be [N, {spec.resolution}, {spec.resolution}, 3], got {list(crops.shape)}")
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    unet, vae, audio = build_components(unet_config, vae_config, AudioConfig())
    images, refs = _to_images(crops), _to_images(references)
    mask = torch.from_numpy(mouth_mask(spec, spec.resolution))[None, None]
    pixel_weight = 1 + 7 * mask

    # phase 1: the VAE on every crop and reference
    pool = torch.cat([images, refs])
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, settings.vae_steps))
    vae.train()
    for _ in (bar := tqdm(range(settings.vae_steps), desc="train avatar VAE", unit="step")):
        x = pool[torch.randint(0, len(pool), (settings.vae_batch,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = (pixel_weight * (recon.float() - x).abs()).mean() + 1e-6 * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale

    # phase 2: U-Net + audio encoder on cached latents
    model = AvatarModel(spec, unet, vae, audio, dict(LCM_SCHEDULER))
    with torch.no_grad():
        reference_latents = model.encode_reference((refs + 1) / 2)
    mel = torch.from_numpy(mel_features(windows, spec.sample_rate, audio.config))
    state_labels = torch.from_numpy(states)
    ref_of = torch.from_numpy(reference_index)
    timesteps = torch.tensor(sorted({t for n in range(1, 5) for t in model.timesteps(n)}))
    noiser = DDPMScheduler(num_train_timesteps=LCM_SCHEDULER["num_train_timesteps"],
                           beta_start=LCM_SCHEDULER["beta_start"], beta_end=LCM_SCHEDULER["beta_end"],
                           beta_schedule=LCM_SCHEDULER["beta_schedule"])
    latent_weight = 1 + 7 * F.interpolate(mask, size=latents.shape[-2:], mode="area")
    params = list(unet.parameters()) + list(audio.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, settings.unet_steps))
    unet.train()
    audio.train()
    for _ in (bar := tqdm(range(settings.unet_steps), desc="train avatar U-Net", unit="step")):
        idx = torch.randint(0, len(latents), (settings.batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = timesteps[torch.randint(0, len(timesteps), (settings.batch,), generator=gen)]
        noisy = torch.cat([noiser.add_noise(x0, noise, t), reference_latents[ref_of[idx]]], dim=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(noisy, t, encoder_hidden_states=audio(mel[idx]), class_labels=state_labels[idx]).sample
        loss = (latent_weight * (pred.float() - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    audio.eval()
    if out_dir is not None:
        save_model(model, out_dir, {"training": {"vae_steps": settings.vae_steps, "unet_steps": settings.unet_steps,
                                                 "batch": settings.batch, "seed": settings.seed,
                                                 "frames": len(crops)}})
    return model
