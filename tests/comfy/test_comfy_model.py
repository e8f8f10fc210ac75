"""DeepCache, step rehash and a CacheQuant schedule on ComfyUI's own MODEL, sampled by ComfyUI's KSampler path.

Real ComfyUI 0.3.75.

The model is ComfyUI's SD1.5 class (openaimodel.UNetModel in a ModelPatcher) with SD1.5's block
layout, shrunk to 32 base channels and seeded random weights, so a run takes a second.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import livecache
from livecache.accel.cache_schedule import CalibratedSchedule
from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.rehash import StepRehashConfig
from livecache.adapters.comfy_unet import apply_deepcache, apply_step_rehash, deep_modules
from livecache.bench.comfy_workloads import DeepBlockCalls, sample

STEPS = 10



def run(model, conds, sampler: str = "euler", scheduler: str = "normal", cfg: float = 5.0):
    """Sample once; returns the latent and how many U-Net calls ran the deep blocks."""
    counter = DeepBlockCalls(model)
    try:
        latent = sample(model, *conds, seed=3, steps=STEPS, cfg=cfg, sampler_name=sampler, scheduler=scheduler, size=16)
    finally:
        counter.close()
    return latent, counter.count


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = float(a.max() - a.min())
    return float(10 * torch.log10(peak**2 / torch.mean((a - b) ** 2)))


def test_our_pack_loads_through_comfyuis_custom_node_loader(repo):
    import nodes  # ComfyUI's nodes.py

    assert asyncio.run(nodes.load_custom_node(str(repo))) is True
    for key in livecache.NODE_CLASS_MAPPINGS:
        assert key in nodes.NODE_CLASS_MAPPINGS, key
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[key] == livecache.NODE_DISPLAY_NAME_MAPPINGS[key]
    web = [d for d in nodes.EXTENSION_WEB_DIRS.values() if d.endswith("web/comfyui")]
    assert web and (repo / "web" / "comfyui" / "livecache.js").is_file()


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras"), ("ddim", "ddim_uniform"),
                                               ("lcm", "sgm_uniform")])
def test_deepcache_on_a_comfyui_model_with_comfyuis_samplers(model, conds, sampler, scheduler):
    before, full_calls = run(model, conds, sampler, scheduler)
    assert full_calls == STEPS  # CFG: cond and uncond batched into one U-Net call per step

    stats = []
    patched = apply_deepcache(model, DeepCacheConfig(cache_interval=2), lambda session: stats.append(session.stats))
    cached, deep_calls = run(patched, conds, sampler, scheduler)
    assert deep_calls == STEPS // 2
    assert (stats[0].full_calls, stats[0].cached_calls) == (STEPS // 2, STEPS // 2)
    assert not torch.equal(cached, before)  # it really reused features
    assert psnr(before, cached) > 35.0, psnr(before, cached)  # 41-44 dB measured

    after, full_again = run(model, conds, sampler, scheduler)
    assert torch.equal(after, before) and full_again == STEPS  # the input MODEL is untouched
    assert all("forward" not in m.__dict__ for m in model.get_model_object("diffusion_model").modules())


def test_patched_model_is_a_clone_and_the_original_keeps_no_wrappers(model, conds):
    from livecache.nodes.comfy_nodes import DeepCacheModel

    wrappers_before = repr(model.model_options.get("transformer_options", {}).get("wrappers"))
    (patched,) = DeepCacheModel().apply(model, 3, 0, "non-uniform", 0.0, 1.0, unique_id="7")
    assert patched is not model and patched.model is model.model
    assert repr(model.model_options.get("transformer_options", {}).get("wrappers")) == wrappers_before
    # the patch survives a further clone made by a later node (e.g. a LoRA loader), like ComfyUI's own patches
    latent, deep_calls = run(patched.clone(), conds)
    assert deep_calls < STEPS and torch.isfinite(latent).all()


def test_cfg_halves_in_separate_calls_keep_separate_caches(model, cond_factory):
    """Prompts of 8 and 77 tokens cannot share a batch, so ComfyUI calls the U-Net twice per step."""
    conds = cond_factory(8, 1), cond_factory(77, 2)
    before, full_calls = run(model, conds)
    cached, deep_calls = run(apply_deepcache(model, DeepCacheConfig(cache_interval=2)), conds)
    assert (full_calls, deep_calls) == (2 * STEPS, STEPS)
    assert psnr(before, cached) > 35.0, psnr(before, cached)


def test_applying_deepcache_again_replaces_the_settings(model, conds):
    every_second = apply_deepcache(model, DeepCacheConfig(cache_interval=2))
    every_fifth = apply_deepcache(every_second, DeepCacheConfig(cache_interval=5))
    assert run(every_fifth, conds)[1] == STEPS // 5
    assert run(every_second, conds)[1] == STEPS // 2  # the earlier clone keeps its own settings


def test_a_second_order_sampler_and_no_cfg(model, conds):
    """Heun evaluates the U-Net twice per step; cfg=1 runs the conditional half only.

    Heun's correction at sigma[i+1] and the next step's first call share that sigma: the clock sees
    one step with two call slots, each with its own cache, so half the 19 calls still run deep.
    """
    before, full_calls = run(model, conds, "heun", "normal", cfg=1.0)
    patched = apply_deepcache(model, DeepCacheConfig(cache_interval=2))
    cached, deep_calls = run(patched, conds, "heun", "normal", cfg=1.0)
    assert (full_calls, deep_calls) == (2 * STEPS - 1, STEPS)
    assert psnr(before, cached) > 35.0, psnr(before, cached)  # 48.6 dB measured


def test_bad_branch_or_model_fails_when_the_node_runs(model):
    unet = model.get_model_object("diffusion_model")
    assert len(deep_modules(unet, 10)) < len(deep_modules(unet, 0))
    with pytest.raises(ValueError, match=r"cache_branch_id must be in \[0, 10\]"):
        apply_deepcache(model, DeepCacheConfig(cache_branch_id=11))
    with pytest.raises(TypeError, match="openaimodel.UNetModel"):
        deep_modules(torch.nn.Linear(2, 2), 0)


def test_step_rehash_on_a_comfyui_model(model, conds):
    """Threshold 0 computes every step; a threshold skips whole U-Net calls and stays close to uncached."""
    before, full_calls = run(model, conds)
    exact, computed = run(apply_step_rehash(model, StepRehashConfig(threshold=0.0)), conds)
    assert torch.equal(exact, before) and computed == full_calls == STEPS

    stats = []
    patched = apply_step_rehash(model, StepRehashConfig(threshold=0.1), lambda session: stats.append(session.stats))
    rehashed, computed = run(patched, conds)
    skipped = stats[0].skipped_steps
    assert 0 < skipped <= STEPS // 2 and computed == STEPS - skipped  # skipped steps never reach the deep blocks
    assert ".." not in stats[0].pattern and stats[0].pattern.startswith("FF")  # max_skips 1; two steps to measure
    assert not torch.equal(rehashed, before)
    assert psnr(before, rehashed) > 40.0, psnr(before, rehashed)  # 78.9 dB measured (3 of 10 steps skipped)

    after, full_again = run(model, conds)
    assert torch.equal(after, before) and full_again == STEPS  # the input MODEL is untouched


def test_step_rehash_node_returns_a_patched_clone(model, conds):
    from livecache.nodes.comfy_nodes import StepRehashModel

    (patched,) = StepRehashModel().apply(model, 0.5, 2, "extrapolate", unique_id="9")
    assert patched is not model and patched.model is model.model
    latent, computed = run(patched, conds)
    assert computed < STEPS and torch.isfinite(latent).all()
    with pytest.raises(ValueError, match="threshold must be a number in"):
        StepRehashModel().apply(model, -1.0, 1, "reuse")


def schedule(full_steps: tuple[bool, ...]) -> CalibratedSchedule:
    return CalibratedSchedule("f", "tiny", len(full_steps), "ddim", full_steps, (), 1.0, 1.0)


def test_a_cachequant_schedule_on_a_comfyui_model_runs_exactly_its_full_steps(model, conds):
    from livecache.nodes.comfy_nodes import DeepCacheModel

    full = (True, True, False, False, True, False, True, False, False, False)  # 4 full steps, not a uniform pattern
    before, _ = run(model, conds)
    (patched,) = DeepCacheModel().apply(model, 3, 0, "uniform", 0.0, 1.0, calibrated_schedule=schedule(full))
    cached, deep_calls = run(patched, conds)
    assert deep_calls == sum(full) == 4
    assert psnr(before, cached) > 30.0, psnr(before, cached)

    (wrong,) = DeepCacheModel().apply(model, 3, 0, "uniform", 0.0, 1.0, calibrated_schedule=schedule(full[:8]))
    with pytest.raises(ValueError, match="this calibrated schedule is for 8 steps, but the sampler runs 10"):
        run(wrong, conds)
    assert torch.equal(run(model, conds)[0], before)  # the failed start left the U-Net as it was
    assert all("forward" not in m.__dict__ for m in model.get_model_object("diffusion_model").modules())


def test_rehash_and_deepcache_stack_on_one_model_as_the_compose_rules_say(model, conds):
    before, _ = run(model, conds)
    deepcache = DeepCacheConfig(cache_interval=2)
    for patched in (apply_step_rehash(apply_deepcache(model, deepcache), StepRehashConfig(threshold=0.2)),
                    apply_deepcache(apply_step_rehash(model, StepRehashConfig(threshold=0.2)), deepcache)):
        latent, deep_calls = run(patched, conds)
        # fewer deep passes than DeepCache alone (5): 2 and 4 measured (the outer one sees the other's output)
        assert deep_calls < STEPS // 2 and psnr(before, latent) > 35.0, (deep_calls, psnr(before, latent))
    with pytest.raises(ValueError, match="'extrapolate' cannot stack with DeepCache"):
        apply_step_rehash(apply_deepcache(model, deepcache), StepRehashConfig(mode="extrapolate"))
    with pytest.raises(ValueError, match="'extrapolate' cannot stack with DeepCache"):
        apply_deepcache(apply_step_rehash(model, StepRehashConfig(mode="extrapolate")), deepcache)
    # the same technique again replaces its settings instead of stacking
    apply_step_rehash(apply_step_rehash(model, StepRehashConfig(mode="extrapolate")), StepRehashConfig())
