"""Quantizing ComfyUI's MODEL from the weights ComfyUI computes with: LoRA- and offload-safe.

ComfyUI applies LoRAs and other weight patches when it *loads* a model for sampling, not when the LoRA
node runs: a full load merges them into the module weights, a low-VRAM load leaves the weights
unpatched on the offload device and patches them on the fly (`weight_function`, e.g. `LowVramPatch`).
So a quantization built when our node runs would quantize the unpatched checkpoint and lose every LoRA.
Instead the node stores the config, and each sampling run asks `LiveQuantization` for the plan once
ComfyUI has loaded the model (its pre-run): the plan is built from the *live* weights — the module's
weight with its weight functions applied, which is what ComfyUI's own layers compute with — and kept
until the patches or the device layout change (`patches_uuid`, and per layer where its weight lives and
whether ComfyUI patches it on the fly). A LoRA chained before or after our node changes the sampled
patcher's `patches_uuid`, so it is quantized in; a second run with the same patches reuses the plan.

Where the weights live and where ComfyUI computes decide the kernels: with both on the CPU, W8A8 runs
torch's x86 int8 kernels; otherwise (a CUDA load device, or weights offloaded while computing on the
GPU) it runs the 8-bit GEMM backend (`accel.quant_gemm`: int8 `torch._int_mm`, or fp8 `torch._scaled_mm`
for backend 'fp8' on capability 8.9+), whose quantized weights stay where ComfyUI keeps the weights and
travel to the input's device per call exactly as ComfyUI's own offloaded weights do, the kernel chosen
per call from that device. DGQ is simulated everywhere. The plan's backend label and the stats' kernels
say which ran. The float weights stay untouched (other clones of the MODEL share them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..accel.quant import LayerRanges, QuantConfig, QuantPlan, plan_from
from .comfy_layers import quant_layers


def pending_plan(config: QuantConfig) -> QuantPlan:
    """The plan a MODEL node stands for before any weights are loaded (what the stacking rules check)."""
    return QuantPlan(config, "", {}, 0)


def live_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias `module` computes with in ComfyUI: its own, with ComfyUI's on-the-fly patches applied.

    After a full load the patches are merged into `module.weight` and the functions lists are empty; after a
    low-VRAM load the functions apply them (as `comfy.ops.cast_bias_weight` does before each call).
    """
    tensors = []
    for name in ("weight", "bias"):
        tensor = getattr(module, name)
        functions = getattr(module, f"{name}_function", None) or []
        if tensor is not None and functions:
            tensor = tensor.detach().to(torch.float32, copy=True)
            for function in functions:
                tensor = function(tensor)
        tensors.append(None if tensor is None else tensor.detach())
    return tensors[0], tensors[1]


@dataclass
class LiveQuantization:
    """Resolves a MODEL node's quantization config into the plan for the model as ComfyUI loaded it."""

    config: QuantConfig
    builds: int = 0  # how many plans were built (one per patch state and device layout)
    _key: Any = field(default=None, repr=False)
    _plan: QuantPlan | None = field(default=None, repr=False)

    def __call__(self, patcher: Any) -> QuantPlan:
        unet = patcher.model.diffusion_model
        layers = quant_layers(unet)
        if not layers:
            raise TypeError(f"{type(unet).__name__} has no Linear/Conv2d layers to quantize")
        key = (patcher.patches_uuid, id(unet), str(patcher.load_device),
               tuple((str(m.weight.device), bool(getattr(m, "weight_function", None)),
                      bool(getattr(m, "bias_function", None))) for m in layers.values()))
        if key != self._key:
            self._plan = None  # drop the old plan before building the new one: never two in memory
            self._plan = self._build(unet, layers, torch.device(patcher.load_device))
            self._key = key
            self.builds += 1
        return self._plan

    def _build(self, unet: nn.Module, layers: dict[str, nn.Module], compute: torch.device) -> QuantPlan:
        with torch.no_grad():
            weights = {name: live_tensors(module) for name, module in layers.items()}
        # W8A8 takes each call's own activation range and DGQ on a MODEL keeps pixel outliers per call,
        # so no calibration run is needed: the ranges stay empty
        return plan_from(self.config, unet, layers, {name: LayerRanges() for name in layers}, "", weights, compute)


def apply_quantization(model: Any, config: QuantConfig, on_finish: Any = None) -> Any:
    """A clone of ComfyUI `model` quantized on every sampling run from its live (patched) weights."""
    from .comfy_unet import apply_technique

    if config.attention_bits:
        raise ValueError("attention score quantization (attention_bits) is not available on a ComfyUI MODEL: "
                         "ComfyUI computes attention in its own fused kernels; set attention_bits to 0")
    if config.correct:
        raise ValueError("quantization-error correction needs calibration generations, which a ComfyUI MODEL "
                         "quantization does not run; use CacheQuant on MODEL for corrected W8A8")
    return apply_technique(model, pending_plan(config), on_finish, LiveQuantization(config))
