"""Step rehash on a diffusers U-Net: how a whole `unet(sample, timestep, ...)` call is handed to the core.

The adapter is one `forward` override on the U-Net: it hands the core "call the model" as a closure,
the sample as `x`, the timestep as the noise level and the other tensor inputs as context, and wraps
the tensor it gets back the way the caller asked (`return_dict`). The ComfyUI adapter does the same
around ComfyUI's `apply_model` (`comfy_unet.ComfyRunSite.around_call`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..accel.forward_override import Forward, ForwardOverrides, has_approximate_override
from ..accel.site import Around, Removal
from .diffusers_unet import read_timestep


def wrap_unet_calls(unet: nn.Module, around: Around) -> Removal:
    """Hand every call of `unet` to `around(compute, sample, timestep, context)`; removing restores `unet`."""
    if has_approximate_override(unet):
        raise ValueError(f"{type(unet).__name__} already has an override of its forward (another step rehash?): "
                         "remove it first")

    def make(original: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return_dict = kwargs.pop("return_dict", True)
            sample = kwargs["sample"] if "sample" in kwargs else args[0]
            context = [a for a in args[2:] if isinstance(a, torch.Tensor)]
            context += [v for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor) and k != "sample"]
            out = around(lambda: original(*args, return_dict=False, **kwargs)[0], sample,
                         read_timestep(args, kwargs), context)
            if not return_dict:
                return (out,)
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)

        return forward

    overrides = ForwardOverrides()
    overrides.install(unet, make)
    return Removal(overrides.restore)
