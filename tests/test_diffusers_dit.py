"""Block caching on diffusers DiTs: every family the installed diffusers has, as a tiny random model built here.

Each family is a builder returning the model and `inputs(level, seeds)`: the keyword arguments of one
call at noise `level` (in [0, 1]; each family gets it in its own units) whose batch row i is built
from `seeds[i]` alone, so a batch of two conditions has, row by row, the inputs of two single runs.
"""

import types
from dataclasses import replace

import diffusers as D
import pytest
import torch
from torch import nn

from livecache.accel.block_cache import BlockCacheConfig, forecast
from livecache.accel.cachequant import CacheQuantConfig, Calibration, calibrate_cachequant
from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.quant import QuantConfig, calibrate_quant, int8_available
from livecache.accel.registry import applied_to
from livecache.accel.rehash import StepRehashConfig
from livecache.accel.schedules import format_schedule, nonuniform_schedule
from livecache.accel.slicing import SlicingConfig
from livecache.accel.techniques import REGISTRY
from livecache.adapters.diffusers_dit import FAMILIES, DiTSite, apply_technique, site_of


def rows(seeds, make):
    """One batch row per seed, each drawn from its own generator."""
    return torch.cat([make(torch.Generator().manual_seed(s)) for s in seeds])

def flux():
    m = D.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    def kw(level, seeds):
        return dict(hidden_states=rows(seeds, lambda g: torch.randn(1, 16, 4, generator=g)),
                    encoder_hidden_states=rows(seeds, lambda g: torch.randn(1, 5, 16, generator=g) + 1),
                    pooled_projections=rows(seeds, lambda g: torch.randn(1, 8, generator=g)),
                    timestep=torch.full((len(seeds),), level), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    return m, kw

def flux2():
    m = D.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False)
    def kw(level, seeds):
        return dict(hidden_states=rows(seeds, lambda g: torch.randn(1, 16, 4, generator=g)),
                    encoder_hidden_states=rows(seeds, lambda g: torch.randn(1, 5, 16, generator=g) + 1),
                    timestep=torch.full((len(seeds),), level), img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(5, 4))
    return m, kw

def sd3():
    m = D.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        out_channels=4, pos_embed_max_size=16)
    def kw(level, seeds):
        return dict(hidden_states=rows(seeds, lambda g: torch.randn(1, 4, 8, 8, generator=g)),
                    encoder_hidden_states=rows(seeds, lambda g: torch.randn(1, 5, 16, generator=g) + 1),
                    pooled_projections=rows(seeds, lambda g: torch.randn(1, 8, generator=g)),
                    timestep=torch.full((len(seeds),), level * 1000))
    return m, kw

def wan():
    m = D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32)
    def kw(level, seeds):
        return dict(hidden_states=rows(seeds, lambda g: torch.randn(1, 4, 2, 8, 8, generator=g)),
                    encoder_hidden_states=rows(seeds, lambda g: torch.randn(1, 5, 16, generator=g) + 1),
                    timestep=torch.full((len(seeds),), level * 1000))
    return m, kw

def qwen():
    m = D.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    def kw(level, seeds):
        return dict(hidden_states=rows(seeds, lambda g: torch.randn(1, 16, 16, generator=g)),
                    encoder_hidden_states=rows(seeds, lambda g: torch.randn(1, 5, 16, generator=g) + 1),
                    encoder_hidden_states_mask=torch.ones(len(seeds), 5, dtype=torch.long),
                    timestep=torch.full((len(seeds),), level), img_shapes=[(1, 4, 4)] * len(seeds))
    return m, kw

def zimage():
    m = D.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=4,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
    def kw(level, seeds):
        return dict(x=[torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds],
                    t=torch.full((len(seeds),), 1 - level),
                    cap_feats=[torch.randn(5, 16, generator=torch.Generator().manual_seed(s + 100)) for s in seeds])
    return m, kw

def dit():
    m = D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=4, norm_num_groups=4, sample_size=8, patch_size=2)
    def kw(level, seeds):
        return dict(hidden_states=rows(seeds, lambda g: torch.randn(1, 4, 8, 8, generator=g)),
                    timestep=torch.full((len(seeds),), level * 1000),
                    class_labels=torch.tensor([s % 10 for s in seeds]))
    return m, kw

