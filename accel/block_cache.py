"""Block caching on a transformer (DeepCache's idea on a DiT), with forecasting as one of its modes.

A diffusion transformer is a stack of blocks that each add a residual to one or two token streams
(image tokens; text tokens in double-stream blocks). From one denoising step to the next, what a span
of middle blocks adds changes slowly. So on a *full* step every block runs and the span's residual —
its output streams minus its input streams, for every stream it changes — is kept; on a *cached*
step the span's first block returns its input plus that residual and the span's other blocks pass
their input through, so none of the span's arithmetic runs. The model's first and last blocks always
run (the adapter refuses a span that includes them): they read the fresh input and shape the output.

Modes:
- "reuse": the residual of the last full step, as it is;
- "forecast": the residual extrapolated to this step's noise level from the last full steps, first or
  second order (Newton's divided differences in the noise level) — the idea behind TaylorSeer: the
  block outputs follow a smooth trajectory in the noise level, so a Taylor step lands closer than a
  constant. With fewer full steps kept than the order needs, the highest order they allow is used;
- "fitted": the residual as a weighted sum of the last full steps' residuals, with weights per cached
  step fitted by least squares on a calibration generation (`forecast_fit.fit_forecast`, from the Gram matrix of the
  span's residuals over its steps; stored in the config as `weights`, one tuple per step). Reuse
  (weight 1 on the newest) and first-order extrapolation are points of the space it searches, so on
  the calibration data it is at least as close as either. It exists because the Taylor step assumes a
  residual that is smooth in the noise level; where the step-to-step change is mostly an irregular
  fluctuation around a slowly moving mean (measured on a random-weight Flux of `bench dit`, width 128:
  consecutive residuals differ by 30–47% of their norm, cosine 0.89–0.96, and extrapolation doubles
  the error of reuse), the fit instead shrinks towards the mean of the kept residuals.

Everything else is DeepCache's, and shared by subclassing it: the step clock keyed on the noise level
(any sampler), the schedules (uniform, non-uniform, a calibrated one such as CacheQuant's DP
schedule), the slots per call inside a step (CFG halves evaluated in separate calls keep separate
residuals; a batch of halves in one call stays apart because the residual is per sample), and
`remove()` restoring every block's forward so outputs are bit-identical again.

What a block's call looks like comes from the adapter as a `BlockIO` per block (which arguments are
the streams, where they sit in its output); this core knows nothing else about the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .deepcache import CacheSchedule, DeepCache, DeepCacheStats
from .forecast_fit import check_weights, fit_forecast
from .forward_override import Forward
from .site import BlockSpan, Streams

__all__ = ["BlockCache", "BlockCacheConfig", "BlockCacheStats", "fit_forecast", "forecast", "weighted"]

BlockCacheMode = Literal["reuse", "forecast", "fitted"]


@dataclass(frozen=True)
class BlockCacheConfig(CacheSchedule):
    """What a user picks; validated on creation so bad values fail before any model is touched.

    `span`: the blocks whose residual is cached, as `(first, stop)` indices into the model's blocks in
    execution order (`stop` excluded); None takes the family's default (`DiTSite.default_span`).
    The schedule fields are `CacheSchedule`'s, shared with DeepCache (`cache_interval`, `schedule`, `start`,
    `end`, `center`, `power`, `full_steps_override` for a calibrated schedule). `mode` and `order`: see the
    module. `weights` (mode "fitted" only, with a calibrated schedule): per step, the weights of the last
    full steps' residuals (oldest first) a cached step adds; empty on full steps (`fit_forecast` makes them).
    """

    span: tuple[int, int] | None = None
    mode: BlockCacheMode = "reuse"
    order: int = 1
    weights: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.span is not None:
            if (not isinstance(self.span, tuple) or len(self.span) != 2
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.span)
                    or not 0 <= self.span[0] < self.span[1]):
                raise ValueError(f"span must be None or a pair of block indices (first, stop) with "
                                 f"0 <= first < stop, got {self.span!r}")
        if self.mode not in ("reuse", "forecast", "fitted"):
            raise ValueError(f"mode must be 'reuse', 'forecast' or 'fitted', got {self.mode!r}")
        if isinstance(self.order, bool) or self.order not in (1, 2):
            raise ValueError(f"order must be 1 or 2 (the forecast's order in the noise level), got {self.order!r}")
        if (self.mode == "fitted") != (self.weights is not None):
            raise ValueError("mode='fitted' needs weights (from fit_forecast), and weights need mode='fitted'")
        if self.weights is not None:
            check_weights(self.weights, self.full_steps_override)

    @property
    def history(self) -> int:
        """How many full steps' residuals a slot keeps."""
        if self.weights is not None:
            return max(1, *(len(w) for w in self.weights))
        return 1 if self.mode == "reuse" else self.order + 1


@dataclass
class BlockCacheStats(DeepCacheStats):
    """DeepCache's counts, plus how many cached calls forecast their residual and how many blocks they skipped."""

    forecast_calls: int = 0
    skipped_blocks: int = 0


