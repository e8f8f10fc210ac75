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
                     output: Callable[[torch.Tensor], Any]) -> Removal:
    """Hand every call of a diffusers `model` (a U-Net or a DiT: its noisy latent is `sample_argument`, first
    positional) to `around`; `output(tensor)` is what the model returns when the caller asks for a dict."""
    if has_approximate_override(model):
        raise ValueError(f"{type(model).__name__} already has an override of its forward (another step rehash?): "
                         "remove it first")

    def make(original: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return_dict = kwargs.pop("return_dict", True)
            sample = kwargs[sample_argument] if sample_argument in kwargs else args[0]
            if not isinstance(sample, torch.Tensor):
                raise TypeError(f"step rehash needs {type(model).__name__}'s latent `{sample_argument}` as one "
                                f"tensor, got a {type(sample).__name__}")
            context = [a for a in args[2:] if isinstance(a, torch.Tensor)]
            context += [v for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor) and k != sample_argument]
            out = around(lambda: original(*args, return_dict=False, **kwargs)[0], sample,
                         read_level(args, kwargs), context)
            return (out,) if not return_dict else output(out)

        return forward

    overrides = ForwardOverrides()
    overrides.install(model, make)
    return Removal(overrides.restore)
