"""CacheQuant and its DP cache schedule calibrated on ComfyUI's own MODEL through ComfyUI's sampler.

Real ComfyUI 0.3.75; the model is ComfyUI's SD1.5 class shrunk to 32 base channels with seeded random
weights (bench/comfy_workloads.py), calibrated and sampled by ComfyUI's KSampler path.
"""

from __future__ import annotations

import pytest
import torch

from livecache.accel.cache_schedule import CalibratedSchedule
from livecache.accel.cachequant import CacheQuantConfig
from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.quant import QuantConfig
from livecache.accel.rehash import StepRehashConfig
from livecache.adapters.comfy_cachequant import SamplerRun, apply_cachequant, calibrate_cachequant, calibrate_schedule
from livecache.adapters.comfy_quant import apply_quantization
from livecache.adapters.comfy_unet import apply_deepcache, apply_step_rehash, entries_of
from livecache.bench.comfy_workloads import DeepBlockCalls, sample
from livecache.nodes.comfy_model_nodes import CacheQuantModel, CalibrateScheduleModel, LoadScheduleModel

STEPS = 6
SIZE = 16



def latent() -> dict:
    return {"samples": torch.zeros(1, 4, SIZE, SIZE)}


def sampler_run(conds, seeds=(0, 1)) -> SamplerRun:
    return SamplerRun(*conds, latent(), tuple(seeds), STEPS, 5.0, "euler", "normal")


def run(model, conds, seed: int = 3) -> torch.Tensor:
    return sample(model, *conds, seed=seed, steps=STEPS, cfg=5.0, size=SIZE)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def untouched(model) -> bool:
    return all("forward" not in m.__dict__ for m in model.get_model_object("diffusion_model").modules()) and \
        not model.get_model_object("diffusion_model")._forward_hooks


def test_cachequant_on_a_model_caches_quantizes_and_corrects_through_comfyui_sampler(model, conds):
    before = run(model, conds)
    config = CacheQuantConfig(full_steps=3)
    plan = calibrate_cachequant(model, config, sampler_run(conds), objective="feature")
    assert plan.schedule.k == 3 and plan.schedule.steps == STEPS and plan.quant is not None
    assert plan.cache_correction is not None and plan.quant.correction_error is not None
    assert plan.schedule.scheduler == "euler/normal" and plan.schedule.model == "SD15"
    stats = []
    patched = apply_cachequant(model, plan, stats.append)
    deep = DeepBlockCalls(patched)
    try:
        latent_out = run(patched, conds)
    finally:
        deep.close()
    assert deep.count == 3 and deep.calls == STEPS  # the deep blocks ran on the 3 full steps only
    line, numbers = stats[0].report()
    assert line.startswith("CacheQuant (DP cache K=3/6 + W8A8") and "int8 (x86 kernels" in line, line
    assert numbers["full_calls"] == 3 and numbers["cached_calls"] == 3
    assert 0 < relative_error(latent_out, before) < 0.2, relative_error(latent_out, before)
    # the corrections were fitted on what ComfyUI's sampler computed (least squares on the calibration seeds)
    assert plan.cache_correction.error_after < plan.cache_correction.error_before
    assert plan.quant.correction_error[1] < plan.quant.correction_error[0]
    uncorrected = run(apply_cachequant(model, plan.variant(False, False)), conds)
    assert relative_error(uncorrected, latent_out) > 1e-3  # the corrections act on the run
    assert torch.equal(run(model, conds), before) and untouched(model)


def test_calibration_reports_every_generation_to_comfyui_progress_bar(model, conds):
    import comfy.utils

    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        calibrate_schedule(model, sampler_run(conds), 3, 0, "output")
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    # 2 seeds + the output objective's uncached generation and one per segment (T=6, K=3: segments of <= 4 steps)
    segments = sum(min(STEPS, i + 5) - (i + 1) for i in range(STEPS - 1))
    total = STEPS * (2 + 1 + segments)
    assert {t for _, t in seen} == {total}
    assert seen[-1][0] == total and [v for v, _ in seen] == sorted(v for v, _ in seen)


def test_schedule_is_saved_loaded_and_checked_against_the_model_weights(model, conds, sd15_factory, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("LIVECACHE_OUTPUT", str(tmp_path))
    (schedule,) = CalibrateScheduleModel().calibrate(model, *conds, latent(), 0, 1, STEPS, 5.0, "euler", "normal",
                                                     1.0, 3, 0, "feature", "schedules/tiny.json")
    assert (tmp_path / "schedules" / "tiny.json").is_file()
    (loaded,) = LoadScheduleModel().load(model, "schedules/tiny.json")
    assert loaded == CalibratedSchedule.load(tmp_path / "schedules" / "tiny.json")
    assert loaded.full_steps == schedule.full_steps and loaded.calibration["seeds"] == [0]

    other = sd15_factory(9)  # another checkpoint
    with pytest.raises(ValueError, match="calibrated for model SD15"):
        LoadScheduleModel().load(other, "schedules/tiny.json")

    # the explicit schedule is used as it is, and its step count wins over the node's steps
    (patched,) = CacheQuantModel().apply(model, *conds, latent(), 0, 1, 20, 5.0, "euler", "normal", 1.0, "w8a8",
                                         True, True, 5, 0, "output", schedule=loaded)
    plan = entries_of(patched)[0].config
    assert plan.schedule == loaded and plan.config.full_steps == 5
    assert relative_error(run(patched, conds), run(model, conds)) < 0.2
    with pytest.raises(ValueError, match="calibrated for model SD15"):  # its weights differ: refused at the run
        run(apply_cachequant(other, plan), conds)


def test_calibration_ignores_the_techniques_already_on_the_model(model, conds):
    plain = calibrate_schedule(model, sampler_run(conds, (0,)), 3, 0, "feature")
    accelerated = apply_step_rehash(apply_deepcache(model, DeepCacheConfig(cache_interval=2)), StepRehashConfig(0.5))
    assert calibrate_schedule(accelerated, sampler_run(conds, (0,)), 3, 0, "feature") == plain
    assert untouched(model)


def test_cachequant_stacks_by_the_registry_rules(model, conds):
    plan = calibrate_cachequant(model, CacheQuantConfig(full_steps=3, quant=None), sampler_run(conds, (0,)),
                                objective="feature")
    with pytest.raises(ValueError, match="feature cache"):
        apply_cachequant(apply_deepcache(model, DeepCacheConfig()), plan)
    quantizing = calibrate_cachequant(model, CacheQuantConfig(full_steps=3), sampler_run(conds, (0,)),
                                      objective="feature")
    with pytest.raises(ValueError, match="already quantizes"):
        apply_cachequant(apply_quantization(model, QuantConfig()), quantizing)
    cached = run(apply_cachequant(model, plan), conds)
    # step rehash in reuse mode stacks around it (chained either side)
    for patched in (apply_step_rehash(apply_cachequant(model, plan), StepRehashConfig(0.0)),
                    apply_cachequant(apply_step_rehash(model, StepRehashConfig(0.0)), plan)):
        torch.testing.assert_close(run(patched, conds), cached, rtol=1e-4, atol=1e-5 * float(cached.abs().max()))
