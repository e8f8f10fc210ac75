"""MuseTalk folders on disk: converting the authors' pickle files to safetensors, and a tiny random folder.

`convert_musetalk(SRC, DST)` reads each component's `.bin`/`.pth` with `torch.load(weights_only=True)`
(tensors and plain containers only: a pickle carrying any other object is refused, never run), checks
every tensor name and shape against a skeleton built from the component's config on the meta device (no
memory for the weights themselves), and writes `<stem>.safetensors` plus the configs into the same layout
under DST — each file whole or not at all, never over an existing file; a failure removes what this run
wrote. `write_tiny_musetalk` writes the same layout with tiny random networks (safetensors, or the
authors' pickle files with the SD VAE's old attention names), which tests and `livecache bench avatar
--engine musetalk` use where no real weights are at hand.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..files import text_writer, write_new
from .loading import PICKLE_SUFFIXES, WeightsError, build_from_config, check_keys, read_json, read_state
from .musetalk import (
    UNET_CONFIG,
    UNET_FOLDERS,
    VAE_FOLDER,
    WHISPER_FOLDER,
    encoder_state,
    legacy_to_current,
    unet_config,
    unet_folder,
    whisper_config,
)

TINY_UNET: dict[str, Any] = {  # MuseTalk's block pattern (cross-attention down, plain last) at toy widths
    "sample_size": 8, "in_channels": 8, "out_channels": 4, "block_out_channels": [16, 32, 32], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {  # SD's 8x VAE shape (4 levels, 4 latent channels, SD's scaling factor)
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 16, 32, 32], "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 8, "sample_size": 256, "scaling_factor": 0.18215,
}
TINY_WHISPER: dict[str, Any] = {  # Whisper-tiny's shape (80 mels, stride-2 encoder) at toy widths, 2 s inputs
    "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_layers": 1,
    "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "num_mel_bins": 80, "max_source_positions": 100,
    "max_target_positions": 32, "vocab_size": 120, "pad_token_id": 100, "bos_token_id": 101, "eos_token_id": 102,
    "decoder_start_token_id": 103,
}
TINY_CHUNK_S = 2  # the tiny extractor's chunk_length: 200 mel frames = 2 * max_source_positions
# Default initialisation (std 0.02) leaves a random Whisper encoder's output to its position table: speech
# moves its tokens by ~4 % of their spread, and the U-Net's lower face by ~1 grey level, where a trained
# encoder's features follow the sound. These gains on the encoder's audio stem (conv1, conv2) and on the
# U-Net's cross-attention values (attn2.to_v) make the random lower face follow the audio by tens of grey
# levels, enough to see through a video codec; names and shapes stay MuseTalk's.
TINY_STEM_GAIN = 10.0
TINY_CROSS_ATTENTION_GAIN = 5.0


def _skeleton_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from an authors' file, loaded with weights_only=True (never a plain unpickle)."""
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{file}: refused: not a plain tensor checkpoint (weights_only load failed: "
                           f"{first})") from None
    flat = isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    if not flat:
        raise WeightsError(f"{file}: must hold a flat {{name: tensor}} state dict, got {type(data).__name__}")
    return data


def _source(folder: Path) -> Path:
    """The one weights file of an authors' component folder (pickle, or safetensors already)."""
    if not folder.is_dir():
        raise WeightsError(f"{folder}: missing")
    found = sorted(p for p in folder.iterdir() if p.suffix in (*PICKLE_SUFFIXES, ".safetensors"))
    if len(found) != 1:
        what = ", ".join(p.name for p in found) or "none"
        raise WeightsError(f"{folder}: needs exactly one weights file (.bin, .pth or .safetensors), found {what}")
    return found[0]


