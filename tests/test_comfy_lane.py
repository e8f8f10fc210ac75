"""The ComfyUI MODEL lane through the registry, on a stand-in for ComfyUI's patcher and wrapper executor.

tests/comfy/ runs the same adapter inside real ComfyUI; this file checks the plumbing where no ComfyUI
checkout exists: a `ModelPatcher`-shaped clone with `OUTER_SAMPLE`/`DIFFUSION_MODEL` wrappers run the way
ComfyUI's `WrapperExecutor` runs them (first added outermost), around an openaimodel-shaped U-Net.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import nn

from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.rehash import StepRehashConfig
from livecache.adapters.comfy_unet import apply_deepcache, apply_step_rehash

STEPS = 6


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    DIFFUSION_MODEL = "diffusion_model"
    APPLY_MODEL = "apply_model"  # the adapter looks for its wrappers at both levels (SD3 is hooked here)


class CallbacksMP:
    ON_PRE_RUN = "on_pre_run"


@pytest.fixture(autouse=True)
def fake_comfy(monkeypatch):
    comfy, extension = ModuleType("comfy"), ModuleType("comfy.patcher_extension")
    extension.WrappersMP = WrappersMP
    extension.CallbacksMP = CallbacksMP
    comfy.patcher_extension = extension
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.patcher_extension", extension)


class Middle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner(x)


class UNetModel(nn.Module):
    """openaimodel's layout: input blocks push skips that the output blocks pop; blocks run layer by layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_blocks = nn.ModuleList(nn.ModuleList([nn.Linear(8, 8)]) for _ in range(3))
        self.middle_block = nn.ModuleList([Middle()])
        self.output_blocks = nn.ModuleList(nn.ModuleList([nn.Linear(8, 8), nn.Tanh()]) for _ in range(3))
        self.deep_calls = 0
        # counted inside the deep layer: a cached layer's override returns without running its own forward
        self.middle_block[0].inner.register_forward_pre_hook(lambda *_: setattr(self, "deep_calls",
                                                                                 self.deep_calls + 1))

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options=None):
        skips = []
        for block in self.input_blocks:
            for layer in block:
                x = layer(x)
            skips.append(x)
        for layer in self.middle_block:
            x = layer(x)
        for block in self.output_blocks:
            x = x + skips.pop()
            for layer in block:
                x = layer(x)
        return x + context.mean() * timesteps.reshape(-1, 1)


class Patcher:
    """What the adapter uses of ComfyUI's ModelPatcher."""

    def __init__(self, unet: nn.Module, wrappers: dict | None = None, callbacks: dict | None = None) -> None:
        self.model = SimpleNamespace(diffusion_model=unet)
        self.wrappers = wrappers or {}
        self.callbacks = callbacks or {}

    def clone(self) -> Patcher:
        copy = lambda d: {k: {n: list(w) for n, w in v.items()} for k, v in d.items()}  # noqa: E731
        return Patcher(self.model.diffusion_model, copy(self.wrappers), copy(self.callbacks))

    def add_callback_with_key(self, kind: str, key: str, callback) -> None:
        self.callbacks.setdefault(kind, {}).setdefault(key, []).append(callback)

    def remove_callbacks_with_key(self, kind: str, key: str) -> None:
        self.callbacks.get(kind, {}).pop(key, None)

    def pre_run(self) -> None:
        """ComfyUI calls this once the model is loaded, before the sampler's first U-Net call."""
        for callbacks in self.callbacks.get(CallbacksMP.ON_PRE_RUN, {}).values():
            for callback in callbacks:
                callback(self)

    def get_model_object(self, name: str) -> nn.Module:
        return self.model.diffusion_model

    def remove_wrappers_with_key(self, kind: str, key: str) -> None:
        self.wrappers.get(kind, {}).pop(key, None)

    def add_wrapper_with_key(self, kind: str, key: str, wrapper) -> None:
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(wrapper)


def run_wrapped(patcher: Patcher, kind: str, inner, *args):
    wrappers = [w for ws in patcher.wrappers.get(kind, {}).values() for w in ws]
    guider = SimpleNamespace(model_patcher=patcher)

    def call(i, *a, **k):
        if i == len(wrappers):
            return inner(*a, **k)
        executor = lambda *a2, **k2: call(i + 1, *a2, **k2)  # noqa: E731
        executor.class_obj = guider
        return wrappers[i](executor, *a, **k)

    return call(0, *args)


