"""A DiT's transformer blocks in execution order, and the spans a block cache may cover: shared by every DiT site.

A DiT runs one or more *stages* — `nn.ModuleList`s of blocks — in order. Each stage says which
parameters of a block are its token streams and where its output puts them. Two stages are *joined*
when the second's blocks take the first's output streams as they are; otherwise (the model
concatenates or splits its streams in between) a span cannot cross from one to the other.

Blocks are numbered in execution order across stages. A span is `(first, stop)` in that numbering;
the model's first and last blocks always run (they read the fresh input and shape the output), and a
span stays inside one run of joined stages. The default span is the longest such run without the
model's first and last blocks: everything that can be cached is (the setting of first-block caches
such as FBCache/TeaCache; a shorter span trades speed for fidelity).

The diffusers sites (`diffusers_dit`) and the ComfyUI sites (`comfy_dit`) differ only in their tables
of stages and in how a call's noise level is read; the layout logic is this module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..accel.site import BlockIO, BlockSpan, FeedbackPoint
from ..accel.slicing import OperatorGroup

TOKENS = 1  # the token dimension of a transformer block's activations [B, tokens, width]


@dataclass(frozen=True)
class Stage:
    """One list of blocks: its attribute on the model, its stream parameters and where its output puts them."""

    attribute: str
    inputs: tuple[str, ...]
    outputs: tuple[int, ...] | None  # None: the block returns its one stream as a tensor
    joins_next: bool = False  # the next stage's blocks take this stage's output streams unchanged
    positions: tuple[int, ...] | None = None  # the streams' argument positions, for a `forward(*args, **kwargs)`
    # each block's token-wise feed-forwards (dotted paths): [B, tokens, width] in and out, every token on its
    # own, so they run slice by slice over the tokens (single-stream blocks that fuse the MLP into the
    # attention's projections have none)
    feed_forwards: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    module: nn.Module
    io: BlockIO
    run: int  # which run of joined stages it belongs to


class BlockLayout:
    """The blocks of one model of family `name`, read from its `stages`."""

    def __init__(self, root: nn.Module, name: str, stages: tuple[Stage, ...]) -> None:
        self.root = root
        self.name = name
        self.stages = stages
        self._blocks: list[Block] = []
        run = 0
        for stage in stages:
            modules = getattr(root, stage.attribute, None)
            if not isinstance(modules, nn.ModuleList):
                raise TypeError(f"{type(root).__name__} has no block list `{stage.attribute}`: this version of "
                                f"{name} is not the one the adapter knows")
            self._blocks += [Block(m, BlockIO.of(m, stage.inputs, stage.outputs, stage.positions), run)
                             for m in modules]
            run += 0 if stage.joins_next else 1

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block, in execution order (the numbering spans use)."""
        return [b.module for b in self._blocks]

    def default_span(self) -> tuple[int, int]:
        """The longest run of joined stages, without the model's first and last blocks."""
        best: tuple[int, int] = (0, 0)
        for run in sorted({b.run for b in self._blocks}):
            indices = [i for i, b in enumerate(self._blocks) if b.run == run]
            first, stop = max(indices[0], 1), min(indices[-1] + 1, len(self._blocks) - 1)
            if stop - first > best[1] - best[0]:
                best = (first, stop)
        if best[1] <= best[0]:
            raise ValueError(f"this {self.name} model has {len(self._blocks)} blocks: too few for a block cache "
                             "(the first and last always run)")
        return best

    def block_span(self, span: tuple[int, int] | None) -> BlockSpan:
        first, stop = self.default_span() if span is None else span
        count = len(self._blocks)
        if not 1 <= first < stop <= count - 1:
            raise ValueError(f"span {(first, stop)} must lie inside blocks 1..{count - 2} of this {self.name} "
                             f"model ({count} blocks; the first and last always run)")
        chosen = self._blocks[first:stop]
        if len({b.run for b in chosen}) > 1:
            runs = sorted({b.run for b in self._blocks})
            bounds = [[i for i, b in enumerate(self._blocks) if b.run == r] for r in runs]
            raise ValueError(f"span {(first, stop)} crosses a point where {self.name} joins or splits its token "
                             "streams; keep it inside one of the block ranges "
                             + ", ".join(f"[{b[0]}, {b[-1] + 1})" for b in bounds))
        return BlockSpan(tuple(b.module for b in chosen), tuple(b.io for b in chosen))

    def block_io(self, index: int) -> BlockIO:
        return self._blocks[index].io

    def block_names(self) -> tuple[str, ...]:
        """The attributes holding the blocks (the prefixes of their layers' qualified names)."""
        return tuple(stage.attribute for stage in self.stages)

    def linear_layers(self) -> dict[str, nn.Module]:
        """The Linear layers inside the transformer blocks, by qualified name: where a DiT's arithmetic is.

        The patch and text embedders, the timestep and modulation projections outside the blocks and the
        output projection stay float: tiny, run once per call, and carrying the signal the rest depends
        on (the usual post-training quantization practice, as on the U-Net).
        """
        prefixes = tuple(f"{name}." for name in self.block_names())
        return {name: module for name, module in self.root.named_modules()
                if isinstance(module, nn.Linear) and name.startswith(prefixes)}

    def token_groups(self) -> list[OperatorGroup]:
        """Every block's feed-forwards, sliced over the tokens: their wide hidden layer (2-4x the width) is
        what they add to the peak, and only one slice of it is alive at a time. A path each stage names must
        exist in its first block (else the model is not the version the table knows); a later block may lack
        it (SD3's last block has no text feed-forward)."""
        groups = []
        for stage in self.stages:
            for index, block in enumerate(getattr(self.root, stage.attribute)):
                for path in stage.feed_forwards:
                    module = _submodule(block, path)
                    if module is None and index == 0:
                        raise TypeError(f"{type(block).__name__} has no feed-forward `{path}`: this version of "
                                        f"{self.name} is not the one the adapter knows")
                    if module is not None:
                        groups.append(OperatorGroup(module, TOKENS))
        if not groups:
            raise TypeError(f"this {self.name} model has no token-wise feed-forwards to slice")
        return groups


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = block
    for part in path.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


