"""Loading weights: local folders only, safetensors only, nothing outside the allowed roots.

Why not `from_pretrained`: it may reach for a hub, falls back to pickle files, and its errors do
not name the file that is wrong. Here every component is read from `<folder>/<component>/` with
its `config.json` and one `*.safetensors` file, and every failure names the file and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..files import text_writer, write_replacing

WEIGHT_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_CONFIG_BYTES = 1 << 20  # configs are a few kB; a bigger file is not a config

# Upper bounds of the sizes a config may set, by key, wherever it appears in any config file we read
# (component configs, model_index.json, scheduler configs). Sizes decide allocations (a U-Net's
# `sample_size` the noise tensor, an avatar's `resolution` every crop), so a hostile or mistyped value
# must fail here, naming the file, not in the allocator. Each bound sits far above every released
# model of the family (SDXL: sample_size 128, block_out_channels up to 1280, cross_attention_dim 2048).
SIZE_LIMITS: dict[str, int] = {
    "sample_size": 4096, "resolution": 4096, "in_channels": 1024, "out_channels": 1024, "latent_channels": 256,
    "block_out_channels": 16384, "layers_per_block": 64, "cross_attention_dim": 16384, "attention_head_dim": 4096,
    "num_attention_heads": 1024, "norm_num_groups": 4096,
    "num_class_embeds": 1_000_000, "projection_class_embeddings_input_dim": 65536,
    "vocab_size": 1_000_000, "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 1024,
    "max_position_embeddings": 65536, "num_train_timesteps": 100_000, "original_inference_steps": 10_000,
    "dim": 65536, "depth": 1024, "heads": 1024, "patch": 1024, "channels": 1024, "num_classes": 1_000_000,
    "chunk": 4096, "context": 4096, "n_mels": 1024, "n_fft": 65536, "hop": 65536, "frames": 65536,
    "sample_rate": 384_000,
}


class WeightsError(ValueError):
    """A weights folder or file is missing, unsafe or does not match the model."""


def resolve_inside(path: str | Path, roots: list[Path], what: str = "the model folders") -> Path:
    """`path` resolved (symlinks too) and checked to lie inside one of `roots` (`what` names them in the
    error): no `..` escapes."""
    candidate = Path(path).expanduser()
    for root in roots:
        full = (root / candidate).resolve() if not candidate.is_absolute() else candidate.resolve()
        if full == root.resolve() or root.resolve() in full.parents:
            if full.exists():
                return full
    allowed = ", ".join(str(r) for r in roots)
    raise WeightsError(f"{path}: not found inside {what} ({allowed})")


def read_json(file: Path, needed_for: str) -> dict[str, Any]:
    """A JSON object from `file`, its sizes checked (`check_sizes`); anything else raises naming the file."""
    if not file.is_file():
        raise WeightsError(f"{file}: missing ({needed_for})")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise WeightsError(f"{file}: {file.stat().st_size} bytes is too large for a config file "
                           f"(at most {MAX_CONFIG_BYTES})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except RecursionError:
        raise WeightsError(f"{file}: not a config (JSON nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, integers too long to convert
        raise WeightsError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{file}: must hold a JSON object ({{\"key\": value, ...}}), not a {type(data).__name__}")
    check_sizes(data, file)
    return data


def check_sizes(config: dict[str, Any], file: Path) -> None:
    """Refuse a size in `SIZE_LIMITS` that is not a positive integer (or a list of them) within its bound."""
    for key, limit in SIZE_LIMITS.items():
        if key not in config or config[key] is None:
            continue
        value = config[key]
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= limit:
                shown = str(value) if len(str(value)) <= 60 else f"{str(value)[:60]}…"
                raise WeightsError(f"{file}: {key} = {shown} must be a positive integer of at most {limit}"
                                   f"{' (or a list of them)' if isinstance(value, list) else ''}")


def read_config(folder: Path) -> dict[str, Any]:
    """A component's `config.json` without diffusers' metadata keys (`_class_name`, `_diffusers_version`…)."""
    config = read_json(folder / "config.json", "every component folder needs its config.json")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def weight_file(folder: Path) -> Path:
    """The one safetensors file of a component folder; pickle files are refused, never loaded."""
    files = sorted(p for p in folder.glob(f"*{WEIGHT_SUFFIX}") if p.is_file())
    if len(files) == 1:
        return files[0]
    if files:
        names = ", ".join(p.name for p in files)
        raise WeightsError(f"{folder}: several weight files ({names}); keep exactly one .safetensors")
    unsafe = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
    hint = f" (found {', '.join(unsafe)}: pickle files are never loaded; convert to safetensors)" if unsafe else ""
    raise WeightsError(f"{folder}: no .safetensors weight file{hint}")


def load_state_into(module: nn.Module, file: Path) -> nn.Module:
    """Load `file` into `module` strictly; a mismatch names the file and the first differing keys.

    Tensors must also fit in kind (floating point where the model has floating point: int8 weights
    are a quantized checkpoint this loader cannot read) and be finite (a NaN weight makes every output
    NaN)."""
    return load_state_dict_into(module, read_state(file), file)


def read_state(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a corrupt file raises naming it."""
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise WeightsError(f"{file}: cannot read safetensors ({err})") from None


