"""The block cache on ComfyUI's own DiT MODELs (comfy.ldm Flux, ...), sampled by ComfyUI's KSampler path.

Real ComfyUI 0.3.75; each model is a tiny random instance of ComfyUI's own class (`tiny_dits`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from livecache.adapters.comfy_dit import layout_of
from livecache.bench.comfy_workloads import sd15_model
from livecache.nodes.comfy_dit_nodes import BlockCacheModel

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the builder sits beside them
from tiny_dits import FAMILIES, conditioning, latent, tiny_dit  # noqa: E402

STEPS = 8


class BlockCalls:
    """How many times each transformer block really ran (a hook on its first Linear: a cached block skips it)."""

    def __init__(self, model) -> None:
        layout = layout_of(model.get_model_object("diffusion_model"))
        assert layout is not None
        self.counts = [0] * len(layout.blocks)
        self._hooks = []
        for index, block in enumerate(layout.blocks):
            first = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
            self._hooks.append(first.register_forward_hook(lambda *_, i=index: self._bump(i)))

    def _bump(self, index: int) -> None:
        self.counts[index] += 1

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def run(model, family: str, cfg: float = 2.0, sampler: str = "euler"):
    """Sample once with ComfyUI's KSampler path; returns the latent and the per-block call counts."""
    import comfy.sample

    counter = BlockCalls(model)
    try:
        with torch.inference_mode():
            empty = latent(family)
            noise = comfy.sample.prepare_noise(empty, 3)
            out = comfy.sample.sample(model, noise, STEPS, cfg, sampler, "simple", conditioning(family, 1),
                                      conditioning(family, 2), empty, seed=3, disable_pbar=True)
    finally:
        counter.close()
    return out, counter.counts


def block_cache(model, interval: int, mode: str = "reuse", order: int = 1, start: int = 0, stop: int = 0):
    return BlockCacheModel().apply(model, interval, start, stop, mode, order)[0]


def untouched(model) -> bool:
    return all("forward" not in m.__dict__ for m in model.get_model_object("diffusion_model").modules())


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_dit(family)


@pytest.fixture(scope="module")
def uncached(model, family):
    out, counts = run(model, family)
    assert torch.isfinite(out).all(), f"the tiny {family} MODEL samples non-finite values uncached"
    return out, counts


def test_the_tiny_model_is_all_seeded(model, family):
    """Every saved tensor of the tiny MODEL comes from the seed, none from uninitialised memory (which made
    later tests' outcomes hang on what earlier ones freed): a second build, with memory churned first, equals it."""
    churn = [torch.full((1 << 16,), float("nan")) for _ in range(64)]
    del churn
    again = tiny_dit(family).model.diffusion_model.state_dict()
    first = model.model.diffusion_model.state_dict()
    assert again.keys() == first.keys()
    assert [k for k in first if not torch.equal(first[k], again[k])] == []


def test_interval_one_equals_uncached_exactly(model, family, uncached):
    out, counts = run(block_cache(model, 1), family)
    assert torch.equal(out, uncached[0]) and counts == uncached[1]


@pytest.mark.parametrize("mode,order", [("reuse", 1), ("forecast", 1), ("forecast", 2)])
def test_cached_steps_skip_the_span(model, family, uncached, mode, order):
    layout = layout_of(model.get_model_object("diffusion_model"))
    first, stop = layout.default_span()
    base, base_counts = uncached
    assert base_counts == [STEPS] * len(layout.blocks)  # CFG: cond and uncond batched, one call per step

    out, counts = run(block_cache(model, 2, mode, order), family)
    expected = [STEPS // 2 if first <= i < stop else STEPS for i in range(len(layout.blocks))]
    assert counts == expected
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    error = float((out - base).abs().max() / base.abs().max())
    assert error < 0.1, error  # 0.4-2.5 % of the output's peak measured (Flux, Wan, Qwen-Image, Lumina 2)

    again, again_counts = run(model, family)  # the input MODEL is unchanged
    assert torch.equal(again, base) and again_counts == base_counts and untouched(model)


def test_the_fitted_forecast_from_a_connected_schedule_skips_the_span(model, family, uncached):
    """Mode 'fitted' takes its full steps and weights from a calibrated schedule (here one built in the test,
    as `calibrated_schedule` would write it): the span runs on the schedule's full steps only."""
    from livecache.accel.cache_schedule import CalibratedSchedule

    layout = layout_of(model.get_model_object("diffusion_model"))
    first, stop = layout.default_span()
    full = tuple(k % 2 == 0 for k in range(STEPS))
    weights = tuple(() if f else ((1.0,) if k < 2 else (0.3, 0.7)) for k, f in enumerate(full))
    schedule = CalibratedSchedule("f" * 16, "tiny", STEPS, "simple", full, ((0.0,) * STEPS,) * STEPS, 1.0, 1.0,
                                  forecast=weights)
    out, counts = run(BlockCacheModel().apply(model, 3, 0, 0, "fitted", 1, schedule)[0], family)
    assert counts == [STEPS // 2 if first <= i < stop else STEPS for i in range(len(layout.blocks))]
    error = float((out - uncached[0]).abs().max() / uncached[0].abs().max())
    assert torch.isfinite(out).all() and not torch.equal(out, uncached[0]) and error < 0.1, error
    assert untouched(model)


def test_a_chosen_span_and_a_bad_one(model, family, uncached):
    layout = layout_of(model.get_model_object("diffusion_model"))
    first, stop = layout.default_span()
    _, counts = run(block_cache(model, 2, start=first, stop=first + 1), family)
    assert counts == [STEPS // 2 if i == first else STEPS for i in range(len(layout.blocks))]
    with pytest.raises(ValueError, match="first and last always run"):
        block_cache(model, 2, start=first, stop=len(layout.blocks))


def test_lora_from_comfyuis_loader_takes_effect(model, family, uncached):
    import comfy.sd

    generator = torch.Generator().manual_seed(5)
    lora = {}
    for name, module in model.get_model_object("diffusion_model").named_modules():
        if isinstance(module, torch.nn.Linear) and ".0." in name:  # every Linear of each stage's first block
            key = "lora_unet_" + name.replace(".", "_")
            lora[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
            lora[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert len(with_lora.patches) == len(lora) // 2
    reference, _ = run(with_lora, family)
    assert not torch.equal(reference, uncached[0])
    # LoRA before the block cache and after it: both sample the LoRA's weights
    after, _ = run(comfy.sd.load_lora_for_models(block_cache(model, 1), None, lora, 1.0, 0.0)[0], family)
    before, _ = run(block_cache(with_lora, 1), family)
    assert torch.equal(after, reference) and torch.equal(before, reference)


def test_an_unsupported_model_names_its_class_and_the_families():
    unet = sd15_model(model_channels=32, context_dim=64, num_heads=2)
    with pytest.raises(TypeError, match=r"UNetModel.*Flux.*WanModel"):
        block_cache(unet, 2)


def test_a_cached_call_on_the_full_calls_inputs_reproduces_it(model, family):
    """The kept residual is what the span added, even though ComfyUI's blocks add to their inputs in place."""
    from livecache.accel.block_cache import BlockCacheConfig
    from livecache.accel.registry import applied_to
    from livecache.accel.techniques import REGISTRY
    from livecache.adapters.comfy_unet import ComfyRunSite

    text, extras = conditioning(family, 1)[0]
    x = torch.randn(latent(family).shape, generator=torch.Generator().manual_seed(4))
    conds = {k: v.cond for k, v in model.model.extra_conds(cross_attn=text, noise=x, **extras).items()}
    context = conds.pop("c_crossattn")
    t = torch.tensor([0.5])
    diffusion_model = model.model.diffusion_model

    def call(level: float) -> torch.Tensor:  # one call as ComfyUI's sampler makes it, the same inputs every time
        options = {"sigmas": torch.tensor([level])}
        return site.around_call(lambda: diffusion_model(x, t, context, transformer_options=options, **conds),
                                level, (x, t), {})

    site = ComfyRunSite(diffusion_model, 2)
    handle = REGISTRY.apply(site, [BlockCacheConfig(cache_interval=2)])[0]
    try:
        with torch.inference_mode():
            full, cached = call(1.0), call(0.9)
    finally:
        applied_to(site.holder).remove_all()
    assert (handle.stats.full_calls, handle.stats.cached_calls) == (1, 1)
    scale = float(full.abs().max())
    assert torch.allclose(cached, full, atol=1e-5 * scale, rtol=0), float((cached - full).abs().max())
    assert untouched(model)
