"""Ca2-VDM cache sharing for Wan-based causal video DiTs (Self-Forcing / CausVid style), on diffusers'
`WanTransformer3DModel`.

The model runs chunk by chunk: each call takes the latent frames of one chunk, its self-attention
(`attn1` of every block) attends to the cached keys/values of committed frames plus the whole chunk
(block-causal, `accel.causal_cache.block_causal_mask`). Committing a chunk (a pass at the clean/context
timestep) writes its keys/values into an `accel.causal_cache.ChunkKVCache`: sink frames kept forever, a
rolling ring for the rest.

Positions: the rotary frame index of a frame is its *absolute* frame index (`CausalWan.positions`), and
keys are rotated before they are cached, so a score depends only on the distance of two frames and a
cached key stays valid as the window slides (no re-basing). The absolute index must stay below the
model's `rope_max_seq_len`; streams longer than that need `reset`.

diffusers (checked: 0.42.1) has no rolling KV cache for Wan self-attention (its `TextKVCacheConfig` hook
serves NucleusMoE-Image blocks only; `WanAnimate2KVCache` holds a reference video's K/V for another model),
so `livecache bench video --wan` has no diffusers peer (`bench/video_wan.py` says why).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from ..accel.causal_cache import ChunkKVCache, block_causal_mask


def load_wan_transformer(folder: str | Path) -> torch.nn.Module:
    """A `WanTransformer3DModel` from a local diffusers-format folder, safetensors only; a pickled
    `.bin` weight or a missing / wrong `config.json` is refused with the file named."""
    from diffusers import WanTransformer3DModel

    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no config.json; expected a diffusers WanTransformer3DModel folder")
    for pickled in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        raise ValueError(f"{pickled}: pickled weights are refused; convert them to .safetensors")
    try:
        fields = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config}: not valid JSON ({err})") from err
    if not isinstance(fields, dict) or fields.get("_class_name") != "WanTransformer3DModel":
        found = fields.get("_class_name") if isinstance(fields, dict) else type(fields).__name__
        raise ValueError(f"{config}: _class_name is {found!r}, expected 'WanTransformer3DModel'")
    weights = ", ".join(w.name for w in sorted(folder.glob("*.safetensors")))
    if not weights:
        raise FileNotFoundError(f"{folder}: no .safetensors weights next to {config.name}")
    try:
        model, info = WanTransformer3DModel.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    except (TypeError, ValueError, RuntimeError) as err:  # shapes or field types the weights do not have
        raise ValueError(f"{config}: does not describe the weights in {weights}: {err}") from err
    # diffusers fills layers the weights lack with random values (a warning only): a config that asks
    # for more blocks than were saved would run a partly random model
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    if missing or unexpected:
        raise ValueError(f"{config}: does not describe the weights in {weights}: {len(missing)} tensors missing "
                         f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
    return model


class _CausalSelfAttn:
    """`attn1` processor: the Wan self-attention with the chunk cache or a block-causal mask."""

    def __init__(self, owner: CausalWan, layer: int) -> None:
        self.owner, self.layer = owner, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, tokens, D]
        state = self.owner
        if state.mask is not None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=state.mask)
        else:
            out = state.cache.attend(self.layer, q, k, v, state.tokens_per_frame, state.commit_flag)
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (the same arithmetic as diffusers' `WanAttnProcessor`)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class _FramePositionRope(torch.nn.Module):
    """Wraps `WanRotaryPosEmbed` so frame i of a call gets the rotary index `owner.positions[i]` (its
    absolute frame index in the stream). Only the temporal columns of the table depend on the frame, so
    one frame's table from diffusers' own forward is repeated and its temporal columns replaced: the
    cost is that of the call's frames, not of every frame up to the newest position."""

    def __init__(self, rope: torch.nn.Module, owner: CausalWan) -> None:
        super().__init__()
        self.rope, self.owner = rope, [owner]  # list: no module cycle

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, f, h, w = hidden_states.shape
        positions = self.owner[0].positions
        if positions.shape != (f,):
            raise ValueError(f"{tuple(positions.shape)} positions for {f} frames")
        newest = int(positions.max())
        if newest >= self.rope.max_seq_len:
            raise ValueError(f"frame {newest} is past the model's rope_max_seq_len {self.rope.max_seq_len}; "
                             "reset the stream")
        cos, sin = self.rope(SimpleNamespace(shape=(b, c, 1, h, w)))  # [1, tokens of one frame, 1, head_dim]
        index = positions.to(self.rope.freqs_cos.device)
        return (_place_frames(cos, self.rope.freqs_cos, index, self.rope.t_dim),
                _place_frames(sin, self.rope.freqs_sin, index, self.rope.t_dim))