def pixart():
    m = D.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=4, norm_num_groups=4, cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16)
    def kw(level, seeds):
        return dict(hidden_states=rows(seeds, lambda g: torch.randn(1, 4, 8, 8, generator=g)),
                    encoder_hidden_states=rows(seeds, lambda g: torch.randn(1, 5, 16, generator=g) + 1),
                    timestep=torch.full((len(seeds),), level * 1000),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return m, kw


FAMILY_BUILDERS = {"FluxTransformer2DModel": flux, "Flux2Transformer2DModel": flux2, "SD3Transformer2DModel": sd3,
                   "WanTransformer3DModel": wan, "QwenImageTransformer2DModel": qwen,
                   "ZImageTransformer2DModel": zimage, "DiTTransformer2DModel": dit,
                   "PixArtTransformer2DModel": pixart}
INSTALLED = [name for name in FAMILY_BUILDERS if hasattr(D, name)]
ABSENT = [name for name in FAMILY_BUILDERS if not hasattr(D, name)]
LEVELS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def build(name):
    """The family's tiny model, its weights drawn from seed 0, in eval mode, and its inputs."""
    torch.manual_seed(0)
    model, inputs = FAMILY_BUILDERS[name]()
    return model.eval(), inputs


def output(model, kwargs) -> torch.Tensor:
    out = model(**kwargs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image answers a list, one tensor per sample


@torch.no_grad()
def run(model, inputs, levels=LEVELS, seeds=(1,)):
    return [output(model, inputs(level, list(seeds))) for level in levels]


class BlockWork:
    """Counts calls of the modules inside the transformer blocks: the work a cache skips (hooks on the
    blocks themselves fire even when an override answers for them)."""

    def __init__(self, blocks):
        self.calls = 0
        self._handles = [m.register_forward_hook(self._count) for b in blocks for m in b.modules() if m is not b]

    def _count(self, *_):
        self.calls += 1

    def remove(self):
        for handle in self._handles:
            handle.remove()


def untouched(model) -> bool:
    return (all("forward" not in m.__dict__ and "_livecache_forwards" not in m.__dict__ for m in model.modules())
            and "_livecache_applied" not in model.__dict__ and not model._forward_pre_hooks
            and not model._forward_hooks)


def test_the_families_table_names_every_family_of_the_issue():
    assert set(FAMILIES) == set(FAMILY_BUILDERS)


@pytest.mark.parametrize("name", INSTALLED)
def test_cached_steps_skip_the_span_and_full_steps_equal_the_uncached_model(name):
    model, inputs = build(name)
    plain = run(model, inputs)
    site = DiTSite(model)
    first, stop = site.default_span()
    assert first >= 1 and stop <= len(site.blocks) - 1
    inside, outside = BlockWork(site.blocks[first:stop]), BlockWork(site.blocks[:first] + site.blocks[stop:])
    per_call = []
    handle = apply_technique(model, BlockCacheConfig(cache_interval=2))
    with torch.no_grad():
        cached = []
        for level in LEVELS:
            before = inside.calls, outside.calls
            cached.append(output(model, inputs(level, [1])))
            per_call.append((inside.calls - before[0], outside.calls - before[1]))
    inside.remove()
    outside.remove()
    assert (handle.stats.full_calls, handle.stats.cached_calls) == (3, 3)
    assert handle.stats.skipped_blocks == 3 * (stop - first)
    full, reused = per_call[0::2], per_call[1::2]
    assert len(set(full)) == 1 and len(set(reused)) == 1
    assert full[0][0] > 0 and reused[0] == (0, full[0][1])  # no span work on cached steps, the rest all runs
    for k in (0, 2, 4):  # full steps compute everything from the same inputs
        assert torch.equal(cached[k], plain[k])
    for k in (1, 3, 5):  # cached steps answer with the kept residual, not what the model computes
        assert not torch.equal(cached[k], plain[k])
    handle.remove()
    assert untouched(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs), plain, strict=True))