def check_keys(shapes: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse tensors whose names or shapes differ from the model's (`shapes`), naming the first of each."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(state) if shapes[k] != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k}: file {tuple(state[k].shape)} vs model {shapes[k]}")
        raise WeightsError(f"{file}: does not match the model config ({'; '.join(parts)})")


def load_state_dict_into(module: nn.Module, state: dict[str, torch.Tensor], file: Path) -> nn.Module:
    """`load_state_into` for tensors already read (and renamed) from `file`, which errors name."""
    own = module.state_dict()
    check_keys({k: tuple(v.shape) for k, v in own.items()}, state, file)
    for key in sorted(state):
        tensor, expected = state[key], own[key]
        if tensor.is_floating_point() != expected.is_floating_point() or (tensor.dtype == torch.bool) != (
                expected.dtype == torch.bool):
            raise WeightsError(f"{file}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}, the model "
                               f"needs {'floating point' if expected.is_floating_point() else expected.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{file}: tensor {key} holds NaN or infinite values")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return module


def save_weights(module: nn.Module, file: Path, half: bool = False) -> None:
    """Write a module's weights as safetensors, whole or not at all (`files.write_replacing`)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
             for k, v in module.state_dict().items()}
    data = save(state)
    write_replacing(file, lambda stream: stream.write(data))


def save_component(module: nn.Module, folder: Path, config: dict[str, Any], name: str, half: bool = False) -> None:
    """A component folder: `config.json` beside `<name>.safetensors`, each written whole or not at all."""
    save_weights(module, folder / f"{name}{WEIGHT_SUFFIX}", half=half)
    save_json(folder / "config.json", config, sort_keys=True)


def save_json(file: Path, data: Any, sort_keys: bool = False) -> None:
    """A config file the pack writes (and rewrites when retrained), whole or not at all."""
    write_replacing(file, text_writer(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"))


def cast(module: nn.Module, *args: object) -> nn.Module:
    """`module.to(*args)` (a dtype, a device) through torch's own `to`: diffusers' `ModelMixin.to` warns "There are
    modules ... that should be kept in float32: []" on every dtype cast, even when no module needs float32
    (diffusers 0.42 tests the list against None), and the warning then reads like a real problem in every job."""
    return nn.Module.to(module, *args)


def build_from_config(cls: Any, config: dict[str, Any], file: Path) -> nn.Module:
    """A diffusers model class built from a config dict read from `file` (metadata keys dropped); a config
    the class refuses raises naming the file."""
    try:
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as err:
        raise WeightsError(f"{file}: not a {cls.__name__} config ({err})") from None


def load_unet(folder: Path, dtype: torch.dtype = torch.float32):
    """A diffusers `UNet2DConditionModel` from `folder/config.json` and its safetensors file."""
    from diffusers import UNet2DConditionModel

    unet = build_from_config(UNet2DConditionModel, read_config(folder), folder / "config.json")
    return cast(load_state_into(unet, weight_file(folder)), dtype).eval()


def load_scheduler_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / "scheduler_config.json", "the scheduler folder needs scheduler_config.json")
