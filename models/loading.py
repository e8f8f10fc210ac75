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
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHT_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class WeightsError(ValueError):
    """A weights folder or file is missing, unsafe or does not match the model."""


def resolve_inside(path: str | Path, roots: list[Path]) -> Path:
    """`path` resolved (symlinks too) and checked to lie inside one of `roots`: no `..` escapes."""
    candidate = Path(path).expanduser()
    for root in roots:
        full = (root / candidate).resolve() if not candidate.is_absolute() else candidate.resolve()
        if full == root.resolve() or root.resolve() in full.parents:
            if full.exists():
                return full
    allowed = ", ".join(str(r) for r in roots)
    raise WeightsError(f"{path}: not found inside the model folders ({allowed})")


def read_json(file: Path, needed_for: str) -> dict[str, Any]:
    """A JSON object from `file`; missing or malformed files raise naming the file and why it is needed."""
    if not file.is_file():
        raise WeightsError(f"{file}: missing ({needed_for})")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise WeightsError(f"{file}: not valid JSON ({err})") from None


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
    """Load `file` into `module` strictly; a mismatch names the file and the first differing keys."""
    try:
        state = load_file(str(file))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise WeightsError(f"{file}: cannot read safetensors ({err})") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise WeightsError(f"{file}: does not match the model config ({'; '.join(parts)})")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return module


def save_weights(module: nn.Module, file: Path, half: bool = False) -> None:
    """Write a module's weights as safetensors via a temporary file: a crash never leaves half a file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
             for k, v in module.state_dict().items()}
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(state, str(tmp))
    tmp.replace(file)


def save_component(module: nn.Module, folder: Path, config: dict[str, Any], name: str, half: bool = False) -> None:
    """A component folder: `config.json` beside `<name>.safetensors`, each written atomically."""
    save_weights(module, folder / f"{name}{WEIGHT_SUFFIX}", half=half)
    tmp_config = folder / ".config.json.tmp"
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp_config.replace(folder / "config.json")


def load_unet(folder: Path, dtype: torch.dtype = torch.float32):
    """A diffusers `UNet2DConditionModel` from `folder/config.json` and its safetensors file."""
    from diffusers import UNet2DConditionModel

    config = read_config(folder)
    try:
        unet = UNet2DConditionModel.from_config(config)
    except Exception as err:
        raise WeightsError(f"{folder / 'config.json'}: not a UNet2DConditionModel config ({err})") from None
    return load_state_into(unet, weight_file(folder)).to(dtype).eval()


def load_scheduler_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / "scheduler_config.json", "the scheduler folder needs scheduler_config.json")
