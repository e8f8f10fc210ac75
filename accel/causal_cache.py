"""Causal cache sharing for autoregressive video diffusion (Ca2-VDM), as one model-agnostic core.

An autoregressive (AR) video model generates a clip of new frames conditioned on the frames it made
before. The plain way re-runs every conditional frame through the network at *every* denoising step of
*every* clip, so the work per clip grows with the context. If the model's temporal attention is
causal (a frame attends only to itself and earlier frames) and conditional frames enter clean with a
fixed "context" conditioning (no timestep, no noise), then each conditional frame's keys and values
depend only on that frame and earlier ones — never on the noisy clip or the step. They can be computed
once, when the frame is committed, and shared by every denoising step of every later clip.

This module holds the parts that do not care what the network looks like:

* `CausalCacheConfig` — on/off and the window (how many past frames stay attendable).
* `TemporalKVCache` — per-layer keys/values along a frame axis, evicting the oldest frames beyond the
  window, so memory stays flat on endless streams.
* `causal_temporal_attention` — the attention op a model's temporal layers call: queries of the frames
  being computed attend to the cached frames plus, causally, to their own frames; on commit the own
  keys/values are appended to the cache.
* `CausalVideoStream` — the AR loop over a `CausalVideoDenoiser`, either sharing the cache (one
  denoiser call per step on the new frames only, one commit call per clip) or recomputing the context
  at every step (the baseline). With the same seeds both give the same frames while the context fits
  in the window.

The network supplies positions (e.g. rotary embeddings applied to keys before they are cached: rotary
scores depend on frame distance only, so cached keys stay valid as the window slides).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CausalCacheConfig:
    """`enabled`: share conditional frames' keys/values across steps and clips (False = recompute the
    context at every step). `window`: how many past frames the model may attend to; older frames are
    evicted, so memory is bounded by it."""

    enabled: bool = True
    window: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window must be a positive number of frames, got {self.window!r}")


class TemporalKVCache:
    """Keys and values of committed frames, per temporal attention layer, at most `window` frames.

    Tensors are `[batch * tokens, heads, frames, head_dim]` (the layout temporal attention works in);
    the frame axis is dim 2. Eviction drops the oldest frames of every layer together, so all layers
    always describe the same frames.
    """

    def __init__(self, window: int) -> None:
        CausalCacheConfig(window=window)  # one place validates the window
        self.window = window
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    @property
    def frames(self) -> int:
        """Frames held now (the same for every layer)."""
        return next(iter(self._keys.values())).shape[2] if self._keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._keys, self._values) for t in d.values())

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layer not in self._keys:
            return None
        return self._keys[layer], self._values[layer]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add a clip's keys/values for `layer`, keeping only the newest `window` frames."""
        if layer in self._keys:
            keys = torch.cat([self._keys[layer], keys], dim=2)
            values = torch.cat([self._values[layer], values], dim=2)
        # clone the kept slice so evicted frames' storage is really freed, not kept alive by a view
        self._keys[layer] = keys[:, :, -self.window:].clone() if keys.shape[2] > self.window else keys
        self._values[layer] = values[:, :, -self.window:].clone() if values.shape[2] > self.window else values

    def clear(self) -> None:
        self._keys.clear()
        self._values.clear()


@dataclass
class CacheAccess:
    """What a temporal layer may do with the cache during one call: read it, and (commit) append to it."""

    cache: TemporalKVCache
    commit: bool