def token_groups(layout: BlockLayout, axis: str) -> list[OperatorGroup]:
    """A DiT's slicing groups for `axis`: its feed-forwards over the tokens ("spatial"). The batch axis is not
    offered: a DiT block's extra inputs (modulation, rotary tables) are batched or broadcast by family, so
    slicing whole blocks by sample could cut a broadcast table whose length happens to match."""
    if axis != "spatial":
        raise ValueError(f"a {layout.name} transformer is sliced over its tokens (axis 'spatial'), got axis {axis!r}")
    return layout.token_groups()


def span_feedback(layout: BlockLayout, where: dict[str, Any] | None) -> FeedbackPoint:
    """ILF on a DiT: feedback steps skip the block `span` (default: the block cache's) and its first block's
    reused output (the span's output: the block cache adds the reused residual there; `target` says so) is
    corrected by a copy of the span's last block (`block`, in the model's numbering), called
    with that step's own arguments (timestep, class labels, text), every stream but the image's as they were."""
    where = dict(where or {})
    span = where.setdefault("span", list(layout.default_span()))
    if not (isinstance(span, list | tuple) and len(span) == 2 and all(isinstance(i, int) for i in span)):
        raise ValueError(f"ILF span must be a pair of block indices, got {span!r}")
    chosen = layout.block_span((span[0], span[1]))
    index = where.setdefault("block", span[1] - 1)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(layout.blocks):
        raise ValueError(f"ILF block must be a block index in 0..{len(layout.blocks) - 1}, got {index!r}")
    first = chosen.io[0]
    if len(first.inputs) != 1:
        raise TypeError(f"ILF needs a span of single-stream blocks; {layout.name}'s blocks "
                        f"{tuple(span)} carry {len(first.inputs)} streams")
    copied = layout.block_io(index)
    where["span"] = [span[0], span[1]]

    def run(block: nn.Module, feature: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return copied.call_with(block, (feature,), args, kwargs)[0]

    last = chosen.io[-1]
    return FeedbackPoint(chosen.blocks, 0, layout.blocks[index], where, run, span=chosen,
                         stream_of=lambda out: first.streams_out(out)[0],
                         with_stream=lambda _out, feature: first.pack((feature,)),
                         target=len(chosen.blocks) - 1, target_stream_of=lambda out: last.streams_out(out)[0])
