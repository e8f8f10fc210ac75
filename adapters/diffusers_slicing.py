"""Where the feature slicer's operator groups are in diffusers models (U-Nets, video U-Nets, the VAE).

Batch axis (samples, CFG halves, video frames folded into the batch):
- a U-Net with no layer that mixes frames, and no feature cache inside it: one group, the whole call
  (every operator of a 2D U-Net works per sample), so peak activation memory is one slice's;
- otherwise U-Nets (`UNet2DConditionModel`, and `UNetMotionModel`/AnimateDiff, whose blocks look the same plus
  `motion_modules`): every layer DeepCache's adapter knows — a down/up layer's resnet, its spatial
  attention, a down/upsampler — is one group, and so is the mid block unless it contains temporal
  layers (then its own resnets and attentions are). Any module that mixes frames (a temporal/motion
  layer, a spatio-temporal resnet) is left whole: slicing frames through it would change its result.
  Temporal layers that are transformers over frames (AnimateDiff's motion modules) normalise over
  all positions first, but their transformer blocks then treat every pixel's frame sequence
  independently ([batch·height·width, frames, channels]): those blocks are groups along their dim 0.
  Why layers and not whole blocks: DeepCache may name single layers of a partly-deep block, and a
  cache must never sit *inside* a sliced group; at layer granularity every module a cache can name is
  a group or contains groups, so the two stack in any order of branch ids.
- the VAE decoder: one group, the whole `decoder` (every operator in it is per sample; nothing else
  wraps it), so peak decoder memory is one slice's.

Spatial axis (tokens) in U-Net transformer blocks: each feed-forward (tokens are independent) and each
attention, sliced by *queries* — a self-attention slice gets the full sequence as keys and values, so
every slice computes exactly its rows of the full attention. Attentions that normalise over positions
(group norm, spatial norm) or add a residual are left whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..accel.slicing import FeatureSlicer, OperatorGroup, SlicingConfig
from .diffusers_unet import unet_layers

_TEMPORAL = re.compile(r"Temporal|Motion|3D")


def mixes_frames(module: nn.Module) -> bool:
    """True when `module` or a submodule works across frames (diffusers' temporal/motion/3D layers)."""
    return any(_TEMPORAL.search(type(m).__name__) for m in module.modules())


def unet_groups(unet: nn.Module, axis: str, cache_inside: bool = False) -> list[OperatorGroup]:
    """The operator groups of a diffusers U-Net (2D or AnimateDiff-style video) for `axis`.

    `cache_inside`: a feature cache will override modules inside the U-Net, so no group may contain one.
    """
    if axis == "spatial":
        return _spatial_groups(unet)
    if not cache_inside and not mixes_frames(unet):
        return [OperatorGroup(unet, 0)]
    layers = unet_layers(unet)
    modules = [m for _, layer in layers.down for m in layer]
    if mixes_frames(layers.mid):
        modules += [m for name in ("resnets", "attentions") for m in getattr(layers.mid, name, None) or []]
    else:
        modules.append(layers.mid)
    modules += [m for _, layer in layers.up for m in layer]
    per_pixel = [b for m in unet.modules() if mixes_frames(m) and hasattr(m, "transformer_blocks")
                 for b in m.transformer_blocks if not mixes_frames(b)]
    return [OperatorGroup(m, 0) for m in modules + per_pixel if not mixes_frames(m)]


def _spatial_groups(unet: nn.Module) -> list[OperatorGroup]:
    groups: list[OperatorGroup] = []
    for block in unet.modules():
        if not (hasattr(block, "attn1") and hasattr(block, "ff")):
            continue  # not a transformer block
        for attn in (block.attn1, getattr(block, "attn2", None)):
            if attn is not None and _query_sliceable(attn):
                groups.append(OperatorGroup(attn, 1, _split_queries))
        if block.ff is not None:
            groups.append(OperatorGroup(block.ff, 1))
    if not groups:
        raise ValueError(f"{type(unet).__name__} has no transformer blocks to slice along the spatial axis")
    return groups


def _query_sliceable(attn: nn.Module) -> bool:
    """An attention whose output rows depend only on their own query rows (and all keys)."""
    return (getattr(attn, "group_norm", None) is None and getattr(attn, "spatial_norm", None) is None
            and not getattr(attn, "residual_connection", False) and not getattr(attn, "norm_cross", None))


def _split_queries(args: tuple[Any, ...], kwargs: dict[str, Any], start: int, stop: int
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One slice of queries; keys and values stay whole (self-attention reads them from the full input)."""
    kwargs = dict(kwargs)
    if "hidden_states" in kwargs:
        hidden, rest = kwargs.pop("hidden_states"), args
    else:
        hidden, rest = args[0], args[1:]
    if rest:  # encoder_hidden_states given positionally
        kwargs["encoder_hidden_states"], rest = rest[0], rest[1:]
    if kwargs.get("encoder_hidden_states") is None:
        kwargs["encoder_hidden_states"] = hidden
    return (hidden.narrow(1, start, stop - start), *rest), kwargs


def vae_decoder_groups(vae: nn.Module) -> list[OperatorGroup]:
    """The VAE decoder as one batch-axis group (every operator in it works per sample)."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None:
        raise TypeError(f"{type(vae).__name__} has no `decoder`: not an AutoencoderKL-shaped VAE")
    if mixes_frames(decoder):
        raise ValueError(f"{type(vae).__name__}'s decoder mixes frames (a temporal decoder): it cannot be "
                         "sliced along the batch axis")
    return [OperatorGroup(decoder, 0)]


@contextmanager
def sliced_decoder(vae: nn.Module | None, configs: Sequence[Any]) -> Iterator[FeatureSlicer | None]:
    """Slice `vae`'s decoder for a `with` block when `configs` hold a `SlicingConfig` with `vae=True`."""
    wanted = [c for c in configs if isinstance(c, SlicingConfig) and c.vae]
    if vae is None or not wanted:
        yield None
        return
    slicer = FeatureSlicer(wanted[0]).apply(vae_decoder_groups(vae))
    try:
        yield slicer
    finally:
        slicer.remove()
