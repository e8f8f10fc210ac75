"""The embedded causal video model: a small class-conditional video diffusion transformer (pixel space).

Frames (16×16 RGB) are cut into 4×4 patches; every block runs spatial attention inside each frame, then
temporal attention across frames at each patch position, then an MLP, all modulated per frame (adaLN)
by that frame's conditioning. Why this size: on 2 shared CPU cores the model must learn in minutes, and
what a 16-token frame with a 96-wide model costs per step is what lets it see enough clips to draw a
legible digit (a 64-token frame cost 4× per step and had seen too few clips in the same time).

Two design rules make the causal cache exact (`accel/causal_cache.py`):

* temporal attention is causal per frame and goes through `causal_temporal_attention`, with rotary
  positions on the frame index (scores depend on frame distance only, so cached keys stay valid as the
  window slides over an endless stream);
* conditional frames enter clean with one learned *context* embedding instead of timestep + class, so
  their keys/values depend on nothing but themselves and earlier frames.

The network predicts the clean frames x0 directly (cosine schedule: x_t = cos(πt/2)·x0 + sin(πt/2)·ε):
a small model predicting ε or v leaks the input noise it fails to cancel into x0 as grain, which the
AR loop would then feed back as context; a direct x0 is what the consistency-style few-step sampler
wants anyway. Samplers below: LCM-style few-step and DDIM multi-step.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..accel.causal_cache import CacheAccess, CausalCacheConfig, CausalVideoStream, causal_temporal_attention
from ..accel.progress import Progress
from .digits import parse_digit_prompt
from .embedded import WEIGHTS_ROOT
from .features import DigitFeatures
from .loading import WeightsError, load_state_into, read_config, save_component, weight_file

VIDEO_DIR = WEIGHTS_ROOT / "video"
VIDEO_FEATURES_FILE = WEIGHTS_ROOT / "video_features.safetensors"  # the content classifier (`models/features.py`)
CLASS_NAMES = tuple(f"digit {d}" for d in range(10)) + ("shapes", "texture")
SHAPES, TEXTURE = 10, 11
REFINE = 32  # channels of the full-resolution conv head


@dataclass(frozen=True)
class VideoModelConfig:
    """Architecture of `CausalVideoDiT`; `chunk` and `context` are what training used (sampler defaults)."""

    resolution: int = 16
    channels: int = 3
    patch: int = 4
    dim: int = 96
    depth: int = 4
    heads: int = 4
    num_classes: int = len(CLASS_NAMES)
    chunk: int = 4
    context: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"video model config: {f.name} must be a positive integer, got {value!r}")
        if self.resolution % self.patch:
            raise ValueError(f"video model config: resolution {self.resolution} is not a multiple of patch "
                             f"{self.patch}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"video model config: dim {self.dim} must split into {self.heads} heads of even size")

    @classmethod
    def from_dict(cls, data: dict) -> VideoModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"video model config: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)


def alpha_sigma(t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine schedule: signal and noise scales at noise level t in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rotary(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[frames, head_dim/2]` for absolute frame positions."""
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim // 2, dtype=torch.float32) / (head_dim // 2)))
    angles = positions.to(torch.float32)[:, None] * freqs[None]
    return angles.cos(), angles.sin()


