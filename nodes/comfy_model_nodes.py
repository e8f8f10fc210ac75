"""Quantization, feature slicing and CacheQuant for ComfyUI's own `MODEL` (Load Checkpoint → MODEL → … → KSampler).

The same shape as `comfy_nodes`: each node returns a patched clone of its input, the technique runs
inside whatever sampler later samples the MODEL, and the run's stats go to this node in the frontend.
Quantization is built when ComfyUI loads the model for a run, from the weights it computes with, so
LoRAs chained before or after this node are quantized in (`adapters.comfy_quant`). CacheQuant and its
schedule calibrate when the node runs, through ComfyUI's own sampler with the inputs a KSampler takes
(`adapters.comfy_cachequant`); schedules are saved and loaded inside ComfyUI's output folder.
"""

from __future__ import annotations

from typing import Any

from ..accel.cache_schedule import CalibratedSchedule
from ..accel.cachequant import CacheQuantConfig
from ..accel.quant import QuantConfig
from ..accel.slicing import SlicingConfig
from ..adapters.comfy_cachequant import (
    SamplerRun,
    apply_cachequant,
    calibrate_cachequant,
    calibrate_schedule,
    fingerprint_of,
)
from ..adapters.comfy_quant import apply_quantization
from ..adapters.comfy_unet import apply_slicing
from .cachequant_nodes import (
    ACT_BITS,
    CACHE_BRANCH,
    SERVED_MODEL,
    WEIGHT_BITS,
    LoadSchedule,
    cachequant_inputs,
    check_steps,
    save_schedule,
    schedule_path,
)
from .comfy_nodes import MODEL_INPUT, stats_reporter
from .fields import declare, int_field
from .kinds import ModelTechnique, Node
from .validation import verdict


class QuantizeModel(ModelTechnique):
    """W8A8 (real int8 kernels on x86 CPUs) or DGQ (simulated) of a ComfyUI MODEL's Linear/Conv2d layers."""

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
            "weight_bits": WEIGHT_BITS,
            "act_bits": ACT_BITS,
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model: Any, method: str, weight_bits: int, act_bits: int,
              unique_id: str | None = None) -> tuple[Any]:
        # DGQ's channel outliers come from calibration runs; on a MODEL it keeps per-call pixel outliers only
        config = QuantConfig(method, int(weight_bits), int(act_bits),
                             outlier_channels=0.0 if method == "dgq" else QuantConfig.outlier_channels)
        return (apply_quantization(model, config, stats_reporter(unique_id)),)


class SlicingModel(ModelTechnique):
    """Feature slicing for a ComfyUI MODEL: each U-Net layer runs a slice of the batch at a time."""

    DESCRIPTION = ("Lower peak memory, same output: every layer of the U-Net runs on one slice of the batch (CFG "
                   "halves, images of a batch) at a time. Stacks with DeepCache, step rehash and quantization.")

    INPUT_TYPES = declare({"model": MODEL_INPUT, "slices": int_field(2, 1, 4096, (
        "Slices per layer call (at most one sample each); peak activation memory inside the U-Net's layers falls "
        "about this many times."))}, unique_id=True)

    def apply(self, model: Any, slices: int, unique_id: str | None = None) -> tuple[Any]:
        return (apply_slicing(model, SlicingConfig("batch", int(slices), vae=False), stats_reporter(unique_id)),)


def _sampler_choices() -> tuple[list[str], list[str]]:
    """ComfyUI's own sampler and scheduler names (these nodes take a MODEL, so they run where ComfyUI is;
    elsewhere the schema lists the KSampler defaults)."""
    try:
        import comfy.samplers
    except ImportError:
        return ["euler"], ["normal"]
    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


def sampler_inputs() -> dict[str, Any]:
    """What KSampler takes (the calibration generations run exactly that), plus how many seeds."""
    samplers, schedulers = _sampler_choices()
    return {
        "positive": ("CONDITIONING", {"tooltip": "The positive conditioning of the generations this will serve."}),
        "negative": ("CONDITIONING", {"tooltip": "The negative conditioning (as connected to KSampler)."}),
        "latent_image": ("LATENT", {"tooltip": "The latent the generations start from (e.g. Empty Latent Image)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "step": 1,
                         "tooltip": "First calibration seed; the others follow it (seed, seed + 1, ...)."}),
        "calibration_seeds": ("INT", {"default": 2, "min": 1, "max": 16, "step": 1,
                                      "tooltip": "How many seeds calibrate (one generation each, per pass)."}),
        "steps": ("INT", {"default": 20, "min": 2, "max": 200, "step": 1,
                          "tooltip": "KSampler's steps: the sampler that uses the result must run this count."}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                          "tooltip": "KSampler's classifier-free guidance."}),
        "sampler_name": (samplers, {"default": "euler", "tooltip": "KSampler's sampler."}),
        "scheduler": (schedulers, {"default": "normal", "tooltip": "KSampler's scheduler."}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "KSampler's denoise."}),
    }


def sampler_run(positive: Any, negative: Any, latent_image: dict[str, Any], seed: int, calibration_seeds: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float) -> SamplerRun:
    return SamplerRun(positive, negative, latent_image, tuple(range(int(seed), int(seed) + int(calibration_seeds))),
                      int(steps), float(cfg), sampler_name, scheduler, float(denoise))


_FULL_STEPS = ("INT", {"default": 7, "min": 1, "max": 200, "step": 1,
                       "tooltip": "K: how many steps run the whole U-Net; the rest reuse its deep features."})
