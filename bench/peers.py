"""Peers measured beside our cores, applied exactly as their authors document them.

Each `run_*` takes a workload and the sampler inputs and returns the final sample, or raises
`PeerUnavailable` with the reason that becomes the row's note (not installed, incompatible
with this diffusers, cannot apply to this model).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..models.sampling import make_scheduler, sample
from .workloads import Workload


class PeerUnavailable(RuntimeError):
    """A peer cannot run on this model or in this environment; the message says why."""


def _sample(work: Workload, scheduler) -> torch.Tensor:
    return sample(work.model, scheduler, work.cond, work.uncond, work.noise, work.steps, work.guidance,
                  progress=False)


def run_deepcache_authors(work: Workload, interval: int) -> torch.Tensor:
    """The DeepCache authors' `DeepCacheSDHelper` (PyPI `DeepCache`), branch 0, uniform."""
    try:
        from DeepCache import DeepCacheSDHelper
    except Exception as err:  # ImportError, or its own imports failing against this diffusers
        raise PeerUnavailable(f"DeepCache not importable ({type(err).__name__}: {err}); pip install DeepCache") from err
    scheduler = make_scheduler("ddim", work.model.scheduler_config)
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=work.model.unet, scheduler=scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        return _sample(work, scheduler)
    finally:
        helper.disable()
        # disable() leaves bound methods as instance attributes; drop them so the model is pristine
        for module in work.model.unet.modules():
            module.__dict__.pop("forward", None)


def run_tome(work: Workload, ratio: float = 0.5) -> torch.Tensor:
    """Token Merging for SD (`tomesd`), merging `ratio` of the tokens in the attention blocks."""
    try:
        import tomesd
    except ImportError as err:
        raise PeerUnavailable("tomesd not installed; pip install tomesd") from err
    tomesd.apply_patch(work.model.unet, ratio=ratio)
    try:
        return _sample(work, make_scheduler("ddim", work.model.scheduler_config))
    except Exception as err:
        raise PeerUnavailable(f"tomesd failed on this diffusers U-Net ({type(err).__name__}: {err})") from err
    finally:
        tomesd.remove_patch(work.model.unet)


def run_tgate(work: Workload, gate_step: int) -> torch.Tensor:
    """T-GATE (`tgate`): cross-attention cached after `gate_step`, run through its SD pipeline."""
    try:
        from diffusers import StableDiffusionPipeline
        from tgate import TgateSDLoader
    except Exception as err:
        raise PeerUnavailable(f"tgate not importable ({type(err).__name__}: {err}); pip install tgate") from err
    scheduler = make_scheduler("ddim", work.model.scheduler_config)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=work.model.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe = TgateSDLoader(pipe)
        size = work.noise.shape[-1] * pipe.vae_scale_factor
        out = pipe.tgate(prompt_embeds=work.cond, negative_prompt_embeds=work.uncond, latents=work.noise.clone(),
                         num_inference_steps=work.steps, guidance_scale=work.guidance, gate_step=gate_step,
                         height=size, width=size, output_type="latent")
    except Exception as err:
        raise PeerUnavailable(f"tgate failed on this model ({type(err).__name__}: {err})") from err
    finally:
        for module in work.model.unet.modules():
            module.__dict__.pop("forward", None)
    return out.images