class Block(nn.Module):
    """Spatial attention (per frame) → causal temporal attention (per patch position) → MLP, adaLN each."""

    def __init__(self, dim: int, heads: int, layer: int) -> None:
        super().__init__()
        self.heads, self.layer = heads, layer
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.spatial_qkv, self.spatial_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.temporal_qkv, self.temporal_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 9 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[rows, seq, 3*dim] → three [rows, heads, seq, head_dim]."""
        rows, seq, _ = qkv.shape
        q, k, v = qkv.view(rows, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                access: CacheAccess | None) -> torch.Tensor:
        b, f, n, d = x.shape
        mods = self.modulation(F.silu(cond)).unsqueeze(2).chunk(9, dim=-1)

        def modulated(i: int) -> torch.Tensor:
            return self.norm(x) * (1 + mods[3 * i + 1]) + mods[3 * i]

        q, k, v = self._heads(self.spatial_qkv(modulated(0)).reshape(b * f, n, 3 * d))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, f, n, d)
        x = x + mods[2] * self.spatial_out(h)

        h = modulated(1).transpose(1, 2).reshape(b * n, f, d)
        q, k, v = self._heads(self.temporal_qkv(h))
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        h = causal_temporal_attention(q, k, v, self.layer, access)
        h = h.transpose(1, 2).reshape(b, n, f, d).transpose(1, 2)
        x = x + mods[5] * self.temporal_out(h)
        return x + mods[8] * self.mlp(modulated(2))


class CausalVideoDiT(nn.Module):
    """Class-conditional video denoiser with causal temporal attention (a `CausalVideoDenoiser`)."""

    def __init__(self, config: VideoModelConfig) -> None:
        super().__init__()
        self.config = config
        c, p, d = config.channels, config.patch, config.dim
        tokens = (config.resolution // p) ** 2
        self.patch_in = nn.Linear(c * p * p, d)
        self.spatial_pos = nn.Parameter(torch.randn(tokens, d) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.class_embed = nn.Embedding(config.num_classes, d)
        self.context_embed = nn.Parameter(torch.randn(d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, config.heads, i) for i in range(config.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False)
        self.modulation_out = nn.Linear(d, 2 * d)
        self.patch_out = nn.Linear(d, c * p * p)
        # a per-frame conv head at full resolution over (patch prediction, noisy input): strokes finer than
        # a patch are drawn here, where neighbouring pixels meet; it is frame-local and after the last
        # temporal layer, so it never touches what the causal cache holds
        self.refine = nn.Sequential(nn.Conv2d(2 * c, REFINE, 3, padding=1), nn.SiLU(),
                                    nn.Conv2d(REFINE, REFINE, 3, padding=1), nn.SiLU(),
                                    nn.Conv2d(REFINE, c, 3, padding=1))
        for layer in (self.modulation_out, self.patch_out, self.refine[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.config.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = 1000.0 * t.float()[..., None] * freqs
        return self.time_mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))

    def _check(self, frames: torch.Tensor, t: torch.Tensor, is_context: torch.Tensor, cond: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.channels, cfg.resolution, cfg.resolution)
        if frames.ndim != 5 or tuple(frames.shape[2:]) != expected:
            raise ValueError(f"frames must be [batch, frames, {', '.join(map(str, expected))}], "
                             f"got {tuple(frames.shape)}")
        if t.shape != frames.shape[:2] or is_context.shape != frames.shape[:2]:
            raise ValueError(f"t and is_context must be [batch, frames] = {tuple(frames.shape[:2])}, "
                             f"got {tuple(t.shape)} and {tuple(is_context.shape)}")
        if cond.shape != frames.shape[:1] or bool(((cond < 0) | (cond >= cfg.num_classes)).any()):
            raise ValueError(f"cond must be [batch] class ids in 0..{cfg.num_classes - 1}, got {cond.tolist()}")

    def forward(self, frames: torch.Tensor, t: torch.Tensor, is_context: torch.Tensor, cond: torch.Tensor,
                first_position: int, access: CacheAccess | None = None) -> torch.Tensor:
        """Predicted clean frames (x0), shape of `frames`; context frames' outputs are meaningless."""
        self._check(frames, t, is_context, cond)
        cfg = self.config
        b, f, c, hgt, wid = frames.shape
        p, g = cfg.patch, cfg.resolution // cfg.patch
        patches = frames.reshape(b, f, c, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f, g * g, c * p * p)
        x = self.patch_in(patches) + self.spatial_pos
        noisy_cond = self._time_embedding(t) + self.class_embed(cond)[:, None]
        frame_cond = torch.where(is_context[..., None], self.context_embed.to(noisy_cond.dtype), noisy_cond)
        positions = torch.arange(first_position, first_position + f, device=frames.device)
        rope = rotary(positions, cfg.dim // cfg.heads)
        for block in self.blocks:
            x = block(x, frame_cond, rope, access)
        shift, scale = self.modulation_out(F.silu(frame_cond)).unsqueeze(2).chunk(2, dim=-1)
        out = self.patch_out(self.norm_out(x) * (1 + scale) + shift)
        out = out.reshape(b, f, g, g, c, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(b * f, c, hgt, wid)
        out = out + self.refine(torch.cat([out, frames.reshape(b * f, c, hgt, wid)], dim=1))
        return out.reshape(b, f, c, hgt, wid)


def lcm_sampler(denoise, noise: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Few-step consistency-style sampling: predict x0, re-noise it with fresh noise to the next level.

    Steps go 1 → 0 evenly; each step is one denoiser call on the new frames only."""
    levels = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    for i in range(steps):
        x0 = denoise(x, float(levels[i])).clamp(-1, 1)
        if i + 1 < steps:
            alpha, sigma = alpha_sigma(levels[i + 1])
            x = alpha * x0 + sigma * torch.randn(x.shape, generator=generator).to(x.device)
    return x0


def ddim_sampler(denoise, noise: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Plain deterministic multi-step sampling (DDIM on the cosine schedule), the comparison sampler."""
    levels = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    for i in range(steps):
        x0 = denoise(x, float(levels[i])).clamp(-1, 1)
        alpha, sigma = alpha_sigma(levels[i])
        alpha_next, sigma_next = alpha_sigma(levels[i + 1])
        eps = (x - alpha * x0) / sigma.clamp_min(1e-4)
        x = alpha_next * x0 + sigma_next * eps
    return x.clamp(-1, 1)


SAMPLERS = {"lcm": lcm_sampler, "ddim": ddim_sampler}
FRESH_STEPS = 4  # the live engine's and the content bench's steps for a fresh clip (3 for a continuation)


def clip_steps(fresh: bool, steps: int, fresh_steps: int) -> int:
    """Sampler steps for one clip. A fresh clip (a stream's first, or the first after a condition change) has no
    committed frame of its class to continue, so its content comes from noise alone and a few-step sampler
    averages over what it could be; a step more there is what lets a new class show within a clip (measured:
    a change to "shapes" dominated its first two clips in 3 of 3 seeds at 4 steps, 1 of 3 at 3)."""
    return fresh_steps if fresh else steps


@torch.no_grad()
def generate(model: CausalVideoDiT, cache: CausalCacheConfig, labels: torch.Tensor, chunks: int,
             chunk_length: int | None = None, steps: int = 2, sampler: str = "lcm", seed: int = 0,
             on_chunk=None, progress: Progress | None = None, fresh_steps: int | None = None) -> torch.Tensor:
    """AR video `[B, chunks * chunk_length, C, H, W]` in [-1, 1] for class ids `labels` `[B]`, or
    `[chunks, B]` for a class per clip (a condition change mid-stream).

    `fresh_steps` (default: `steps`): sampler steps for a fresh clip — the first, or one whose class differs
    from the clip before — which draws its content from noise, where a continuation only moves committed
    content on (see `clip_steps`).

    Noise is drawn chunk by chunk from one seeded generator, so cache-shared and recompute runs with
    the same seed see the same noise. `on_chunk(index, stream)` is called after each chunk (timing);
    `progress` (default: none) counts the chunks and may stop the video between two of them."""
    cfg = model.config
    chunk_length = chunk_length or cfg.chunk
    fresh_steps = steps if fresh_steps is None else fresh_steps
    if chunks < 1 or chunk_length < 1 or steps < 1 or fresh_steps < 1:
        raise ValueError(f"chunks, chunk_length, steps and fresh_steps must be >= 1, got {chunks}, {chunk_length}, "
                         f"{steps}, {fresh_steps}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if labels.ndim == 1:
        labels = labels.expand(chunks, -1)
    if labels.ndim != 2 or labels.shape[0] != chunks:
        raise ValueError(f"labels must be [batch] or [chunks={chunks}, batch], got {tuple(labels.shape)}")
    stream = CausalVideoStream(model, cache)
    generator = torch.Generator().manual_seed(seed)
    clips = []
    for index in (progress or Progress(bar=False)).loop(range(chunks), "generating video", "chunk"):
        noise = torch.randn(labels.shape[1], chunk_length, cfg.channels, cfg.resolution, cfg.resolution,
                            generator=generator)
        fresh = index == 0 or bool((labels[index] != labels[index - 1]).any())
        clips.append(stream.next_chunk(noise, labels[index], SAMPLERS[sampler], clip_steps(fresh, steps, fresh_steps),
                                       generator))
        if on_chunk is not None:
            on_chunk(index, stream)
    return torch.cat(clips, dim=1)


def parse_video_prompt(prompt: str | int) -> int:
    """Class id for a prompt: "7" / "digit 7" / "a seven", "shapes", "texture", or a class id.

    Raises ValueError naming the prompt and the choices (a typo must not silently pick something)."""
    if isinstance(prompt, int) and not isinstance(prompt, bool):
        if not 0 <= prompt < len(CLASS_NAMES):
            raise ValueError(f"class id must be 0..{len(CLASS_NAMES) - 1}, got {prompt}")
        return prompt
    text = str(prompt).strip().lower()
    if re.search(r"\bshapes?\b", text):
        return SHAPES
    if re.search(r"\btextures?\b", text):
        return TEXTURE
    try:
        if not text:
            raise ValueError("empty")
        return parse_digit_prompt(text)
    except ValueError:
        raise ValueError(f"the embedded video model draws a bouncing digit ('7', 'a seven'), 'shapes' or "
                         f"'texture'; cannot read {prompt!r}") from None


def load_video_classifier(file: Path | None = None) -> DigitFeatures:
    """The 12-class content classifier (digits, shapes, texture) on `colour_blind` frames, in eval mode."""
    file = VIDEO_FEATURES_FILE if file is None else Path(file)
    if not file.is_file():
        raise WeightsError(f"{file}: no video classifier (train one with `livecache train video-features`)")
    return load_state_into(DigitFeatures(len(CLASS_NAMES)), file).eval()


def save_video_model(model: CausalVideoDiT, folder: Path) -> None:
    save_component(model, folder, dict(asdict(model.config), _class_name="CausalVideoDiT"), "model", half=True)


def load_video_model(folder: Path | None = None) -> CausalVideoDiT:
    """The shipped model (default) or one written by `livecache train video --out FOLDER`, in eval mode.

    Missing files, unknown config keys and weights that do not fit the config raise `WeightsError`
    naming the file."""
    folder = VIDEO_DIR if folder is None else Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such video model folder (train one with `livecache train video`)")
    try:
        config = VideoModelConfig.from_dict(read_config(folder))
    except (TypeError, ValueError) as err:
        if isinstance(err, WeightsError):
            raise
        raise WeightsError(f"{folder / 'config.json'}: {err}") from None
    return load_state_into(CausalVideoDiT(config), weight_file(folder)).eval()
