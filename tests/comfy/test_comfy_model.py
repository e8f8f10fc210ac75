"""DeepCache on ComfyUI's own MODEL, sampled by ComfyUI's own KSampler path (real ComfyUI 0.3.75).

The model is ComfyUI's SD1.5 class (openaimodel.UNetModel in a ModelPatcher) with SD1.5's block
layout, shrunk to 32 base channels and seeded random weights, so a run takes a second.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import livecache
from livecache.accel.deepcache import DeepCacheConfig
from livecache.adapters.comfy_unet import apply_deepcache, deep_modules
from livecache.adapters.comfy_workloads import DeepBlockCalls, conditioning, sample, sd15_model

CONTEXT = 64
STEPS = 10


@pytest.fixture(scope="module")
def model():
    return sd15_model(model_channels=32, context_dim=CONTEXT, num_heads=2, seed=0)


@pytest.fixture(scope="module")
def conds():
    return conditioning(1, 8, CONTEXT, seed=1), conditioning(1, 8, CONTEXT, seed=2)


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


def test_cfg_halves_in_separate_calls_keep_separate_caches(model):
    """Prompts of 8 and 77 tokens cannot share a batch, so ComfyUI calls the U-Net twice per step."""
    conds = conditioning(1, 8, CONTEXT, seed=1), conditioning(1, 77, CONTEXT, seed=2)
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
