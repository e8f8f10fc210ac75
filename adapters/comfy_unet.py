"""Adapter for ComfyUI's `MODEL` (a `ModelPatcher` around `openaimodel.UNetModel`: SD1.x, SD2.x, SDXL).

A ComfyUI user hands us a `ModelPatcher`, never a bare U-Net, and several patchers share one
U-Net. So nothing is changed on the U-Net while the patcher sits in the graph: we clone the
patcher and add ComfyUI's own wrappers and callbacks (`comfy.patcher_extension`), the way ComfyUI's
EasyCache node does, all under one key holding every LiveCache technique of the MODEL (`Entry`):

- `OUTER_SAMPLE` (one sampling run of *this* clone) opens a `RunSession` (it learns the run's length
  from the sigmas) and closes it in a `finally`, so the U-Net is exactly as before whatever happens,
  and other clones never see it;
- `ON_PRE_RUN` (ComfyUI has loaded the model for the run: LoRAs and other weight patches applied)
  applies the entries through the technique registry, together, checked and in rank order, whatever
  order the nodes were chained in; an entry may first `resolve` its config against the loaded model
  (quantization builds its plan from the live weights: `comfy_quant`);
- `DIFFUSION_MODEL` (each U-Net call; for a DiT whose forward runs no such wrappers, SD3's MMDiT, the
  `APPLY_MODEL` call around it, one per model call: `comfy_dit.call_wrapper`): the run learns the call's
  noise level (the sigma that ComfyUI puts in `transformer_options`) and its inputs, which is all the
  cores need — so every ComfyUI sampler works, and CFG halves batched into one call (or split over
  several calls when memory is short) are one call slot each, never mixed.

Each run's `ComfyRunSite` says where things are in `UNetModel` (DeepCache's deep modules here, the
quantized layers and slicing groups in `comfy_layers`), the run's length, and the U-Net calls the
wrapper sees. So DeepCache runs the same core as the diffusers path, and step rehash hands each whole
U-Net call to its core, which runs it or answers with the output it reuses. A CacheQuant schedule
needs no technique of its own: it is DeepCache with explicit full steps
(`DeepCacheConfig.full_steps_override`), checked against the sampler's step count when a run starts.

ComfyUI is imported lazily here and nowhere else below the node classes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..accel.deepcache import DeepCacheConfig
from ..accel.registry import Handle, applied_to
from ..accel.rehash import StepRehashConfig
from ..accel.site import Around, BlockSpan, CallStart, FeedbackPoint, Removable, Removal, Site
from ..accel.slicing import OperatorGroup, SliceAxis, SlicingConfig
from ..accel.techniques import REGISTRY
from .comfy_dit import call_wrapper, layout_of
from .comfy_layers import operator_groups, quant_layers, weights_version
from .dit_blocks import span_feedback

Call = Callable[[], Any]


# -- where DeepCache's deep modules are -------------------------------------------------------
def deep_modules(unet: nn.Module, branch_id: int) -> list[nn.Module]:
    """The layers of `UNetModel` that lie entirely below skip branch `branch_id`, in execution order.

    `input_blocks[0]` is conv_in and every input block pushes one skip, consumed by the output
    blocks in reverse; branch `b` keeps `input_blocks[:b + 1]` and the last `b + 1` output blocks
    (the same numbering as the diffusers adapter and the DeepCache authors). ComfyUI runs a block
    by iterating its layers (`forward_timestep_embed`), not through the block's own forward, so the
    deep modules are the layers of the deep blocks (each returns its cached output on cached steps).
    """
    for name in ("input_blocks", "middle_block", "output_blocks"):
        if getattr(unet, name, None) is None:
            raise TypeError(f"{type(unet).__name__} has no `{name}`: DeepCache for ComfyUI MODELs needs a U-Net "
                            "of the SD1.x/SD2.x/SDXL family (openaimodel.UNetModel), not a DiT or other model")
    inputs, outputs = list(unet.input_blocks), list(unet.output_blocks)
    if len(inputs) != len(outputs):
        raise TypeError(f"unexpected U-Net: {len(inputs)} input blocks but {len(outputs)} output blocks")
    if not 0 <= branch_id < len(inputs) - 1:
        raise ValueError(f"cache_branch_id must be in [0, {len(inputs) - 2}] for this U-Net, got {branch_id}")
    deep_blocks = inputs[branch_id + 1 :] + [unet.middle_block] + outputs[: len(outputs) - branch_id - 1]
    return [layer for block in deep_blocks for layer in block]


def _is_resblock(module: nn.Module) -> bool:
    """A plain `openaimodel.ResBlock` with a timestep embedding (ComfyUI runs it as `layer(x, emb)`)."""
    return type(module).__name__ == "ResBlock" and getattr(module, "emb_layers", None) is not None


def _run_resblock(block: nn.Module, feature: torch.Tensor, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> torch.Tensor:
    """A ResBlock copy on `feature` with the timestep embedding the first deep layer received (`emb`, second)."""
    return block(feature, kwargs["emb"] if "emb" in kwargs else args[1])


def unet_feedback_point(unet: nn.Module, where: dict[str, Any] | None) -> FeedbackPoint:
    """ILF on a ComfyUI U-Net below skip branch `branch` (default 0): a feedback step skips DeepCache's deep layers
    and the feature the shallow branch reads (the last deep layer's output) is corrected by a copy of the deep
    ResBlock `block` (its qualified name; default: the last deep one that maps the feature's channels to
    themselves, as on the diffusers U-Net), called with the step's timestep embedding. ComfyUI hands that
    embedding only to the layers that take one (`forward_timestep_embed`), so the first deep layer must be one:
    a branch whose deep part starts at a downsampler is refused, naming it."""
    where = dict(where or {})
    branch = where.setdefault("branch", 0)
    if isinstance(branch, bool) or not isinstance(branch, int):
        raise ValueError(f"ILF branch must be an integer, got {branch!r}")
    deep = tuple(deep_modules(unet, branch))
    if not any(cls.__name__ == "TimestepBlock" for cls in type(deep[0]).__mro__):
        raise ValueError(f"ILF cannot attach at branch {branch} of this U-Net: its first deep layer "
                         f"({type(deep[0]).__name__}) receives no timestep embedding, which the feedback module "
                         "runs with; choose a branch whose deep part starts at a ResBlock")
    names = {id(m): name for name, m in unet.named_modules()}
    resblocks = [layer for layer in deep if _is_resblock(layer)]
    channels = resblocks[-1].out_channels  # the last deep resblock shapes the feature (the layers after keep it)
    fits = [names[id(m)] for m in resblocks if m.channels == m.out_channels == channels]
    if not fits:
        raise TypeError(f"no deep ResBlock of this U-Net maps {channels} channels to {channels}: ILF cannot attach "
                        f"at branch {branch}")
    name = where.setdefault("block", fits[-1])
    block = dict(unet.named_modules()).get(name) if isinstance(name, str) else None
    if block is None or not _is_resblock(block):
        raise ValueError(f"this U-Net has no ResBlock {name!r} for the ILF module to copy")
    return FeedbackPoint(deep, len(deep) - 1, block, where, _run_resblock)


class ComfyRunSite(Site):
    """A ComfyUI diffusion model (a `UNetModel`, or a `comfy.ldm` DiT: `comfy_dit`) during one sampling run:
    the wrapper announces every call to it."""

    family = "ComfyUI"
    calls = "U-Net calls"

    def __init__(self, unet: nn.Module, total_steps: int) -> None:
        super().__init__(unet)
        self.layout = layout_of(unet)  # the transformer blocks of a DiT; None for a U-Net
        if self.layout is not None:
            self.family = f"ComfyUI DiT ({self.layout.name})"
            self.calls = "transformer calls"
        self.holder = self  # the run's techniques are recorded on the run (they go when it ends)
        self.total_steps = total_steps
        self._watchers: list[tuple[CallStart, Callable[[], None]]] = []
        self._around: Around | None = None

    def read_level(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        return read_sigma(args, kwargs)

    def deep_modules(self, branch_id: int) -> list[nn.Module]:
        return deep_modules(self.root, branch_id)

    def quant_layers(self) -> dict[str, nn.Module]:
        return quant_layers(self.root)

    def operator_groups(self, axis: SliceAxis, cache_inside: bool) -> list[OperatorGroup]:
        return operator_groups(self.root, axis)

    def block_span(self, span: tuple[int, int] | None) -> BlockSpan:
        if self.layout is None:
            return super().block_span(span)
        return self.layout.block_span(span)

    def feedback_point(self, where: dict[str, Any] | None) -> FeedbackPoint:
        if self.layout is None:
            return unet_feedback_point(self.root, where)
        return span_feedback(self.layout, where)

    def watch_calls(self, begin: CallStart, end: Callable[[], None]) -> Removable:
        watcher = (begin, end)
        self._watchers.append(watcher)
        return Removal(lambda: self._watchers.remove(watcher))

    def wrap_calls(self, around: Around) -> Removable:
        if self._around is not None:
            raise ValueError("another technique already answers for this U-Net's calls in this run")
        self._around = around
        return Removal(lambda: setattr(self, "_around", None))

    def watch_generations(self, start: Callable[[int], None]) -> Removable:
        start(self.total_steps)  # the run is one generation, and it is starting
        return Removal()

    def around_call(self, call: Call, level: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run (or answer for) one U-Net call at noise level `level`; `call()` runs the U-Net and inner wrappers.

        A technique that answers for whole calls (step rehash, the outermost) sits outside the watchers:
        a call it answers never reaches the U-Net, so the feature caches never see it.
        """

        def watched() -> Any:
            for begin, _ in self._watchers:
                begin(level, args, kwargs)
            try:
                return call()
            finally:
                for _, end in self._watchers:
                    end()

        if self._around is None:
            return watched()
        # UNetModel.forward(x, timesteps, context, y, control, transformer_options): the sample is x; the other
        # tensors (context, y, ...) only gate reuse to calls of the same shapes, e.g. the same CFG batch layout
        x = args[0] if args else kwargs["x"]
        context = [a for a in args[2:] if isinstance(a, torch.Tensor)]
        context += [v for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor) and k != "x"]
        return self._around(watched, x, level, context)