def causal_temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                              access: CacheAccess | None) -> torch.Tensor:
    """Attention over the frame axis, causal per frame, with the cached frames in front.

    `q, k, v`: `[batch * tokens, heads, frames, head_dim]` for the frames of this call (positions already
    applied). Frame i of the call sees every cached frame and frames 0..i of the call. With `access.commit`
    this call's keys/values are appended to the cache after use (only clean, committed frames should be).
    """
    past = access.cache.read(layer) if access is not None else None
    n_new = q.shape[2]
    if past is not None:
        keys, values = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    else:
        keys, values = k, v
    n_past = keys.shape[2] - n_new
    allowed = torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).tril()
    if n_past:
        allowed = torch.cat([torch.ones(n_new, n_past, dtype=torch.bool, device=q.device), allowed], dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    if access is not None and access.commit:
        access.cache.append(layer, k, v)
    return out


class CausalVideoDenoiser(Protocol):
    """A video denoiser whose temporal attention goes through `causal_temporal_attention`.

    `frames`: `[B, F, C, H, W]`; `t`: `[B, F]` noise levels in 0..1; `is_context`: `[B, F]` bool, True for
    clean conditional frames (their conditioning must not depend on `t` or `cond`); `cond`: `[B]` class
    ids; `first_position`: absolute index of `frames[:, 0]`. Returns the clean-frame prediction.
    """

    def __call__(self, frames: torch.Tensor, t: torch.Tensor, is_context: torch.Tensor, cond: torch.Tensor,
                 first_position: int, access: CacheAccess | None = None) -> torch.Tensor: ...


# sampler(denoise(x, t) -> x0 prediction, noise, steps, generator) -> clean frames
ChunkSampler = Callable[[Callable[[torch.Tensor, float], torch.Tensor], torch.Tensor, int, torch.Generator],
                        torch.Tensor]


class CausalVideoStream:
    """Endless AR generation: each `next_chunk` denoises new frames conditioned on the last `window`.

    Cache-shared mode keeps a `TemporalKVCache`; recompute mode keeps the last `window` clean frames and
    runs them through the model with the new frames at every step. `committed` counts generated frames.
    """

    def __init__(self, denoiser: CausalVideoDenoiser, config: CausalCacheConfig) -> None:
        self.denoiser = denoiser
        self.config = config
        self.cache = TemporalKVCache(config.window)
        self._frames: deque[torch.Tensor] = deque(maxlen=config.window)  # recompute mode: [B, C, H, W] each
        self.committed = 0

    @property
    def context_frames(self) -> int:
        return self.cache.frames if self.config.enabled else len(self._frames)

    @property
    def state_bytes(self) -> int:
        """Bytes of context this stream holds: the cache's keys/values, or the recompute mode's frames."""
        if self.config.enabled:
            return self.cache.nbytes
        return sum(f.numel() * f.element_size() for f in self._frames)

    def reset(self) -> None:
        self.cache.clear()
        self._frames.clear()
        self.committed = 0

    @torch.no_grad()
    def next_chunk(self, noise: torch.Tensor, cond: torch.Tensor, sampler: ChunkSampler, steps: int,
                   generator: torch.Generator) -> torch.Tensor:
        """Generate `noise.shape[1]` frames (`noise`: `[B, F, C, H, W]`), commit them, return them."""
        if noise.ndim != 5:
            raise ValueError(f"noise must be [batch, frames, channels, height, width], got {tuple(noise.shape)}")
        batch, n_new = noise.shape[:2]
        position = self.committed
        new_context = torch.zeros(batch, n_new, dtype=torch.bool, device=noise.device)
        if self.config.enabled:
            access = CacheAccess(self.cache, commit=False)

            def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
                return self.denoiser(x, torch.full((batch, n_new), t, device=x.device), new_context, cond,
                                     position, access)

            clean = sampler(denoise, noise, steps, generator)
            # commit: the clean frames' keys/values enter the cache once, with context conditioning
            self.denoiser(clean, torch.zeros(batch, n_new, device=clean.device), ~new_context, cond, position,
                          CacheAccess(self.cache, commit=True))
        else:
            context = torch.stack(list(self._frames), dim=1) if self._frames else noise[:, :0]
            n_ctx = context.shape[1]
            is_context = torch.cat([torch.ones(batch, n_ctx, dtype=torch.bool, device=noise.device), new_context],
                                   dim=1)

            def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
                levels = torch.cat([torch.zeros(batch, n_ctx), torch.full((batch, n_new), t)], dim=1)
                out = self.denoiser(torch.cat([context, x], dim=1), levels.to(x.device), is_context, cond,
                                    position - n_ctx)
                return out[:, n_ctx:]

            clean = sampler(denoise, noise, steps, generator)
            self._frames.extend(clean.unbind(dim=1))
        self.committed += n_new
        return clean