@pytest.mark.parametrize("name", INSTALLED)
def test_interval_one_equals_the_uncached_model_exactly(name):
    model, inputs = build(name)
    plain = run(model, inputs, LEVELS[:3])
    handle = apply_technique(model, BlockCacheConfig(cache_interval=1, mode="forecast"))
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs, LEVELS[:3]), plain, strict=True))
    assert handle.stats.cached_calls == 0
    applied_to(model).remove("blockcache")
    assert untouched(model)


def close(a, b) -> bool:
    """Equal up to batch-size-dependent summation order: a tolerance scaled to the tensors' magnitude."""
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6)


@pytest.mark.parametrize("name", INSTALLED)
def test_cfg_halves_in_one_batch_never_mix(name):
    model, inputs = build(name)
    config = BlockCacheConfig(cache_interval=3, mode="forecast")
    handle = apply_technique(model, config)
    both = run(model, inputs, seeds=(1, 2))
    halves = []
    for seed in (1, 2):
        handle.remove()
        handle = apply_technique(model, config)
        halves.append(run(model, inputs, seeds=(seed,)))
    handle.remove()
    assert handle.stats.cached_calls == 4 and handle.stats.forecast_calls > 0
    for k, batch in enumerate(both):
        assert close(batch[0:1], halves[0][k]) and close(batch[1:2], halves[1][k])
    assert not close(halves[0][1], halves[1][1])  # the two conditions do give different answers


def test_cfg_halves_in_separate_calls_keep_separate_residuals():
    model, inputs = build(INSTALLED[0])
    config = BlockCacheConfig(cache_interval=2)
    alone = []
    for seed in (1, 2):
        handle = apply_technique(model, config)
        alone.append(run(model, inputs, seeds=(seed,)))
        handle.remove()
    handle = apply_technique(model, config)
    with torch.no_grad():
        together = [[output(model, inputs(level, [seed])) for seed in (1, 2)] for level in LEVELS]
    handle.remove()
    assert handle.stats.cached_calls == 6  # 3 cached steps, 2 calls each
    for k, (first, second) in enumerate(together):
        assert torch.equal(first, alone[0][k]) and torch.equal(second, alone[1][k])


def test_forecast_is_exact_on_polynomials_of_its_order():
    levels = [0.9, 0.7, 0.5]
    linear = [(lv, (torch.full((2,), 3.0 - 2.0 * lv),)) for lv in levels]
    quadratic = [(lv, (torch.full((2,), 1.0 + lv - 4.0 * lv * lv),)) for lv in levels]
    assert torch.allclose(forecast(linear, 0.2, 1)[0], torch.full((2,), 3.0 - 0.4))
    assert torch.allclose(forecast(quadratic, 0.2, 2)[0], torch.full((2,), 1.0 + 0.2 - 0.16))
    assert not torch.allclose(forecast(quadratic, 0.2, 1)[0], torch.full((2,), 1.0 + 0.2 - 0.16))
    assert torch.equal(forecast(linear[:1], 0.2, 2)[0], linear[0][1][0])  # one point: the residual as it is


SMOOTH = [name for name in ("WanTransformer3DModel", "FluxTransformer2DModel", "SD3Transformer2DModel")
          if name in INSTALLED]


@pytest.mark.parametrize("name", SMOOTH)
def test_forecasting_beats_plain_reuse_on_a_smooth_trajectory(name):
    """A controlled, smooth trajectory: the input moves a little and linearly with the noise level, and the
    level takes small steps (a random model's timestep embedding oscillates fast, a trained one's blocks
    do not). Cached steps that have two or three full steps behind them are compared with what the
    uncached model computes there."""
    model, inputs = build(name)
    start, end = inputs(1.0, [1])["hidden_states"], inputs(0.0, [2])["hidden_states"]
    steps, size = 10, 2e-4
    levels = [0.5 - size * k for k in range(steps)]

    def smooth(level, seeds):
        kwargs = inputs(level, seeds)
        kwargs["hidden_states"] = start + 0.2 * (0.5 - level) / (size * (steps - 1)) * (end - start)
        return kwargs

    plain = run(model, smooth, levels)
    errors = {}
    for mode, order in (("reuse", 1), ("forecast", 1), ("forecast", 2)):
        handle = apply_technique(model, BlockCacheConfig(cache_interval=3, mode=mode, order=order))
        out = run(model, smooth, levels)
        handle.remove()
        errors[mode, order] = sum(float((out[k] - plain[k]).pow(2).mean()) for k in (4, 5, 7, 8))
    assert errors["forecast", 1] < 0.25 * errors["reuse", 1]
    assert errors["forecast", 2] < errors["forecast", 1]