Resolve = Callable[[Any], Any]  # (the ModelPatcher being sampled, loaded) -> the config applied in this run


@dataclass(frozen=True)
class Entry:
    """One LiveCache technique on a MODEL: its config (what the stacking rules check when the node runs),
    how a run turns it into what is applied (a quantization plan from the weights ComfyUI loaded), and
    who hears what the run did."""

    config: Any
    resolve: Resolve | None = None
    on_finish: Callable[[TechniqueSession], None] | None = None

    @property
    def name(self) -> str:
        return REGISTRY.of(self.config, "ComfyUI").name


class TechniqueSession:
    """What one technique did during one sampling run of a patched MODEL (what `on_finish` receives)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.technique = REGISTRY.of(config, "ComfyUI")
        self.seconds = 0.0
        self.handle: Handle | None = None

    @property
    def stats(self) -> Any:
        return None if self.handle is None else self.handle.stats

    def report(self) -> tuple[str, dict[str, Any]] | None:
        """The line and numbers the frontend shows for this run (as the LC_PIPE sampler's); None when the
        technique never got applied (the run failed at its start)."""
        return None if self.handle is None else self.handle.report(self.seconds)


class RunSession:
    """Every LiveCache technique on the sampled MODEL during one run: applied together through the registry
    (checked, in rank order) once ComfyUI has loaded the model, removed together when the run ends."""

    def __init__(self, entries: Sequence[Entry], total_steps: int) -> None:
        self.entries = tuple(entries)
        self.total_steps = total_steps
        self.sessions = [TechniqueSession(entry.config) for entry in self.entries]
        self._site: ComfyRunSite | None = None
        self._started = time.perf_counter()

    def start(self, patcher: Any) -> None:
        """The model is loaded (LoRAs and other weight patches applied): apply the techniques to its U-Net."""
        if self._site is not None:
            return
        configs = [entry.config if entry.resolve is None else entry.resolve(patcher) for entry in self.entries]
        self._started = time.perf_counter()
        site = ComfyRunSite(patcher.model.diffusion_model, self.total_steps)
        site.weights_version = weights_version(patcher)  # schedules' fingerprint checks hash once per patch set
        handles = REGISTRY.apply(site, configs)
        self._site = site
        for session, handle in zip(self.sessions, handles, strict=True):
            session.handle = handle

    def around_call(self, call: Call, level: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._site is None:  # the U-Net called before ComfyUI's pre-run (outside a sampler's run)
            return call()
        return self._site.around_call(call, level, args, kwargs)

    def finish(self) -> None:
        """The run ended (also after an error): restore the U-Net, drop per-run state, report; the stats stay."""
        seconds = time.perf_counter() - self._started
        if self._site is not None:
            applied_to(self._site.holder).remove_all()
        for entry, session in zip(self.entries, self.sessions, strict=True):
            session.seconds = seconds
            if entry.on_finish is not None:
                entry.on_finish(session)


# -- ComfyUI plumbing, shared by every technique ----------------------------------------------
def read_sigma(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The noise level of one call of a ComfyUI diffusion model (`UNetModel.forward(x, timesteps, ...,
    transformer_options)`, and every `comfy.ldm` DiT's `forward(x, timestep, ..., transformer_options)`).

    ComfyUI's sampler puts the call's sigmas in `transformer_options`, passed by keyword or as the last
    positional dict (as ComfyUI's EasyCache finds it); the timestep is the fallback for callers that
    bypass the sampler (both fall as sampling proceeds, which is all the clock needs).
    """
    options = kwargs.get("transformer_options")
    if options is None:
        options = next((a for a in reversed(args) if isinstance(a, dict)), None)
    level = options.get("sigmas") if isinstance(options, dict) else None
    if level is None:
        level = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("timestep"))
    return float(level.reshape(-1)[0]) if isinstance(level, torch.Tensor) else float(level)


