"""Adapter for ComfyUI's `MODEL` (a `ModelPatcher` around `openaimodel.UNetModel`: SD1.x, SD2.x, SDXL).

A ComfyUI user hands us a `ModelPatcher`, never a bare U-Net, and several patchers share one
U-Net. So nothing is changed on the U-Net while the patcher sits in the graph: we clone the
patcher and add two of ComfyUI's own wrappers (`comfy.patcher_extension`), the way ComfyUI's
EasyCache node does:

- `OUTER_SAMPLE` (one sampling run of *this* clone): a fresh technique session attaches to the
  U-Net for the length of the run (it learns the run's length from the sigmas) and detaches in a
  `finally`, so the U-Net is exactly as before whatever happens, and other clones never see it;
- `DIFFUSION_MODEL` (each U-Net call): the session learns the call's noise level (the sigma that
  ComfyUI puts in `transformer_options`) and its inputs, which is all the cores need — so every
  ComfyUI sampler works, and CFG halves batched into one call (or split over several calls when
  memory is short) are one call slot each, never mixed.

Techniques come from the technique registry (`accel.techniques`), as on the diffusers path: each
sampling run is a `ComfyRunSite` — where DeepCache's deep modules are in `UNetModel`, the run's
length, and the U-Net calls the wrapper sees — and a `TechniqueSession` applies the technique's
registration to it when the run starts and removes it when the run ends. `apply_technique` does the
ComfyUI plumbing once for all of them. So DeepCache runs the same core as the diffusers path, and
step rehash hands each whole U-Net call to its core, which runs it or answers with the output it
reuses. A CacheQuant schedule needs no technique of its own: it is DeepCache with explicit full
steps (`DeepCacheConfig.full_steps_override`), checked against the sampler's step count when a run
starts.

ComfyUI is imported lazily here and nowhere else below the node classes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..accel.deepcache import DeepCacheConfig
from ..accel.registry import Handle
from ..accel.rehash import StepRehashConfig
from ..accel.site import Around, CallStart, Removable, Removal, Site
from ..accel.techniques import REGISTRY

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


class ComfyRunSite(Site):
    """A ComfyUI `UNetModel` during one sampling run: the wrapper announces every U-Net call to it."""

    family = "ComfyUI"

    def __init__(self, unet: nn.Module, total_steps: int) -> None:
        super().__init__(unet)
        self.holder = self  # each technique is applied on its own per run; the patcher's wrappers are the record
        self.total_steps = total_steps
        self._watchers: list[tuple[CallStart, Callable[[], None]]] = []
        self._around: Around | None = None

    def read_level(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        return read_sigma(args, kwargs)

    def deep_modules(self, branch_id: int) -> list[nn.Module]:
        return deep_modules(self.root, branch_id)

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
        """Run (or answer for) one U-Net call at noise level `level`; `call()` runs the U-Net and inner wrappers."""
        for begin, _ in self._watchers:
            begin(level, args, kwargs)
        try:
            if self._around is None:
                return call()
            # UNetModel.forward(x, timesteps, context, y, control, transformer_options): the sample is x; the other
            # tensors (context, y, ...) only gate reuse to calls of the same shapes, e.g. the same CFG batch layout
            x = args[0] if args else kwargs["x"]
            context = [a for a in args[2:] if isinstance(a, torch.Tensor)]
            context += [v for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor) and k != "x"]
            return self._around(call, x, level, context)
        finally:
            for _, end in self._watchers:
                end()


class TechniqueSession:
    """One technique during one sampling run of a patched MODEL: applied at the start, removed at the end."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.technique = REGISTRY.of(config, "ComfyUI")
        self.seconds = 0.0
        self._site: ComfyRunSite | None = None
        self._handle: Handle | None = None
        self._started = 0.0

    @property
    def stats(self) -> Any:
        return None if self._handle is None else self._handle.stats

    def report(self) -> tuple[str, dict[str, Any]] | None:
        """The line and numbers the frontend shows for this run (as the LC_PIPE sampler's); None when the
        technique never got applied (the run failed at its start)."""
        return None if self._handle is None else self._handle.report(self.seconds)

    def start(self, unet: nn.Module, total_steps: int) -> None:
        """The run starts on `unet` with `total_steps` sampler steps (len(sigmas) - 1)."""
        self._started = time.perf_counter()
        self._site = ComfyRunSite(unet, total_steps)
        (self._handle,) = REGISTRY.apply(self._site, [self.config])

    def around_call(self, call: Call, level: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._site.around_call(call, level, args, kwargs)

    def finish(self) -> None:
        """The run ended (also after an error): restore the U-Net and drop per-run state; the stats stay."""
        if self._handle is not None:
            self._handle.remove()
        self.seconds = time.perf_counter() - self._started


# -- ComfyUI plumbing, shared by every technique ----------------------------------------------
def read_sigma(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The noise level of a `UNetModel.forward(x, timesteps, context, y, control, transformer_options)` call.

    ComfyUI's sampler puts the call's sigmas in `transformer_options`; the timestep is the fallback
    for callers that bypass the sampler (both fall as sampling proceeds, which is all the clock needs).
    """
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
    level = options.get("sigmas") if isinstance(options, dict) else None
    if level is None:
        level = args[1] if len(args) > 1 else kwargs["timesteps"]
    return float(level.reshape(-1)[0]) if isinstance(level, torch.Tensor) else float(level)


def apply_technique(model: Any, config: Any, on_finish: Callable[[TechniqueSession], None] | None = None) -> Any:
    """A clone of ComfyUI `model` (a ModelPatcher) that applies `config`'s technique on every sampling run.

    The technique's name keys its wrappers (`livecache_<name>`): applying a technique to a MODEL that
    already has it replaces the earlier settings (the last node in the chain wins) instead of stacking two
    copies. `on_finish(session)` runs after each run, e.g. to report what the session did to the frontend.
    `config` is checked with those of the other LiveCache techniques already on `model` by the registry's
    stacking rules, so a combination that cannot work fails when the node runs.
    """
    from comfy.patcher_extension import WrappersMP  # ComfyUI, imported only when a MODEL is patched

    key = f"livecache_{REGISTRY.of(config, 'ComfyUI').name}"
    others = [getattr(w, "livecache_config", None) for name, ws in model.wrappers.get(WrappersMP.DIFFUSION_MODEL,
                                                                                      {}).items()
              if name != key for w in ws]
    REGISTRY.check_stack([c for c in others if c is not None] + [config])

    current: list[TechniqueSession] = []  # the session of the run in progress (runs are sequential in ComfyUI)

    def outer_sample(executor: Any, *args: Any, **kwargs: Any) -> Any:
        unet = executor.class_obj.model_patcher.model.diffusion_model
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        session = TechniqueSession(config)
        current.append(session)
        try:  # start inside the try: a start that fails half-way (e.g. a schedule for another step count) is undone
            session.start(unet, max(int(sigmas.shape[-1]) - 1, 1))
            return executor(*args, **kwargs)
        finally:
            current.remove(session)
            session.finish()
            if on_finish is not None:
                on_finish(session)

    def diffusion_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
        if not current:  # the U-Net called outside a sampling run of this clone
            return executor(*args, **kwargs)
        return current[-1].around_call(lambda: executor(*args, **kwargs), read_sigma(args, kwargs), tuple(args),
                                       kwargs)

    diffusion_model.livecache_config = config  # type: ignore[attr-defined]  # read by a later apply_technique

    patched = model.clone()
    for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, outer_sample), (WrappersMP.DIFFUSION_MODEL, diffusion_model)):
        patched.remove_wrappers_with_key(kind, key)
        patched.add_wrapper_with_key(kind, key, wrapper)
    return patched


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
