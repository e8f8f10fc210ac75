"""Ca2-VDM cache sharing on a tiny random diffusers `WanTransformer3DModel` (real layout), on CPU."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from livecache.accel.causal_cache import block_causal_mask  # noqa: E402
from livecache.adapters.diffusers_wan_causal import CausalWan, load_wan_transformer  # noqa: E402

CHUNK = 2  # latent frames per chunk


def tiny_wan() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=64).eval()


def inputs(frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, frames, 4, 4, generator=g), torch.randn(1, 3, 16, generator=g)


def test_mask_is_block_causal_over_chunks():
    mask = block_causal_mask(4, 2, 2)
    chunk_of_token = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for i in range(8):
        for j in range(8):
            assert bool(mask[i, j]) == bool(chunk_of_token[j] <= chunk_of_token[i])
    with pytest.raises(ValueError, match="chunks"):
        block_causal_mask(5, 2, 2)


def test_chunked_with_cache_equals_full_block_causal_forward(close_reassociated):
    model = tiny_wan()
    latents, text = inputs(6)
    t = torch.tensor([500.0])
    runner = CausalWan(model, window=6, sink=1)
    full = runner.full(latents, t, text, CHUNK)
    chunks = [runner.commit_chunk(latents[:, :, i : i + CHUNK], text, t) for i in range(0, 6, CHUNK)]
    close_reassociated(torch.cat(chunks, dim=2), full, 64)
    # a denoise call on a new chunk leaves the cache unchanged; the plain (non-causal) model differs
    assert runner.cache.frames == 6
    plain = diffusers.WanTransformer3DModel.from_config(model.config).eval()
    plain.load_state_dict(tiny_wan().state_dict())
    with torch.no_grad():
        unmasked = plain(latents, t, text, return_dict=False)[0]
    assert not torch.allclose(unmasked[:, :, :CHUNK], full[:, :, :CHUNK], atol=1e-4)


def test_past_the_window_memory_is_flat_and_sinks_are_kept():
    model = tiny_wan()
    runner = CausalWan(model, window=5, sink=1)
    latents, text = inputs(2 * 8)
    sizes = []
    sink_keys = None
    for i in range(8):
        runner.commit_chunk(latents[:, :, 2 * i : 2 * i + 2], text)
        sizes.append(runner.cache.nbytes)
        if i == 0:
            sink_keys = runner.cache._keys[0][:, :, :4].clone()  # frame 0: 4 tokens per frame
    assert len(set(sizes)) == 1 and runner.cache.frames == 5 and runner.cache.committed == 16
    assert torch.equal(runner.cache._keys[0][:, :, :4], sink_keys)
    out = runner.denoise(latents[:, :, :2], torch.tensor([900.0]), text)
    assert out.shape == (1, 4, 2, 4, 4) and runner.cache.nbytes == sizes[0]


def test_loading_from_a_saved_folder_and_refusals(tmp_path):
    model = tiny_wan()
    model.save_pretrained(tmp_path / "ok", safe_serialization=True)
    loaded = load_wan_transformer(tmp_path / "ok")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    bad = tmp_path / "bin"
    model.save_pretrained(bad, safe_serialization=True)
    (bad / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin"):
        load_wan_transformer(bad)
    wrong = tmp_path / "wrong"
    model.save_pretrained(wrong, safe_serialization=True)
    (wrong / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="config.json"):
        load_wan_transformer(wrong)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_wan_transformer(tmp_path / "missing")