_OBJECTIVE = (["output", "feature"], {
    "default": "output",
    "tooltip": "What the DP minimises: output = the measured change of the final latent when a run of steps reuses "
               "features (one extra generation per segment; best quality); feature = the deep features' reuse "
               "error (no extra generations; a rougher proxy)."})


class CalibrateScheduleModel(Node, category="calibrate", returns={"schedule": "LC_SCHEDULE"}, function="calibrate"):
    """CacheQuant's DP cache schedule calibrated on a ComfyUI MODEL through ComfyUI's sampler."""

    DESCRIPTION = ("Samples a few seeds with your MODEL, conditioning and latent as KSampler would, measures what "
                   "reusing each step's deep features later costs, and picks the K full steps that minimise it. "
                   "Connect it to CacheQuant for MODEL or DeepCache for MODEL; save it to reuse it. On a DiT MODEL the "
                   "feature is the residual of the family's default block span (cache_branch_id unused).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to calibrate for (the schedule only fits these weights)."}),
            **sampler_inputs(),
            "full_steps": _FULL_STEPS,
            "cache_branch_id": CACHE_BRANCH,
            "objective": _OBJECTIVE,
            "save_as": ("STRING", {"default": "", "tooltip": "Optional file name inside ComfyUI's output folder "
                                                             "(e.g. schedules/my_model.json); empty: not saved."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, full_steps: int | None = None, steps: int | None = None,
                        save_as: str | None = None) -> bool | str:
        return verdict(cls, {"full_steps": full_steps, "steps": steps, "save_as": save_as},
                       lambda: check_steps(full_steps, steps),
                       lambda: isinstance(save_as, str) and save_as.strip() and schedule_path(save_as))

    def calibrate(self, model: Any, positive: Any, negative: Any, latent_image: dict[str, Any], seed: int,
                  calibration_seeds: int, steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
                  full_steps: int, cache_branch_id: int, objective: str, save_as: str) -> tuple[CalibratedSchedule]:
        check_steps(full_steps, steps)
        if save_as.strip():
            schedule_path(save_as)  # a bad path fails before calibrating
        run = sampler_run(positive, negative, latent_image, seed, calibration_seeds, steps, cfg, sampler_name,
                          scheduler, denoise)
        schedule = calibrate_schedule(model, run, int(full_steps), int(cache_branch_id), objective)
        if save_as.strip():
            save_schedule(schedule, save_as)
        return (schedule,)


class LoadScheduleModel(LoadSchedule):
    """Load a saved cache schedule and check it against the weights of a ComfyUI MODEL."""

    DESCRIPTION = ("Loads a cache schedule JSON from ComfyUI's output folder; refuses one calibrated for other "
                   "weights (another checkpoint, or the same one with other LoRAs).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": SERVED_MODEL}),
            "path": ("STRING", {"default": "schedules/my_model.json",
                                "tooltip": "File inside ComfyUI's output folder, as Calibrate Cache Schedule for "
                                           "MODEL saved it."}),
        }}

    @staticmethod
    def fingerprint(model: Any) -> str:
        return fingerprint_of(model)


class CacheQuantModel(ModelTechnique):
    """CacheQuant on a ComfyUI MODEL: calibrated DP cache schedule + W8A8 + decoupled error corrections."""

    DESCRIPTION = ("Caching and quantization optimised together, calibrated on your MODEL through ComfyUI's sampler "
                   "with the inputs KSampler gets: a DP cache schedule (connected, or calibrated here), W8A8 layers "
                   "(real int8 on the CPU, simulated elsewhere) and least-squares corrections of the cache and the "
                   "quantization errors. Sample it with the same steps. On a DiT MODEL (Flux, SD3, Wan, Qwen-Image, "
                   "Lumina 2) the cached feature is the residual of the family's default block span (cache_branch_id "
                   "unused).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            **sampler_inputs(),
            **cachequant_inputs("w8a8: int8 weights and activations; none: calibrated caching only.",
                                "Correct each quantized layer's output per channel and step."),
            "full_steps": _FULL_STEPS,
            "cache_branch_id": CACHE_BRANCH,
            "objective": _OBJECTIVE,
        }, "optional": {
            "schedule": ("LC_SCHEDULE", {"tooltip": "A calibrated/loaded schedule; its step count wins over 'steps' "
                                                    "and no schedule is calibrated here."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, full_steps: int | None = None, steps: int | None = None) -> bool | str:
        return verdict(cls, {"full_steps": full_steps, "steps": steps}, lambda: check_steps(full_steps, steps))

    def apply(self, model: Any, positive: Any, negative: Any, latent_image: dict[str, Any], seed: int,
              calibration_seeds: int, steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
              quantization: str, correct_cache: bool, correct_quant: bool, full_steps: int, cache_branch_id: int,
              objective: str, schedule: CalibratedSchedule | None = None, unique_id: str | None = None) -> tuple[Any]:
        if schedule is not None:
            steps = schedule.steps
        else:
            check_steps(full_steps, steps)
        config = CacheQuantConfig(int(full_steps), int(cache_branch_id),
                                  QuantConfig() if quantization == "w8a8" else None, bool(correct_cache),
                                  bool(correct_quant))
        run = sampler_run(positive, negative, latent_image, seed, calibration_seeds, steps, cfg, sampler_name,
                          scheduler, denoise)
        plan = calibrate_cachequant(model, config, run, schedule, objective)
        return (apply_cachequant(model, plan, stats_reporter(unique_id)),)