def test_an_unsupported_model_is_refused_naming_its_class_and_the_supported_families(tiny_unet):
    for model in (nn.Linear(2, 2), tiny_unet):
        with pytest.raises(TypeError) as caught:
            apply_technique(model, BlockCacheConfig())
        message = str(caught.value)
        assert type(model).__name__ in message
        assert all(cls in message and family.name in message for cls, family in FAMILIES.items())
    assert untouched(tiny_unet)


@pytest.mark.parametrize("name", ABSENT or ["none absent"])
def test_absent_families_fail_with_the_clear_error(name):
    if name == "none absent":
        assert not ABSENT  # every family of the issue exists in this diffusers; nothing to refuse
        return
    stand_in = type(name + "Unknown", (nn.Module,), {})()
    with pytest.raises(TypeError, match="supported:"):
        site_of(stand_in)


def test_a_span_must_leave_first_and_last_blocks_and_not_cross_a_stream_join():
    model, _ = build("Flux2Transformer2DModel")  # 2 double-stream blocks, then 3 single-stream ones
    site = DiTSite(model)
    assert site.default_span() == (2, 4)
    with pytest.raises(ValueError, match="first and last always run"):
        site.block_span((0, 3))
    with pytest.raises(ValueError, match=r"crosses .* \[0, 2\), \[2, 5\)"):
        apply_technique(model, BlockCacheConfig(span=(1, 3)))
    assert untouched(model)
    flux_model, _ = build("FluxTransformer2DModel")  # Flux's two stages are joined: one span over both
    assert DiTSite(flux_model).default_span() == (1, 4)
    with pytest.raises(ValueError, match="pair of block indices"):
        BlockCacheConfig(span=(3, 3))
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        BlockCacheConfig(mode="forecast", order=3)


def test_a_scheduler_announces_generations_for_the_non_uniform_schedule():
    model, inputs = build("SD3Transformer2DModel")
    scheduler = D.FlowMatchEulerDiscreteScheduler()
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    handle = apply_technique(pipe, BlockCacheConfig(cache_interval=2, schedule="non-uniform", center=0.2))
    scheduler.set_timesteps(8)
    with torch.no_grad():
        for t in scheduler.timesteps:
            output(model, inputs(float(t) / 1000, [1]))
    expected = nonuniform_schedule(8, 2, center=0.2)
    assert handle.stats.schedule == format_schedule(expected)
    assert handle.stats.full_calls == sum(expected)
    handle.remove()
    assert "set_timesteps" not in scheduler.__dict__ and untouched(model)


def test_the_registry_stacking_rules_hold_on_a_dit():
    model, _ = build("WanTransformer3DModel")
    with pytest.raises(ValueError, match="feature cache"):
        REGISTRY.check_stack([BlockCacheConfig(), DeepCacheConfig()])
    with pytest.raises(ValueError, match="extrapolate"):
        REGISTRY.check_stack([BlockCacheConfig(), StepRehashConfig(mode="extrapolate")])
    with pytest.raises(TypeError, match=r"diffusers DiT \(Wan\).*skip branches"):
        apply_technique(model, DeepCacheConfig())
    assert untouched(model)


@pytest.mark.parametrize("name", [n for n in ("WanTransformer3DModel", "FluxTransformer2DModel") if n in INSTALLED])
def test_w8a8_on_the_blocks_linear_layers_stacks_with_the_block_cache(name):
    model, inputs = build(name)
    site = DiTSite(model)
    layers = site.quant_layers()
    assert layers and all(isinstance(m, nn.Linear) for m in layers.values())
    inside = {id(m) for b in site.blocks for m in b.modules()}
    assert all(id(m) in inside for m in layers.values())
    plain = run(model, inputs, LEVELS[:4])
    plan = calibrate_quant(QuantConfig(), model, layers, site.read_level, lambda: run(model, inputs, LEVELS[:4]))
    handles = REGISTRY.apply(site, [BlockCacheConfig(cache_interval=2), plan])
    quantized = run(model, inputs, LEVELS[:4])
    assert handles[1].stats.quantized_layers == len(layers)
    assert handles[1].stats.backend.startswith("int8" if int8_available() else "simulated")
    for k in (0, 2):  # full steps: only the quantization error, small against the output's magnitude
        error = (quantized[k] - plain[k]).abs().max() / plain[k].abs().max()
        assert 0 < error < 0.1
    applied_to(model).remove_all()
    assert untouched(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs, LEVELS[:4]), plain, strict=True))


