"""`livecache bench video`: time per generated clip vs AR step, causal cache shared vs recompute, and
what the video shows (`bench/video_content.py`: class share per condition, after a change, motion).

One process, one model, the same seeds and noise for both modes (`models.video.generate`). After a
warm-up, the whole AR run (`--chunks` clips) is repeated `--repeats` times per mode, alternating which
mode goes first, and each clip index reports its median time. With the cache, each clip costs
`steps` denoiser calls on the new frames plus one commit call, whatever the context; recomputing runs
the whole context through the model at every step, so its cost grows until the window is full.

Fidelity sits beside the speed: the max abs difference of the two modes' frames over the clips whose
context still fits the window (they must match to float tolerance there; after the first eviction the
cache holds keys computed with older context, so the modes legitimately diverge — PSNR over all frames
is reported for that part). Memory: peak RSS growth of each mode over a separate, untimed run (Linux
`/proc/self/clear_refs` resets the peak; freed heap is trimmed first), and the cache's own bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from ..accel.causal_cache import CausalCacheConfig, CausalVideoStream
from ..files import text_writer, write_replacing
from ..models.video import SAMPLERS, CausalVideoDiT, generate, load_video_classifier, load_video_model
from ..procfs import status_kib
from . import video_wan
from .metrics import psnr
from .video_content import content_report, print_content

MODES = ("cached", "recompute")
REPORT_AT = (1, 2, 4, 8, 16, 32, 64)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=32, help="clips per AR run (default 32)")
    parser.add_argument("--chunk-length", type=int, default=4, help="frames per clip (default 4)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per clip (default 4)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="lcm", help="sampler (default lcm)")
    parser.add_argument("--window", type=int, default=32,
                        help="context window in frames for both modes (default 32: the context of clip 8 "
                             "still fits, so outputs must match there)")
    parser.add_argument("--batch", type=int, default=4,
                        help="streams generated together, as a server batches its sessions (default 4; at 1 the "
                             "tiny model's per-call overhead dominates the cached clips)")
    parser.add_argument("--repeats", type=int, default=3, help="timed AR runs per mode; medians (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: this model's ops are small; more threads mostly add "
                             "synchronisation)")
    parser.add_argument("--weights", type=Path, default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--content-clips", type=int, default=12,
                        help="clips per stream for the content rows (class share per condition, after a condition "
                             "change, frame-to-frame change against the data's); 0 skips them (default 12)")
    parser.add_argument("--content-steps", type=int, default=3,
                        help="sampler steps for the content rows (default 3, as the live engine)")
    parser.add_argument("--switch-at", type=int, default=4,
                        help="content rows: the clip after which each stream changes condition (default 4)")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="content classifier file (default: the shipped video_features.safetensors)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--live", type=float, default=None, metavar="SECONDS",
                        help="instead: start `livecache serve --engine video`, stream SECONDS over the websocket API "
                             "(changing the condition every 10 s) and report frames, gaps and the server's RSS")
    video_wan.configure(parser)


def peak_memory_mib(run) -> float | None:
    """Peak resident-memory growth (MiB) while `run()` executes; None where Linux's counters are missing."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = status_kib("VmRSS")
    run()
    peak = status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def _timed_run(model: CausalVideoDiT, cache: CausalCacheConfig, args: argparse.Namespace,
               labels: torch.Tensor) -> tuple[list[float], torch.Tensor, list[int]]:
    marks, context = [time.perf_counter()], []

    def on_chunk(index: int, stream: CausalVideoStream) -> None:
        marks.append(time.perf_counter())
        context.append(stream.context_frames)

    video = generate(model, cache, labels, args.chunks, args.chunk_length, args.steps, args.sampler, 0, on_chunk)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)], video, context


