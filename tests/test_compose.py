"""Techniques stack through `accelerated` in a fixed order, and combinations that cannot work are refused."""

from types import SimpleNamespace

import pytest
import torch

from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.rehash import StepRehashConfig
from livecache.accel.slicing import SlicingConfig
from livecache.accel.techniques import application_order, check_stack
from livecache.adapters.diffusers_site import accelerated
from livecache.models.sampling import make_scheduler

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
SLICING, DEEPCACHE, REHASH = SlicingConfig(slices=2, vae=False), DeepCacheConfig(2), StepRehashConfig(0.5)


@torch.no_grad()
def lcm4(unet, scheduler):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    states = torch.randn(2, 3, 32, generator=g)
    scheduler.set_timesteps(4)
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=states).sample
        x = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    return x


def test_lcm_deepcache_slicing_rehash_stack_in_any_order(tiny_unet, close_reassociated):
    scheduler = make_scheduler("lcm", SCHEDULER_CONFIG)
    plain = lcm4(tiny_unet, scheduler)
    with accelerated(tiny_unet, scheduler, [DEEPCACHE, REHASH]) as (cache, rehash):
        unsliced = lcm4(tiny_unet, scheduler)
    with accelerated(tiny_unet, scheduler, [REHASH, SLICING, DEEPCACHE]) as (rehash2, slicing, cache2):
        stacked = lcm4(tiny_unet, scheduler)
    with accelerated(tiny_unet, scheduler, [SLICING, DEEPCACHE, REHASH]):
        reordered = lcm4(tiny_unet, scheduler)
    close_reassociated(stacked, unsliced)  # slicing is exact under the caches, up to float order
    assert torch.equal(stacked, reordered)
    assert rehash2.stats.pattern == rehash.stats.pattern and cache2.stats.schedule == "F.F."
    assert slicing.stats.slice_calls > 0 and not torch.equal(stacked, plain)
    assert torch.equal(lcm4(tiny_unet, scheduler), plain)  # everything removed, bit-identical
    assert all("forward" not in m.__dict__ for m in tiny_unet.modules())
    assert "set_timesteps" not in scheduler.__dict__


def test_application_order_is_slicing_then_caches_then_rehash():
    assert application_order([REHASH, DEEPCACHE, SLICING]) == [SLICING, DEEPCACHE, REHASH]


@pytest.mark.parametrize("configs, message", [
    ([DEEPCACHE, DeepCacheConfig(3)], "DeepCache is applied twice"),
    ([REHASH, StepRehashConfig(0.2)], "step rehash is applied twice"),
    ([SLICING, SLICING], "feature slicing is applied twice"),
    ([DEEPCACHE, StepRehashConfig(0.2, mode="extrapolate")], "'extrapolate' cannot stack with DeepCache"),
])
def test_combinations_that_cannot_work_are_refused(configs, message):
    with pytest.raises(ValueError, match=message):
        check_stack(configs)


def test_refusals_happen_before_the_model_is_touched(tiny_unet):
    scheduler = make_scheduler("ddim", SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="applied twice"), accelerated(tiny_unet, scheduler, [REHASH, REHASH]):
        pass
    with pytest.raises(TypeError, match="no diffusers adapter for SimpleNamespace"), \
            accelerated(tiny_unet, scheduler, [SimpleNamespace()]):
        pass
    assert all("forward" not in m.__dict__ for m in tiny_unet.modules())
    assert not tiny_unet._forward_pre_hooks and "set_timesteps" not in scheduler.__dict__
