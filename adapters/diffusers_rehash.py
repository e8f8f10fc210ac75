"""Step rehash on a diffusers U-Net: the core answers `unet(sample, timestep, ...)` calls.

The whole adapter is one `forward` override on the U-Net: it hands the core "call the model" as a
closure, the sample as `x`, the timestep as the noise level and the other tensor inputs as context,
and wraps the tensor it gets back the way the caller asked (`return_dict`). Any model family plugs in
the same way, e.g. a ComfyUI model-function wrapper:

    def wrapper(apply_model, args):  # ComfyUI's `set_model_unet_function_wrapper` signature
        x, t, c = args["input"], args["timestep"], args["c"]
        return core.call(lambda: apply_model(x, t, **c), x, float(t.reshape(-1)[0]),
                         [v for v in c.values() if isinstance(v, torch.Tensor)])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..accel.forward_override import ForwardOverrides, has_approximate_override
from ..accel.rehash import StepRehash, StepRehashConfig
from .diffusers_unet import read_timestep


class StepRehashHandle:
    """Step rehash applied to a U-Net (and its scheduler, whose `set_timesteps` starts a generation)."""

    def __init__(self, core: StepRehash, unet: nn.Module, scheduler: Any | None) -> None:
        self.core = core
        self._overrides = ForwardOverrides()
        self._overrides.install(unet, self._forward)
        self._scheduler = scheduler
        self._previous_set_timesteps = None
        if scheduler is not None:
            self._previous_set_timesteps = scheduler.__dict__.get("set_timesteps")
            original = scheduler.set_timesteps

            def set_timesteps(*args: Any, **kwargs: Any) -> Any:
                result = original(*args, **kwargs)
                core.reset(len(scheduler.timesteps))
                return result

            scheduler.set_timesteps = set_timesteps

    @property
    def stats(self):
        return self.core.stats

    def _forward(self, original):
        def forward(*args: Any, **kwargs: Any) -> Any:
            return_dict = kwargs.pop("return_dict", True)
            sample = kwargs["sample"] if "sample" in kwargs else args[0]
            context = [a for a in args[2:] if isinstance(a, torch.Tensor)]
            context += [v for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor) and k != "sample"]
            out = self.core.call(lambda: original(*args, return_dict=False, **kwargs)[0], sample,
                                 read_timestep(args, kwargs), context)
            if not return_dict:
                return (out,)
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)

        return forward

    def remove(self) -> None:
        """Restore the U-Net's forward and the scheduler's `set_timesteps` exactly as they were."""
        self._overrides.restore()
        if self._scheduler is not None:
            if self._previous_set_timesteps is None:
                del self._scheduler.set_timesteps
            else:
                self._scheduler.set_timesteps = self._previous_set_timesteps
            self._scheduler = None
        self.core.forget()


def apply_rehash(target: Any, config: StepRehashConfig) -> StepRehashHandle:
    """Apply step rehash to a diffusers pipeline (`target.unet` + `target.scheduler`) or a bare U-Net."""
    unet = getattr(target, "unet", target)
    scheduler = getattr(target, "scheduler", None) if unet is not target else None
    if has_approximate_override(unet):
        raise ValueError(f"{type(unet).__name__} already has an override of its forward (another step rehash?): "
                         "remove it first")
    return StepRehashHandle(StepRehash(config), unet, scheduler)