def _place_frames(one_frame: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, t_dim: int) -> torch.Tensor:
    """One frame's rotary table repeated per frame, the first `t_dim` (temporal) columns from `positions`
    (diffusers concatenates the temporal, height and width parts in that order)."""
    tpf, dim = one_frame.shape[1], one_frame.shape[-1]
    out = one_frame.reshape(1, 1, tpf, dim).repeat(1, positions.numel(), 1, 1)
    out[..., :t_dim] = table[positions, :t_dim][None, :, None, :].to(out.dtype)
    return out.reshape(1, positions.numel() * tpf, 1, dim)


class CausalWan:
    """A `WanTransformer3DModel` run causally over chunks of latent frames with a shared KV cache.

    `denoise(latents, timestep, text)` predicts for one chunk (`[B, C, F, H, W]`) against the cache;
    `commit_chunk(latents, text, timestep=0)` runs the clean chunk once and caches its keys/values;
    `full(latents, timestep, text, chunk_frames, ...)` is the reference without a cache: the given frames
    in one forward with the block-causal mask (optionally the sink + window one), per-frame timesteps.
    """

    def __init__(self, model: torch.nn.Module, window: int, sink: int = 0) -> None:
        if tuple(model.config.patch_size)[0] != 1:
            raise ValueError(f"patch_size {tuple(model.config.patch_size)}: chunking needs a temporal patch of 1")
        self.model = model
        self.cache = ChunkKVCache(window, sink)
        self.mask: torch.Tensor | None = None
        self.commit_flag = False
        self.tokens_per_frame = 0
        self.positions = torch.zeros(0, dtype=torch.long)  # absolute frame index of each frame of the call
        if not isinstance(model.rope, _FramePositionRope):
            model.rope = _FramePositionRope(model.rope, self)
        for i, block in enumerate(model.blocks):
            block.attn1.set_processor(_CausalSelfAttn(self, i))

    def _run(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
             positions: torch.Tensor) -> torch.Tensor:
        """One model call; `timestep` `[B]`, or `[B, F]` per latent frame (spread over the frame's tokens)."""
        _, _, frames, h, w = latents.shape
        p = self.model.config.patch_size
        self.tokens_per_frame = (h // p[1]) * (w // p[2])
        self.positions = positions
        timestep = timestep.to(latents.device)
        if timestep.ndim == 2:
            if timestep.shape[1] != frames:
                raise ValueError(f"per-frame timesteps {tuple(timestep.shape)} for {frames} frames")
            timestep = timestep.repeat_interleave(self.tokens_per_frame, dim=1)
        return self.model(latents, timestep, text, return_dict=False)[0]

    def _next_positions(self, frames: int) -> torch.Tensor:
        return torch.arange(self.cache.committed, self.cache.committed + frames)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The model's prediction for the next chunk at `timestep`, attending to the cache; caches nothing."""
        self.mask, self.commit_flag = None, False
        return self._run(latents, timestep, text, self._next_positions(latents.shape[2]))

    @torch.no_grad()
    def commit_chunk(self, latents: torch.Tensor, text: torch.Tensor,
                     timestep: torch.Tensor | None = None) -> torch.Tensor:
        """Run the clean chunk at the context timestep (0 by default), cache it; returns the output."""
        if timestep is None:
            timestep = torch.zeros(latents.shape[0])
        self.mask, self.commit_flag = None, True
        try:
            out = self._run(latents, timestep, text, self._next_positions(latents.shape[2]))
        finally:
            self.commit_flag = False
        self.cache.advance(latents.shape[2])
        return out

    @torch.no_grad()
    def full(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, chunk_frames: int,
             positions: torch.Tensor | None = None, windowed: bool = False) -> torch.Tensor:
        """Reference without the cache: all `latents` frames in one forward under `block_causal_mask`.

        `positions`: the frames' absolute indices (default 0..F-1; a recomputed window passes its sinks
        and recent frames). `windowed`: each chunk sees of earlier frames only those this runner's cache
        would hold (sinks + rolling window), the exact cached attention past the window. `timestep`: `[B]`
        or `[B, F]` (e.g. 0 for context frames, the noise level for the new chunk).
        """
        frames = latents.shape[2]
        p = self.model.config.patch_size
        tpf = (latents.shape[3] // p[1]) * (latents.shape[4] // p[2])
        window = (self.cache.window, self.cache.sink) if windowed else (None, 0)
        self.mask = block_causal_mask(frames, tpf, chunk_frames, latents.device, window=window[0], sink=window[1],
                                      positions=positions)
        try:
            return self._run(latents, timestep, text, torch.arange(frames) if positions is None else positions)
        finally:
            self.mask = None

    def reset(self) -> None:
        self.cache.clear()