@pytest.mark.parametrize("name", INSTALLED)
def test_step_rehash_skips_whole_calls_and_removal_restores_the_model(name):
    """Threshold 10 (any step after the first two may be skipped, never two in a row): a skipped call runs no
    block at all and answers with the last output; removing it gives the uncached outputs bit for bit."""
    model, inputs = build(name)
    plain = run(model, inputs)
    work = BlockWork(DiTSite(model).blocks)
    run(model, inputs)
    per_run = work.calls
    handle = apply_technique(model, StepRehashConfig(threshold=10.0, max_skips=1))
    rehashed = run(model, inputs)
    calls = work.calls - per_run
    work.remove()
    assert handle.stats.pattern == "FF.F.F", handle.stats.pattern
    assert (handle.stats.computed_calls, handle.stats.skipped_calls) == (4, 2)
    assert calls * len(LEVELS) == per_run * 4  # the block work of 4 calls out of 6
    assert [torch.equal(a, b) for a, b in zip(rehashed, plain, strict=True)] == [True, True, False, True, False, True]
    for k in (2, 4):  # a skipped step answers with the step before it
        assert torch.equal(rehashed[k], rehashed[k - 1])
    handle.remove()
    assert untouched(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs), plain, strict=True))


def widest_feed_forward_output(site, model, inputs) -> tuple[int, list[torch.Tensor]]:
    """The largest tensor any feed-forward's first Linear produced in one run (its hidden layer), and the run."""
    widest = [0]
    hooks = []
    for group in site.operator_groups("spatial", cache_inside=False):
        first = next(m for m in group.module.modules() if isinstance(m, nn.Linear))
        hooks.append(first.register_forward_hook(lambda _m, _a, out: widest.append(max(widest.pop(), out.numel()))))
    try:
        outputs = run(model, inputs, LEVELS[:2])
    finally:
        for hook in hooks:
            hook.remove()
    return widest[0], outputs


@pytest.mark.parametrize("name", INSTALLED)
def test_token_slicing_gives_the_same_output_and_cuts_the_feed_forward_peak(name, close_reassociated):
    model, inputs = build(name)
    site = DiTSite(model)
    whole, plain = widest_feed_forward_output(site, model, inputs)
    handle = apply_technique(model, SlicingConfig("spatial", 4, vae=False))
    cut, sliced = widest_feed_forward_output(site, model, inputs)
    # every call cut in up to 4 slices (a text stream of 5 tokens runs as slices of 2, 2 and 1)
    assert 0 < handle.stats.group_calls < handle.stats.slice_calls <= 4 * handle.stats.group_calls
    assert cut * 3 <= whole, (cut, whole)  # a quarter of the tokens at a time (rounded up per slice)
    for a, b in zip(sliced, plain, strict=True):  # the same sums, cut at other token boundaries
        close_reassociated(a, b)
    handle.remove()
    assert untouched(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs, LEVELS[:2]), plain, strict=True))


def test_the_batch_axis_is_refused_on_a_dit_naming_the_token_axis():
    model, _ = build("WanTransformer3DModel")
    with pytest.raises(ValueError, match="sliced over its tokens"):
        apply_technique(model, SlicingConfig("batch", 2, vae=False))
    assert untouched(model)


def span_calls_per_step(model, inputs, site: DiTSite) -> tuple[list[torch.Tensor], list[int]]:
    """One call per noise level of LEVELS: the outputs, and how many calls the default span's blocks ran on each."""
    first, stop = site.default_span()
    inside = BlockWork(site.blocks[first:stop])
    outputs, per_step = [], []
    with torch.no_grad():
        for level in LEVELS:
            before = inside.calls
            outputs.append(output(model, inputs(level, [1])))
            per_step.append(inside.calls - before)
    inside.remove()
    return outputs, per_step


