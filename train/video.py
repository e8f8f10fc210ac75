"""`livecache train video`: fit the embedded causal video model on procedural clips (seeded, 2 CPU cores).

Each training clip has `context` clean frames (0..config.context, drawn per clip, fed with the context
embedding exactly as the AR sampler feeds committed frames) followed by noisy frames at one shared noise
level; the loss (x0 prediction, cosine schedule) covers the noisy frames only. Training every context
length at once is what lets one model start a stream from nothing and continue it from a full window.
Half the clips are noised to exactly the levels the few-step sampler visits (1, 0.75, 0.5, 0.25), so
1-4 step sampling gets a model that is best where it is asked. Context frames are degraded at random
(noise and a Gaussian blur; the model is not told), so it learns to redraw a sharp class from soft
context rather than copy the softness: without it, the few-step sampler's small blur compounded clip
after clip into blobs.
A fifth of the clips (`SWITCH`) take their context from another clip, usually of another class: that is
a condition change mid-stream, and it teaches the model that the class decides what is drawn, whatever
the committed frames showed. A clip with no context of its own class (a stream's first clip, or the
clip after a change) shows a digit that starts in the middle of the frame (`make_clips(centred=True)`):
where a new digit appears is then not a guess the few-step sampler must average over, only its motion is.
An EMA of the weights is what ships, in fp16 safetensors.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.features import DigitFeatures, colour_blind
from ..models.loading import save_weights
from ..models.video import (
    CLASS_NAMES,
    VIDEO_DIR,
    VIDEO_FEATURES_FILE,
    CausalVideoDiT,
    VideoModelConfig,
    alpha_sigma,
    save_video_model,
)
from .video_data import make_clips

CONTEXT_JITTER = 0.08  # max std of the noise put on context frames during training
CONTEXT_BLUR = 0.9  # max Gaussian blur sigma (pixels) put on context frames during training
CLASSIFIER_EXEMPLARS = 40  # handwritings per digit the content classifier learns (the model learns one)
SWITCH = 0.2  # share of clips whose context frames come from another clip (a condition change)


def blur(clips: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Clips `[B, F, C, H, W]` blurred by a Gaussian of `sigma[b]` pixels per clip (0 = unchanged)."""
    b, f, c, h, w = clips.shape
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, 5]; sigma ~0 gives [0, 0, 1, 0, 0]
    weight = (kernel[:, :, None] * kernel[:, None, :]).repeat_interleave(f * c, dim=0)[:, None]
    out = F.conv2d(F.pad(clips.reshape(1, b * f * c, h, w), (2, 2, 2, 2), mode="replicate"), weight, groups=b * f * c)
    return out.reshape(clips.shape)


