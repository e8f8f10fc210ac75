"""The technique registry: lookups, the record of what a model carries, removal by name, one scheduler patch."""

import pytest
import torch
from torch import nn

from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.registry import Registry, Technique, applied_to
from livecache.accel.rehash import StepRehashConfig
from livecache.accel.site import Site
from livecache.accel.slicing import SlicingConfig
from livecache.accel.techniques import REGISTRY
from livecache.adapters.diffusers_site import UNetSite, accelerated, apply_technique
from livecache.models.sampling import make_scheduler

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
SLICING, DEEPCACHE, REHASH = SlicingConfig(slices=2, vae=False), DeepCacheConfig(2), StepRehashConfig(0.5)


@torch.no_grad()
def generate(unet, scheduler, steps=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    states = torch.randn(2, 3, 32, generator=g)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = unet(x, t, encoder_hidden_states=states).sample
        x = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    return x


def untouched(unet, scheduler) -> bool:
    return (all("forward" not in m.__dict__ and "_livecache_forwards" not in m.__dict__ for m in unet.modules())
            and "set_timesteps" not in scheduler.__dict__ and "_livecache_applied" not in unet.__dict__
            and not unet._forward_pre_hooks and not unet._forward_hooks)


def test_every_technique_is_registered_once_with_its_rank():
    assert REGISTRY.names() == ["slicing", "quantization", "deepcache", "blockcache", "ilf", "cachequant", "rehash"]
    assert REGISTRY.of(DEEPCACHE).title == "DeepCache" and REGISTRY.named("rehash").config_type is StepRehashConfig
    assert [REGISTRY.of(c).rank for c in (SLICING, DEEPCACHE, REHASH)] == [0, 1, 2]
    with pytest.raises(TypeError, match="no LiveCache adapter for int"):
        REGISTRY.of(3)
    with pytest.raises(ValueError, match="already registered"):
        Registry([REGISTRY.named("deepcache"), REGISTRY.named("deepcache")])


def test_a_model_lists_what_it_carries_and_drops_one_technique_by_name(tiny_unet):
    scheduler = make_scheduler("ddim", SCHEDULER_CONFIG)
    plain = generate(tiny_unet, scheduler)
    with accelerated(tiny_unet, scheduler, [SLICING, REHASH]):
        sliced_rehash = generate(tiny_unet, scheduler)
    with accelerated(tiny_unet, scheduler, [DEEPCACHE, REHASH]):
        cached_rehash = generate(tiny_unet, scheduler)

    REGISTRY.apply(UNetSite(tiny_unet, scheduler), [REHASH, DEEPCACHE, SLICING])
    record = applied_to(tiny_unet)
    assert record.names() == ["slicing", "deepcache", "rehash"] and "deepcache" in record
    record.remove("slicing")  # innermost: the cache around the sliced layers is rebuilt on the plain ones
    assert record.names() == ["deepcache", "rehash"]
    assert torch.equal(generate(tiny_unet, scheduler), cached_rehash)
    assert record.handle("rehash").stats.pattern.startswith("FF")  # still told of each generation
    record.remove("deepcache")
    with pytest.raises(KeyError, match="'deepcache' is not applied to this model; applied: rehash"):
        record.remove("deepcache")
    assert len(record) == 1
    assert not torch.equal(generate(tiny_unet, scheduler), plain)
    record.remove_all()
    assert torch.equal(generate(tiny_unet, scheduler), plain) and untouched(tiny_unet, scheduler)
    assert len(applied_to(tiny_unet)) == 0
    assert not torch.equal(sliced_rehash, plain)


def test_remove_all_restores_bit_identical_outputs(tiny_unet):
    scheduler = make_scheduler("lcm", SCHEDULER_CONFIG)
    plain = generate(tiny_unet, scheduler, steps=4)
    handles = REGISTRY.apply(UNetSite(tiny_unet, scheduler), [SLICING, DEEPCACHE, REHASH])
    accelerated_out = generate(tiny_unet, scheduler, steps=4)
    assert [h.name for h in handles] == ["slicing", "deepcache", "rehash"]
    applied_to(tiny_unet).remove_all()
    assert not torch.equal(accelerated_out, plain)
    assert torch.equal(generate(tiny_unet, scheduler, steps=4), plain) and untouched(tiny_unet, scheduler)


def test_the_scheduler_is_patched_once_and_restored_exactly(tiny_unet):
    scheduler = make_scheduler("ddim", SCHEDULER_CONFIG)
    seen = []
    original = scheduler.set_timesteps

    def mine(*args, **kwargs):  # someone else's instance override, there before us
        seen.append(args)
        return original(*args, **kwargs)

    scheduler.set_timesteps = mine
    cache, rehash = REGISTRY.apply(UNetSite(tiny_unet, scheduler), [DEEPCACHE, REHASH])
    patch = scheduler.__dict__["set_timesteps"]
    cache.remove()
    assert scheduler.__dict__["set_timesteps"] is patch  # one patch, shared while anyone listens
    generate(tiny_unet, scheduler, steps=5)
    assert len(rehash.stats.pattern) == 5 and len(seen) == 1
    rehash.remove()
    assert scheduler.__dict__["set_timesteps"] is mine  # put back what was there, not deleted


def test_techniques_join_a_model_only_around_what_it_carries(tiny_unet):
    scheduler = make_scheduler("ddim", SCHEDULER_CONFIG)
    cache = apply_technique(tiny_unet, DEEPCACHE)
    try:
        with pytest.raises(ValueError, match="cannot add feature slicing to a model that already has DeepCache"):
            apply_technique(tiny_unet, SLICING)
        with pytest.raises(ValueError, match="step rehash mode 'extrapolate' cannot stack with DeepCache"):
            apply_technique(tiny_unet, StepRehashConfig(mode="extrapolate"))
        rehash = apply_technique(tiny_unet, REHASH)
        assert applied_to(tiny_unet).names() == ["deepcache", "rehash"]
        rehash.remove()
    finally:
        cache.remove()
    assert untouched(tiny_unet, scheduler)


def test_reports_are_looked_up_per_technique(tiny_unet):
    scheduler = make_scheduler("ddim", SCHEDULER_CONFIG)
    with accelerated(tiny_unet, scheduler, [SLICING, DEEPCACHE, REHASH]) as handles:
        generate(tiny_unet, scheduler)
    lines = [h.report(1.5)[0] for h in handles]
    assert lines[0].startswith("Slicing: ") and lines[1].startswith("DeepCache: ") and "in 1.50 s" in lines[1]
    assert lines[2].startswith("Step rehash: ") and handles[2].report(1.5)[1]["seconds"] == 1.5


class Chain(nn.Module):
    """A toy model family: a stack of blocks, `forward(x, level)`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x, level):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


class ChainSite(Site):
    """All a new model family needs for DeepCache: where the deep part is and how to read the noise level."""

    family = "toy chain"

    def read_level(self, args, kwargs):
        return float(args[1])

    def deep_modules(self, branch_id):
        return list(self.root.blocks[1 + branch_id:])


def test_a_new_family_is_one_site_and_a_new_technique_one_registration():
    model, x = Chain(), torch.randn(3, 8)
    plain = [model(x + level, level) for level in (3.0, 2.0, 1.0)]
    (handle,) = REGISTRY.apply(ChainSite(model), [DeepCacheConfig(cache_interval=2)])
    cached = [model(x + level, level) for level in (3.0, 2.0, 1.0)]
    assert (handle.stats.full_calls, handle.stats.cached_calls) == (2, 1)
    assert torch.equal(cached[0], plain[0]) and not torch.equal(cached[1], plain[1])
    with pytest.raises(TypeError, match=r"toy chain \(Chain\) offers no way to answer for whole model calls"):
        REGISTRY.apply(ChainSite(model), [REHASH])
    assert applied_to(model).names() == ["deepcache"]
    handle.remove()
    assert torch.equal(model(x + 2.0, 2.0), plain[1])

    class Scale:
        stats = None

    def apply_scale(site, factor, handle, _stack):
        handle.core = Scale()
        handle.undo(site.root.register_forward_hook(lambda _m, _a, out: out * factor))

    registry = Registry([Technique("scale", "scale", float, 5, apply_scale, lambda _s, t: (f"scaled in {t}", {}))])
    (scaled,) = registry.apply(ChainSite(model), [2.0])
    assert torch.equal(model(x + 1.0, 1.0), 2.0 * plain[2]) and applied_to(model).names() == ["scale"]
    scaled.remove()
    assert torch.equal(model(x + 1.0, 1.0), plain[2]) and "_livecache_applied" not in model.__dict__
