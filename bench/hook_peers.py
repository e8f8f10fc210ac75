"""Peers from diffusers' own `diffusers.hooks`, applied to the workload's `UNet2DConditionModel`.

Each runner applies one hook family with the settings its documentation suggests, samples with
the same loop, seeds and inputs as our rows (through the caller's `loop`, which measures it), and
removes the hook through diffusers' own `HookRegistry`. Families that cannot apply to a U-Net
raise `PeerUnavailable` with the reason (most of them look for transformer-block names that a
U-Net does not have), which becomes the row's note: the table says which peers do not apply and
why instead of silently dropping them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..adapters.diffusers_unet import read_timestep
from ..models.sampling import make_scheduler, sample
from .peers import PeerUnavailable
from .workloads import Workload

Loop = Callable[[Callable[[], torch.Tensor]], torch.Tensor]  # runs (and measures) the sampler loop


class _Timestep:
    """The current timestep, for hooks that ask for it through a callback."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.value = 1000
        self.handle = unet.register_forward_pre_hook(
            lambda _m, args, kwargs: setattr(self, "value", int(read_timestep(args, kwargs))), with_kwargs=True)


def _run_with_hook(work: Workload, name: str, apply: Callable[[torch.nn.Module, _Timestep], None],
                   loop: Loop) -> torch.Tensor:
    try:
        from diffusers.hooks import HookRegistry
    except ImportError as err:
        raise PeerUnavailable(f"diffusers.hooks missing ({err})") from err
    unet = work.model.unet
    clock = _Timestep(unet)
    try:
        apply(unet, clock)
        HookRegistry.check_if_exists_or_initialize(unet)
        if not any(m._diffusers_hook.hooks for m in unet.modules() if hasattr(m, "_diffusers_hook")):
            raise PeerUnavailable(f"{name} found no block to hook in a UNet2DConditionModel")
        scheduler = make_scheduler("ddim", work.model.scheduler_config)
        return loop(lambda: sample(work.model, scheduler, work.cond, work.uncond, work.noise, work.steps,
                                   work.guidance, progress=False))
    except PeerUnavailable:
        raise
    except Exception as err:
        raise PeerUnavailable(f"{name} cannot run on this U-Net ({type(err).__name__}: {str(err)[:160]})") from err
    finally:
        clock.handle.remove()
        remove_diffusers_hooks(unet)


def remove_diffusers_hooks(model: torch.nn.Module) -> None:
    """Take every `diffusers.hooks` hook off `model` and its submodules, through diffusers' `HookRegistry`."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for hook_name in list(registry.hooks):
                registry.remove_hook(hook_name, recurse=False)
            del module._diffusers_hook
        module.__dict__.pop("forward", None)  # removal leaves the class forward bound on the instance


def run_pab(work: Workload, loop: Loop) -> torch.Tensor:
    """Pyramid Attention Broadcast: reuse attention outputs inside a timestep window."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def apply(unet: torch.nn.Module, clock: _Timestep) -> None:
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=3,
            spatial_attention_timestep_skip_range=(100, 800), cross_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=("attn1",), cross_attention_block_identifiers=("attn2",),
            current_timestep_callback=lambda: clock.value)
        apply_pyramid_attention_broadcast(unet, config)

    return _run_with_hook(work, "PyramidAttentionBroadcast", apply, loop)


def run_faster_cache(work: Workload, loop: Loop) -> torch.Tensor:
    """FasterCache: attention reuse with frequency-weighted updates plus unconditional-batch skipping."""
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    def apply(unet: torch.nn.Module, clock: _Timestep) -> None:
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
            spatial_attention_block_identifiers=("attn1",), current_timestep_callback=lambda: clock.value,
            attention_weight_callback=lambda _: 0.3, tensor_format="BCHW", is_guidance_distilled=False)
        apply_faster_cache(unet, config)

    return _run_with_hook(work, "FasterCache", apply, loop)


def run_first_block_cache(work: Workload, loop: Loop) -> torch.Tensor:
    """First Block Cache: skip the remaining blocks while the first block's residual barely changes."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return _run_with_hook(work, "FirstBlockCache",
                          lambda unet, _clock: apply_first_block_cache(unet, FirstBlockCacheConfig(threshold=0.2)),
                          loop)


def run_taylorseer(work: Workload, loop: Loop) -> torch.Tensor:
    """TaylorSeer: forecast cached features with a Taylor expansion over steps."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    return _run_with_hook(work, "TaylorSeer",
                          lambda unet, _clock: apply_taylorseer_cache(unet, TaylorSeerCacheConfig(cache_interval=3)),
                          loop)


HOOK_PEERS: dict[str, Callable[[Workload, Loop], torch.Tensor]] = {
    "diffusers PyramidAttentionBroadcast": run_pab,
    "diffusers FasterCache": run_faster_cache,
    "diffusers FirstBlockCache": run_first_block_cache,
    "diffusers TaylorSeer": run_taylorseer,
}