@torch.no_grad()
def sample(patcher: Patcher) -> torch.Tensor:
    """Euler-like steps over falling sigmas, CFG batched into one call per step (as ComfyUI's KSampler)."""
    unet = patcher.model.diffusion_model
    context = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))

    def inner(noise, _latent, _sampler, sigmas):
        patcher.pre_run()
        x = noise
        for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
            both = torch.cat([x, x])
            options = {"sigmas": sigma.reshape(1)}
            out = run_wrapped(patcher, WrappersMP.DIFFUSION_MODEL, unet, both, sigma.expand(2), context, None, None,
                              options)
            x = x + (following - sigma) * (out[:1] + 2.0 * (out[1:] - out[:1]))
        return x

    noise = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    return run_wrapped(patcher, WrappersMP.OUTER_SAMPLE, inner, noise, None, None, torch.linspace(1.0, 0.0, STEPS + 1))


def test_deepcache_on_a_model_reuses_deep_layers_and_leaves_the_input_untouched():
    model = Patcher(UNetModel())
    unet = model.model.diffusion_model
    plain = sample(model)
    sessions = []
    patched = apply_deepcache(model, DeepCacheConfig(cache_interval=2), sessions.append)
    unet.deep_calls = 0
    cached = sample(patched)
    assert unet.deep_calls == STEPS // 2 and not torch.equal(cached, plain)
    stats = sessions[0].stats
    assert (stats.full_calls, stats.cached_calls) == (STEPS // 2, STEPS // 2)
    line, numbers = sessions[0].report()
    assert line.startswith("DeepCache: 3 full / 3 cached U-Net calls in ") and numbers["cached_calls"] == 3
    assert torch.equal(sample(model), plain) and not model.wrappers and not model.callbacks
    assert all("forward" not in m.__dict__ for m in unet.modules()) and "_livecache_applied" not in unet.__dict__


def test_rehash_and_deepcache_stack_in_either_order_and_extrapolate_is_refused():
    model = Patcher(UNetModel())
    unet = model.model.diffusion_model
    deepcache, rehash = DeepCacheConfig(cache_interval=2), StepRehashConfig(threshold=10.0)
    for patched in (apply_step_rehash(apply_deepcache(model, deepcache), rehash),
                    apply_deepcache(apply_step_rehash(model, rehash), deepcache)):
        unet.deep_calls = 0
        sample(patched)
        assert 0 < unet.deep_calls < STEPS // 2  # fewer deep passes than DeepCache alone: both techniques ran
    with pytest.raises(ValueError, match="'extrapolate' cannot stack with DeepCache"):
        apply_step_rehash(apply_deepcache(model, deepcache), StepRehashConfig(mode="extrapolate"))
    with pytest.raises(ValueError, match="'extrapolate' cannot stack with DeepCache"):
        apply_deepcache(apply_step_rehash(model, StepRehashConfig(mode="extrapolate")), deepcache)
    again = apply_step_rehash(apply_step_rehash(model, StepRehashConfig(mode="extrapolate")), StepRehashConfig())
    assert list(again.wrappers[WrappersMP.DIFFUSION_MODEL]) == ["livecache"]  # one entry list for all techniques
    (entry,) = again.wrappers[WrappersMP.DIFFUSION_MODEL]["livecache"][0].livecache_entries
    assert entry.config == StepRehashConfig()  # the last node wins


def test_a_run_that_fails_at_its_start_leaves_the_unet_as_it_was():
    model = Patcher(UNetModel())
    sessions = []
    wrong = DeepCacheConfig(schedule="calibrated", full_steps_override=(True, False))  # for 2 steps, not 6
    with pytest.raises(ValueError, match="this calibrated schedule is for 2 steps, but the sampler runs 6"):
        sample(apply_deepcache(model, wrong, sessions.append))
    assert sessions[0].report() is None
    assert all("forward" not in m.__dict__ for m in model.model.diffusion_model.modules())