_KEY = "livecache"


def entries_of(model: Any) -> tuple[Entry, ...]:
    """The LiveCache techniques already on ComfyUI `model` (a ModelPatcher), in the order they were added."""
    from comfy.patcher_extension import WrappersMP  # ComfyUI, imported only when a MODEL is patched

    wrappers = [w for kind in (WrappersMP.DIFFUSION_MODEL, WrappersMP.APPLY_MODEL)
                for w in model.wrappers.get(kind, {}).get(_KEY, [])]
    return tuple(entry for wrapper in wrappers for entry in getattr(wrapper, "livecache_entries", ()))


def apply_technique(model: Any, config: Any, on_finish: Callable[[TechniqueSession], None] | None = None,
                    resolve: Resolve | None = None) -> Any:
    """A clone of ComfyUI `model` (a ModelPatcher) that applies `config`'s technique on every sampling run.

    Every LiveCache technique on a MODEL lives in one entry list under one wrapper key (`livecache`), so a run
    applies them together, checked and in the registry's rank order whatever order the nodes were chained in.
    Applying a technique the MODEL already has replaces the earlier settings (the last node in the chain wins)
    instead of stacking two copies. The stack is checked now, so a combination that cannot work fails when the
    node runs. `resolve(patcher)` turns `config` into what a run applies once the model is loaded (see
    `adapters.comfy_quant`); `on_finish(session)` runs after each run, e.g. to report to the frontend.
    """
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    entry = Entry(config, resolve, on_finish)
    entries = tuple(e for e in entries_of(model) if e.name != entry.name) + (entry,)
    REGISTRY.check_stack([e.config for e in entries])

    current: list[RunSession] = []  # the run in progress (runs are sequential in ComfyUI)

    def outer_sample(executor: Any, *args: Any, **kwargs: Any) -> Any:
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        session = RunSession(entries, max(int(sigmas.shape[-1]) - 1, 1))
        current.append(session)
        try:  # a start that fails half-way (e.g. a schedule for another step count) is undone in finish()
            return executor(*args, **kwargs)
        finally:
            current.remove(session)
            session.finish()

    def pre_run(patcher: Any) -> None:  # ComfyUI has loaded the model for this run: weights are patched
        if current:
            current[-1].start(patcher)

    def diffusion_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
        if not current:  # the U-Net called outside a sampling run of this clone
            return executor(*args, **kwargs)
        return current[-1].around_call(lambda: executor(*args, **kwargs), read_sigma(args, kwargs), tuple(args),
                                       kwargs)

    diffusion_model.livecache_entries = entries  # type: ignore[attr-defined]  # read by a later apply_technique

    patched = without_techniques(model)
    # each model call: at the diffusion model's forward, or at apply_model for a DiT whose forward runs no wrappers
    calls = getattr(WrappersMP, call_wrapper(model.get_model_object("diffusion_model")).upper())
    for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, outer_sample), (calls, diffusion_model)):
        patched.add_wrapper_with_key(kind, _KEY, wrapper)
    patched.add_callback_with_key(CallbacksMP.ON_PRE_RUN, _KEY, pre_run)
    return patched


