"""`livecache bench video --wan`: Ca2-VDM cache sharing on a Wan-shaped causal DiT (Self-Forcing / CausVid
style), a tiny random diffusers `WanTransformer3DModel` built in code, chunk by chunk.

Three ways to generate the same chunks from the same noise, each with the same flow-matching Euler
sampler (`--wan-steps` steps per chunk, the model's output taken as the velocity noise − x0):

* `cached`: every step attends to the shared `ChunkKVCache` (sinks + rolling window), one commit pass
  per chunk at timestep 0 (`adapters.diffusers_wan_causal.CausalWan`).
* `recompute`: no cache; every step runs the frames the window holds (sinks + recent frames, at their
  absolute positions, timestep 0) with the new chunk through the model under the block-causal mask,
  what an AR model without a KV cache does. Its cost grows until the window is full. Past the window it
  legitimately differs from `cached`: the cached keys of a held frame were computed when that frame
  still saw frames evicted since.
* `history`: no cache; every step runs *every* earlier frame with the sink + window mask, the exact
  attention of the cached stream recomputed (equal to `cached` at every chunk), its cost growing forever.

diffusers 0.42.1 has no peer to add: no rolling or block-causal self-attention KV cache for
`WanTransformer3DModel`. Its `TextKVCacheConfig` hook caches text K/V for NucleusMoE-Image blocks only,
and `WanAnimate2KVCache` belongs to another model (`WanAnimate2Transformer3DModel`): a reference video's
K/V extracted once and attended per frame under a flex `BlockMask` (flex backend, `torch.compile`), not a
cache of the model's own committed chunks with sinks and eviction.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..accel.causal_cache import held_by_window
from ..adapters.diffusers_wan_causal import CausalWan

MODES = ("cached", "recompute", "history")
TEXT_TOKENS = 8


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wan", action="store_true",
                        help="instead: the Wan-shaped causal DiT rows (tiny random diffusers WanTransformer3DModel): "
                             "per-chunk cost cached vs recompute, equality, memory past the window")
    parser.add_argument("--wan-chunks", type=int, default=8, help="--wan: chunks per AR run (default 8)")
    parser.add_argument("--wan-chunk-frames", type=int, default=3,
                        help="--wan: latent frames per chunk (default 3, as Self-Forcing)")
    parser.add_argument("--wan-window", type=int, default=12,
                        help="--wan: frames the cache holds, sinks included (default 12: chunks 1-5 fit)")
    parser.add_argument("--wan-sink", type=int, default=3, help="--wan: attention-sink frames (default 3)")
    parser.add_argument("--wan-steps", type=int, default=4, help="--wan: sampler steps per chunk (default 4)")
    parser.add_argument("--wan-latent", type=int, default=16,
                        help="--wan: latent height = width (default 16: 64 tokens per frame)")


def invalid(args: argparse.Namespace) -> str | None:
    """What is wrong with the `--wan-*` flags, or None."""
    for name in ("wan_chunks", "wan_chunk_frames", "wan_window", "wan_steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if not 0 <= args.wan_sink < args.wan_window:
        return f"--wan-sink must be in 0..{args.wan_window - 1} (below --wan-window)"
    if args.wan_chunk_frames > args.wan_window - args.wan_sink:
        return f"--wan-chunk-frames must fit the {args.wan_window - args.wan_sink} rolling slots (window - sink)"
    if args.wan_latent < 2 or args.wan_latent % 2:
        return "--wan-latent must be an even size of at least 2 (the patch is 2x2)"
    if args.wan_chunks * args.wan_chunk_frames > 256:
        return "--wan-chunks x --wan-chunk-frames must stay within the model's 256 rotary frames"
    return None


def tiny_wan(seed: int = 0) -> torch.nn.Module:
    """A seeded random Wan transformer: Wan 2.1's layout (patch (1, 2, 2), qk RMS norm, cross-attention
    to text, rotary 3D positions) at a width a 2-core CPU runs in milliseconds."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, rope_max_seq_len=256).eval()