def training_loss(model: CausalVideoDiT, clips: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator, starts: torch.Tensor | None = None) -> torch.Tensor:
    """x0-prediction MSE on the noisy frames of `clips` after a random number of clean context frames.

    `starts` (same labels, digits starting centred): what the noisy frames show when a clip has no
    context of its own class (a stream's first clip, or a condition change)."""
    cfg = model.config
    batch, frames = clips.shape[:2]
    context = torch.randint(0, min(cfg.context, frames - 1) + 1, (batch,), generator=generator)
    is_context = torch.arange(frames)[None] < context[:, None]
    switch = torch.rand(batch, generator=generator) < SWITCH
    switched = switch[:, None] & is_context
    clips = torch.where(switched[..., None, None, None], clips.roll(1, dims=0), clips)
    if starts is not None:
        # a new start: noisy frame j shows frame j - context of a centred-start clip
        fresh = (context == 0) | switch
        start_frame = (torch.arange(frames)[None] - context[:, None]).clamp(min=0)
        aligned = starts[torch.arange(batch)[:, None], start_frame]
        clips = torch.where((fresh[:, None] & ~is_context)[..., None, None, None], aligned, clips)
    # half the clips at the few-step sampler's own levels (1, 0.75, 0.5, 0.25), half anywhere in (0, 1)
    uniform = torch.rand(batch, generator=generator)
    few_step = torch.randint(1, 5, (batch,), generator=generator) / 4
    level = torch.where(torch.rand(batch, generator=generator) < 0.5, few_step, uniform)[:, None].expand(batch, frames)
    t = torch.where(is_context, torch.zeros(()), level)
    noise = torch.randn(clips.shape, generator=generator)
    alpha, sigma = (s[..., None, None, None] for s in alpha_sigma(t))
    jitter = CONTEXT_JITTER * torch.rand(batch, 1, 1, 1, 1, generator=generator)
    degraded = blur(clips, CONTEXT_BLUR * torch.rand(batch, generator=generator)) + jitter * noise
    noisy = torch.where(is_context[..., None, None, None], degraded, alpha * clips + sigma * noise)
    position = int(torch.randint(0, 512, (1,), generator=generator))
    pred = model(noisy, t, is_context, labels, position)  # fp32: bf16 autocast is slower at this size
    per_frame = F.mse_loss(pred, clips, reduction="none").mean(dim=(2, 3, 4))
    weight = (~is_context).float()
    return (per_frame * weight).sum() / weight.sum()


def train_video(out_dir: Path = VIDEO_DIR, steps: int = 10000, batch: int = 16, frames: int = 6, seed: int = 0,
                config: VideoModelConfig | None = None, lr: float = 2e-3, threads: int = 2,
                checkpoint_every: int = 0) -> Path:
    """Train and write `out_dir/config.json` + `model.safetensors`; returns the folder.

    Two torch threads by default (on a quiet 2-core machine a step took 192 ms against 303 ms on one).
    `checkpoint_every` > 0 also writes the EMA every that many steps,
    so a long run can be looked at (and stopped) while it trains."""
    config = config or VideoModelConfig()
    if frames < 2:
        raise ValueError(f"frames must be at least 2 (context + a noisy frame), got {frames}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = CausalVideoDiT(config).train()
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    warmup = max(1, min(40, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    progress = tqdm(range(steps), desc="train video model", unit="step")
    for step in progress:
        labels = torch.randint(0, config.num_classes, (batch,), generator=generator)
        clips = make_clips(labels, frames, generator, config.resolution)
        starts = make_clips(labels, frames, generator, config.resolution, centred=True)
        loss = training_loss(model, clips, labels, generator, starts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_video_model(ema, Path(out_dir))
    torch.set_num_threads(previous_threads)
    save_video_model(ema, Path(out_dir))
    return Path(out_dir)


def train_video_features(out_file: Path = VIDEO_FEATURES_FILE, steps: int = 1500, batch: int = 96, seed: int = 0,
                         resolution: int | None = None) -> Path:
    """Train the content classifier the video bench scores frames with; returns the file written.

    Frames are single frames of the training clips (any position, any phase), seen colour-blind and with
    a little noise and a random brightness, so what decides the class is the shape. It is trained on the
    data, never on the model's output, so it cannot learn to excuse the model's mistakes; and on 40
    handwritings per digit where the model is taught one, so it reads a digit, not a template."""
    resolution = resolution or VideoModelConfig().resolution
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitFeatures(len(CLASS_NAMES)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in tqdm(range(steps), desc="train video features", unit="step"):
        labels = torch.randint(0, len(CLASS_NAMES), (batch,), generator=generator)
        frames = make_clips(labels, 1, generator, resolution, exemplars=CLASSIFIER_EXEMPLARS)[:, 0]
        gain = 0.6 + 0.4 * torch.rand(batch, 1, 1, 1, generator=generator)
        images = (colour_blind(frames) + 1) * gain - 1 + 0.08 * torch.randn(batch, 1, resolution, resolution,
                                                                              generator=generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    save_weights(model.eval(), Path(out_file))
    return Path(out_file)
