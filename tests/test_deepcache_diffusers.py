"""DeepCache through the diffusers adapter, on a tiny SD-shaped U-Net built in code."""

from types import SimpleNamespace

import pytest
import torch

from livecache.accel.deepcache import DeepCacheConfig
from livecache.adapters.diffusers_site import accelerated, apply_technique
from livecache.adapters.diffusers_unet import deep_modules, unet_layers
from livecache.bench.metrics import psnr
from livecache.models.sampling import make_scheduler

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


@torch.no_grad()
def generate(unet, scheduler, steps=10, seed=0, guidance=5.0, split_cfg=False):
    """A plain CFG sampling loop; `split_cfg` runs the two halves as separate U-Net calls."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond, uncond = torch.randn(1, 3, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if split_cfg:
            e_u = unet(scheduler.scale_model_input(x, t), t, uncond).sample
            e_c = unet(scheduler.scale_model_input(x, t), t, cond).sample
        else:
            both = unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, torch.cat([uncond, cond])).sample
            e_u, e_c = both.chunk(2)
        x = scheduler.step(e_u + guidance * (e_c - e_u), t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    return x


def pipe(unet, kind="ddim"):
    return SimpleNamespace(unet=unet, scheduler=make_scheduler(kind, SCHEDULER_CONFIG))


def test_layers_match_skip_connections(tiny_unet):
    layers = unet_layers(tiny_unet)
    assert len(layers.up) == len(layers.down) + 1
    assert [type(m).__name__ for m in deep_modules(tiny_unet, 0)][:3] == [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    with pytest.raises(ValueError, match=r"cache_branch_id must be in \[0, 7\]"):
        deep_modules(tiny_unet, 8)


def test_cached_path_runs_deep_blocks_fewer_times(tiny_unet, deep_counter):
    p = pipe(tiny_unet)
    baseline = deep_counter(tiny_unet)
    generate(tiny_unet, p.scheduler, steps=10)
    baseline.handle.remove()
    handle = apply_technique(p, DeepCacheConfig(cache_interval=3))
    counter = deep_counter(tiny_unet)
    generate(tiny_unet, p.scheduler, steps=10)
    handle.remove()
    assert baseline.count == 10
    assert counter.count == 4 == handle.stats.full_calls  # steps 0, 3, 6, 9
    assert handle.stats.cached_calls == 6


def test_remove_restores_bit_identical_outputs(tiny_unet):
    p = pipe(tiny_unet)
    before = generate(tiny_unet, p.scheduler)
    handle = apply_technique(p, DeepCacheConfig(cache_interval=2, cache_branch_id=2, schedule="non-uniform"))
    cached = generate(tiny_unet, p.scheduler)
    handle.remove()
    after = generate(tiny_unet, p.scheduler)
    assert not torch.equal(before, cached)
    assert torch.equal(before, after)
    assert all("forward" not in m.__dict__ for m in tiny_unet.modules())
    assert "set_timesteps" not in p.scheduler.__dict__


def test_interval_one_equals_uncached_exactly(tiny_unet):
    p = pipe(tiny_unet)
    reference = generate(tiny_unet, p.scheduler)
    with accelerated(tiny_unet, p.scheduler, [DeepCacheConfig(cache_interval=1)]):
        assert torch.equal(generate(tiny_unet, p.scheduler), reference)


@pytest.mark.parametrize("kind", ["lcm", "euler", "dpmpp_2m"])
def test_works_with_other_schedulers(tiny_unet, deep_counter, kind):
    p = pipe(tiny_unet, kind)
    steps = 4 if kind == "lcm" else 8
    reference = generate(tiny_unet, p.scheduler, steps=steps)
    with accelerated(tiny_unet, p.scheduler, [DeepCacheConfig(cache_interval=2)]) as (handle,):
        counter = deep_counter(tiny_unet)
        out = generate(tiny_unet, p.scheduler, steps=steps)
        counter.handle.remove()
    assert counter.count == steps // 2
    assert handle.stats.full_calls == steps // 2
    assert torch.isfinite(out).all()
    assert psnr(out, reference) > 20


def test_state_resets_between_generations(tiny_unet):
    p = pipe(tiny_unet)
    with accelerated(tiny_unet, p.scheduler, [DeepCacheConfig(cache_interval=3)]):
        first = generate(tiny_unet, p.scheduler, seed=0)
        other = generate(tiny_unet, p.scheduler, seed=5)
        again = generate(tiny_unet, p.scheduler, seed=0)
    assert torch.equal(first, again)  # nothing from the seed-5 run leaked into the repeat
    assert not torch.equal(first, other)


def test_cfg_halves_in_separate_calls_keep_separate_caches(tiny_unet, close_reassociated):
    p = pipe(tiny_unet)
    reference = generate(tiny_unet, p.scheduler, split_cfg=True)
    batched = generate(tiny_unet, p.scheduler, split_cfg=False)
    with accelerated(tiny_unet, p.scheduler, [DeepCacheConfig(cache_interval=2)]):
        split_cached = generate(tiny_unet, p.scheduler, split_cfg=True)
        batched_cached = generate(tiny_unet, p.scheduler, split_cfg=False)
    # separate calls per half must give the same result as one batched call (up to float order)
    close_reassociated(batched, reference)
    close_reassociated(batched_cached, split_cached)


def test_applying_twice_is_refused(tiny_unet):
    handle = apply_technique(pipe(tiny_unet), DeepCacheConfig())
    try:
        with pytest.raises(ValueError, match="another feature cache is applied"):
            apply_technique(pipe(tiny_unet), DeepCacheConfig())
    finally:
        handle.remove()
    assert all("forward" not in m.__dict__ for m in tiny_unet.modules())


def test_deep_blocks_called_outside_a_unet_call_compute_normally(tiny_unet):
    p = pipe(tiny_unet)
    with accelerated(tiny_unet, p.scheduler, [DeepCacheConfig(cache_interval=3)]):
        generate(tiny_unet, p.scheduler, steps=5)  # ends on a cached step
        resnet = tiny_unet.mid_block.resnets[0]
        x, temb, states = torch.randn(1, 32, 4, 4), torch.randn(1, 64), torch.randn(1, 3, 32)
        with torch.no_grad():
            mid = tiny_unet.mid_block
            first = mid(x, temb, encoder_hidden_states=states)
            assert not torch.equal(first, mid(x + 1, temb, encoder_hidden_states=states))
            assert torch.equal(resnet(x, temb), resnet.__class__.forward(resnet, x, temb))