def _sample(predict, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Flow-matching Euler from σ = 1 to 0: x ← x + (σ' − σ)·v, `predict(x, timestep)` the velocity."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = x + (following - sigma) * predict(x, 1000 * sigma)
    return x


def _generate(runner: CausalWan, mode: str, noise: list[torch.Tensor], text: torch.Tensor, args: argparse.Namespace,
              marks: list[float] | None = None, state: list[int] | None = None) -> torch.Tensor:
    """One AR run of `len(noise)` chunks (`[B, C, f, H, W]` each). Appends the time after each chunk to
    `marks` and the context bytes the mode holds to `state` (the cache's K/V; the kept latent frames).
    Returns every chunk's clean latents, `[B, C, chunks * f, H, W]`."""
    runner.reset()
    f, batch = args.wan_chunk_frames, noise[0].shape[0]
    window, sink = runner.cache.window, runner.cache.sink
    out: list[torch.Tensor] = []
    kept, kept_at = noise[0][:, :, :0], torch.zeros(0, dtype=torch.long)  # context frames and their positions
    if marks is not None:
        marks.append(time.perf_counter())
    for index, chunk_noise in enumerate(noise):
        new_at = torch.arange(index * f, (index + 1) * f)
        if mode == "cached":
            x = _sample(lambda x, t: runner.denoise(x, t.reshape(1).expand(batch), text), chunk_noise, args.wan_steps)
            runner.commit_chunk(x, text)
        else:
            positions = torch.cat([kept_at, new_at])

            def predict(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor = kept,
                        positions: torch.Tensor = positions) -> torch.Tensor:
                levels = torch.cat([torch.zeros(batch, context.shape[2]), t.expand(batch, f)], dim=1)
                full = runner.full(torch.cat([context, x], dim=2), levels, text, f, positions=positions,
                                   windowed=mode == "history")
                return full[:, :, -f:]

            x = _sample(predict, chunk_noise, args.wan_steps)
            kept, kept_at = torch.cat([kept, x], dim=2), torch.cat([kept_at, new_at])
            if mode == "recompute":  # only what the window holds: memory bounded like the cache's
                held = held_by_window(kept_at, int(new_at[-1]) + 1, window, sink)
                kept, kept_at = kept[:, :, held], kept_at[held]
        out.append(x)
        if marks is not None:
            marks.append(time.perf_counter())
        if state is not None:
            state.append(runner.cache.nbytes if mode == "cached" else kept.numel() * kept.element_size())
    return torch.cat(out, dim=2)


def run(args: argparse.Namespace) -> dict:
    """Time `--repeats` interleaved AR runs per mode (medians per chunk), then compare their chunks."""
    torch.set_num_threads(args.threads)
    model = tiny_wan()
    runner = CausalWan(model, window=args.wan_window, sink=args.wan_sink)
    f, size = args.wan_chunk_frames, args.wan_latent
    g = torch.Generator().manual_seed(0)
    channels = model.config.in_channels
    noise = [torch.randn(1, channels, f, size, size, generator=g) for _ in range(args.wan_chunks)]
    text = torch.randn(1, TEXT_TOKENS, model.config.text_dim, generator=g)
    for mode in MODES:  # warm-up
        _generate(runner, mode, noise[:2], text, args)
    times: dict[str, list[list[float]]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:  # rotate which mode goes first
            marks: list[float] = []
            _generate(runner, mode, noise, text, args, marks)
            times[mode].append([b - a for a, b in zip(marks, marks[1:], strict=False)])
    median = {m: [statistics.median(run[i] for run in times[m]) for i in range(args.wan_chunks)] for m in MODES}
    videos, state = {}, {}
    for mode in MODES:
        state[mode] = []
        videos[mode] = _generate(runner, mode, noise, text, args, state=state[mode])
    # chunk c (1-based) fits when the (c - 1) * f frames before it all fit the window: no eviction yet
    fits = min(args.wan_chunks, args.wan_window // f + 1)
    scale = float(videos["history"].abs().max())

    def delta(a: str, b: str) -> list[float]:
        return [float((videos[a][:, :, i * f : (i + 1) * f] - videos[b][:, :, i * f : (i + 1) * f]).abs().max()) / scale
                for i in range(args.wan_chunks)]

    return {
        "config": {k: v for k, v in vars(args).items() if k.startswith("wan") or k in ("repeats", "threads")},
        "model": {"params": sum(p.numel() for p in model.parameters()), "tokens_per_frame": (size // 2) ** 2,
                  **{k: model.config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                                  "ffn_dim", "in_channels")}},
        "threads": torch.get_num_threads(),
        "seconds_per_chunk": median,
        "context_frames": [int(held_by_window(torch.arange(i * f), i * f, args.wan_window, args.wan_sink).sum())
                           for i in range(args.wan_chunks)],
        "fits_window_chunks": fits,
        "relative_delta_vs_recompute": delta("cached", "recompute"),
        "relative_delta_vs_history": delta("cached", "history"),
        "relative_bound": 64 * torch.finfo(torch.float32).eps,  # the suite's reassociation bound (64 eps)
        "state_bytes": state,
        "diffusers_peer": None,
        "diffusers_peer_reason": "diffusers has no rolling / block-causal self-attention KV cache for "
                                 "WanTransformer3DModel (see bench/video_wan.py)",
    }


def print_table(result: dict) -> None:
    t, ctx = result["seconds_per_chunk"], result["context_frames"]
    d_re, d_hist = result["relative_delta_vs_recompute"], result["relative_delta_vs_history"]
    state = result["state_bytes"]
    print("| chunk | context frames | cached ms | recompute ms | speed-up | history ms | speed-up | "
          "max abs diff vs recompute | vs history | cache KiB | recompute context KiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i in range(len(t["cached"])):
        print(f"| {i + 1} | {ctx[i]} | {1000 * t['cached'][i]:.1f} | {1000 * t['recompute'][i]:.1f} | "
              f"{t['recompute'][i] / t['cached'][i]:.2f}x | {1000 * t['history'][i]:.1f} | "
              f"{t['history'][i] / t['cached'][i]:.2f}x | {d_re[i]:.1e} | {d_hist[i]:.1e} | "
              f"{state['cached'][i] / 1024:.0f} | {state['recompute'][i] / 1024:.0f} |")
    fits, bound = result["fits_window_chunks"], result["relative_bound"]
    steady = t["cached"][1:] or t["cached"]
    flat = statistics.median(steady)
    print(f"cached, chunks 2..{len(t['cached'])}: median {1000 * flat:.1f} ms, min {min(steady) / flat:.2f}x / "
          f"max {max(steady) / flat:.2f}x of it")
    print(f"max |cached - recompute| / max|x| over chunks 1..{fits} (context within the window): "
          f"{max(d_re[:fits]):.1e} (bound {bound:.1e}); cached vs history (same sink + window mask) over all "
          f"chunks: {max(d_hist):.1e}")
    print(f"diffusers peer: none: {result['diffusers_peer_reason']}")
