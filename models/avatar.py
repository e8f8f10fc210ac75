"""The diffusion avatar model: latent inpainting of the lower face from audio, in one to four LCM steps.

What it computes (LLIA-shaped, built only from diffusers parts so community weights of the same shape
load from a local folder):

- the reference face crop (a square around the mouth, `resolution` px) is masked over the mouth and
  encoded once per session by the VAE (`AutoencoderKL`): the *masked reference latent*;
- per frame, a short audio window (`audio_context_s` ending at the frame's time) becomes log-mel
  features (numpy, no extra dependency), which `AudioEncoder` turns into the tokens the U-Net
  cross-attends to; the state label (speaking / listening / idle) is the U-Net's class label;
- the U-Net (`UNet2DConditionModel`, SD-inpainting input layout: noisy latent 4 + mask 1 + masked
  reference latent 4 = 9 channels) predicts the clean latent (`prediction_type="sample"`), stepped by
  diffusers' `LCMScheduler` for 1–4 steps from a fixed noise (the same conditioning always gives the
  same face: no flicker between frames);
- the VAE decodes the crop; the caller pastes it back with the soft mask (`mouth_mask`).

Weights folder layout (safetensors only; every file is named in errors):

    avatar/
      model_index.json          {"_class_name": "LiveCacheAvatar", "resolution": 64, "steps": 2,
                                 "audio_context_s": 0.2, "crop_scale": 1.5, "crop_dy": 0.1,
                                 "mask_rx": 0.4, "mask_ry": 0.3, "states": [...]}
      unet/config.json          a UNet2DConditionModel config: in_channels 9, out_channels 4,
      unet/diffusion_pytorch_model.safetensors   num_class_embeds 3, cross_attention_dim = audio dim
      vae/config.json           an AutoencoderKL config (latent_channels 4; `scaling_factor` is used)
      vae/diffusion_pytorch_model.safetensors
      audio_encoder/config.json {"n_mels": 32, "n_fft": 400, "hop": 160, "dim": 64, "frames": 18}
      audio_encoder/model.safetensors
      scheduler/scheduler_config.json   an LCMScheduler config (prediction_type "sample" or "epsilon")

Geometry (`crop_scale`, `crop_dy`, `mask_*`) is in units of the mouth width found on the portrait, so
the model sees the same framing at every output size. Missing files, configs of the wrong class and
tensors of the wrong shape raise `WeightsError` naming the file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .audio_features import log_mel
from .embedded import WEIGHTS_ROOT
from .loading import (
    WeightsError,
    build_from_config,
    cast,
    load_state_into,
    read_config,
    read_json,
    save_component,
    save_json,
    weight_file,
)

AVATAR_DIR = WEIGHTS_ROOT / "avatar"
STATES = ("speaking", "listening", "idle")


@dataclass(frozen=True)
class AvatarSpec:
    """Everything outside the component configs: framing, audio window, default step count."""

    resolution: int = 64
    steps: int = 2
    audio_context_s: float = 0.2
    sample_rate: int = 16000
    crop_scale: float = 1.5  # crop side / mouth width
    crop_dy: float = 0.1  # crop centre below the mouth centre, in mouth widths
    mask_rx: float = 0.40  # mask ellipse radii as fractions of the crop side
    mask_ry: float = 0.30
    states: tuple[str, ...] = STATES

    def __post_init__(self) -> None:
        for name in ("audio_context_s", "crop_scale", "crop_dy", "mask_rx", "mask_ry"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.audio_context_s <= 10 or not 0 < self.crop_scale <= 10:
            raise ValueError(f"audio_context_s and crop_scale must be in (0, 10], got {self.audio_context_s} "
                             f"and {self.crop_scale}")
        if not isinstance(self.resolution, int) or self.resolution < 16 or self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and >= 16, got {self.resolution}")
        if not 1 <= self.steps <= 4:
            raise ValueError(f"steps must be 1..4 (LCM), got {self.steps}")
        if tuple(self.states) != STATES:
            raise ValueError(f"states must be {list(STATES)} in this order, got {list(self.states)}")


@dataclass(frozen=True)
class AudioConfig:
    n_mels: int = 32
    n_fft: int = 400
    hop: int = 160
    dim: int = 64
    frames: int = 18  # mel frames in one audio window (audio_context_s * rate, no padding)


TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 17,
    "out_channels": 8,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "num_class_embeds": len(STATES),
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 8,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.0,
}
LCM_SCHEDULER: dict[str, Any] = {
    "_class_name": "LCMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "original_inference_steps": 50,
    "prediction_type": "sample",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": True,
}


def mel_features(audio: np.ndarray, rate: int, config: AudioConfig) -> np.ndarray:
    """Log-mel frames of each window: float audio [B, T] -> [B, config.frames, n_mels].

    Windows shorter than `frames` hops are left-padded with silence (a session's first frames), longer
    ones keep their most recent part, so the newest audio always sits in the last frame.
    """
    audio = np.atleast_2d(np.asarray(audio, np.float32))
    need = config.n_fft + (config.frames - 1) * config.hop
    if audio.shape[1] < need:
        audio = np.pad(audio, ((0, 0), (need - audio.shape[1], 0)))
    audio = audio[:, -need:]
    idx = np.arange(config.frames)[:, None] * config.hop + np.arange(config.n_fft)[None, :]
    return log_mel(audio[:, idx], rate, config.n_mels)


class AudioEncoder(nn.Module):
    """Log-mel frames -> cross-attention tokens (a per-frame MLP plus learned positions)."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.n_mels)
        self.proj = nn.Sequential(nn.Linear(config.n_mels, config.dim), nn.GELU(), nn.Linear(config.dim, config.dim))
        self.position = nn.Parameter(torch.zeros(1, config.frames, config.dim))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.ndim != 3 or tuple(mel.shape[1:]) != (self.config.frames, self.config.n_mels):
            raise ValueError(f"audio features must be [B, {self.config.frames}, {self.config.n_mels}], "
                             f"got {list(mel.shape)}")
        return self.proj(self.norm(mel)) + self.position


@torch.no_grad()
def vae_decode(vae: nn.Module, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents through an `AutoencoderKL` decoder: float RGB [B, 3, H, W] in 0..1 on the CPU."""
    image = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample
    return ((image.float().cpu() + 1) / 2).clamp(0, 1)


def mouth_mask(spec: AvatarSpec, size: int) -> np.ndarray:
    """The soft inpainting mask over the mouth in crop coordinates ([size, size] float32, 1 inside)."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    r = np.sqrt(((xx - 0.5) / spec.mask_rx) ** 2 + ((yy - 0.5) / spec.mask_ry) ** 2)
    return np.clip((1.15 - r) / 0.3, 0.0, 1.0).astype(np.float32)  # feathered over ~15% of the radius


@dataclass
class AvatarModel:
    """The loaded components; stateless between calls except the scheduler (callers serialise `denoise`)."""

    spec: AvatarSpec
    unet: nn.Module
    vae: nn.Module
    audio_encoder: AudioEncoder
    scheduler_config: dict[str, Any]
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _scheduler: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from diffusers import LCMScheduler

        unet_in = self.unet.config.in_channels
        latent = self.vae.config.latent_channels
        if unet_in != 2 * latent + 1:
            raise WeightsError(f"unet/config.json: in_channels {unet_in} must be 2 * vae latent_channels + 1 "
                               f"= {2 * latent + 1} (noisy latent, mask, masked reference latent)")
        if self.unet.config.cross_attention_dim != self.audio_encoder.config.dim:
            raise WeightsError(f"unet/config.json: cross_attention_dim {self.unet.config.cross_attention_dim} "
                               f"must equal audio_encoder/config.json dim {self.audio_encoder.config.dim}")
        if (self.unet.config.num_class_embeds or 0) < len(STATES):
            raise WeightsError(f"unet/config.json: num_class_embeds must be >= {len(STATES)} (the state labels)")
        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        try:
            self._scheduler = LCMScheduler(**config)
        except TypeError as err:
            raise WeightsError(f"scheduler/scheduler_config.json: not an LCMScheduler config ({err})") from None

    # -- shapes ----------------------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        return self.spec.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def timesteps(self, steps: int) -> list[int]:
        self._scheduler.set_timesteps(steps)
        return [int(t) for t in self._scheduler.timesteps]

    # -- stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_reference(self, crops: torch.Tensor) -> torch.Tensor:
        """Masked reference latents [B, 1 + C, h, w] (mask then latent) from crops [B, 3, H, W] in 0..1."""
        mask = torch.from_numpy(mouth_mask(self.spec, self.spec.resolution))
        masked = (crops * 2 - 1) * (1 - mask)
        latent = self.vae.encode(masked.to(self.device, self.dtype)).latent_dist.mode() * self.vae.config.scaling_factor
        small = torch.nn.functional.interpolate(mask[None, None], size=latent.shape[-2:], mode="area").to(self.device)
        return torch.cat([small.expand(len(latent), -1, -1, -1).to(latent.dtype), latent], dim=1)

    @torch.no_grad()
    def audio_tokens(self, mel: torch.Tensor) -> torch.Tensor:
        return self.audio_encoder(mel.to(self.device, torch.float32)).to(self.dtype)

    @torch.no_grad()
    def denoise(self, reference: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor, steps: int,
                noise: torch.Tensor) -> torch.Tensor:
        """Clean latents [B, C, h, w] in `steps` LCM steps from `noise`, for each frame's conditioning."""
        generator = torch.Generator().manual_seed(0)  # the noise LCM re-injects between steps: fixed too
        self._scheduler.set_timesteps(steps)
        sample = noise.to(self.device, self.dtype)
        reference, states = reference.to(self.device, self.dtype), states.to(self.device)
        denoised = sample
        for t in self._scheduler.timesteps:
            x = torch.cat([sample, reference], dim=1)
            out = self.unet(x, t, encoder_hidden_states=tokens, class_labels=states).sample
            sample, denoised = self._scheduler.step(out, t, sample, generator=generator, return_dict=False)
        return denoised

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Crops [B, 3, H, W] in 0..1."""
        return vae_decode(self.vae, latents, self.dtype)

    def to(self, dtype: torch.dtype, device: str | torch.device | None = None) -> AvatarModel:
        """Cast the U-Net and VAE (the audio encoder stays fp32: it is tiny and sees raw log-mels)."""
        self.device = torch.device(device) if device is not None else self.device
        for module in (self.unet, self.vae):
            cast(module, self.device, dtype)
        self.audio_encoder.to(self.device)
        self.dtype = dtype
        return self


def build_components(unet_config: dict[str, Any] | None = None, vae_config: dict[str, Any] | None = None,
                     audio: AudioConfig | None = None) -> tuple[nn.Module, nn.Module, AudioEncoder]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel(**(unet_config or TINY_UNET)), AutoencoderKL(**(vae_config or TINY_VAE)),
            AudioEncoder(audio or AudioConfig()))


def random_model(seed: int = 0, spec: AvatarSpec | None = None) -> AvatarModel:
    """The tiny configuration with seeded random weights: what tests run without any weights file."""
    torch.manual_seed(seed)
    unet, vae, audio = build_components()
    return AvatarModel(spec or AvatarSpec(), unet.eval(), vae.eval(), audio.eval(), dict(LCM_SCHEDULER))


def save_model(model: AvatarModel, folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the folder layout described in the module docstring (fp16 weights keep it small)."""
    save_component(model.unet, folder / "unet", dict(model.unet.config, _class_name="UNet2DConditionModel"),
                   "diffusion_pytorch_model", half=True)
    save_component(model.vae, folder / "vae", dict(model.vae.config, _class_name="AutoencoderKL"),
                   "diffusion_pytorch_model", half=True)
    save_component(model.audio_encoder, folder / "audio_encoder", asdict(model.audio_encoder.config), "model",
                   half=True)
    save_json(folder / "scheduler" / "scheduler_config.json", model.scheduler_config)
    index = {"_class_name": "LiveCacheAvatar", **asdict(model.spec), **(extra or {})}
    index["states"] = list(index["states"])
    save_json(folder / "model_index.json", index)
    return folder


def _from_config(cls: Any, folder: Path) -> nn.Module:
    return build_from_config(cls, read_config(folder), folder / "config.json")


def load_model(folder: Path = AVATAR_DIR) -> AvatarModel:
    """Load an avatar folder (layout in the module docstring); every failure names the file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder (an avatar weights folder holds model_index.json, unet/, "
                           "vae/, audio_encoder/ and scheduler/)")
    index = read_json(folder / "model_index.json", "it names the framing and audio window the model was trained on")
    known = set(AvatarSpec.__dataclass_fields__)
    try:
        spec = AvatarSpec(**{k: tuple(v) if k == "states" else v for k, v in index.items() if k in known})
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{folder / 'model_index.json'}: {err}") from None
    unet = load_state_into(_from_config(UNet2DConditionModel, folder / "unet"), weight_file(folder / "unet"))
    vae = load_state_into(_from_config(AutoencoderKL, folder / "vae"), weight_file(folder / "vae"))
    audio_config = read_config(folder / "audio_encoder")
    try:
        audio = AudioEncoder(AudioConfig(**audio_config))
    except TypeError as err:
        raise WeightsError(f"{folder / 'audio_encoder' / 'config.json'}: {err}") from None
    load_state_into(audio, weight_file(folder / "audio_encoder"))
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json", "the LCM scheduler settings")
    expected_frames = 1 + (round(spec.audio_context_s * spec.sample_rate) - audio.config.n_fft) // audio.config.hop
    if audio.config.frames != expected_frames:
        raise WeightsError(f"{folder / 'audio_encoder' / 'config.json'}: frames {audio.config.frames} does not fit "
                           f"audio_context_s {spec.audio_context_s} (expected {expected_frames})")
    return AvatarModel(spec, unet.float().eval(), vae.float().eval(), audio.float().eval(), scheduler)
