"""`livecache bench comfy`: inside a real ComfyUI, uncached vs ComfyUI's own EasyCache vs our DeepCache and step rehash.

Everything runs in one process on one model: ComfyUI's SD1.5 model class (openaimodel.UNetModel
in a ModelPatcher, SD1.5 channels 320/640/1280 by default) with seeded random weights — no
checkpoint is needed, and speed depends on the architecture, not the weights — sampled
by ComfyUI's KSampler path with CFG, the same seed, sampler and scheduler for every method. Each
method is a patched clone of the same MODEL (EasyCache through ComfyUI's own node class, ours
through the adapter of `LiveCacheDeepCacheModel` / `LiveCacheStepRehashModel`), so the comparison is
exactly what a ComfyUI user gets.

Methods are timed in interleaved rounds after a warm-up (the median is reported), speed is the
ratio to uncached in the same round set, and fidelity sits beside it: latent PSNR (peak = range of
the uncached latent) and SSIM of the latents rescaled to 0..1 by the uncached range. Run it from an
environment where ComfyUI imports (scripts/setup_comfy.sh makes one: .comfy/venv), e.g.
`.comfy/venv/bin/livecache bench comfy --comfy-root .comfy/ComfyUI`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..accel.cachequant import CacheQuantConfig
from ..accel.deepcache import DeepCacheConfig
from ..accel.rehash import StepRehashConfig
from ..adapters.comfy_cachequant import SamplerRun, apply_cachequant, calibrate_cachequant
from ..adapters.comfy_unet import apply_deepcache, apply_step_rehash
from ..files import text_writer, write_replacing
from .comfy_workloads import DeepBlockCalls, conditioning, sample, sd15_model, use_comfyui, with_easycache
from .metrics import psnr, ssim

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    method: str
    seconds: float
    speed: float
    psnr: float
    ssim: float
    deep_calls: int
    unet_calls: int


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfy-root", type=Path, default=None,
                        help="a ComfyUI folder (default: ComfyUI must already be importable), e.g. .comfy/ComfyUI")
    parser.add_argument("--channels", type=int, default=320, help="U-Net base channels (SD1.5: 320; multiple of 32)")
    parser.add_argument("--size", type=int, default=32, help="latent side (default 32: a 256x256 image)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--sampler", default="euler", help="a ComfyUI sampler name (default euler)")
    parser.add_argument("--scheduler", default="normal", help="a ComfyUI scheduler name (default normal)")
    parser.add_argument("--intervals", default="2,3", help="our DeepCache cache intervals (default 2,3)")
    parser.add_argument("--easycache-threshold", type=float, default=0.2,
                        help="EasyCache reuse_threshold (ComfyUI's node default 0.2)")
    parser.add_argument("--rehash-threshold", type=float, default=0.1,
                        help="our step rehash threshold (the node's default 0.1), max_skips 1, reuse")
    parser.add_argument("--cachequant-full-steps", type=int, default=5,
                        help="CacheQuant's K full steps, calibrated through ComfyUI's sampler (default 5; 0: no row)")
    parser.add_argument("--cachequant-seeds", type=int, default=1,
                        help="CacheQuant's calibration seeds (default 1; seeds 100.., never the measured seed 0)")
    parser.add_argument("--cachequant-objective", choices=("feature", "output"), default="feature",
                        help="what CacheQuant's DP minimises (default feature: no extra generations)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--runs", type=int, default=2, help="timed rounds; the median is reported (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")


def main(args: argparse.Namespace) -> int:
    intervals = [int(x) for x in args.intervals.split(",") if x.strip()]
    if args.runs < 1 or args.steps < 2 or not intervals or min(intervals) < 1 or args.size < 8:
        raise SystemExit(f"bad options: runs {args.runs}, steps {args.steps}, intervals {intervals}, size {args.size}")
    if not 0 <= args.cachequant_full_steps <= args.steps or args.cachequant_seeds < 1:
        raise SystemExit(f"bad options: --cachequant-full-steps {args.cachequant_full_steps} must be in 0..{args.steps}"
                         f", --cachequant-seeds {args.cachequant_seeds} at least 1")
    use_comfyui(args.comfy_root)
    context = 768
    model = sd15_model(model_channels=args.channels, context_dim=context, seed=0, dtype=DTYPES[args.dtype])
    positive, negative = conditioning(1, 77, context, seed=1), conditioning(1, 77, context, seed=2)
    methods: dict[str, Any] = {"uncached": model,
                               f"ComfyUI EasyCache (threshold {args.easycache_threshold})":
                                   with_easycache(model, args.easycache_threshold)}
    for n in intervals:
        methods[f"ours DeepCache N={n} uniform"] = apply_deepcache(model, DeepCacheConfig(cache_interval=n))
        methods[f"ours DeepCache N={n} non-uniform"] = apply_deepcache(
            model, DeepCacheConfig(cache_interval=n, schedule="non-uniform"))
    methods[f"ours step rehash (threshold {args.rehash_threshold})"] = apply_step_rehash(
        model, StepRehashConfig(args.rehash_threshold))

    if args.cachequant_full_steps:
        calibration = SamplerRun(positive, negative, {"samples": torch.zeros(1, 4, args.size, args.size)},
                                 tuple(range(100, 100 + args.cachequant_seeds)), args.steps, args.cfg, args.sampler,
                                 args.scheduler)
        started = time.perf_counter()
        plan = calibrate_cachequant(model, CacheQuantConfig(args.cachequant_full_steps), calibration,
                                    objective=args.cachequant_objective)
        print(f"CacheQuant calibrated in {time.perf_counter() - started:.1f} s: {plan.label()}, schedule "
              f"{plan.schedule.describe()}", flush=True)
        methods[f"ours CacheQuant K={args.cachequant_full_steps} ({args.cachequant_objective} DP) + W8A8"] = \
            apply_cachequant(model, plan)

    def run(patched: Any, steps: int) -> tuple[torch.Tensor, int, int]:
        return _counted(patched, lambda: sample(patched, positive, negative, seed=0, steps=steps, cfg=args.cfg,
                                                sampler_name=args.sampler, scheduler=args.scheduler, size=args.size))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ComfyUI SD1.5-shaped U-Net "
          f"({args.channels} base channels, random weights, {args.dtype}), latent {args.size}x{args.size}, "
          f"{args.steps} {args.sampler}/{args.scheduler} steps, cfg {args.cfg}; {args.runs} rounds, median", flush=True)
    run(model, 2)  # warm-up: allocator, kernels, ComfyUI's first model load
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, tuple[torch.Tensor, int, int]] = {}
    for round_index in range(args.runs):
        for name, patched in methods.items():
            started = time.perf_counter()
            results[name] = run(patched, args.steps)
            times[name].append(time.perf_counter() - started)
            print(f"  round {round_index + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    reference = results["uncached"][0]
    base = statistics.median(times["uncached"])
    rows = []
    for name, (latent, deep_calls, unet_calls) in results.items():
        seconds = statistics.median(times[name])
        rows.append(Row(name, seconds, base / seconds, psnr(latent, reference), _latent_ssim(latent, reference),
                        deep_calls, unet_calls))
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(args.json, text_writer(json.dumps([asdict(r) for r in rows], indent=2, default=str)))
    return 0


def _counted(model: Any, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Run a sampling call; returns its latent, the U-Net calls that ran the deep blocks, and all U-Net calls."""
    deep = DeepBlockCalls(model)
    try:
        latent = run()
    finally:
        deep.close()
    return latent, deep.count, deep.calls


def _latent_ssim(latent: torch.Tensor, reference: torch.Tensor) -> float:
    """SSIM of latents as 4-channel images, both rescaled to 0..1 by the reference's range."""
    low, high = reference.min(), reference.max()
    scale = lambda t: ((t.float() - low) / (high - low)).clamp(0, 1).permute(0, 2, 3, 1)  # noqa: E731
    return ssim(scale(latent), scale(reference))


def format_table(rows: list[Row]) -> str:
    lines = ["| method | s / image | speed | latent PSNR | latent SSIM | U-Net calls running the deep blocks |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        fidelity = "∞" if r.psnr == float("inf") else f"{r.psnr:.2f} dB"
        lines.append(f"| {r.method} | {r.seconds:.2f} | {r.speed:.2f}× | {fidelity} | {r.ssim:.4f} | "
                     f"{r.deep_calls}/{r.unet_calls} |")
    return "\n".join(lines)