def forecast(history: Sequence[tuple[float, Streams]], level: float, order: int) -> Streams:
    """Extrapolate the residuals in `history` (oldest first) to `level`: Newton's divided differences.

    Uses the last `order + 1` entries (fewer when fewer are kept); entries at one level count once.
    """
    points: list[tuple[float, Streams]] = []
    for entry in reversed(history):  # newest first
        if len(points) > order:
            break
        if all(entry[0] != p[0] for p in points):
            points.append(entry)
    levels = [p[0] for p in points]
    out = []
    for s in range(len(points[0][1])):
        # divided-difference table, newest point first: coef[k] = f[l0, ..., lk]
        table = [p[1][s].float() for p in points]
        coefs = [table[0]]
        for k in range(1, len(points)):
            table = [(table[i] - table[i + 1]) / (levels[i] - levels[i + k]) for i in range(len(table) - 1)]
            coefs.append(table[0])
        value, basis = coefs[0], 1.0
        for k in range(1, len(coefs)):
            basis *= level - levels[k - 1]
            value = value + basis * coefs[k]
        out.append(value.to(points[0][1][s].dtype))
    return tuple(out)


def weighted(history: Sequence[tuple[float, Streams]], weights: Sequence[float]) -> Streams:
    """Σ_k weights[k] · residual of the k-th of the last len(weights) entries of `history` (oldest first)."""
    entries = history[len(history) - len(weights):]
    out = []
    for s in range(len(entries[0][1])):
        value = sum(w * e[1][s].float() for w, e in zip(weights, entries, strict=True))
        out.append(value.to(entries[0][1][s].dtype))
    return tuple(out)


class BlockCache(DeepCache):
    """The block cache core applied to one model through the block span an adapter names."""

    def __init__(self, config: BlockCacheConfig) -> None:
        super().__init__(config)
        self.block_config = config
        self.stats = BlockCacheStats()
        self._span: BlockSpan | None = None
        self._level = 0.0
        self._entry: Streams | None = None  # the span's input streams in the current full call
        # a stacked correction of the residual a cached call adds, by step (CacheQuant's cache correction)
        self.correction: Callable[[int, Streams], Streams] | None = None

    def attach_span(self, span: BlockSpan) -> BlockCache:
        """Override the span's blocks' forwards (the host announces calls through `begin_call`/`end_call`)."""
        self._span = span
        self.attach(span.blocks)
        return self

    def begin_call(self, level: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().begin_call(level, args, kwargs)
        self._level = level
        self._entry = None

    def _cached_forward(self, index: int, original: Forward) -> Forward:
        assert self._span is not None
        io, last = self._span.io[index], len(self._span.blocks) - 1

        def forward(*args: Any, **kwargs: Any) -> Any:
            slot = self._slot
            if slot is None:  # called outside a model call
                return original(*args, **kwargs)
            if self._reuse:
                streams = io.streams_in(args, kwargs)
                if index > 0:
                    return io.pack(streams)  # the span's residual was added at its first block
                residual = self._residual(slot.outputs[0])
                if all(r.shape == s.shape for r, s in zip(residual, streams, strict=True)):
                    self.stats.skipped_blocks += len(self._span.blocks)
                    return io.pack(tuple(s + r for s, r in zip(streams, residual, strict=True)))
                self._recompute_call(slot)  # the streams changed shape under the same inputs: compute
            if index == 0:  # a copy: blocks may add to their inputs in place (ComfyUI's Flux blocks do)
                self._entry = tuple(s.clone() for s in io.streams_in(args, kwargs))
            out = original(*args, **kwargs)
            if index == last and self._entry is not None:
                self._keep(slot, tuple(o - e for o, e in zip(io.streams_out(out), self._entry, strict=True)))
            return out

        return forward

    def _residual(self, history: list[tuple[float, Streams]]) -> Streams:
        weights = self.block_config.weights
        if weights is not None and self.tick is not None and len(history) >= len(weights[self.tick.step]):
            self.stats.forecast_calls += 1
            residual = weighted(history, weights[self.tick.step])
        elif self.block_config.mode != "forecast" or len(history) == 1:
            residual = history[-1][1]
        else:
            self.stats.forecast_calls += 1
            residual = forecast(history, self._level, self.block_config.order)
        if self.correction is None or self.tick is None:
            return residual
        return self.correction(self.tick.step, residual)

    def _keep(self, slot: Any, residual: Streams) -> None:
        """Add this full step's residual to the slot's history (outputs[0]), keeping what the mode needs."""
        history: list[tuple[float, Streams]] = slot.outputs.get(0, [])
        history = [h for h in history if h[0] != self._level] + [(self._level, residual)]
        slot.outputs[0] = history[-self.block_config.history:]

    def _recompute_call(self, slot: Any) -> None:
        self._reuse = False
        slot.outputs = {}
        self.stats.cached_calls -= 1
        self.stats.full_calls += 1