def cachequant_plan(name, model, inputs, **config):
    """CacheQuant calibrated on one generation of `name` (its own seed) over the default block span."""
    site = DiTSite(model)
    span = site.default_span()
    calibration = Calibration([lambda: run(model, inputs, seeds=(3,))], len(LEVELS), name, "test levels")
    return calibrate_cachequant(CacheQuantConfig(full_steps=3, blocks=span, **config), site.span_cache_site(span),
                                calibration)


@pytest.mark.parametrize("name", INSTALLED)
def test_cachequant_on_the_block_span_skips_it_on_cached_steps_and_quantizes_the_blocks(name):
    model, inputs = build(name)
    plain = run(model, inputs)
    plan = cachequant_plan(name, model, inputs)
    schedule = plan.schedule
    assert schedule.k == 3 and schedule.full_steps[0] and schedule.cost <= schedule.uniform_cost
    # the cache correction is a least-squares fit of the fresh residual on the reused one: it never adds error
    assert plan.cache_correction.error_after < plan.cache_correction.error_before
    site = DiTSite(model)
    handle = apply_technique(model, plan)
    out, per_step = span_calls_per_step(model, inputs, site)
    assert [calls > 0 for calls in per_step] == list(schedule.full_steps)  # the span runs on full steps only
    assert (handle.stats.full_calls, handle.stats.cached_calls) == (3, 3)
    assert handle.core.quantizer.stats.quantized_layers == len(site.quant_layers())
    k = schedule.full_steps.index(True, 1)  # the second full step: only quantization error, after a cached one
    error = float((out[0] - plain[0]).abs().max() / plain[0].abs().max())
    assert 0 < error < 0.1, error
    assert all(torch.isfinite(o).all() for o in out) and not torch.equal(out[k], plain[k])
    handle.remove()
    assert untouched(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs), plain, strict=True))


def test_cachequant_corrections_are_decoupled_switches_on_a_dit():
    """Cache only (no quantization): the cache correction changes exactly the cached steps; a plan for a
    U-Net's skip branch is refused on a DiT, naming what the DiT lacks."""
    name = INSTALLED[0]
    model, inputs = build(name)
    plan = cachequant_plan(name, model, inputs, quant=None)
    outputs = {}
    for correct in (True, False):
        handle = apply_technique(model, plan.variant(correct_cache=correct, correct_quant=False))
        outputs[correct] = run(model, inputs)
        handle.remove()
    for k, full in enumerate(plan.schedule.full_steps):
        assert torch.equal(outputs[True][k], outputs[False][k]) == full, k
    with pytest.raises(TypeError, match="skip branches"):
        apply_technique(model, replace(plan, config=replace(plan.config, blocks=None)))
    assert untouched(model)


@pytest.mark.parametrize("name", [n for n in ("FluxTransformer2DModel", "WanTransformer3DModel") if n in INSTALLED])
def test_the_fitted_forecast_skips_the_span_and_reports_transformer_calls(name):
    """The fitted mode through the diffusers adapter: weights for a F.F..F schedule (as `fit_forecast` makes
    them), no span work on cached steps, the report names transformer calls, removal restores the model."""
    model, inputs = build(name)
    plain = run(model, inputs)
    schedule = (True, False, True, False, False, True)
    weights = ((), (1.0,), (), (0.4, 0.6), (0.3, 0.7), ())
    handle = apply_technique(model, BlockCacheConfig(schedule="calibrated", full_steps_override=schedule,
                                                     mode="fitted", weights=weights))
    cached, per_call = span_calls_per_step(model, inputs, DiTSite(model))
    assert [calls > 0 for calls in per_call] == list(schedule)
    assert (handle.stats.full_calls, handle.stats.cached_calls, handle.stats.forecast_calls) == (3, 3, 3)
    for k in (0, 2, 5):
        assert torch.equal(cached[k], plain[k])
    line, numbers = handle.report(1.0)
    assert line.startswith("Block cache: 3 full / 3 cached transformer calls (3 forecast)"), line
    assert numbers["forecast_calls"] == 3
    handle.remove()
    assert untouched(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs), plain, strict=True))
