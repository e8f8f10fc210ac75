"""Feature slicer + operator grouping: run groups of operators slice by slice to cut peak memory.

The idea (Streamlined Inference, "Feature Slicer" and "Operator Grouping"): a diffusion network's
peak memory is set by the large intermediates *inside* its blocks (a resnet's normalised and
activated copies, attention queries/keys/values, the 4×–8× wide feed-forward hidden layer), all
proportional to the batch (and, for video, the frame count). Most operators are independent along
some axis — every sample and frame along the batch axis, every token along the spatial axis for
feed-forward layers and attention queries — so a *group* of consecutive such operators can run on one
slice of its input at a time. Only one slice's intermediates are alive at once; the group's output is
written slice by slice into one preallocated tensor. Nothing is approximated: every slice computes
exactly what the full call computes for those rows (bit-identical where the kernels do not change
their blocking with the batch size, otherwise within float rounding, ~1e-6).

How it is applied, for any model family:
- an adapter names the *operator groups*: modules whose whole computation is independent along the
  axis, with the dimension to slice (`OperatorGroup.dim`) and, where a module needs more than "slice
  every tensor argument that has this length along that dimension", a `split` function (attention
  query slicing must keep the keys whole). The adapter is where model knowledge lives: which blocks
  mix frames (temporal layers) and must run whole, which normalisations mix positions;
- each group's `forward` is replaced by an *exact* override (see `forward_override`): caches may then
  wrap a sliced module (they see one call and one full output), but a cache inside a sliced group
  would see each slice as a separate call, so slicing refuses modules that already carry a cache and
  is applied first (its rank in `accel.techniques`);
- `remove()` restores every module's forward exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .forward_override import Forward, ForwardOverrides, has_approximate_override

SliceAxis = Literal["batch", "spatial"]
Split = Callable[[tuple[Any, ...], dict[str, Any], int, int], tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass(frozen=True)
class SlicingConfig:
    """What a user picks; validated on creation so bad values fail before any model is touched.

    `axis`: "batch" slices samples — CFG halves, images of a batch, and the frames of a video model,
    which diffusers' video U-Nets (AnimateDiff) fold into the batch; "spatial" slices tokens in
    attention (queries) and feed-forward layers.
    `slices`: how many slices each group call is cut into (at most one row per slice: a batch of 2 runs
    in 2 slices); peak activation memory inside a group falls about that many times. `vae`: also slice the
    VAE decoder (batch axis only).
    """

    axis: SliceAxis = "batch"
    slices: int = 4
    vae: bool = True

    def __post_init__(self) -> None:
        if self.axis not in ("batch", "spatial"):
            raise ValueError(f"axis must be 'batch' or 'spatial', got {self.axis!r}")
        if isinstance(self.slices, bool) or not isinstance(self.slices, int) or not 1 <= self.slices <= 4096:
            raise ValueError(f"slices must be an integer in [1, 4096], got {self.slices!r}")
        if self.vae and self.axis != "batch":
            raise ValueError("the VAE decoder can only be sliced along the batch axis (its group norms and "
                             "convolutions mix spatial positions); set vae=False for axis 'spatial'")


@dataclass
class SlicingStats:
    """How often sliced groups ran, and in how many slices in total."""

    group_calls: int = 0
    slice_calls: int = 0


@dataclass(frozen=True)
class OperatorGroup:
    """A module whose computation is independent along dimension `dim` of its activations.

    Without `split`, every tensor argument whose size along `dim` equals the first tensor argument's is
    sliced, everything else is passed whole (broadcast tensors, time embeddings of batch 1, flags).
    """

    module: nn.Module
    dim: int
    split: Split | None = None


class FeatureSlicer:
    """The slicing core applied to the operator groups an adapter names."""

    def __init__(self, config: SlicingConfig) -> None:
        self.config = config
        self.stats = SlicingStats()
        self._overrides = ForwardOverrides()

    def apply(self, groups: Sequence[OperatorGroup]) -> FeatureSlicer:
        """Slice every group; refuses modules a cache already wraps (slicing must sit innermost)."""
        if len(self._overrides):
            raise RuntimeError("this FeatureSlicer is already applied; remove() it first")
        if not groups:
            raise ValueError("the adapter named no operator groups to slice")
        cached = [type(g.module).__name__ for g in groups if has_approximate_override(g.module)]
        if cached:
            raise ValueError(f"{cached[0]} is already wrapped by a feature cache: apply slicing before caches "
                             "(a cache inside a sliced group would see each slice as a separate call)")
        for group in groups:
            self._overrides.install(group.module, lambda original, g=group: self._sliced(g, original), exact=True)
        return self

    def remove(self) -> None:
        """Restore every module's forward exactly."""
        self._overrides.restore()

    def _sliced(self, group: OperatorGroup, original: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            length = _lead_length(args, kwargs, group.dim)
            if length is None or length < 2 or self.config.slices < 2:
                return original(*args, **kwargs)
            size = -(-length // self.config.slices)  # ceil: at most `slices` slices
            self.stats.group_calls += 1
            out: Any = None
            for start in range(0, length, size):
                stop = min(length, start + size)
                if group.split is None:
                    part_args, part_kwargs = slice_tree((args, kwargs), group.dim, length, start, stop)
                else:
                    part_args, part_kwargs = group.split(args, kwargs, start, stop)
                part = original(*part_args, **part_kwargs)
                self.stats.slice_calls += 1
                if out is None:
                    out = _allocate(part, group.dim, length, stop - start, type(group.module).__name__)
                _place(out, part, group.dim, start, stop)
            return out

        return forward


def slice_tree(value: Any, dim: int, length: int, start: int, stop: int) -> Any:
    """`value` with every tensor of size `length` along `dim` narrowed to [start, stop) (tuples, lists,
    dicts recursed into; anything else passed unchanged)."""
    if isinstance(value, torch.Tensor):
        if value.ndim > dim and value.shape[dim] == length:
            return value.narrow(dim, start, stop - start)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(slice_tree(v, dim, length, start, stop) for v in value)
    if isinstance(value, dict):
        return {k: slice_tree(v, dim, length, start, stop) for k, v in value.items()}
    return value


def _lead_length(args: tuple[Any, ...], kwargs: dict[str, Any], dim: int) -> int | None:
    """Size along `dim` of the call's first tensor (the activations the group processes)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[dim]) if value.ndim > dim else None
    return None


def _allocate(part: Any, dim: int, length: int, rows: int, name: str) -> Any:
    """Empty full-size outputs shaped like one slice's, so slices are copied in and freed one by one."""
    if isinstance(part, torch.Tensor):
        if part.ndim <= dim or part.shape[dim] != rows:
            raise ValueError(f"{name} returned a tensor of shape {tuple(part.shape)} for a slice of {rows} along "
                             f"dim {dim}: its output is not per-slice, so it cannot be an operator group")
        shape = list(part.shape)
        shape[dim] = length
        return part.new_empty(shape)
    if isinstance(part, (tuple, list)):
        return [_allocate(p, dim, length, rows, name) for p in part] if isinstance(part, list) \
            else tuple(_allocate(p, dim, length, rows, name) for p in part)
    if isinstance(part, Mapping):  # model outputs such as diffusers' `BaseOutput` dataclasses
        return type(part)(**{k: _allocate(v, dim, length, rows, name) for k, v in part.items()})
    if part is None:
        return None
    raise TypeError(f"{name} returned a {type(part).__name__}; operator groups must return tensors, "
                    "or tuples or dicts of them")


def _place(out: Any, part: Any, dim: int, start: int, stop: int) -> None:
    if isinstance(out, torch.Tensor):
        out.narrow(dim, start, stop - start).copy_(part)
    elif isinstance(out, (tuple, list)):
        for o, p in zip(out, part, strict=True):
            _place(o, p, dim, start, stop)
    elif isinstance(out, Mapping):
        for key, value in out.items():
            _place(value, part[key], dim, start, stop)
