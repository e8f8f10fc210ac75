"""Step rehash: the core on a toy model function, and through the diffusers adapter on a tiny U-Net."""

import re
from types import SimpleNamespace

import pytest
import torch

from livecache.accel.rehash import StepRehash, StepRehashConfig
from livecache.adapters.diffusers_site import accelerated, apply_technique
from livecache.bench.metrics import psnr
from livecache.models.sampling import make_scheduler

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


@torch.no_grad()
def generate(unet, scheduler, steps=10, seed=0, guidance=5.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    states = torch.cat([torch.randn(1, 3, 32, generator=g), torch.randn(1, 3, 32, generator=g)])
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        e_u, e_c = unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, states).sample.chunk(2)
        x = scheduler.step(e_u + guidance * (e_c - e_u), t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    return x


class CallCounter:
    def __init__(self, unet):
        self.count = 0
        self.handle = unet.conv_in.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))


def toy_run(core, inputs, levels):
    """Drive the core like a sampler: one call per step; the 'model' doubles its input."""
    calls = []

    def model(x):
        calls.append(1)
        return 2 * x

    outs = [core.call(lambda x=x: model(x), x, level) for x, level in zip(inputs, levels, strict=True)]
    return outs, len(calls)


def test_core_skips_repeated_inputs_but_never_more_than_the_guard():
    x = torch.ones(2, 3)
    core = StepRehash(StepRehashConfig(threshold=0.01, max_skips=2))
    outs, computed = toy_run(core, [x, x * 1.5] + [x * 1.5] * 8, list(range(100, 0, -10)))
    assert core.stats.pattern == "FF..F..F..", core.stats.pattern  # identical inputs: skip, 2 at most in a row
    assert computed == 4 == core.stats.computed_calls and core.stats.skipped_calls == 6
    assert all(torch.equal(o, x * 3) for o in outs[1:])


def test_core_computes_when_inputs_change_a_lot_and_at_threshold_zero():
    inputs = [torch.full((2, 3), float(2**k)) for k in range(6)]
    core = StepRehash(StepRehashConfig(threshold=0.5, max_skips=5))
    _, computed = toy_run(core, inputs, [60, 50, 40, 30, 20, 10])
    assert computed == 6 and core.stats.pattern == "FFFFFF"  # each input doubles: predicted change 1 > 0.5
    zero = StepRehash(StepRehashConfig(threshold=0.0))
    _, computed = toy_run(zero, [torch.ones(2, 3)] * 6, [60, 50, 40, 30, 20, 10])
    assert computed == 6


def test_core_extrapolates_along_the_noise_level():
    core = StepRehash(StepRehashConfig(threshold=5.0, max_skips=1, mode="extrapolate"))
    levels = [30.0, 20.0, 10.0]
    inputs = [torch.full((1, 2), 1.0), torch.full((1, 2), 1.1), torch.full((1, 2), 1.1)]
    outs = [core.call(lambda x=x, lv=lv: x * 0 + lv, x, lv) for x, lv in zip(inputs, levels, strict=True)]
    assert core.stats.pattern == "FF."
    assert torch.allclose(outs[2], torch.full((1, 2), 10.0))  # the output is linear in the level: exact


def test_slots_keep_separate_outputs():
    core = StepRehash(StepRehashConfig(threshold=1.0))
    x = torch.ones(1, 2)
    answers = []
    for level in (30, 20, 10):
        answers.append([core.call(lambda s=s: x * (s + 1), x, level) for s in (0, 1)])  # two calls per step
    assert core.stats.pattern == "FF."
    assert torch.equal(answers[2][0], x) and torch.equal(answers[2][1], 2 * x)


def test_new_generation_starts_fresh():
    core = StepRehash(StepRehashConfig(threshold=1.0))
    x = torch.ones(1, 2)
    toy_run(core, [x] * 3, [30, 20, 10])
    outs, computed = toy_run(core, [x * 5] * 3, [30, 20, 10])  # level jumps up: a new generation
    assert core.stats.pattern == "FF." and computed == 2
    assert torch.equal(outs[2], x * 10)


@pytest.mark.parametrize("bad, message", [
    ({"threshold": -0.1}, "threshold must be a number in"), ({"max_skips": 0}, "max_skips must be an integer"),
    ({"mode": "guess"}, "mode must be 'reuse' or 'extrapolate'"), ({"threshold": "high"}, "threshold must be"),
])
def test_bad_configs_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        StepRehashConfig(**bad)


@pytest.mark.parametrize("kind, steps", [("ddim", 20), ("euler", 20), ("lcm", 4)])
def test_unet_skips_within_the_guard_with_every_scheduler(tiny_unet, kind, steps):
    scheduler = make_scheduler(kind, SCHEDULER_CONFIG)
    reference = generate(tiny_unet, scheduler, steps)
    config = StepRehashConfig(threshold=0.5, max_skips=2)
    with accelerated(tiny_unet, scheduler, [config]) as (handle,):
        counter = CallCounter(tiny_unet)
        out = generate(tiny_unet, scheduler, steps)
        counter.handle.remove()
    stats = handle.stats
    assert len(stats.pattern) == steps and stats.pattern.startswith("FF")
    assert stats.skipped_steps > 0 and not re.search(r"\.{3}", stats.pattern)  # never 3 skips in a row
    assert counter.count == stats.computed_calls == steps - stats.skipped_steps
    assert torch.isfinite(out).all() and psnr(out, reference) > 20


def test_threshold_zero_computes_every_step_bit_identically(tiny_unet):
    scheduler = make_scheduler("ddim", SCHEDULER_CONFIG)
    reference = generate(tiny_unet, scheduler)
    with accelerated(tiny_unet, scheduler, [StepRehashConfig(threshold=0.0)]) as (handle,):
        assert torch.equal(generate(tiny_unet, scheduler), reference)
    assert handle.stats.pattern == "F" * 10 and handle.stats.skipped_calls == 0


def test_remove_restores_bit_identical_outputs(tiny_unet):
    target = SimpleNamespace(unet=tiny_unet, scheduler=make_scheduler("ddim", SCHEDULER_CONFIG))
    before = generate(tiny_unet, target.scheduler)
    handle = apply_technique(target, StepRehashConfig(threshold=1.0, max_skips=3))
    rehashed = generate(tiny_unet, target.scheduler)
    handle.remove()
    assert handle.stats.skipped_steps > 0 and not torch.equal(before, rehashed)
    assert torch.equal(generate(tiny_unet, target.scheduler), before)
    assert "forward" not in tiny_unet.__dict__ and "set_timesteps" not in target.scheduler.__dict__


def test_return_dict_false_and_keyword_calls(tiny_unet):
    x, states = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 32)
    with torch.no_grad(), accelerated(tiny_unet, None, [StepRehashConfig(threshold=0.0)]):
        as_tuple = tiny_unet(x, 500, states, return_dict=False)
        keywords = tiny_unet(sample=x, timestep=400, encoder_hidden_states=states).sample
    with torch.no_grad():
        assert torch.equal(as_tuple[0], tiny_unet(x, 500, states).sample)
        assert torch.equal(keywords, tiny_unet(x, 400, states).sample)
