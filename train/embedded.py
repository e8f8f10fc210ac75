"""Reproducible training of the embedded models on 2 CPU cores (seeded, single-threaded order).

`livecache train digits` fits the class-conditional digits U-Net with the DDPM objective
(epsilon prediction, cosine noise schedule, 10% label dropout so classifier-free guidance works,
an EMA of the weights is what ships). `livecache train features` fits the classifier whose
features give the FID-style score. Both write safetensors through `save_component`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.digits import UNCONDITIONAL, load_digits_tensor
from ..models.embedded import (
    DIGITS_DIR,
    FEATURES_FILE,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    DigitPromptEncoder,
    build_digits_unet,
)
from ..models.features import DigitFeatures
from ..models.loading import save_component, save_json, save_weights


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each digit by up to one pixel: more variety without changing what a digit looks like."""
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=shifts, dims=(2, 3))


def train_digits(out_dir: Path = DIGITS_DIR, steps: int = 1500, batch: int = 64, seed: int = 0) -> Path:
    """Train the digits U-Net and its prompt encoder; returns the folder written."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensor()
    unet, encoder = build_digits_unet(), DigitPromptEncoder()
    noise_schedule = DDPMScheduler(
        num_train_timesteps=SCHEDULER_CONFIG["num_train_timesteps"], beta_schedule=SCHEDULER_CONFIG["beta_schedule"]
    )
    params = list(unet.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    lr_at = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    ema_unet, ema_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(encoder).eval()
    progress = tqdm(range(steps), desc="train digits U-Net", unit="step")
    for step in progress:
        idx = torch.randint(0, len(images), (batch,), generator=generator)
        x0 = augment(images[idx], generator)
        y = torch.where(torch.rand(batch, generator=generator) < 0.1, UNCONDITIONAL, labels[idx])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(noise_schedule.add_noise(x0, noise, t), t, encoder(y)).sample
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_encoder, encoder)):
                for e, p in zip(ema.parameters(), live.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    save_component(ema_unet, out_dir / "unet", dict(UNET_CONFIG, _class_name="UNet2DConditionModel"),
                   "diffusion_pytorch_model", half=True)
    save_component(ema_encoder, out_dir / "prompt_encoder", {"_class_name": "DigitPromptEncoder"}, "model", half=True)
    save_json(out_dir / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    save_json(out_dir / "model_index.json", {"_class_name": "LiveCacheDigits", "steps": steps, "batch": batch,
                                             "seed": seed})
    return out_dir


def train_features(out_file: Path = FEATURES_FILE, epochs: int = 30, seed: int = 0) -> Path:
    """Train the digit classifier used by the FID-style score; returns the file written."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensor()
    model = DigitFeatures()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in tqdm(range(epochs), desc="train digit features", unit="epoch"):
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(augment(images[idx], generator)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    save_weights(model, out_file)
    return out_file
