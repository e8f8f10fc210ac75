"""A model *site*: what an adapter says about one model of its family, in the terms the cores use.

A core never looks a model up itself: it asks its site where the blocks are (a U-Net's deep
modules below a skip branch, the layers a quantizer replaces, the operator groups a slicer may
cut), how to read the noise level of a call, and how model calls and generations are announced.
Adapters subclass `Site` for their family (a diffusers U-Net, a ComfyUI `UNetModel` during one
sampling run, a diffusers DiT with its block span) and implement what the family offers;
everything a family lacks fails with a message naming the family and the missing part, so a
technique that cannot work on a model says so before it touches anything.

Three ways a site announces what happens, each returning something to `remove()`:
- `watch_calls(begin, end)`: each model call starts (with its noise level and inputs) and ends;
  by default forward hooks on `root`, for hosts whose wrappers see every call they announce it;
- `wrap_calls(around)`: each whole model call is handed to `around`, which runs it or answers for it
  (step rehash);
- `watch_generations(start)`: a generation of `n` steps starts (a diffusers scheduler's
  `set_timesteps`, a ComfyUI sampling run). By default nothing announces it: the cores' step clocks
  find new generations in the noise levels alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from functools import cached_property
from typing import Any, Protocol

import torch
from torch import nn

from .cache_schedule import model_fingerprint
from .slicing import OperatorGroup, SliceAxis

LevelReader = Callable[[tuple[Any, ...], dict[str, Any]], float]
CallStart = Callable[[float, tuple[Any, ...], dict[str, Any]], None]
Streams = tuple[torch.Tensor, ...]  # the token streams a transformer block carries (image; text)
# around(compute, x, level, context) -> the call's output tensor; compute() runs the model
Around = Callable[[Callable[[], torch.Tensor], torch.Tensor, float, Sequence[torch.Tensor]], torch.Tensor]


class Removable(Protocol):
    def remove(self) -> None: ...


class Removal:
    """A `Removable` around a function (or nothing to do), run at most once."""

    def __init__(self, undo: Callable[[], None] | None = None) -> None:
        self._undo = undo

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


def remove_all(removables: list[Any]) -> None:
    """Remove each of `removables` (hook handles, `Removal`s), in order, and empty the list: a core's
    `remove()` runs this, so calling it twice is harmless."""
    for removable in removables:
        removable.remove()
    removables.clear()


def hook_calls(root: nn.Module, read_level: LevelReader, begin: CallStart, end: Callable[[], None]) -> Removal:
    """Announce every call of `root` as one model call: `begin(level, args, kwargs)` before, `end()` after."""
    handles = [root.register_forward_pre_hook(lambda _m, args, kwargs: begin(read_level(args, kwargs), args, kwargs),
                                              with_kwargs=True),
               root.register_forward_hook(lambda *_: end())]
    return Removal(lambda: [handle.remove() for handle in handles])


@dataclass(frozen=True)
class CacheSite:
    """One model at one cache branch, as the caching cores and their calibration see it."""

    root: nn.Module  # the module whose calls are model calls
    read_level: LevelReader
    deep_modules: tuple[nn.Module, ...]  # what a feature cache reuses, in execution order
    feature_module: nn.Module  # the deep output the shallow branch reads (recorded, corrected)
    quant_layers: Mapping[str, nn.Module]  # the Linear/Conv2d layers a quantizer replaces, by name
    _: KW_ONLY  # the optional fields by name only: two were added by separate changes, positions would mix them
    weights_version: Hashable | None = None  # the host's token for the state of root's weights (see `Site`)
    # a DiT's cache: the block span whose residual is reused (deep_modules are then its blocks); None: a U-Net's
    span: BlockSpan | None = None

    @cached_property
    def fingerprint(self) -> str:
        """Tells checkpoints apart (schedules and plans refuse another model); computed once, on use."""
        return model_fingerprint(self.root, self.weights_version)


@dataclass(frozen=True)
class BlockIO:
    """How one block's call carries the streams: which parameters they are, where its output puts them.

    `inputs`: the stream parameters' names, in stream order; `positions`: where each sits when passed
    positionally; `outputs`: each stream's index in the returned tuple, or None when the block returns
    its one stream as a bare tensor.
    """

    inputs: tuple[str, ...]
    positions: tuple[int, ...]
    outputs: tuple[int, ...] | None

    @classmethod
    def of(cls, block: nn.Module, inputs: Sequence[str], outputs: Sequence[int] | None,
           positions: Sequence[int] | None = None) -> BlockIO:
        """Read the positions of `inputs` from `block`'s forward signature, or take them as given (`positions`:
        for a block whose forward is `forward(*args, **kwargs)`, called with the streams positionally)."""
        if outputs is not None and len(outputs) != len(inputs):
            raise ValueError("a block's output must place every stream it takes")
        if positions is not None:
            if len(positions) != len(inputs):
                raise ValueError("a block's stream positions must name one position per stream")
            return cls(tuple(inputs), tuple(positions), None if outputs is None else tuple(outputs))
        params = list(inspect.signature(type(block).forward).parameters)[1:]  # without self
        missing = [name for name in inputs if name not in params]
        if missing:
            raise TypeError(f"{type(block).__name__}.forward has no parameter {missing[0]!r}: this version of the "
                            "model is not the one the adapter knows")
        return cls(tuple(inputs), tuple(params.index(n) for n in inputs), None if outputs is None else tuple(outputs))

    def streams_in(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Streams:
        return tuple(kwargs[n] if n in kwargs else args[p] for n, p in zip(self.inputs, self.positions, strict=True))

    def streams_out(self, output: Any) -> Streams:
        return (output,) if self.outputs is None else tuple(output[i] for i in self.outputs)

    def call_with(self, block: nn.Module, streams: Streams, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Streams:
        """Run `block` (a copy of the block this IO describes, say) on `streams` with the rest of one call's
        arguments as they were: how a feedback module built from a backbone block sees that step's context."""
        args, kwargs = list(args), dict(kwargs)
        for name, position, stream in zip(self.inputs, self.positions, streams, strict=True):
            if name in kwargs or position >= len(args):
                kwargs[name] = stream
            else:
                args[position] = stream
        return self.streams_out(block(*args, **kwargs))

    def pack(self, streams: Streams) -> Any:
        """The block's output carrying `streams`."""
        if self.outputs is None:
            return streams[0]
        out: list[Any] = [None] * len(self.outputs)
        for index, stream in zip(self.outputs, streams, strict=True):
            out[index] = stream
        return tuple(out)


