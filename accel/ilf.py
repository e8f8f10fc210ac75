"""Inner Loop Feedback (ILF): a small trained module that predicts, on a cached step, what a full step computes.

The idea (Gwilliam et al., "Accelerate High-Quality Diffusion Models with Inner Loop Feedback"): the
features of one backbone block change slowly from step to step, and a little computation on a step
beats skipping it. So, as in DeepCache or a block cache, *full* steps run the whole backbone and the
steps between them skip a part of it (a U-Net's deep modules, a DiT's middle block span) and reuse
what the last full step computed; but instead of passing that stale feature on, a *feedback module*
moves it to this step. The module is a copy of one backbone block with every setting kept, called
with this step's context (its timestep embedding, its class labels), and its influence is a learnable
scale `s` that starts at zero:

    feature' = feature + s · (copy(feature; this step) − feature)

Only the module is trained, by distillation from the frozen backbone's own sampling trajectories
(`train/ilf.py`); the backbone never changes.

- At `s = 0` the module is the identity, bit for bit: an untrained module changes nothing, so ILF is
  then exactly the plain reuse it rides on, and every full step exactly the backbone.
- Where it attaches comes from the adapter (`Site.feedback_point`): which modules a feedback step
  skips, which output the module corrects, which block it copies, and a family's numbering of that
  point, saved with the module so it loads where it was trained.
- Which steps are full is `CacheSchedule`'s (DeepCache's and the block cache's): steps are read from
  the noise level, so any sampler works.
- A trained module is tied to the backbone it was trained on (`cache_schedule.model_fingerprint`): applying it to
  another model is refused, naming both fingerprints. Modules are safetensors files, nothing else.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from ..files import write_new, write_replacing
from .block_cache import BlockCache, BlockCacheConfig, BlockCacheMode
from .deepcache import CacheSchedule, DeepCache
from .forward_override import ForwardOverrides
from .site import FeedbackPoint, RunBlock

FORMAT = "livecache.ilf/1"
MAX_MODULE_BYTES = 256 << 20  # a copied block of a large DiT is tens of MB; the embedded ones a few hundred kB


class FeedbackModule(nn.Module):
    """A copy of one backbone block and the scale of its influence (zero: the identity)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = clean_copy(block)
        self.scale = nn.Parameter(torch.zeros(1, dtype=next(self.block.parameters()).dtype))

    def forward(self, feature: torch.Tensor, run: RunBlock, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> torch.Tensor:
        # the copy runs on its own tensor: a block may add to its input in place (ComfyUI's Flux blocks `x += ...`)
        moved = run(self.block, feature.clone(), args, kwargs)
        return feature + self.scale.to(feature.dtype) * (moved - feature)


def clean_copy(block: nn.Module) -> nn.Module:
    """A copy of `block` computing what its class computes: without the instance forwards other techniques
    installed on it (a slicer's, a cache's) or the forward hooks others registered on it (a recorder's, a
    counter's), which would otherwise be copied along and act on the original's behalf."""
    out = copy.deepcopy(block)
    for module in out.modules():
        for name in ("forward", "_livecache_forwards"):
            module.__dict__.pop(name, None)
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
                      module._forward_pre_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.clear()
    return out


def read_tensors(path: Path, hint: str = "") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file (a module, a training checkpoint); a file safetensors
    cannot parse — a pickle renamed, a truncated write — raises a ValueError naming it, then `hint`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises several types for files it cannot parse
        raise ValueError(f"{path}: not a safetensors file ({err}){hint}") from None


@dataclass(frozen=True, eq=False)
class FeedbackWeights:
    """A trained module as loaded: its tensors and what it was trained for (compared by identity)."""

    state: dict[str, torch.Tensor]
    fingerprint: str  # of the backbone it was trained on
    model: str
    where: dict[str, Any]  # the family's numbering of the attachment point
    training: dict[str, Any] = field(default_factory=dict)  # seeds, steps, gap, seconds, losses

    @classmethod
    def of(cls, module: FeedbackModule, fingerprint: str, model: str, where: dict[str, Any],
           training: dict[str, Any] | None = None) -> FeedbackWeights:
        state = {k: v.detach().float().contiguous().clone() for k, v in module.state_dict().items()}
        return cls(state, fingerprint, model, dict(where), dict(training or {}))

    def to_bytes(self) -> bytes:
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "model": self.model,
                "where": json.dumps(self.where), "training": json.dumps(self.training)}
        return save(self.state, metadata=meta)

    def save(self, path: str | Path, replace: bool = False) -> Path:
        """Write the module whole or not at all; without `replace` an existing file is never overwritten."""
        data = self.to_bytes()
        write = write_replacing if replace else write_new
        return write(Path(path), lambda stream: stream.write(data))

    @classmethod
    def load(cls, path: str | Path) -> FeedbackWeights:
        """Read a module file; anything but a LiveCache ILF safetensors file raises a ValueError naming it."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: ILF modules are safetensors files (.safetensors); "
                             f"{path.suffix or 'a file without suffix'} is refused — pickle files (.pt, .pth, "
                             ".ckpt, .bin, .pkl) are never loaded")
        if not path.is_file():
            raise ValueError(f"{path}: no such ILF module file")
        if path.stat().st_size > MAX_MODULE_BYTES:
            raise ValueError(f"{path}: {path.stat().st_size} bytes is too large for an ILF module "
                             f"(at most {MAX_MODULE_BYTES})")
        meta, state = read_tensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a LiveCache ILF module (expected format {FORMAT!r} in its metadata)")
        try:
            where, training = json.loads(meta["where"]), json.loads(meta["training"])
            fingerprint, model = meta["fingerprint"], meta["model"]
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: ILF module metadata is incomplete or not JSON ({err})") from None
        if not isinstance(where, dict) or not isinstance(training, dict):
            raise ValueError(f"{path}: ILF module metadata 'where' and 'training' must be JSON objects")
        bad = [k for k, v in state.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{path}: tensor {bad[0]} is not finite floating point")
        return cls(state, fingerprint, model, where, training)

    def check(self, fingerprint: str) -> None:
        """Refuse a backbone other than the one this module was trained on, naming both."""
        if fingerprint != self.fingerprint:
            raise ValueError(f"this ILF module was trained for model {self.model} (#{self.fingerprint}), not this "
                             f"model (#{fingerprint}): train one for it with `livecache train ilf --model ...`")

    def module_for(self, point: FeedbackPoint) -> FeedbackModule:
        """The module, built on a copy of `point.block` and loaded strictly."""
        module = FeedbackModule(point.block)
        own = module.state_dict()
        missing, unexpected = sorted(set(own) - set(self.state)), sorted(set(self.state) - set(own))
        wrong = sorted(k for k in set(own) & set(self.state) if own[k].shape != self.state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"this ILF module does not fit {type(point.block).__name__} at {self.where} "
                             f"(missing {missing[:2]}, unexpected {unexpected[:2]}, wrong shape {wrong[:2]})")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in self.state.items()})
        return module


@dataclass(frozen=True)
class ILFConfig(CacheSchedule):
    """What a user picks: the schedule (`CacheSchedule`'s fields; `cache_interval` 2 runs the module on every
    other step) and the trained module. `module=None` applies an untrained one (scale 0: plain reuse), which
    is where training starts. `where`: the attachment point for an untrained module (None: the family's
    default); a trained module brings its own. `mode`/`order`: what the module corrects on a DiT span — the
    block cache's plain reuse or its forecast (`accel.block_cache`); None: what the module was trained on
    (its file records it; reuse for an untrained one). A U-Net has no forecast: only reuse."""

    module: FeedbackWeights | None = None
    where: dict[str, Any] | None = field(default=None, compare=False)
    mode: BlockCacheMode | None = None
    order: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.module is not None and not isinstance(self.module, FeedbackWeights):
            raise ValueError(f"module must be a loaded FeedbackWeights (FeedbackWeights.load), got "
                             f"{type(self.module).__name__}")
        if self.module is not None and self.where is not None and self.where != self.module.where:
            raise ValueError(f"the module was trained at {self.module.where}, not at {self.where}")
        BlockCacheConfig(mode=self.cache_mode, order=self.cache_order)  # the block cache's checks

    @property
    def cache_mode(self) -> BlockCacheMode:
        trained = self.module.training.get("mode", "reuse") if self.module is not None else "reuse"
        return self.mode or trained

    @property
    def cache_order(self) -> int:
        trained = self.module.training.get("order", 1) if self.module is not None else 1
        return self.order or trained

    def schedule_only(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(CacheSchedule)}


@dataclass
class ILFStats:
    """Full and cached model calls, and how many cached calls the module corrected."""

    full_calls: int = 0
    cached_calls: int = 0
    feedback_calls: int = 0
    schedule: str = ""


class ILF:
    """The ILF core on one model: a reuse cache over the skipped modules, the module correcting its output."""

    def __init__(self, config: ILFConfig, point: FeedbackPoint, module: FeedbackModule) -> None:
        self.config = config
        self.point = point
        self.module = module
        if point.span is not None:
            block = BlockCacheConfig(**config.schedule_only(), mode=config.cache_mode, order=config.cache_order)
            self.cache: DeepCache = BlockCache(block).attach_span(point.span)
        elif config.cache_mode != "reuse":
            raise ValueError("ILF on a U-Net corrects DeepCache's reused deep features: it has no forecast mode "
                             "(forecasting is the DiT block cache's)")
        else:
            self.cache = DeepCache(config).attach(point.skipped)
        self.feedback_calls = 0
        self.prediction: torch.Tensor | None = None  # the last corrected feature (the trainer's feature loss)
        self._context: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._overrides = ForwardOverrides()
        self._overrides.install(point.skipped[point.corrected], self._feedback_forward)
        self._hook = point.skipped[0].register_forward_pre_hook(self._keep_context, with_kwargs=True)

    @property
    def stats(self) -> ILFStats:
        cache = self.cache.stats
        return ILFStats(cache.full_calls, cache.cached_calls, self.feedback_calls, cache.schedule)

    def begin_call(self, level: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.cache.begin_call(level, args, kwargs)

    def end_call(self) -> None:
        self.cache.end_call()
        self._context = None

    def reset(self, total_steps: int | None = None) -> None:
        self.cache.reset(total_steps)

    def remove(self) -> None:
        """Restore every forward (bit-identical outputs again) and drop every kept tensor."""
        self._hook.remove()
        self._overrides.restore()
        self.cache.remove()
        self._context = None
        self.prediction = None

    def _keep_context(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.cache.reusing:
            self._context = (args, kwargs)

    def _feedback_forward(self, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if not self.cache.reusing or self._context is None:
                return out
            self.prediction = self.module(self.point.stream_of(out), self.point.run, *self._context)
            self.feedback_calls += 1
            # the model reads a copy: a later block may add to its input in place (ComfyUI's Flux), which would
            # change the kept prediction under the trainer's feature loss
            return self.point.with_stream(out, self.prediction.clone())

        return forward


def build_ilf(config: ILFConfig, point: FeedbackPoint, fingerprint: Callable[[], str]) -> ILF:
    """The core for `config` at `point`: a trained module is checked against `fingerprint()`, the fingerprint of
    the model's weights as they compute (the site's: a host that knows when its weights change, ComfyUI with its
    LoRAs merged, hashes them once per state); an untrained one needs no check, so nothing is hashed for it."""
    if config.module is None:
        return ILF(config, point, FeedbackModule(point.block))
    config.module.check(fingerprint())
    return ILF(config, point, config.module.module_for(point))
