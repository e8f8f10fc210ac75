"""MuseTalk-format talking-head weights: single-step latent inpainting of the lower face from Whisper features.

MuseTalk (TMElyralab) is a diffusers `UNet2DConditionModel` that, in one call at timestep 0, turns the
VAE latents of a face crop whose lower half is blacked out, next to the latents of the whole crop (the
reference), into the latents of that face speaking the audio it cross-attends to. The audio is the
stacked hidden states (embeddings + every layer) of a Whisper-tiny encoder, 50 feature frames per second,
ten frames per video frame, with a sinusoidal position code added. Stable Diffusion's VAE encodes and
decodes 256² crops. This module loads those weights from the authors' folder layout, converted to
safetensors (`livecache convert musetalk SRC DST`; pickle files are never loaded here):

    models/
      musetalkV15/musetalk.json  + unet.safetensors                 (or musetalk/ for v1.0; V15 wins)
      sd-vae/config.json         + diffusion_pytorch_model.safetensors
      whisper/config.json        + preprocessor_config.json + pytorch_model.safetensors  (encoder used)

Every missing or wrong file raises `WeightsError` naming it; a folder that still holds only the authors'
`.bin`/`.pth` files is refused with the command that converts it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .avatar import vae_decode
from .loading import (
    PICKLE_SUFFIXES,
    WeightsError,
    build_from_config,
    cast,
    load_state_dict_into,
    read_json,
    read_state,
    weight_file,
)

UNET_FOLDERS = ("musetalkV15", "musetalk")  # v1.5 first: it is the one the authors recommend
UNET_CONFIG = "musetalk.json"
VAE_FOLDER = "sd-vae"
WHISPER_FOLDER = "whisper"
CONVERT = "livecache convert musetalk SRC DST"
WHISPER_RATE = 50  # encoder frames per second (10 ms mel hop, stride-2 conv)
_LEGACY_ATTENTION = re.compile(r"^(.*attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class MuseTalkSpec:
    """Framing and audio windowing; MuseTalk's values by default (the weights carry none of them)."""

    resolution: int = 256  # crop side the VAE sees (MuseTalk's `resized_img`)
    audio_context_s: float = 1.0  # audio the encoder sees before each frame (the newest part is used)
    pad_left: int = 2  # MuseTalk's audio_padding_length_left/right, in video frames
    pad_right: int = 2
    sample_rate: int = 16000
    version: str = "1.5"
    steps: int = 1  # single-step: the U-Net is called once per frame

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 16 or self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and >= 16, got {self.resolution!r}")
        if not 0 < self.audio_context_s <= 30 or self.audio_context_s * WHISPER_RATE < self.window_frames:
            need = self.window_frames / WHISPER_RATE
            raise ValueError(f"audio_context_s must cover the {self.window_frames} Whisper frames of a window "
                             f"({need:g} s) and be at most 30 s, got {self.audio_context_s}")

    @property
    def window_frames(self) -> int:
        """Whisper frames per video frame: 2 * (left + right + 1) as in MuseTalk's `get_whisper_chunk`."""
        return 2 * (self.pad_left + self.pad_right + 1)


