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
* `TemporalKVCache` — per-layer keys/values of the last `window` committed frames in a preallocated
  ring (the oldest frames are overwritten), so memory is flat on endless streams.
* `causal_temporal_attention` — the attention op a model's temporal layers call: queries of the frames
  being computed attend to the cached frames plus, causally, to their own frames; on commit their
  keys/values enter the cache.
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

    Each layer owns one preallocated buffer `[batch * tokens, heads, window + scratch, head_dim]` (the
    layout temporal attention works in; frames on dim 2): a ring of `window` committed frames, then
    scratch slots where the frames of the current call are written. Attention reads the whole buffer
    as one tensor — no concatenation per call — and masks the ring slots not yet filled. The order of
    frames in the ring does not matter (positions are already in the keys; committed frames are all
    visible to new frames), so eviction is an overwrite of the oldest slots, and memory is fixed by the
    window from the first clip on.
    """

    def __init__(self, window: int) -> None:
        CausalCacheConfig(window=window)  # one place validates the window
        self.window = window
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self.frames = 0  # committed frames held (the same for every layer)
        self._next = 0  # ring slot the next committed frame overwrites

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._keys, self._values) for t in d.values())

    def _buffers(self, layer: int, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers, (re)allocated when the batch layout or the number of new frames grows."""
        rows, heads, n_new, dim = k.shape
        keys = self._keys.get(layer)
        if keys is None or keys.shape[2] < self.window + n_new or keys.shape[:2] != (rows, heads) \
                or keys.shape[3] != dim:
            if keys is not None and self.frames and keys.shape[:2] != (rows, heads):
                raise ValueError(f"the cache holds {tuple(keys.shape[:2])} rows x heads, this call has "
                                 f"{(rows, heads)}: batch or resolution changed mid-stream; reset the stream")
            shape = (rows, heads, self.window + n_new, dim)
            fresh_k, fresh_v = k.new_zeros(shape), k.new_zeros(shape)
            if keys is not None and self.frames:
                fresh_k[:, :, : self.window] = keys[:, :, : self.window]
                fresh_v[:, :, : self.window] = self._values[layer][:, :, : self.window]
            self._keys[layer], self._values[layer] = fresh_k, fresh_v
        return self._keys[layer], self._values[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, commit: bool) -> torch.Tensor:
        """Attention of this call's frames over the committed frames and, causally, themselves; with
        `commit` their keys/values then overwrite the oldest ring slots (call `advance` after the pass)."""
        n_new = q.shape[2]
        keys, values = self._buffers(layer, k)
        keys[:, :, self.window : self.window + n_new] = k
        values[:, :, self.window : self.window + n_new] = v
        visible = torch.zeros(n_new, self.window, dtype=torch.bool, device=q.device)
        visible[:, : self.frames] = True
        allowed = torch.cat([visible, torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).tril()], dim=1)
        # a few queries over a short cache: explicit matmul + softmax beats the fused kernel's per-call setup
        scores = (q @ keys[:, :, : self.window + n_new].transpose(-1, -2)) * q.shape[-1] ** -0.5
        out = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ values[:, :, : self.window + n_new]
        if commit:
            keep = min(n_new, self.window)  # a clip longer than the window keeps its newest frames
            slots = (self._next + torch.arange(keep)) % self.window
            keys[:, :, slots] = k[:, :, n_new - keep :]
            values[:, :, slots] = v[:, :, n_new - keep :]
        return out

    def advance(self, n_new: int) -> None:
        """Account for `n_new` frames committed by the pass that just ran through every layer."""
        keep = min(n_new, self.window)
        self._next = (self._next + keep) % self.window
        self.frames = min(self.frames + keep, self.window)

    def clear(self) -> None:
        self._keys.clear()
        self._values.clear()
        self.frames = 0
        self._next = 0


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
    this call's keys/values enter the cache after use (only clean, committed frames should be).
    """
    if access is not None:
        return access.cache.attend(layer, q, k, v, access.commit)
    n = q.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool,
                                                                        device=q.device).tril())


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
            self.cache.advance(n_new)
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


def held_by_window(frames: torch.Tensor, committed: torch.Tensor | int, window: int, sink: int) -> torch.Tensor:
    """Which of `frames` (absolute indices) a sink + rolling window holds once `committed` frames were
    committed: the first `sink` frames forever, and the last `window - sink` others. What
    `ChunkKVCache`'s slots hold (`ChunkKVCache.held_frames`) and what `block_causal_mask`'s windowed
    reference lets a chunk see."""
    return (frames < committed) & ((frames < sink) | (frames >= committed - (window - sink)))


def block_causal_mask(frames: int, tokens_per_frame: int, chunk_frames: int,
                      device: torch.device | None = None, *, window: int | None = None, sink: int = 0,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """`[frames * tpf, frames * tpf]` bool, True where attention is allowed: every token of chunk k sees
    every token of chunks 0..k (bidirectional inside a chunk, causal across chunks), as in
    Self-Forcing / CausVid. Tokens are frame-major (frame, then space).

    `positions` are the frames' absolute indices (default 0..frames-1); a frame's chunk is its index //
    `chunk_frames`, so a subset of a stream's frames (sinks plus the recent window) keeps its chunks.
    With `window`, a chunk sees of the frames before it only those a `ChunkKVCache(window, sink)` holds
    when that chunk runs (`held_by_window` at the chunk's first frame): the exact attention of the cached
    stream past the window, recomputed in one forward.
    """
    if positions is None:
        if frames % chunk_frames:
            raise ValueError(f"{frames} frames do not split into chunks of {chunk_frames}")
        positions = torch.arange(frames, device=device)
    elif positions.shape != (frames,):
        raise ValueError(f"positions must be one absolute index per frame ({frames}), got {tuple(positions.shape)}")
    positions = positions.to(device)
    chunk = positions // chunk_frames
    allowed = chunk[None, :] <= chunk[:, None]  # [query frame, key frame]
    if window is not None:
        start = (chunk * chunk_frames)[:, None]  # first frame of each query's chunk
        allowed &= (chunk[None, :] == chunk[:, None]) | held_by_window(positions[None, :], start, window, sink)
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class ChunkKVCache:
    """Per-layer keys/values of committed frames for full spatio-temporal (block-causal) attention.

    Buffers `[batch, heads, (window + n_new) * tpf, head_dim]` are preallocated: `sink` slots hold the
    first `sink` committed frames forever (attention sinks), the other `window - sink` slots are a ring
    where the oldest non-sink frame is overwritten, then scratch for the current call's tokens. Keys
    must carry their positions already (rotary applied with the absolute frame index): rotary scores
    depend on distance only, so a cached key stays valid however the window slides.
    """

    def __init__(self, window: int, sink: int = 0) -> None:
        CausalCacheConfig(window=window)
        if not 0 <= sink < window:
            raise ValueError(f"sink frames must be in 0..window-1 ({window - 1}), got {sink!r}")
        self.window, self.sink = window, sink
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self.frames = 0  # committed frames held
        self.committed = 0  # frames ever committed (absolute index of the next frame)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._keys, self._values) for t in d.values())

    def held_frames(self) -> torch.Tensor:
        """Absolute indices of the committed frames whose keys/values the slots hold now."""
        frames = torch.arange(self.committed)
        return frames[held_by_window(frames, self.committed, self.window, self.sink)]

    def _slots(self, n: int) -> torch.Tensor:
        """Slots the next `n` committed frames go to (sinks first, then the ring of non-sink slots)."""
        out = []
        for i in range(self.committed, self.committed + n):
            out.append(i if i < self.sink else self.sink + (i - self.sink) % (self.window - self.sink))
        return torch.tensor(out, dtype=torch.long)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int,
               commit: bool) -> torch.Tensor:
        """This call's tokens (one chunk, `[B, heads, n_new * tpf, D]`) attend to every cached frame and
        to the whole chunk; with `commit` their keys/values then take their slots (call `advance`)."""
        tpf, n_tok = tokens_per_frame, q.shape[2]
        n_new = n_tok // tpf
        cap = self.window * tpf
        keys = self._keys.get(layer)
        if keys is None or keys.shape[2] < cap + n_tok or keys.shape[:2] != k.shape[:2] or keys.shape[3] != k.shape[3]:
            if keys is not None and self.frames:
                raise ValueError("the chunk's batch, heads or size grew mid-stream; reset the stream")
            shape = (k.shape[0], k.shape[1], cap + n_tok, k.shape[3])
            self._keys[layer], self._values[layer] = k.new_zeros(shape), k.new_zeros(shape)
            keys = self._keys[layer]
        values = self._values[layer]
        keys[:, :, cap : cap + n_tok] = k
        values[:, :, cap : cap + n_tok] = v
        held = torch.zeros(self.window, dtype=torch.bool, device=q.device)
        held[: self.frames] = True  # slots fill in order 0..window-1 before any is overwritten
        allowed = torch.cat([held.repeat_interleave(tpf), torch.ones(n_tok, dtype=torch.bool, device=q.device)])
        out = F.scaled_dot_product_attention(q, keys[:, :, : cap + n_tok], values[:, :, : cap + n_tok],
                                             attn_mask=allowed[None, None, None, :])
        if commit:
            ring_frames = n_new - max(0, min(n_new, self.sink - self.committed))  # those not taking a sink slot
            if ring_frames > self.window - self.sink:
                raise ValueError(f"a chunk of {n_new} frames puts {ring_frames} in the {self.window - self.sink} "
                                 "ring slots; use a larger window or smaller chunks")
            idx = (self._slots(n_new)[:, None] * tpf + torch.arange(tpf)).flatten().to(q.device)
            keys[:, :, idx] = k
            values[:, :, idx] = v
        return out

    def advance(self, n_new: int) -> None:
        """Account for `n_new` frames committed by the pass that just ran through every layer."""
        self.committed += n_new
        self.frames = min(self.frames + n_new, self.window)

    def clear(self) -> None:
        self._keys.clear()
        self._values.clear()
        self.frames = 0
        self.committed = 0
