"""Where the quantizer's layers and the slicer's operator groups are in ComfyUI's `openaimodel.UNetModel` (and,
for a `comfy.ldm` DiT, in its blocks: the Linears of its blocks, its feed-forwards over tokens, `dit_blocks`).

Nothing here applies anything (that is `comfy_unet`, through the technique registry).

- Quantized layers: every Linear/Conv2d (ComfyUI's op classes subclass torch's) except the first and
  last convolutions and the timestep/class embeddings, which are tiny, run once per call and carry the
  signal the rest depends on — the same choice as the diffusers map (`diffusers_unet.quant_layers`).
- Operator groups (batch axis): every layer of `input_blocks`, `middle_block` and `output_blocks`, the
  units ComfyUI runs one by one (`forward_timestep_embed`). Every operator in them works per sample, so a
  slice of the batch (CFG halves, images of a batch) computes exactly its rows. Why layers and not the
  whole call: ComfyUI runs its `DIFFUSION_MODEL` wrappers inside `UNetModel.forward`, so slicing the whole
  call would run every wrapper once per slice; and at layer granularity every module DeepCache names is a
  group, so a cache always sits outside a sliced group. Layers that mix video frames are left whole.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

from torch import nn

from ..accel.slicing import OperatorGroup, SliceAxis
from .comfy_dit import layout_of
from .dit_blocks import token_groups

SKIPPED_PREFIXES = ("input_blocks.0.0", "out.", "time_embed.", "label_emb.")
_MIXES_FRAMES = re.compile(r"Video|Temporal|3D")


def quant_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The Linear/Conv2d layers a quantizer replaces, by qualified name (a DiT's: the Linears of its blocks)."""
    layout = layout_of(unet)
    if layout is not None:
        return layout.linear_layers()
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d) and not name.startswith(SKIPPED_PREFIXES)}


def operator_groups(unet: nn.Module, axis: SliceAxis) -> list[OperatorGroup]:
    """The batch-axis operator groups of a ComfyUI U-Net (its blocks' layers); a DiT's feed-forwards over tokens."""
    layout = layout_of(unet)
    if layout is not None:
        return token_groups(layout, axis)
    if axis != "batch":
        raise ValueError(f"a ComfyUI MODEL is sliced along the batch axis only, got axis {axis!r}")
    blocks = [*getattr(unet, "input_blocks", ()), getattr(unet, "middle_block", None),
              *getattr(unet, "output_blocks", ())]
    if any(block is None for block in blocks) or not blocks[1:-1]:
        raise TypeError(f"{type(unet).__name__} has no input/middle/output blocks: slicing a ComfyUI MODEL needs a "
                        "U-Net of the SD1.x/SD2.x/SDXL family (openaimodel.UNetModel)")
    return [OperatorGroup(layer, 0) for block in blocks for layer in block
            if not any(_MIXES_FRAMES.search(type(m).__name__) for m in layer.modules())]


def weights_version(patcher: Any) -> Hashable | None:
    """A token for the state of the weights ComfyUI loaded for `patcher` (what a fingerprint may be remembered by).

    ComfyUI records on the model which patch set is merged into its weights (`current_weight_patches_uuid`:
    a LoRA added, removed or re-weighted makes a new one; None while no patcher has loaded the model) and
    how many layers it patches on the fly in low-VRAM mode (`lowvram_patch_counter`, which changes as
    layers move between merged and on-the-fly patching). None: the state is unknown, hash every time.
    """
    model = patcher.model
    merged = getattr(model, "current_weight_patches_uuid", None)
    if merged is None:
        return None
    return merged, bool(getattr(model, "model_lowvram", False)), getattr(model, "lowvram_patch_counter", 0)