def _components(src: Path) -> list[tuple[str, list[str], Callable[[dict], dict], Callable[[], torch.nn.Module]]]:
    """(folder, config files, rename, skeleton) per component, read from SRC's configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    unet_dir, vae_dir, whisper_dir = unet_folder(src), src / VAE_FOLDER, src / WHISPER_FOLDER
    u_config = unet_config(unet_dir)
    v_config = read_json(vae_dir / "config.json", "the SD VAE config")
    w_config = whisper_config(whisper_dir)
    read_json(whisper_dir / "preprocessor_config.json", "the Whisper feature extractor settings")
    return [
        (unet_dir.name, [UNET_CONFIG], lambda s: s,
         lambda: build_from_config(UNet2DConditionModel, u_config, unet_dir / UNET_CONFIG)),
        (VAE_FOLDER, ["config.json"], legacy_to_current,
         lambda: build_from_config(AutoencoderKL, v_config, vae_dir / "config.json")),
        (WHISPER_FOLDER, ["config.json", "preprocessor_config.json"], None, lambda: WhisperEncoder(w_config)),
    ]


def convert_musetalk(src: str | Path, dst: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Convert an authors' MuseTalk folder (SRC) into a safetensors folder of the same layout (DST)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise WeightsError(f"{src}: not a folder (the authors' models/ folder with {UNET_FOLDERS[0]}/, "
                           f"{VAE_FOLDER}/ and {WHISPER_FOLDER}/)")
    plan = []
    for name, configs, rename, skeleton in _components(src):
        file = _source(src / name)
        plan.append((name, configs, rename, skeleton, file, dst / name / f"{file.stem}.safetensors"))
    targets = [dst / name / c for name, configs, *_ in plan for c in configs] + [p[-1] for p in plan]
    taken = [str(t) for t in targets if t.exists()]
    if taken:
        raise WeightsError(f"{dst}: refusing to overwrite existing files: {', '.join(taken)}")
    written: list[Path] = []
    try:
        for name, configs, rename, skeleton, file, target in plan:
            state = read_state(file) if file.suffix == ".safetensors" else _read_pickle(file)
            dropped = 0
            if rename is None:  # Whisper: keep the encoder, named as in transformers' WhisperModel
                encoder = encoder_state(state, file)
                dropped = len(state) - len(encoder)
                check_keys(_skeleton_shapes(skeleton), encoder, file)
                state = {f"model.encoder.{k}": v for k, v in encoder.items()}
            else:
                state = rename(state)
                check_keys(_skeleton_shapes(skeleton), state, file)
            data = save({k: v.contiguous() for k, v in state.items()})
            written.append(write_new(target, lambda stream, data=data: stream.write(data)))
            for config in configs:
                text = (src / name / config).read_text(encoding="utf-8")
                written.append(write_new(dst / name / config, text_writer(text)))
            note = f" ({dropped} decoder tensors dropped: only the encoder is used)" if dropped else ""
            log(f"{file} -> {target}: {len(state)} tensors{note}")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's VAE attention names back to the old ones sd-vae-ft-mse's .bin still uses."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, tensor in state.items():
        for new, legacy in old.items():
            if f"attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
        out[key] = tensor
    return out


def write_tiny_musetalk(folder: str | Path, seed: int = 0, authors_format: bool = False) -> Path:
    """A MuseTalk v1.5 folder with tiny random networks (audio gains as above): safetensors (loadable), or the
    authors' pickles."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
    whisper = WhisperModel(WhisperConfig(**TINY_WHISPER))
    with torch.no_grad():
        for conv in (whisper.encoder.conv1, whisper.encoder.conv2):
            conv.weight.mul_(TINY_STEM_GAIN)
        for name, module in unet.named_modules():
            if name.endswith(".attn2"):
                module.to_v.weight.mul_(TINY_CROSS_ATTENTION_GAIN)
    states = {UNET_FOLDERS[0]: ("unet", unet.state_dict()),
              VAE_FOLDER: ("diffusion_pytorch_model", vae.state_dict()),
              WHISPER_FOLDER: ("pytorch_model", {f"model.{k}": v for k, v in whisper.state_dict().items()})}
    configs = {UNET_FOLDERS[0]: {UNET_CONFIG: TINY_UNET},  # the authors' musetalk.json carries no _class_name
               VAE_FOLDER: {"config.json": dict(vae.config, _class_name="AutoencoderKL")},
               WHISPER_FOLDER: {"config.json": whisper.config.to_dict(), "preprocessor_config.json":
                                WhisperFeatureExtractor(feature_size=80, chunk_length=TINY_CHUNK_S).to_dict()}}
    for name, (stem, state) in states.items():
        for file, config in configs[name].items():
            write_new(folder / name / file, text_writer(json.dumps(config, indent=2, default=list) + "\n"))
        state = {k: v.detach().clone().contiguous() for k, v in state.items()}
        if authors_format:
            suffix = ".pth" if name == UNET_FOLDERS[0] else ".bin"
            state = _legacy_names(state) if name == VAE_FOLDER else state
            write_new(folder / name / f"{stem}{suffix}", lambda stream, state=state: torch.save(state, stream))
        else:
            data = save(state)
            write_new(folder / name / f"{stem}.safetensors", lambda stream, data=data: stream.write(data))
    return folder