@dataclass(frozen=True)
class BlockSpan:
    """The blocks a block cache covers, in execution order, with how each is called."""

    blocks: tuple[nn.Module, ...]
    io: tuple[BlockIO, ...]

    def __post_init__(self) -> None:
        if not self.blocks or len(self.blocks) != len(self.io):
            raise ValueError("a block span needs at least one block and one BlockIO per block")
        if len({len(io.inputs) for io in self.io}) != 1:
            raise ValueError("every block of a span must carry the same streams (a span cannot cross a point where "
                             "the model joins or splits its streams)")


# run(copy, features, args, kwargs) -> features: a copy of the backbone block on `features`, with the
# context (timestep embedding, class labels) of the first skipped module's call in this model call
RunBlock = Callable[[nn.Module, torch.Tensor, tuple[Any, ...], dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class FeedbackPoint:
    """Where an Inner Loop Feedback module attaches on one model (`accel.ilf`).

    `skipped`: what a feedback step does not compute, in execution order — a U-Net's deep modules
    (DeepCache's) or a DiT's block span (`span`, then the blocks are `span.blocks`); `corrected`: the
    index in `skipped` whose (reused) output the module corrects, the feature the rest of the model reads;
    `block`: the backbone block the module is a copy of; `where`: how the family numbers this point
    (saved with a trained module, so it is loaded where it was trained); `run`: how the copy is called;
    `stream_of`/`with_stream`: the feature tensor in the corrected module's output, and that output
    carrying another feature. `target`: the index in `skipped` whose output in a *full* pass is what the
    corrected feature stands for on a feedback step — the teacher's feature a trainer distils towards
    (`train.ilf`); None: `corrected` itself (a U-Net's last deep module). On a DiT the reused residual is
    added at the span's first block, so its output there stands for the span's last block's output
    (`target_stream_of` reads the feature from that block's output; None: `stream_of`).
    """

    skipped: tuple[nn.Module, ...]
    corrected: int
    block: nn.Module
    where: dict[str, Any]
    run: RunBlock
    span: BlockSpan | None = None
    stream_of: Callable[[Any], torch.Tensor] = lambda out: out
    with_stream: Callable[[Any, torch.Tensor], Any] = lambda _out, feature: feature
    target: int | None = None
    target_stream_of: Callable[[Any], torch.Tensor] | None = None

    def teacher_feature(self) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
        """The module whose output in a full pass holds the feature the corrected one stands for, and its reader."""
        index = self.corrected if self.target is None else self.target
        return self.skipped[index], self.target_stream_of or self.stream_of


class Site:
    """One model of a family; subclasses implement what their family offers."""

    family = "model"
    calls = "model calls"  # what one call of `root` is, in the lines a run reports ("U-Net calls", ...)
    # a host that knows when root's weights change sets a token for their state (ComfyUI: the weight patches
    # merged into them), so the fingerprint is hashed once per state instead of on every check
    weights_version: Hashable | None = None

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        # where the record of applied techniques lives (`accel.registry.applied_to`): on the root, so it
        # outlives this site object and lists everything applied to the model
        self.holder: Any = root

    def read_level(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        """The noise level (timestep or sigma) of one call of `root`."""
        raise self._lacks("noise level reader")

    def deep_modules(self, branch_id: int) -> list[nn.Module]:
        """The largest modules entirely below skip branch `branch_id`, in execution order (feature caches)."""
        raise self._lacks("skip branches with deep modules (DeepCache and CacheQuant need a U-Net)")

    def feature_module(self, branch_id: int) -> nn.Module:
        return self.deep_modules(branch_id)[-1]

    def quant_layers(self) -> dict[str, nn.Module]:
        raise self._lacks("map of quantizable layers")

    def operator_groups(self, axis: SliceAxis, cache_inside: bool) -> list[OperatorGroup]:
        """Modules independent along `axis`; with `cache_inside`, none may contain a module a cache overrides."""
        raise self._lacks("map of sliceable operator groups")

    def quantize_attention(self, bits: int) -> Removable:
        raise self._lacks("attention score quantization")

    def block_span(self, span: tuple[int, int] | None) -> BlockSpan:
        """The transformer blocks `span` names (`(first, stop)` in execution order; None: the family's
        default) and how each is called: what a block cache covers."""
        raise self._lacks("transformer block span (a block cache needs a DiT)")

    def feedback_point(self, where: dict[str, Any] | None) -> FeedbackPoint:
        """Where an ILF module attaches: `where` as a trained module saved it (None: the family's default)."""
        raise self._lacks("attachment point for an Inner Loop Feedback module")

    def cache_site(self, branch_id: int) -> CacheSite:
        deep = tuple(self.deep_modules(branch_id))
        return CacheSite(self.root, self.read_level, deep, self.feature_module(branch_id), self.quant_layers(),
                         weights_version=self.weights_version)

    @property
    def fingerprint(self) -> str:
        """What schedules and calibrated plans are checked against (`cache_schedule.model_fingerprint`)."""
        return model_fingerprint(self.root, self.weights_version)

    def span_cache_site(self, span: tuple[int, int] | None) -> CacheSite:
        """A DiT as CacheQuant sees it: the block span `span` (None: the family's default) is what is cached."""
        blocks = self.block_span(span)
        return CacheSite(self.root, self.read_level, blocks.blocks, blocks.blocks[-1], self.quant_layers(),
                         weights_version=self.weights_version, span=blocks)

    def watch_calls(self, begin: CallStart, end: Callable[[], None]) -> Removable:
        return hook_calls(self.root, self.read_level, begin, end)

    def wrap_calls(self, around: Around) -> Removable:
        raise self._lacks("way to answer for whole model calls")

    def watch_generations(self, start: Callable[[int], None]) -> Removable:
        return Removal()

    def _lacks(self, what: str) -> TypeError:
        return TypeError(f"{self.family} ({type(self.root).__name__}) offers no {what}")