def legacy_to_current(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE attention names (query/key/value/proj_attn, as in sd-vae-ft-mse) in today's names."""
    renamed = {}
    for key, tensor in state.items():
        match = _LEGACY_ATTENTION.match(key)
        renamed[f"{match[1]}{_NEW_ATTENTION[match[2]]}.{match[3]}" if match else key] = tensor
    return renamed


def encoder_state(state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """The Whisper encoder's tensors of a full Whisper checkpoint ("model.encoder.*" or "encoder.*"); the
    decoder and output projection are dropped (the avatar listens, it does not transcribe)."""
    out, other = {}, []
    for key, tensor in state.items():
        name = key.removeprefix("model.")
        if name.startswith("encoder."):
            out[name.removeprefix("encoder.")] = tensor
        elif not (name.startswith("decoder.") or name.startswith("proj_out.")):
            other.append(key)
    if other:
        raise WeightsError(f"{file}: tensors that belong to no Whisper encoder or decoder: {sorted(other)[:3]}")
    if not out:
        raise WeightsError(f"{file}: no Whisper encoder tensors (keys starting with 'model.encoder.' or 'encoder.')")
    return out


def unet_folder(root: Path) -> Path:
    for name in UNET_FOLDERS:
        if (root / name).is_dir():
            return root / name
    raise WeightsError(f"{root}: no U-Net folder ({' or '.join(f'{n}/' for n in UNET_FOLDERS)} with {UNET_CONFIG}); "
                       f"a MuseTalk folder holds {UNET_FOLDERS[0]}/, {VAE_FOLDER}/ and {WHISPER_FOLDER}/")


def safetensors_of(folder: Path) -> Path:
    """The component's safetensors file; authors' pickle files get the command that converts them."""
    if not folder.is_dir():
        raise WeightsError(f"{folder}: missing (a MuseTalk folder holds {UNET_FOLDERS[0]}/, {VAE_FOLDER}/ and "
                           f"{WHISPER_FOLDER}/)")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any(folder.glob("*.safetensors")):
        raise WeightsError(f"{folder}: holds {', '.join(pickles)} (pickle) and no .safetensors; pickle files are "
                           f"never loaded. Convert the folder first: {CONVERT} (SRC: the folder above "
                           f"{folder.name}/, DST: a new folder)")
    return weight_file(folder)


def unet_config(folder: Path) -> dict[str, Any]:
    config = read_json(folder / UNET_CONFIG, "the MuseTalk U-Net config")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def whisper_config(folder: Path):
    from transformers import WhisperConfig

    data = read_json(folder / "config.json", "the Whisper encoder config")
    try:
        return WhisperConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{folder / 'config.json'}: not a Whisper config ({err})") from None


def whisper_extractor(folder: Path):
    from transformers import WhisperFeatureExtractor

    data = read_json(folder / "preprocessor_config.json", "the Whisper feature extractor settings")
    known = {"feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value"}
    try:
        return WhisperFeatureExtractor(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{folder / 'preprocessor_config.json'}: not a Whisper feature extractor ({err})") from None


def sinusoid(length: int, dim: int) -> torch.Tensor:
    """MuseTalk's `PositionalEncoding` table [1, length, dim] (sin on even, cos on odd channels)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)[:, : dim // 2]
    return table[None]


@dataclass
class MuseTalkModel:
    """The loaded U-Net, VAE and Whisper encoder with MuseTalk's stages; stateless between calls."""

    spec: MuseTalkSpec
    unet: nn.Module
    vae: nn.Module
    encoder: nn.Module
    extractor: Any
    files: dict[str, Path] = field(default_factory=dict)  # which file each check refers to
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    silent_windows: int = 0  # windows served from the silence cache (digital silence: the same features)
    _silence: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        latent, unet, cfg = self.latent_channels, self.unet.config, self.encoder.config
        where = self.files.get("unet", "musetalk.json")
        if unet.in_channels != 2 * latent or unet.out_channels != latent:
            raise WeightsError(f"{where}: in_channels {unet.in_channels} / out_channels {unet.out_channels} must be "
                               f"{2 * latent} / {latent} (masked latent + reference latent of the "
                               f"{latent}-channel VAE in, one latent out)")
        if unet.cross_attention_dim != cfg.d_model:
            raise WeightsError(f"{where}: cross_attention_dim {unet.cross_attention_dim} must equal the Whisper "
                               f"d_model {cfg.d_model} ({self.files.get('whisper', 'whisper/config.json')})")
        ex = self.extractor
        if ex.feature_size != cfg.num_mel_bins or ex.nb_max_frames != 2 * cfg.max_source_positions:
            raise WeightsError(f"{self.files.get('extractor', 'preprocessor_config.json')}: {ex.feature_size} mel "
                               f"bins over {ex.nb_max_frames} frames do not fit the encoder ({cfg.num_mel_bins} "
                               f"bins, {2 * cfg.max_source_positions} frames)")
        if ex.sampling_rate != self.spec.sample_rate or self.spec.audio_context_s > ex.chunk_length:
            raise WeightsError(f"{self.files.get('extractor', 'preprocessor_config.json')}: sampling_rate "
                               f"{ex.sampling_rate} / chunk_length {ex.chunk_length} s must be "
                               f"{self.spec.sample_rate} / at least audio_context_s {self.spec.audio_context_s}")
        self._t0 = torch.zeros(1, dtype=torch.long)
        self._position = sinusoid(self.tokens, cfg.d_model)

    # -- shapes ----------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_size(self) -> int:
        return self.spec.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def tokens(self) -> int:
        """Audio tokens per frame: window frames x (embeddings + every encoder layer)."""
        return self.spec.window_frames * (self.encoder.config.encoder_layers + 1)

    # -- stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_reference(self, crops: torch.Tensor) -> torch.Tensor:
        """[masked latent, reference latent] [B, 2C, h, w] from RGB crops [B, 3, R, R] in 0..1: the lower half
        blacked out, as MuseTalk's `get_latents_for_unet` (the distribution's mean: no per-session noise)."""
        keep = torch.zeros(crops.shape[-2:], dtype=crops.dtype)
        keep[: crops.shape[-2] // 2] = 1.0
        both = torch.cat([crops * keep, crops]) * 2 - 1
        latents = self.vae.encode(both.to(self.device, self.dtype)).latent_dist.mode() * self.vae.config.scaling_factor
        masked, reference = latents.chunk(2)
        return torch.cat([masked, reference], dim=1)

    def whisper_input(self, windows: np.ndarray) -> np.ndarray:
        """The extractor's log-mel input [B, mels, nb_max_frames] for windows [B, T], computed on the window
        only: frames past it hold the normalised floor the padded 30 s input has there (the extractor clamps
        at max - 8 in log10, so silence reads max(-1.5, peak - 2) after its (x + 4) / 4), which
        `tests/test_musetalk.py` checks against the extractor run on the full padded input."""
        ex, count = self.extractor, windows.shape[1]
        tail = np.zeros((len(windows), ex.n_fft + ex.hop_length), np.float32)
        padded = np.concatenate([windows.astype(np.float32), tail], axis=1)
        mel = ex(list(padded), sampling_rate=ex.sampling_rate, padding="longest", return_tensors="np").input_features
        exact = -(-(count + ex.n_fft // 2) // ex.hop_length)  # frames whose FFT window reaches the audio
        floor = np.maximum(-1.5, mel.max(axis=(1, 2)) - 2.0)[:, None, None]
        out = np.broadcast_to(floor, (len(windows), mel.shape[1], ex.nb_max_frames)).copy()
        out[:, :, :exact] = mel[:, :, :exact]
        return out.astype(np.float32)

    @torch.no_grad()
    def audio_features(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, tokens, d_model], reuse signal [B, 8, mels]) for windows [B, T] that end at each frame.

        The tokens are the `window_frames` newest encoder frames (all hidden states stacked, time-major as
        MuseTalk's rearrange 'b c h w -> b (c h) w'); the reuse signal is the log-mel of the newest 80 ms,
        which the temporal cache compares between frames. Windows of digital silence share one result."""
        windows = np.asarray(windows, np.float32)
        silent = ~windows.any(axis=1)
        end = windows.shape[1] * WHISPER_RATE // self.spec.sample_rate
        mel_end = windows.shape[1] // self.extractor.hop_length
        tokens = torch.empty(len(windows), self.tokens, self.encoder.config.d_model)
        signal = torch.empty(len(windows), 8, self.extractor.feature_size)
        loud = np.flatnonzero(~silent)
        if len(loud):
            tokens[loud], signal[loud] = self._encode(windows[loud], end, mel_end)
        if silent.any():
            self.silent_windows += int(silent.sum())
            if windows.shape[1] not in self._silence:
                self._silence[windows.shape[1]] = self._encode(np.zeros((1, windows.shape[1]), np.float32), end,
                                                               mel_end)
            tokens[silent], signal[silent] = self._silence[windows.shape[1]]
        return tokens, signal

    def _encode(self, windows: np.ndarray, end: int, mel_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        mel = torch.from_numpy(self.whisper_input(windows))
        states = self.encoder(mel.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        stacked = torch.stack(states, dim=2)[:, end - self.spec.window_frames : end]  # [B, frames, layers, D]
        tokens = stacked.reshape(len(windows), self.tokens, -1).float().cpu()
        return tokens, mel[:, :, mel_end - 8 : mel_end].transpose(1, 2)

    @torch.no_grad()
    def predict(self, reference: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The speaking face's latents [B, C, h, w]: one U-Net call at timestep 0 (MuseTalk's inference)."""
        audio = (tokens + self._position).to(self.device, self.dtype)
        return self.unet(reference.to(self.device, self.dtype), self._t0.to(self.device),
                         encoder_hidden_states=audio).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """RGB crops [B, 3, R, R] in 0..1."""
        return vae_decode(self.vae, latents, self.dtype)

    def to(self, dtype: torch.dtype, device: str | torch.device | None = None) -> MuseTalkModel:
        """Cast every network (MuseTalk runs Whisper in the U-Net's dtype too)."""
        self.device = torch.device(device) if device is not None else self.device
        for module in (self.unet, self.vae, self.encoder):
            cast(module, self.device, dtype)
        self.dtype = dtype
        return self


def load_musetalk(root: str | Path, spec: MuseTalkSpec | None = None) -> MuseTalkModel:
    """Load a MuseTalk folder (layout in the module docstring) with safetensors weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"{root}: not a folder (a MuseTalk folder holds {UNET_FOLDERS[0]}/ or {UNET_FOLDERS[1]}/, "
                           f"{VAE_FOLDER}/ and {WHISPER_FOLDER}/)")
    unet_dir, vae_dir, whisper_dir = unet_folder(root), root / VAE_FOLDER, root / WHISPER_FOLDER
    version = "1.5" if unet_dir.name == UNET_FOLDERS[0] else "1.0"
    spec = spec or MuseTalkSpec(version=version)
    unet = build_from_config(UNet2DConditionModel, unet_config(unet_dir), unet_dir / UNET_CONFIG)
    vae = build_from_config(AutoencoderKL, read_json(vae_dir / "config.json", "the SD VAE config"),
                            vae_dir / "config.json")
    encoder = WhisperEncoder(whisper_config(whisper_dir))
    extractor = whisper_extractor(whisper_dir)
    files = {"unet": unet_dir / UNET_CONFIG, "whisper": whisper_dir / "config.json",
             "extractor": whisper_dir / "preprocessor_config.json"}
    model = MuseTalkModel(spec, unet.eval(), vae.eval(), encoder.eval(), extractor, files)  # configs fit first
    for module, folder, rename in ((unet, unet_dir, None), (vae, vae_dir, legacy_to_current),
                                   (encoder, whisper_dir, "whisper")):
        file = safetensors_of(folder)
        state = read_state(file)
        state = encoder_state(state, file) if rename == "whisper" else rename(state) if rename else state
        load_state_dict_into(module, state, file)
    return model
