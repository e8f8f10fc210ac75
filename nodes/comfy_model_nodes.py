"""Quantization and feature slicing for ComfyUI's own `MODEL` (Load Checkpoint → MODEL → … → KSampler).

The same shape as `comfy_nodes`: each node returns a patched clone of its input, the technique runs
inside whatever sampler later samples the MODEL, and the run's stats go to this node in the frontend.
Quantization is built when ComfyUI loads the model for a run, from the weights it computes with, so
LoRAs chained before or after this node are quantized in (`adapters.comfy_quant`).
"""

from __future__ import annotations

from typing import Any

from ..accel.quant import QuantConfig
from ..accel.slicing import SlicingConfig
from ..adapters.comfy_quant import apply_quantization
from ..adapters.comfy_unet import apply_slicing
from .comfy_nodes import MODEL_INPUT, stats_reporter


class QuantizeModel:
    """W8A8 (real int8 kernels on x86 CPUs) or DGQ (simulated) of a ComfyUI MODEL's Linear/Conv2d layers."""

    CATEGORY = "LiveCache/accelerate"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Post-training quantization of a ComfyUI MODEL, rebuilt from the weights ComfyUI loads (LoRAs "
                   "included) whenever they change. W8A8 runs torch's int8 kernels on the CPU and is simulated "
                   "(fake-quant) elsewhere; DGQ is always simulated. The stats line names the backend that ran.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "method": (["w8a8", "dgq"], {"default": "w8a8",
                                         "tooltip": "w8a8: int8 weights, per-call int8 activations; dgq: 8/6/4-bit "
                                                    "weights, group-wise activations keeping outlier pixels in "
                                                    "float (simulated)."}),
            "weight_bits": ("INT", {"default": 8, "min": 4, "max": 8, "step": 2,
                                    "tooltip": "8, 6 or 4 (DGQ); W8A8 needs 8."}),
            "act_bits": ("INT", {"default": 8, "min": 4, "max": 8, "step": 1,
                                 "tooltip": "Activation bits (W8A8 needs 8)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model: Any, method: str, weight_bits: int, act_bits: int,
              unique_id: str | None = None) -> tuple[Any]:
        # DGQ's channel outliers come from calibration runs; on a MODEL it keeps per-call pixel outliers only
        config = QuantConfig(method, int(weight_bits), int(act_bits),
                             outlier_channels=0.0 if method == "dgq" else QuantConfig.outlier_channels)
        return (apply_quantization(model, config, stats_reporter(unique_id)),)


class SlicingModel:
    """Feature slicing for a ComfyUI MODEL: each U-Net layer runs a slice of the batch at a time."""

    CATEGORY = "LiveCache/accelerate"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Lower peak memory, same output: every layer of the U-Net runs on one slice of the batch (CFG "
                   "halves, images of a batch) at a time. Stacks with DeepCache, step rehash and quantization.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "slices": ("INT", {"default": 2, "min": 1, "max": 4096, "step": 1,
                               "tooltip": "Slices per layer call (at most one sample each); peak activation memory "
                                          "inside the U-Net's layers falls about this many times."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model: Any, slices: int, unique_id: str | None = None) -> tuple[Any]:
        return (apply_slicing(model, SlicingConfig("batch", int(slices), vae=False), stats_reporter(unique_id)),)
