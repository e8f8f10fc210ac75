"""Inner Loop Feedback on ComfyUI's `MODEL`: the one ILF core (`accel.ilf`) through the MODEL lane's wrappers.

Applying is the MODEL lane's (`comfy_unet.apply_technique`): a patched clone whose sampling runs apply the
ILF config through the technique registry with every other LiveCache technique on the MODEL, so its stacking
rules hold (one feature cache: ILF or DeepCache or the block cache, not two; no quantization under ILF's float
module). Where the module attaches is the run site's (`ComfyRunSite.feedback_point`): a U-Net's deep layers
below a skip branch, or a DiT's cached span of single-stream blocks (Flux's single blocks, Wan, Lumina 2 /
Z-Image); a span whose blocks carry two streams (SD3, Qwen-Image, Flux's double blocks) is refused, naming it.

The fingerprint a module is tied to is that of the diffusion model's weights *as ComfyUI computes with them*:
loaded for sampling, every weight patch merged (a LoRA included), hashed once per patch set
(`comfy_cachequant.fingerprint_of`). So a module trained on a bare checkpoint is refused on that checkpoint
with a LoRA, naming both fingerprints (train one on the MODEL with the LoRA); the node checks it when it
runs, and each sampling run checks it again on the weights loaded for that run (a LoRA added after the node).

`training_site` is the MODEL's diffusion model as the ILF trainer calls it (`train.ilf.comfy_teacher`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from ..accel.ilf import ILFConfig
from ..accel.site import Site
from .comfy_cachequant import fingerprint_of
from .comfy_dit import layout_of, supported
from .comfy_unet import ComfyRunSite, TechniqueSession, apply_technique


def check_ilf(model: Any, config: ILFConfig) -> None:
    """Refuse, before anything runs, a MODEL ILF cannot attach to or a module trained for another model."""
    diffusion_model = model.get_model_object("diffusion_model")
    if layout_of(diffusion_model) is None and getattr(diffusion_model, "input_blocks", None) is None:
        raise TypeError(f"ILF does not support this MODEL's diffusion model {type(diffusion_model).__name__}: it "
                        "needs a U-Net (openaimodel.UNetModel: SD1.x/SD2.x/SDXL) or a DiT of "
                        f"{supported()}")
    where = config.module.where if config.module is not None else config.where
    ComfyRunSite(diffusion_model, 1).feedback_point(where)  # a point this model lacks fails here, naming it
    if config.module is not None:
        config.module.check(fingerprint_of(model))


def apply_ilf(model: Any, config: ILFConfig, on_finish: Callable[[TechniqueSession], None] | None = None) -> Any:
    """A clone of ComfyUI `model` whose sampling runs correct their cached steps with `config`'s module; `model`
    itself is left untouched. Checked now (`check_ilf`) and again on the weights each run loads."""
    check_ilf(model, config)
    return apply_technique(model, config, on_finish)


class ComfyTrainingSite(ComfyRunSite):
    """A ComfyUI diffusion model called directly, as the ILF trainer replays recorded calls: each call of the
    module is one model call (announced by forward hooks, `Site`'s default, as no sampler wrapper runs), and the
    trainer starts each generation itself (no sampling run announces one)."""

    watch_calls = Site.watch_calls
    wrap_calls = Site.wrap_calls
    watch_generations = Site.watch_generations


def training_site(model: Any) -> ComfyTrainingSite:
    """`model`'s diffusion model loaded as ComfyUI loads it for sampling (weight patches merged): what a module
    is trained on, and so what its fingerprint is of."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    return ComfyTrainingSite(model.get_model_object("diffusion_model"), 1)



def student_of(site: ComfyTrainingSite) -> Callable[[], ComfyTrainingSite] | None:
    """What the trainer trains on when `site`'s weights were made under inference mode (ComfyUI's executor loads
    models in it, and autograd may not save such tensors): a copy of the diffusion model, made outside it — the
    same values, names and so fingerprint, for as long as training runs (it costs one more copy of the weights).
    None: the weights serve as they are."""
    if not any(p.is_inference() for p in site.root.parameters()):
        return None
    return lambda: ComfyTrainingSite(copy.deepcopy(site.root), 1)
