"""Step rehash on a diffusers U-Net or DiT: how a whole `model(sample, timestep, ...)` call is handed to the core.

The adapter is one `forward` override on the U-Net: it hands the core "call the model" as a closure,
the sample as `x`, the timestep as the noise level and the other tensor inputs as context, and wraps
the tensor it gets back the way the caller asked (`return_dict`). The ComfyUI adapter does the same
around ComfyUI's `apply_model` (`comfy_unet.ComfyRunSite.around_call`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..accel.forward_override import Forward, ForwardOverrides, has_approximate_override
from ..accel.site import Around, LevelReader, Removal
from .diffusers_unet import read_timestep


def wrap_unet_calls(unet: nn.Module, around: Around) -> Removal:
    """Hand every call of `unet` to `around(compute, sample, timestep, context)`; removing restores `unet`."""

    def output(sample: torch.Tensor) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample)

    return wrap_model_calls(unet, around, "sample", read_timestep, output)


def wrap_model_calls(model: nn.Module, around: Around, sample_argument: str, read_level: LevelReader,
                     output: Callable[[Any], Any]) -> Removal:
    """Hand every call of a diffusers `model` (a U-Net or a DiT: its noisy latent is `sample_argument`, first
    positional) to `around`; `output(sample)` is what the model returns when the caller asks for a dict.

    A latent given as a list of same-shaped per-sample tensors (Z-Image's `x`, answered as a list too) is seen
    by the core as one stacked tensor, and the answer is handed back as a list again.
    """
    if has_approximate_override(model):
        raise ValueError(f"{type(model).__name__} already has an override of its forward (another step rehash?): "
                         "remove it first")

    def make(original: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return_dict = kwargs.pop("return_dict", True)
            sample = kwargs[sample_argument] if sample_argument in kwargs else args[0]
            listed = isinstance(sample, list | tuple)
            x = _one_tensor(model, sample_argument, sample)
            context = [t for a in args[2:] for t in _tensors(a)]
            context += [t for k, v in sorted(kwargs.items()) if k != sample_argument for t in _tensors(v)]

            def compute() -> torch.Tensor:
                out = original(*args, return_dict=False, **kwargs)[0]
                return torch.stack(list(out)) if listed else out

            out = around(compute, x, read_level(args, kwargs), context)
            answer = list(out.unbind(0)) if listed else out
            return (answer,) if not return_dict else output(answer)

        return forward

    overrides = ForwardOverrides()
    overrides.install(model, make)
    return Removal(overrides.restore)


def _one_tensor(model: nn.Module, name: str, sample: Any) -> torch.Tensor:
    """The latent as the one tensor the core compares from step to step (a list of per-sample tensors stacked)."""
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(sample, list | tuple) and sample and all(isinstance(t, torch.Tensor) for t in sample) \
            and len({t.shape for t in sample}) == 1:
        return torch.stack(list(sample))
    raise TypeError(f"step rehash needs {type(model).__name__}'s latent `{name}` as one tensor or a list of "
                    f"same-shaped tensors, got {type(sample).__name__}")


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of one argument (itself, or those of a list: Z-Image passes its captions as a list)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []
