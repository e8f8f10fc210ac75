"""Step rehash, W8A8/DGQ and token slicing on ComfyUI's own DiT MODELs, alone and stacked with the block cache,
through ComfyUI's sampling code with the samplers users pick (Euler, DPM++ 2M, LCM, res_multistep).

Real ComfyUI 0.3.75; each model is a tiny random instance of ComfyUI's own class (`tiny_dits`).
"""

# ruff: noqa: F811  (the tests take the shared fixtures imported from test_comfy_dit as arguments)
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from livecache.accel.block_cache import BlockCacheConfig
from livecache.accel.registry import applied_to
from livecache.accel.techniques import REGISTRY
from livecache.adapters.comfy_dit import layout_of
from livecache.adapters.comfy_unet import ComfyRunSite
from livecache.bench.comfy_workloads import sd15_model
from livecache.nodes.comfy_dit_nodes import TokenSlicingModel
from livecache.nodes.comfy_model_nodes import QuantizeModel
from livecache.nodes.comfy_nodes import StepRehashModel

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the helpers sit beside them
from test_comfy_dit import STEPS, block_cache, family, model, run, uncached, untouched  # noqa: E402, F401 (fixtures)
from tiny_dits import conditioning, latent  # noqa: E402


def relative_error(out: torch.Tensor, base: torch.Tensor) -> float:
    return float((out - base).abs().max() / base.abs().max())


def still_the_same(model, family, uncached) -> None:
    """The input MODEL samples exactly as before: nothing of a technique stays behind."""
    again, counts = run(model, family)
    assert torch.equal(again, uncached[0]) and counts == uncached[1] and untouched(model)


def test_step_rehash_skips_whole_calls(model, family, uncached):
    out, counts = run(StepRehashModel().apply(model, 10.0, 1, "reuse")[0], family)
    base, base_counts = uncached
    # the threshold lets any step after the warm-up be skipped, never two in a row; a skipped call runs no block
    assert len(set(counts)) == 1 and STEPS // 2 <= counts[0] < STEPS, counts
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    still_the_same(model, family, uncached)


def test_clones_of_one_model_keep_their_own_techniques(model, family, uncached):
    """Two differently-configured clones of one MODEL (one chained from the other), sampled alternately: each
    run does what its own clone asks, whatever the run before it applied to the shared diffusion model."""
    layout = layout_of(model.get_model_object("diffusion_model"))
    first, stop = layout.default_span()
    cached = block_cache(model, 2)
    rehashed = StepRehashModel().apply(block_cache(cached, 4), 10.0, 1, "reuse")[0]  # interval 4 replaces 2
    outputs: dict[str, list[torch.Tensor]] = {"cached": [], "rehashed": []}
    for name in ("cached", "rehashed", "cached", "rehashed"):
        out, counts = run(cached if name == "cached" else rehashed, family)
        outputs[name].append(out)
        in_span = [c for i, c in enumerate(counts) if first <= i < stop]
        outside = [c for i, c in enumerate(counts) if not first <= i < stop]
        if name == "cached":
            assert in_span == [STEPS // 2] * len(in_span) and outside == [STEPS] * len(outside), counts
        else:  # rehash skips whole calls (fewer than all steps everywhere); the span runs on 1 step in 4 of those
            assert len(set(outside)) == 1 and STEPS // 2 <= outside[0] < STEPS, counts
            assert set(in_span) == {-(-outside[0] // 4)}, counts
    for runs in outputs.values():
        assert torch.equal(runs[0], runs[1])
    assert not torch.equal(outputs["cached"][0], outputs["rehashed"][0])
    still_the_same(model, family, uncached)


@pytest.mark.parametrize("method", ["w8a8", "dgq"])
def test_quantization_of_the_blocks_linears(model, family, uncached, method):
    layers = layout_of(model.get_model_object("diffusion_model")).linear_layers()
    assert layers and all(isinstance(m, torch.nn.Linear) for m in layers.values())
    out, counts = run(QuantizeModel().apply(model, method, 8, 8)[0], family)
    base, base_counts = uncached
    assert counts == base_counts and torch.isfinite(out).all() and not torch.equal(out, base)
    assert relative_error(out, base) < 0.2, relative_error(out, base)
    still_the_same(model, family, uncached)


def widest_feed_forward_activation(model, family, sliced) -> int:
    """The largest tensor any feed-forward's first Linear produced in one sampling run (its hidden layer)."""
    layout = layout_of(model.get_model_object("diffusion_model"))
    widest = [0]
    hooks = []
    for group in layout.token_groups():
        first = next(m for m in group.module.modules() if isinstance(m, torch.nn.Linear))
        hooks.append(first.register_forward_hook(lambda _m, _a, out: widest.append(max(widest.pop(), out.numel()))))
    try:
        out, _ = run(sliced, family)
    finally:
        for hook in hooks:
            hook.remove()
    return widest[0], out


def test_token_slicing_is_exact_and_cuts_the_feed_forward_peak(model, family, uncached):
    whole, base = widest_feed_forward_activation(model, family, model)
    cut, out = widest_feed_forward_activation(model, family, TokenSlicingModel().apply(model, 4)[0])
    assert cut * 3 <= whole, (cut, whole)  # a quarter of the tokens at a time (rounded up per slice)
    scale = float(base.abs().max())
    assert torch.allclose(out, base, atol=1e-5 * scale, rtol=0), float((out - base).abs().max())
    still_the_same(model, family, uncached)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "lcm", "res_multistep"])
def test_comfyuis_samplers_run_the_stack(model, family, uncached, sampler):
    """Block cache + W8A8 + token slicing + step rehash (reuse), chained in any order, on each sampler."""
    stacked = TokenSlicingModel().apply(QuantizeModel().apply(block_cache(model, 2), "w8a8", 8, 8)[0], 2)[0]
    stacked = StepRehashModel().apply(stacked, 0.0, 1, "reuse")[0]  # threshold 0: computes every step
    base, base_counts = run(model, family, sampler=sampler)
    out, counts = run(stacked, family, sampler=sampler)
    first, stop = layout_of(model.get_model_object("diffusion_model")).default_span()
    assert counts == [STEPS // 2 if first <= i < stop else STEPS for i in range(len(counts))], counts
    assert torch.isfinite(out).all() and relative_error(out, base) < 0.3, relative_error(out, base)
    still_the_same(model, family, uncached)


def test_cfg_halves_in_one_batch_never_mix(model, family):
    """A batch of two prompts, full then cached: each row equals that prompt sampled alone."""
    texts = [conditioning(family, seed)[0] for seed in (1, 2)]
    x = torch.randn((2, *latent(family).shape[1:]), generator=torch.Generator().manual_seed(4))
    diffusion_model = model.model.diffusion_model

    def conds_of(rows: list[int]) -> tuple[torch.Tensor, dict]:
        parts = [model.model.extra_conds(cross_attn=texts[r][0], noise=x[r:r + 1], **texts[r][1]) for r in rows]
        merged = {k: parts[0][k].concat([p[k] for p in parts[1:]]) for k in parts[0]}  # as ComfyUI batches them
        return merged.pop("c_crossattn"), merged

    def two_calls(rows: list[int]) -> torch.Tensor:
        site = ComfyRunSite(diffusion_model, 2)
        REGISTRY.apply(site, [BlockCacheConfig(cache_interval=2)])
        context, conds = conds_of(rows)
        try:
            outs = []
            for level in (1.0, 0.8):
                options = {"sigmas": torch.tensor([level])}
                t = torch.full((len(rows),), level)
                outs.append(site.around_call(
                    lambda t=t, o=options: diffusion_model(x[rows], t, context, transformer_options=o, **conds),
                    level, (x[rows], t), {}))
            return outs[1]  # the cached call
        finally:
            applied_to(site.holder).remove_all()

    with torch.inference_mode():
        both, alone = two_calls([0, 1]), torch.cat([two_calls([0]), two_calls([1])])
    scale = float(alone.abs().max())
    assert torch.allclose(both, alone, atol=1e-4 * scale, rtol=0), float((both - alone).abs().max())
    assert untouched(model)


def test_a_u_net_is_refused_by_the_dit_nodes_naming_its_class_and_the_families():
    unet = sd15_model(model_channels=32, context_dim=64, num_heads=2)
    with pytest.raises(TypeError, match=r"UNetModel.*Flux.*OpenAISignatureMMDITWrapper.*WanModel"):
        TokenSlicingModel().apply(unet, 4)
