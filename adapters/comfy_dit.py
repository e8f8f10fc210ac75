"""ComfyUI's diffusion transformers (`comfy.ldm` DiTs inside a `MODEL`): where their blocks are.

ComfyUI's DiT forwards loop over their block lists and call each block with the token streams as
positional or keyword arguments (`block(img=img, txt=txt, ...)`, `block(x, e=e0, ...)`), so the block
layout is the same kind of table as the diffusers one (`dit_blocks.Stage`), by the class names
ComfyUI 0.3.75 gives them (subclasses such as VACE or S2V Wan run the same blocks and match too).
The noise level of a call is the sigma ComfyUI's sampler puts in `transformer_options`, read by the
MODEL lane (`comfy_unet.read_sigma`) for every family alike; the sampling-run plumbing (wrappers,
pre-run, one site per run) is the U-Net lane's, which asks `layout_of` whether a model is a DiT.

Every model is left as it is: nothing here changes a module, it only says where things are.
Any other model gets one error naming its class and the supported families (`family_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .dit_blocks import BlockLayout, Stage


@dataclass(frozen=True)
class ComfyFamily:
    """One `comfy.ldm` DiT class as a block cache sees it."""

    name: str
    stages: tuple[Stage, ...]
    # whether the class runs ComfyUI's DIFFUSION_MODEL wrappers around its forward (most comfy.ldm DiTs do);
    # for one that does not, the MODEL lane wraps each call one level out, at APPLY_MODEL (`call_wrapper`)
    runs_diffusion_wrappers: bool = True


FAMILIES: dict[str, ComfyFamily] = {
    # double-stream blocks: block(img=, txt=, ...) -> (img, txt); then one stream, cat(txt, img): not joined
    "Flux": ComfyFamily("Flux / Flux 2", (Stage("double_blocks", ("img", "txt"), (0, 1),
                                                feed_forwards=("img_mlp", "txt_mlp")),
                                          Stage("single_blocks", ("x",), None))),
    # SD3 / SD3.5: JointBlock.forward(*args, **kwargs), called as block(context, x, c=...) -> (context, x); the
    # last block's context half is pre-only (it returns None for the text), so it always runs anyway. By SD3's
    # class, not its base `MMDiT`: AuraFlow's unrelated model is called `MMDiT` too
    "OpenAISignatureMMDITWrapper": ComfyFamily(
        "SD3 / SD3.5", (Stage("joint_blocks", ("context", "x"), (0, 1), positions=(0, 1),
                                      feed_forwards=("x_block.mlp", "context_block.mlp")),),
        runs_diffusion_wrappers=False),
    "WanModel": ComfyFamily("Wan", (Stage("blocks", ("x",), None, feed_forwards=("ffn",)),)),
    # block(hidden_states=, encoder_hidden_states=, ...) -> (encoder_hidden_states, hidden_states)
    "QwenImageTransformer2DModel": ComfyFamily(
        "Qwen-Image", (Stage("transformer_blocks", ("hidden_states", "encoder_hidden_states"), (1, 0),
                             feed_forwards=("img_mlp", "txt_mlp")),)),
    # the main layers only: the noise and caption refiners before them carry other streams
    "NextDiT": ComfyFamily("Lumina 2 / Z-Image", (Stage("layers", ("x",), None, feed_forwards=("feed_forward",)),)),
}


def supported() -> str:
    return ", ".join(f"{cls} ({family.name})" for cls, family in FAMILIES.items())


def family_of(diffusion_model: nn.Module) -> ComfyFamily:
    """The family of a MODEL's diffusion model (its class or a base class by name), or a TypeError naming both."""
    found = _lookup(diffusion_model)
    if found is None:
        raise TypeError(f"the block cache does not support this MODEL's diffusion model "
                        f"{type(diffusion_model).__name__}; supported comfy.ldm classes: {supported()}")
    return found


def layout_of(diffusion_model: nn.Module) -> BlockLayout | None:
    """The block layout of a supported DiT; None for any other model (a U-Net, which the U-Net site describes)."""
    family = _lookup(diffusion_model)
    return None if family is None else BlockLayout(diffusion_model, family.name, family.stages)


def call_wrapper(diffusion_model: nn.Module) -> str:
    """Which `comfy.patcher_extension.WrappersMP` kind sees every call of this diffusion model: DIFFUSION_MODEL
    (its own forward runs it: U-Nets and most DiTs), else APPLY_MODEL (the model's `apply_model`, which every
    ComfyUI model runs; its calls take the sigma and return the denoised latent, one call per model call)."""
    family = _lookup(diffusion_model)
    return "apply_model" if family is not None and not family.runs_diffusion_wrappers else "diffusion_model"


def check_span(diffusion_model: nn.Module, span: tuple[int, int] | None) -> tuple[int, int]:
    """The span a block cache would cover on this model (`span`, or the family's default), checked now."""
    family = family_of(diffusion_model)
    layout = BlockLayout(diffusion_model, family.name, family.stages)
    chosen = layout.default_span() if span is None else span
    layout.block_span(chosen)
    return chosen


def _lookup(diffusion_model: nn.Module) -> ComfyFamily | None:
    for cls in type(diffusion_model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return None