def run_bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load_video_model(args.weights)
    torch.manual_seed(0)
    labels = torch.arange(args.batch) % model.config.num_classes
    configs = {mode: CausalCacheConfig(enabled=mode == "cached", window=args.window) for mode in MODES}
    warm = argparse.Namespace(**{**vars(args), "chunks": 2})
    for mode in MODES:
        _timed_run(model, configs[mode], warm, labels)
    times: dict[str, list[list[float]]] = {m: [] for m in MODES}
    videos: dict[str, torch.Tensor] = {}
    context: dict[str, list[int]] = {}
    for r in range(args.repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            seconds, video, ctx = _timed_run(model, configs[mode], args, labels)
            times[mode].append(seconds)
            videos[mode], context[mode] = video, ctx
    median = {m: [statistics.median(run[i] for run in times[m]) for i in range(args.chunks)] for m in MODES}
    fits = max(1, min(args.chunks, args.window // args.chunk_length + 1))  # clips whose context never evicted
    exact_frames = fits * args.chunk_length
    diff = float((videos["cached"][:, :exact_frames] - videos["recompute"][:, :exact_frames]).abs().max())
    memory, state_bytes = {}, {}
    for mode in MODES:
        def run(mode: str = mode) -> None:
            def record(index: int, stream: CausalVideoStream) -> None:
                state_bytes[mode] = stream.state_bytes

            generate(model, configs[mode], labels, args.chunks, args.chunk_length, args.steps, args.sampler, 0,
                     record)

        memory[mode] = peak_memory_mib(run)
    content = None
    if args.content_clips:
        content = content_report(model, load_video_classifier(args.classifier), args.content_clips,
                                 args.chunk_length, args.content_steps, args.sampler, args.switch_at)
    cached, recompute = median["cached"], median["recompute"]
    steady = cached[1:]  # from clip 2 on
    flat = statistics.median(steady) if steady else cached[0]
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if not k.startswith("_") and k not in ("func",)},
        "model": {"params": sum(p.numel() for p in model.parameters()), **vars(model.config)},
        "threads": torch.get_num_threads(),
        "seconds_per_chunk": median,
        "context_frames": context,
        "ratio": {str(n): recompute[n - 1] / cached[n - 1] for n in REPORT_AT if n <= args.chunks},
        "cached_flatness": {"median_s": flat, "min_over_median": min(steady or [flat]) / flat,
                            "max_over_median": max(steady or [flat]) / flat},
        "max_abs_diff_in_window": diff,
        "exact_clips": fits,
        "psnr_all_frames_db": psnr((videos["cached"] + 1) / 2, (videos["recompute"] + 1) / 2, peak=1.0),
        "peak_rss_growth_mib": memory,
        "state_bytes_at_end": state_bytes,
        "content": content,
    }


def print_table(result: dict) -> None:
    cached, recompute = result["seconds_per_chunk"]["cached"], result["seconds_per_chunk"]["recompute"]
    length, window = result["config"]["chunk_length"], result["config"]["window"]
    print("| clip | context frames | cache shared ms | recompute ms | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for n in REPORT_AT:
        if n <= len(cached):
            print(f"| {n} | {min((n - 1) * length, window)} | {1000 * cached[n - 1]:.1f} | "
                  f"{1000 * recompute[n - 1]:.1f} | {recompute[n - 1] / cached[n - 1]:.2f}x |")
    flat, mem, state = result["cached_flatness"], result["peak_rss_growth_mib"], result["state_bytes_at_end"]
    print(f"cache shared, clips 2..{len(cached)}: median {1000 * flat['median_s']:.1f} ms, "
          f"min {flat['min_over_median']:.2f}x / max {flat['max_over_median']:.2f}x of the median")
    print(f"max |cached - recompute| over the first {result['exact_clips']} clips (context within the window): "
          f"{result['max_abs_diff_in_window']:.2e}; PSNR over all frames {result['psnr_all_frames_db']:.1f} dB")
    fmt = lambda v: "n/a" if v is None else f"{v:.1f} MiB"  # noqa: E731
    print(f"peak RSS growth: cache shared {fmt(mem['cached'])}, recompute {fmt(mem['recompute'])}; "
          f"state held at the end: cache {state['cached'] / 2**20:.2f} MiB, "
          f"recompute context {state['recompute'] / 2**20:.2f} MiB")
    if result["content"] is not None:
        print_content(result["content"])


def _child_pids() -> list[int]:
    """PIDs whose parent is this process (the server subprocess), read from /proc."""
    me, found = str(Path("/proc/self").resolve().name), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            found.append(int(stat.parent.name))
    return found


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _live_session(base: str, seconds: float, pid: int | None) -> dict:
    import websockets

    from ..examples.ws_client import unpack_frame
    from .loopback import ws_url

    prompts = ["texture", "3", "shapes", "7", "texture", "0"]
    arrivals: list[float] = []
    rss: list[tuple[float, float | None]] = []
    applied: list[str] = []
    loop = asyncio.get_running_loop()
    async with websockets.connect(ws_url(base), max_size=16 * 2**20) as ws:
        await ws.send(json.dumps({"type": "start", "size": 512, "fps": 12, "seed": 10}))
        start = loop.time()
        next_change, next_sample = start + 10, start
        while loop.time() - start < seconds:
            message = await asyncio.wait_for(ws.recv(), 10)
            now = loop.time()
            if isinstance(message, bytes):
                unpack_frame(message)
                arrivals.append(now - start)
            elif json.loads(message)["type"] == "condition":
                applied.append(json.loads(message)["name"])
            if now >= next_change:
                await ws.send(json.dumps({"type": "condition", "prompt": prompts[len(applied) % len(prompts)]}))
                next_change += 10
            if now >= next_sample:
                rss.append((round(now - start, 1), None if pid is None else _rss_mib(pid)))
                next_sample += 5
        await ws.send(json.dumps({"type": "stop"}))
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    values = [v for _, v in rss if v is not None]
    return {"seconds": seconds, "frames": len(arrivals), "fps": len(arrivals) / seconds,
            "max_gap_s": max(gaps) if gaps else None, "conditions_applied": applied, "rss_mib": rss,
            "rss_growth_mib_after_10s": (values[-1] - values[2]) if len(values) > 3 else None}


def run_live(seconds: float) -> dict:
    from .loopback import spawn_server

    with spawn_server("--engine", "video") as base:
        children = _child_pids()
        return asyncio.run(_live_session(base, seconds, children[0] if len(children) == 1 else None))


def main(args: argparse.Namespace) -> int:
    if args.live is not None:
        result = run_live(args.live)
        rss = [v for _, v in result["rss_mib"] if v is not None]
        print(f"live video stream over the websocket API, {result['seconds']:.0f} s at 12 fps requested: "
              f"{result['frames']} frames ({result['fps']:.1f} fps), longest gap {result['max_gap_s']:.2f} s, "
              f"conditions applied {result['conditions_applied']}")
        if rss:
            print(f"server RSS (MiB) every 5 s: {[round(v, 1) for v in rss]}; growth after 10 s: "
                  f"{result['rss_growth_mib_after_10s']:.1f} MiB")
    elif args.wan:
        problem = video_wan.invalid(args)
        if problem:
            print(problem)
            return 2
        result = video_wan.run(args)
        video_wan.print_table(result)
    else:
        for name in ("chunks", "chunk_length", "steps", "window", "batch", "repeats", "threads", "content_steps"):
            if getattr(args, name) < 1:
                print(f"--{name.replace('_', '-')} must be at least 1")
                return 2
        if args.content_clips and not 1 <= args.switch_at < args.content_clips:
            print(f"--switch-at must be in 1..{args.content_clips - 1} (below --content-clips)")
            return 2
        result = run_bench(args)
        print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(args.json, text_writer(json.dumps(result, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return 0
