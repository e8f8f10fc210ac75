"""Nodes for CacheQuant and quantization: calibrate/load a DP cache schedule, CacheQuant, W8A8/DGQ.

Each node validates its inputs, runs one calibration through the adapter, and returns a new
value: an `LC_SCHEDULE` (a `CalibratedSchedule`) or an `LC_PIPE` carrying one more acceleration
(a `CacheQuantPlan` or `QuantPlan`). Calibration runs the model as loaded (no acceleration), so
the input model is never changed; schedules are saved and loaded inside the output folder only.
Stacking rules (the technique registry's `check_stack`, through `PipeTechnique.stacked`) refuse combinations
that cannot work, e.g. CacheQuant on a model that already has DeepCache (two feature caches on one U-Net).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..accel.cache_schedule import CalibratedSchedule, model_fingerprint
from ..accel.cachequant import CacheQuantConfig, Calibration
from ..accel.progress import Progress
from ..accel.quant import QuantConfig
from ..adapters.diffusers_quant import calibrate_cachequant_unet, calibrate_quantization, calibrate_schedule
from ..adapters.diffusers_unet import deep_modules
from ..models.calibration import calibration_runs
from ..models.pipeline import DiffusionModel
from ..models.sampling import SCHEDULERS
from .context import host_progress, output_dir
from .fields import PIPE_MODEL, bool_field, choice_field, declare, float_field, int_field, link, text_field
from .kinds import Node, PipeTechnique
from .validation import verdict

LOG = logging.getLogger("livecache")
CALIBRATION_INPUTS = {
    "calibration_prompts": text_field("0, 3, 7", "Comma-separated prompts the calibration generations draw "
                                                 "(a few that resemble your real prompts).", multiline=False),
    "calibration_seeds": int_field(2, 1, 16, "Seeds per prompt (seeds 0..N-1); more runs, steadier statistics."),
    "steps": int_field(20, 2, 200, "Steps of the generations this serves: the sampler must use the same count."),
    "scheduler": choice_field(SCHEDULERS, "ddim", "Sampler family the calibration runs with."),
    "guidance": float_field(2.0, 0.0, 30.0, "Classifier-free guidance of the calibration generations.", step=0.1),
}
# inputs that the LC_PIPE nodes here and the MODEL nodes (`comfy_model_nodes`) declare alike
CACHE_BRANCH = int_field(0, 0, 15, "The DeepCache skip branch whose deep features are reused.")
SERVED_MODEL = "The model the schedule will serve (checked by fingerprint)."
WEIGHT_BITS = int_field(8, 4, 8, "8, 6 or 4 (DGQ); W8A8 needs 8.", step=2)
ACT_BITS = int_field(8, 4, 8, "Activation bits (W8A8 needs 8).")


def _runs(model: DiffusionModel, calibration_prompts: str, calibration_seeds: int, steps: int, scheduler: str,
          guidance: float, progress: Progress):
    return calibration_runs(model, calibration_prompts.split(","), list(range(calibration_seeds)), steps, scheduler,
                            guidance, progress=progress)


def _calibration(model: DiffusionModel, calibration_prompts: str, calibration_seeds: int, steps: int,
                 scheduler: str, guidance: float) -> Calibration:
    """The calibration generations, with what the schedule file records about them."""
    info = {"prompts": [p.strip() for p in calibration_prompts.split(",") if p.strip()],
            "seeds": calibration_seeds, "guidance": guidance}
    progress = host_progress()
    runs = _runs(model, calibration_prompts, calibration_seeds, steps, scheduler, guidance, progress)
    return Calibration(runs, steps, model.name, scheduler, info, progress)


def _check_prompts(model: DiffusionModel | None, calibration_prompts: str | None) -> None:
    """Calibration prompts the model cannot read fail before the calibration starts."""
    if model is not None and isinstance(calibration_prompts, str):
        for prompt in calibration_prompts.split(","):
            model.encode_prompt(prompt.strip())


def check_steps(full_steps: int | None, steps: int | None) -> None:
    if isinstance(full_steps, int) and isinstance(steps, int) and full_steps > steps:
        raise ValueError(f"full_steps ({full_steps}) cannot exceed steps ({steps})")


def schedule_path(path: str) -> Path:
    """`path` inside the output folder (no absolute paths, no `..`), with a .json suffix."""
    relative = Path(path.strip())
    if not path.strip() or relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"schedule path {path!r} must be a relative path inside the output folder")
    return output_dir() / relative.with_suffix(".json")


def cachequant_inputs(quantization: str, correct_quant: str) -> dict[str, tuple]:
    """CacheQuant's own inputs, the same on both lanes but for two tooltips (the int8 kernels and the
    corrections run per lane)."""
    return {
        "quantization": choice_field(["w8a8", "none"], "w8a8", quantization),
        "correct_cache": bool_field(True, "Correct the reused deep features per channel (calibrated)."),
        "correct_quant": bool_field(True, correct_quant),
    }


def save_schedule(schedule: CalibratedSchedule, save_as: str) -> None:
    """Save under `save_as` (see `schedule_path`); a file there holding another schedule is kept, and this one
    goes to a numbered name beside it."""
    wanted = schedule_path(save_as)
    saved = schedule.save(wanted)
    if saved != wanted:
        LOG.warning("%s holds another schedule and was kept; this one is saved as %s", wanted, saved)


class CalibrateSchedule(Node, category="calibrate", returns={"schedule": "LC_SCHEDULE"}, function="calibrate"):
    """Choose the K full-compute steps of a cache schedule by dynamic programming on calibration runs."""

    DESCRIPTION = ("Runs a few calibration generations, measures what reusing each step's deep features at later "
                   "steps costs, and picks the full steps that minimise it (CacheQuant's DP).")
    INPUT_TYPES = declare({
        "model": link("LC_PIPE", "The model to calibrate for (the schedule only fits this model)."),
        "full_steps": int_field(7, 1, 200, "K: how many steps run the whole U-Net; the rest reuse deep features."),
        "cache_branch_id": CACHE_BRANCH,
        **CALIBRATION_INPUTS,
        "objective": choice_field(["output", "feature"], "output",
                                  "What the DP minimises: output = the measured change of the final latent when a "
                                  "run of steps reuses features (one extra generation per segment; best quality); "
                                  "feature = the deep features' reuse error (one uncached pass; faster, a rougher "
                                  "proxy)."),
        "save_as": text_field("", "Optional file name inside the output folder (e.g. schedules/my_model.json); "
                                  "empty: not saved."),
    })

    @classmethod
    def VALIDATE_INPUTS(cls, full_steps: int | None = None, steps: int | None = None,
                        calibration_prompts: str | None = None, save_as: str | None = None,
                        model: DiffusionModel | None = None) -> bool | str:
        return verdict(cls, {"full_steps": full_steps, "steps": steps, "calibration_prompts": calibration_prompts,
                             "save_as": save_as},
                       lambda: check_steps(full_steps, steps),
                       lambda: isinstance(save_as, str) and save_as.strip() and schedule_path(save_as),
                       lambda: _check_prompts(model, calibration_prompts))

    def calibrate(self, model: DiffusionModel, full_steps: int, cache_branch_id: int, calibration_prompts: str,
                  calibration_seeds: int, steps: int, scheduler: str, guidance: float, objective: str,
                  save_as: str) -> tuple[CalibratedSchedule]:
        check_steps(full_steps, steps)
        deep_modules(model.unet, cache_branch_id)  # a branch this U-Net lacks fails here, naming the range
        calibration = _calibration(model, calibration_prompts, calibration_seeds, steps, scheduler, guidance)
        schedule = calibrate_schedule(model.unet, calibration, full_steps, cache_branch_id, objective)
        if save_as.strip():
            save_schedule(schedule, save_as)
        return (schedule,)


class LoadSchedule(Node, category="calibrate", returns={"schedule": "LC_SCHEDULE"}, function="load"):
    """Load a saved cache schedule and check that it was calibrated for this model.

    `comfy_model_nodes.LoadScheduleModel` is this node for a ComfyUI MODEL: other inputs, another fingerprint.
    """

    DESCRIPTION = "Loads a cache schedule JSON from the output folder; refuses one calibrated for another model."
    INPUT_TYPES = declare({
        "model": link("LC_PIPE", SERVED_MODEL),
        "path": text_field("schedules/digits.json",
                           "File inside the output folder, as written by Calibrate Cache Schedule."),
    })

    @classmethod
    def VALIDATE_INPUTS(cls, path: str | None = None) -> bool | str:
        """The file is read and checked now: a missing or broken schedule fails before anything runs."""
        return verdict(cls, {"path": path}, lambda: isinstance(path, str) and CalibratedSchedule.load(
            schedule_path(path)))

    def load(self, model: Any, path: str) -> tuple[CalibratedSchedule]:
        schedule = CalibratedSchedule.load(schedule_path(path))
        schedule.check(self.fingerprint(model))
        return (schedule,)

    @staticmethod
    def fingerprint(model: DiffusionModel) -> str:
        """What the schedule records about the weights it was calibrated on."""
        return model_fingerprint(model.unet)


class ApplyCacheQuant(PipeTechnique):
    """CacheQuant: calibrated DP cache schedule + W8A8 + decoupled per-channel error correction."""

    DESCRIPTION = ("Caching and quantization optimised together: a DP cache schedule (given, or calibrated here), "
                   "W8A8 layers, and least-squares corrections of the cache and quantization errors.")
    INPUT_TYPES = declare({
        "model": PIPE_MODEL,
        **cachequant_inputs("w8a8: int8 weights and activations (real int8 kernels on x86 CPUs); none: "
                            "calibrated caching only.", "Correct each quantized layer's output per channel."),
        "full_steps": int_field(7, 1, 200, "K full-compute steps, when no schedule is connected."),
        "cache_branch_id": CACHE_BRANCH,
        **CALIBRATION_INPUTS,
    }, {"schedule": link("LC_SCHEDULE", "A calibrated/loaded schedule; its step count wins over 'steps'.")},
        unique_id=True)

    @classmethod
    def VALIDATE_INPUTS(cls, calibration_prompts: str | None = None,
                        model: DiffusionModel | None = None) -> bool | str:
        return verdict(cls, {"calibration_prompts": calibration_prompts},
                       lambda: _check_prompts(model, calibration_prompts))

    def apply(self, model: DiffusionModel, quantization: str, correct_cache: bool, correct_quant: bool,
              full_steps: int, cache_branch_id: int, calibration_prompts: str, calibration_seeds: int, steps: int,
              scheduler: str, guidance: float, schedule: CalibratedSchedule | None = None,
              unique_id: str | None = None) -> tuple[DiffusionModel]:
        if schedule is not None:
            schedule.check(model_fingerprint(model.unet))
            steps, scheduler = schedule.steps, schedule.scheduler
        elif full_steps > steps:
            raise ValueError(f"full_steps ({full_steps}) cannot exceed steps ({steps})")
        deep_modules(model.unet, cache_branch_id)
        config = CacheQuantConfig(full_steps, cache_branch_id, QuantConfig() if quantization == "w8a8" else None,
                                  correct_cache, correct_quant)
        calibration = _calibration(model, calibration_prompts, calibration_seeds, steps, scheduler, guidance)
        return self.stacked(model, calibrate_cachequant_unet(model.unet, config, calibration, schedule), unique_id)


class Quantize(PipeTechnique):
    """W8A8 or DGQ (distribution-aware group quantization) of the U-Net's Linear/Conv2d layers."""

    DESCRIPTION = ("Post-training quantization calibrated on a few generations: W8A8 (real int8 on x86 CPUs) or DGQ "
                   "(8/6/4-bit weights, group-wise activations with float outliers, log2 cross-attention scores).")
    INPUT_TYPES = declare({
        "model": link("LC_PIPE", "The model to quantize; it is not modified, a copy is returned."),
        "method": choice_field(["w8a8", "dgq"], "w8a8", "w8a8: per-tensor int8 activations, int8 weights; dgq: "
                                                        "group-wise activations keeping outliers in float "
                                                        "(simulated)."),
        "weight_bits": WEIGHT_BITS,
        "act_bits": ACT_BITS,
        "attention_bits": int_field(0, 0, 8, "DGQ: log2-quantize cross-attention scores to this many bits (0 = off)."),
        "correct": bool_field(False, "Calibrate per-channel corrections of each layer's quant error."),
        **CALIBRATION_INPUTS,
    }, unique_id=True)

    @classmethod
    def VALIDATE_INPUTS(cls, method: str | None = None, weight_bits: int | None = None, act_bits: int | None = None,
                        attention_bits: int | None = None, calibration_prompts: str | None = None,
                        model: DiffusionModel | None = None) -> bool | str:
        bits = (method, weight_bits, act_bits, attention_bits)
        return verdict(cls, {"method": method, "weight_bits": weight_bits, "act_bits": act_bits,
                             "attention_bits": attention_bits, "calibration_prompts": calibration_prompts},
                       lambda: None in bits or QuantConfig(method, weight_bits, act_bits,
                                                           attention_bits=attention_bits),
                       lambda: _check_prompts(model, calibration_prompts))

    def apply(self, model: DiffusionModel, method: str, weight_bits: int, act_bits: int, attention_bits: int,
              correct: bool, calibration_prompts: str, calibration_seeds: int, steps: int, scheduler: str,
              guidance: float, unique_id: str | None = None) -> tuple[DiffusionModel]:
        config = QuantConfig(method, weight_bits, act_bits, attention_bits=attention_bits, correct=correct)
        progress = host_progress()
        runs = _runs(model, calibration_prompts, calibration_seeds, steps, scheduler, guidance, progress)
        return self.stacked(model, calibrate_quantization(model.unet, config, runs, progress), unique_id)
