"""Ca2-VDM cache sharing for Wan-based causal video DiTs (Self-Forcing / CausVid style), on diffusers'
`WanTransformer3DModel`.

The model runs chunk by chunk: each call takes the latent frames of one chunk, its self-attention
(`attn1` of every block) attends to the cached keys/values of committed frames plus the whole chunk
(block-causal, `accel.causal_cache.block_causal_mask`). Committing a chunk (a pass at the clean/context
timestep) writes its keys/values into an `accel.causal_cache.ChunkKVCache`: sink frames kept forever, a
rolling ring for the rest.

Positions: the rotary frame index of a chunk is its *absolute* frame index (`CausalWan.position`), and
keys are rotated before they are cached, so a score depends only on the distance of two frames and a
cached key stays valid as the window slides (no re-basing). The absolute index must stay below the
model's `rope_max_seq_len`; streams longer than that need `reset`.

diffusers (checked: 0.42.1) has no rolling KV cache for Wan self-attention (its hooks hold a text
cross-attention K/V cache only), so there is no peer to bench against.
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
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no .safetensors weights next to {config.name}")
    return WanTransformer3DModel.from_pretrained(folder, use_safetensors=True)


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


class _OffsetRope(torch.nn.Module):
    """Wraps `WanRotaryPosEmbed` so a chunk's frames get their absolute index `owner.position + i`."""

    def __init__(self, rope: torch.nn.Module, owner: CausalWan) -> None:
        super().__init__()
        self.rope, self.owner = rope, [owner]  # list: no module cycle

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, f, h, w = hidden_states.shape
        offset = self.owner[0].position
        if offset + f > self.rope.max_seq_len:
            raise ValueError(f"frame {offset + f} is past the model's rope_max_seq_len {self.rope.max_seq_len}")
        cos, sin = self.rope(SimpleNamespace(shape=(b, c, offset + f, h, w)))
        tokens = f * (h // self.rope.patch_size[1]) * (w // self.rope.patch_size[2])
        return cos[:, -tokens:], sin[:, -tokens:]


class CausalWan:
    """A `WanTransformer3DModel` run causally over chunks of latent frames with a shared KV cache.

    `denoise(latents, timestep, text)` predicts for one chunk (`[B, C, F, H, W]`) against the cache;
    `commit(latents, text, timestep=0)` runs the clean chunk once and caches its keys/values;
    `full(latents, timestep, text, chunk_frames)` is the reference: one forward over all frames with
    the block-causal mask (no cache).
    """

    def __init__(self, model: torch.nn.Module, window: int, sink: int = 0) -> None:
        if tuple(model.config.patch_size)[0] != 1:
            raise ValueError(f"patch_size {tuple(model.config.patch_size)}: chunking needs a temporal patch of 1")
        self.model = model
        self.cache = ChunkKVCache(window, sink)
        self.mask: torch.Tensor | None = None
        self.commit_flag = False
        self.tokens_per_frame = 0
        self.position = 0
        if not isinstance(model.rope, _OffsetRope):
            model.rope = _OffsetRope(model.rope, self)
        for i, block in enumerate(model.blocks):
            block.attn1.set_processor(_CausalSelfAttn(self, i))

    def _run(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        _, _, _, h, w = latents.shape
        p = self.model.config.patch_size
        self.tokens_per_frame = (h // p[1]) * (w // p[2])
        timestep = timestep.to(latents.device)
        return self.model(latents, timestep, text, return_dict=False)[0]

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.mask, self.commit_flag, self.position = None, False, self.cache.committed
        return self._run(latents, timestep, text)

    @torch.no_grad()
    def commit_chunk(self, latents: torch.Tensor, text: torch.Tensor,
                     timestep: torch.Tensor | None = None) -> torch.Tensor:
        """Run the clean chunk at the context timestep (0 by default), cache it; returns the output."""
        if timestep is None:
            timestep = torch.zeros(latents.shape[0])
        self.mask, self.commit_flag, self.position = None, True, self.cache.committed
        out = self._run(latents, timestep, text)
        self.cache.advance(latents.shape[2])
        self.commit_flag = False
        return out

    @torch.no_grad()
    def full(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
             chunk_frames: int) -> torch.Tensor:
        """Reference: all frames in one forward with the block-causal mask, positions from 0."""
        p = self.model.config.patch_size
        tpf = (latents.shape[3] // p[1]) * (latents.shape[4] // p[2])
        self.mask = block_causal_mask(latents.shape[2], tpf, chunk_frames, latents.device)
        self.position = 0
        try:
            return self._run(latents, timestep, text)
        finally:
            self.mask = None

    def reset(self) -> None:
        self.cache.clear()