def without_techniques(model: Any) -> Any:
    """A clone of ComfyUI `model` without the LiveCache techniques on it (what calibration samples: the float,
    uncached model, with every other patch and wrapper the MODEL carries)."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    bare = model.clone()
    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.DIFFUSION_MODEL, WrappersMP.APPLY_MODEL):
        bare.remove_wrappers_with_key(kind, _KEY)
    bare.remove_callbacks_with_key(CallbacksMP.ON_PRE_RUN, _KEY)
    return bare


def apply_slicing(model: Any, config: SlicingConfig,
                  on_finish: Callable[[TechniqueSession], None] | None = None) -> Any:
    """A clone of ComfyUI `model` with feature slicing (batch axis); checked against the U-Net now."""
    if config.vae:
        raise ValueError("a ComfyUI MODEL holds no VAE to slice: set vae to False (ComfyUI's VAE Decode "
                         "(Tiled) node lowers the decoder's memory)")
    operator_groups(model.get_model_object("diffusion_model"), config.axis)
    return apply_technique(model, config, on_finish)


def apply_deepcache(model: Any, config: DeepCacheConfig,
                    on_finish: Callable[[TechniqueSession], None] | None = None) -> Any:
    """A clone of ComfyUI `model` with DeepCache; `model` itself is left untouched.

    The branch is checked against the model's U-Net now, so a wrong branch or a non-U-Net model
    fails when the node runs, not in the middle of sampling.
    """
    deep_modules(model.get_model_object("diffusion_model"), config.cache_branch_id)
    return apply_technique(model, config, on_finish)


def apply_step_rehash(model: Any, config: StepRehashConfig,
                      on_finish: Callable[[TechniqueSession], None] | None = None) -> Any:
    """A clone of ComfyUI `model` with step rehash; `model` itself is left untouched.

    Any model ComfyUI samples works (the session only sees whole U-Net calls), so nothing is checked here.
    """
    return apply_technique(model, config, on_finish)
