"""Ca2-VDM cache sharing on a tiny random diffusers `WanTransformer3DModel` (real layout), on CPU."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from livecache.accel.causal_cache import ChunkKVCache, block_causal_mask  # noqa: E402
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


def test_windowed_mask_keeps_sinks_and_the_recent_window():
    # window 4 with 1 sink, chunks of 2: chunk 3 (frames 6, 7) sees frame 0 (sink), 3..5 (ring) and itself
    mask = block_causal_mask(8, 1, 2, window=4, sink=1)
    assert mask[6].tolist() == [True, False, False, True, True, True, True, True]
    assert torch.equal(mask[6], mask[7])
    assert torch.equal(mask[:6], block_causal_mask(8, 1, 2)[:6])  # before chunk 3 the context fits the window
    # a subset of a stream's frames keeps their chunks: sink 0 and frames 5..7 -> chunks 0, 2, 3, 3
    subset = block_causal_mask(4, 1, 2, positions=torch.tensor([0, 5, 6, 7]))
    assert subset.tolist() == [[True, False, False, False], [True, True, False, False],
                               [True, True, True, True], [True, True, True, True]]


def test_cache_slots_hold_the_sinks_and_the_recent_window():
    """Chunk-by-chunk commits, keys encoding their frame index: the slots hold `held_frames`, a chunk that
    straddles the sink boundary splits between sink and ring slots, and one too big for the ring is refused."""
    cache = ChunkKVCache(window=5, sink=3)
    for start in range(0, 12, 2):
        frames = torch.arange(start, start + 2, dtype=torch.float32)
        k = frames.reshape(1, 1, 2, 1).expand(1, 1, 2, 4)
        cache.attend(0, k, k, k, tokens_per_frame=1, commit=True)
        cache.advance(2)
        stored = cache._keys[0][0, 0, : cache.frames, 0]
        assert sorted(stored.tolist()) == cache.held_frames().float().tolist()
    assert cache.held_frames().tolist() == [0, 1, 2, 10, 11]
    wide = ChunkKVCache(window=4, sink=1)
    k = torch.zeros(1, 1, 4, 2)
    wide.attend(0, k, k, k, tokens_per_frame=1, commit=True)  # frame 0 to the sink, 1..3 to the 3 ring slots
    wide.advance(4)
    with pytest.raises(ValueError, match="ring slots"):
        wide.attend(0, k, k, k, tokens_per_frame=1, commit=True)


def test_rope_positions_match_diffusers_and_one_chunk_is_the_plain_model(close_reassociated):
    """The per-frame rotary table equals diffusers' own for frames 0..F-1, so `full` with one chunk
    covering every frame (no mask in effect) and per-frame timesteps is the unmodified model."""
    model, plain = tiny_wan(), tiny_wan()
    latents, text = inputs(6)
    t = torch.tensor([300.0])
    with torch.no_grad():
        expected = plain(latents, t, text, return_dict=False)[0]
        table = plain.rope(latents)
    runner = CausalWan(model, window=6)
    runner.positions = torch.arange(6)
    for ours, theirs in zip(model.rope(latents), table, strict=True):
        assert torch.equal(ours, theirs)
    close_reassociated(runner.full(latents, t.expand(1, 6), text, chunk_frames=6), expected)


def test_a_chunk_denoised_against_the_cache_equals_full_recomputation(close_reassociated):
    """Context committed at timestep 0, then chunk 3 denoised at two noise levels against the cache:
    each prediction equals one forward over context + chunk with the context at 0 and the chunk at its
    level, positions 0..7; the cache is left as the commits made it."""
    model = tiny_wan()
    latents, text = inputs(8)
    runner = CausalWan(model, window=8)
    for i in range(0, 6, CHUNK):
        runner.commit_chunk(latents[:, :, i : i + CHUNK], text)
    slots = runner.cache.window * 4  # the committed slots (4 tokens per frame); the rest is scratch
    held = [t[:, :, :slots].clone() for t in runner.cache._keys.values()]
    for level in (900.0, 400.0):
        noisy = torch.randn(1, 4, CHUNK, 4, 4, generator=torch.Generator().manual_seed(int(level)))
        cached = runner.denoise(noisy, torch.tensor([level]), text)
        levels = torch.tensor([[0.0] * 6 + [level] * CHUNK])
        reference = runner.full(torch.cat([latents[:, :, :6], noisy], dim=2), levels, text, CHUNK)[:, :, 6:]
        close_reassociated(cached, reference)
        # the check has teeth: the same mask with the chunk's rotary index 4 frames off is far off
        shifted = runner.full(torch.cat([latents[:, :, :6], noisy], dim=2), levels, text, CHUNK,
                              positions=torch.tensor([0, 1, 2, 3, 4, 5, 10, 11]))[:, :, 6:]
        assert float((shifted - reference).abs().max()) > 1e3 * close_reassociated.bound() * float(
            reference.abs().max())
    assert runner.cache.committed == 6
    assert all(torch.equal(a, b[:, :, :slots]) for a, b in zip(held, runner.cache._keys.values(), strict=True))


def test_a_chunk_past_the_sink_boundary_and_the_window_equals_the_windowed_reference(close_reassociated):
    """Sink 3, window 7, chunks of 2: chunk 1 straddles the sink boundary (frame 2 a sink, frame 3 in the
    ring) and from chunk 4 on the ring evicts. Every commit and a denoised chunk 6 equal one forward over
    all frames with the sink + window mask; memory is the same after every chunk."""
    model = tiny_wan()
    latents, text = inputs(14)
    runner = CausalWan(model, window=7, sink=3)
    commits, sizes = [], []
    for i in range(0, 12, CHUNK):
        commits.append(runner.commit_chunk(latents[:, :, i : i + CHUNK], text))
        sizes.append(runner.cache.nbytes)
    assert runner.cache.held_frames().tolist() == [0, 1, 2, 8, 9, 10, 11]
    zero = torch.zeros(1)
    close_reassociated(torch.cat(commits, dim=2), runner.full(latents[:, :, :12], zero, text, CHUNK, windowed=True))
    level = torch.tensor([700.0])
    cached = runner.denoise(latents[:, :, 12:], level, text)
    levels = torch.tensor([[0.0] * 12 + [700.0] * CHUNK])
    reference = runner.full(latents, levels, text, CHUNK, windowed=True)[:, :, 12:]
    close_reassociated(cached, reference)
    # eviction matters: attending to every earlier frame (no window) gives another chunk
    unwindowed = runner.full(latents, levels, text, CHUNK)[:, :, 12:]
    assert float((unwindowed - reference).abs().max()) > 1e3 * close_reassociated.bound() * float(
        reference.abs().max())
    assert len(set(sizes)) == 1 and runner.cache.nbytes == sizes[0]


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
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    # a Wan config that does not describe the saved weights: more blocks than saved (diffusers alone would
    # fill them with random values), another width, a field of the wrong type, not JSON at all
    for name, text in [("more_layers", json.dumps({**config, "num_layers": 3})),
                       ("wider", json.dumps({**config, "ffn_dim": 64})),
                       ("typo", json.dumps({**config, "num_layers": "two"})), ("not_json", "{")]:
        folder = tmp_path / name
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"{name}/config.json"):
            load_wan_transformer(folder)


def test_bench_wan_rows_equal_within_the_window_and_hold_flat_memory_past_it():
    """`livecache bench video --wan` at toy sizes: cached equals both recomputations while the context
    fits, equals the windowed full-history one after eviction and differs from the window recompute
    (so the equality rows can fail); the cache's bytes never change, the recompute context's stop growing."""
    import argparse

    from livecache.bench import video_wan

    args = argparse.Namespace(wan=True, wan_chunks=5, wan_chunk_frames=2, wan_window=4, wan_sink=1, wan_steps=2,
                              wan_latent=4, repeats=1, threads=1)
    assert video_wan.invalid(args) is None
    result = video_wan.run(args)
    bound, fits = result["relative_bound"], result["fits_window_chunks"]
    assert fits == 3 and result["context_frames"] == [0, 2, 4, 4, 4]
    assert max(result["relative_delta_vs_recompute"][:fits]) <= bound
    assert min(result["relative_delta_vs_recompute"][fits:]) > 10 * bound
    assert max(result["relative_delta_vs_history"]) <= bound
    assert len(set(result["state_bytes"]["cached"])) == 1
    context = result["state_bytes"]["recompute"]
    assert context[0] < context[1] == context[2] == context[3] == context[4]  # full from chunk 2 on
    assert video_wan.invalid(argparse.Namespace(**{**vars(args), "wan_chunk_frames": 4})).startswith(
        "--wan-chunk-frames")
