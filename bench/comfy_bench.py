"""`livecache bench comfy`: every LiveCache technique on ComfyUI's own MODEL beside ComfyUI's EasyCache and LazyCache.

Everything runs in one process on one model: ComfyUI's SD1.5 model class (openaimodel.UNetModel
in a ModelPatcher, SD1.5 channels 320/640/1280 by default) with seeded random weights — no
checkpoint is needed, and speed depends on the architecture, not the weights — sampled
by ComfyUI's KSampler path with CFG, the same seed, sampler and scheduler for every method. Each
method is a patched clone of the same MODEL made by the node a ComfyUI user wires (ComfyUI's own
EasyCache and LazyCache node classes; ours through the MODEL nodes' adapters: DeepCache, step rehash,
Quantize MODEL W8A8 / DGQ, Slicing, CacheQuant calibrated through ComfyUI's sampler, and stacks of them),
so the comparison is exactly what a ComfyUI user gets. A second copy of the model in bf16 (same weights
rounded) is the bf16 baseline.

Methods are timed in interleaved rounds after a warm-up (the median is reported), speed is the
ratio to uncached fp32 (and to uncached bf16) in the same round set, and fidelity sits beside it: latent
PSNR against the uncached fp32 latent (peak = its range) and SSIM of the latents rescaled to 0..1 by that
range. Run it from an environment where ComfyUI imports (scripts/setup_comfy.sh makes one: .comfy/venv),
e.g. `.comfy/venv/bin/livecache bench comfy --comfy-root .comfy/ComfyUI`.
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
from ..nodes.comfy_model_nodes import QuantizeModel, SlicingModel
from .comfy_workloads import (
    PEER_CACHES,
    DeepBlockCalls,
    conditioning,
    sample,
    sd15_model,
    use_comfyui,
    with_peer_cache,
)
from .metrics import psnr, ssim

UNCACHED, BF16 = "uncached fp32", "uncached bf16"


@dataclass
class Row:
    method: str
    seconds: float
    speed: float
    speed_vs_bf16: float
    psnr: float
    ssim: float
    deep_calls: int
    unet_calls: int


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfy-root", type=Path, default=None,
                        help="a ComfyUI folder (default: ComfyUI must already be importable), e.g. .comfy/ComfyUI")
    parser.add_argument("--channels", type=int, default=320, help="U-Net base channels (SD1.5: 320; multiple of 32)")
    parser.add_argument("--context", type=int, default=768, help="text embedding width (SD1.5: 768)")
    parser.add_argument("--size", type=int, default=32, help="latent side (default 32: a 256x256 image)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--sampler", default="euler", help="a ComfyUI sampler name (default euler)")
    parser.add_argument("--scheduler", default="normal", help="a ComfyUI scheduler name (default normal)")
    parser.add_argument("--intervals", default="2,3", help="our DeepCache cache intervals (default 2,3)")
    parser.add_argument("--peer-threshold", type=float, default=0.2,
                        help="EasyCache's and LazyCache's reuse_threshold (ComfyUI's node default 0.2)")
    parser.add_argument("--rehash-threshold", type=float, default=0.1,
                        help="our step rehash threshold (the node's default 0.1), max_skips 1, reuse")
    parser.add_argument("--cachequant-full-steps", type=int, default=5,
                        help="CacheQuant's K full steps, calibrated through ComfyUI's sampler (default 5; 0: no "
                             "CacheQuant rows)")
    parser.add_argument("--cachequant-seeds", type=int, default=1,
                        help="CacheQuant's calibration seeds (default 1; seeds 100.., never the measured seed 0)")
    parser.add_argument("--cachequant-objective", choices=("feature", "output"), default="feature",
                        help="what CacheQuant's DP minimises (default feature: no extra generations)")
    parser.add_argument("--slices", type=int, default=2, help="Slicing for MODEL's slices (default 2: CFG halves)")
    parser.add_argument("--no-dgq", action="store_true",
                        help="leave out the DGQ row (simulated: fake-quant in float, slower than uncached)")
    parser.add_argument("--runs", type=int, default=2, help="timed rounds; the median is reported (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")


def main(args: argparse.Namespace) -> int:
    intervals = [int(x) for x in args.intervals.split(",") if x.strip()]
    if args.runs < 1 or args.steps < 2 or not intervals or min(intervals) < 1 or args.size < 8 or args.slices < 1:
        raise SystemExit(f"bad options: runs {args.runs}, steps {args.steps}, intervals {intervals}, size {args.size}"
                         f", slices {args.slices}")
    if not 0 <= args.cachequant_full_steps <= args.steps or args.cachequant_seeds < 1:
        raise SystemExit(f"bad options: --cachequant-full-steps {args.cachequant_full_steps} must be in 0..{args.steps}"
                         f", --cachequant-seeds {args.cachequant_seeds} at least 1")
    use_comfyui(args.comfy_root)
    model = sd15_model(model_channels=args.channels, context_dim=args.context, seed=0)
    positive, negative = conditioning(1, 77, args.context, seed=1), conditioning(1, 77, args.context, seed=2)
    methods = build_methods(args, model, intervals, positive, negative)

    def run(patched: Any, steps: int) -> tuple[torch.Tensor, int, int]:
        return _counted(patched, lambda: sample(patched, positive, negative, seed=0, steps=steps, cfg=args.cfg,
                                                sampler_name=args.sampler, scheduler=args.scheduler, size=args.size))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ComfyUI SD1.5-shaped U-Net "
          f"({args.channels} base channels, random weights, fp32 and bf16), latent {args.size}x{args.size}, "
          f"{args.steps} {args.sampler}/{args.scheduler} steps, cfg {args.cfg}; {args.runs} rounds, median", flush=True)
    for patched in (model, methods[BF16]):
        run(patched, 2)  # warm-up: allocator, kernels, ComfyUI's first model load (per dtype)
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, tuple[torch.Tensor, int, int]] = {}
    for round_index in range(args.runs):
        for name, patched in methods.items():
            started = time.perf_counter()
            results[name] = run(patched, args.steps)
            times[name].append(time.perf_counter() - started)
            print(f"  round {round_index + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    rows = rows_of(results, {name: statistics.median(t) for name, t in times.items()})
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(args.json, text_writer(json.dumps([asdict(r) for r in rows], indent=2, default=str)))
    return 0


def build_methods(args: argparse.Namespace, model: Any, intervals: list[int], positive: Any,
                  negative: Any) -> dict[str, Any]:
    """Every row's MODEL, each a patched clone of `model` (or of its bf16 copy), as the nodes make them."""
    bf16 = sd15_model(model_channels=args.channels, context_dim=args.context, seed=0, dtype=torch.bfloat16)
    threshold = args.peer_threshold
    methods: dict[str, Any] = {UNCACHED: model, BF16: bf16}
    for peer in PEER_CACHES:
        methods[f"ComfyUI {peer} (threshold {threshold})"] = with_peer_cache(model, peer, threshold)
    for n in intervals:
        for schedule in ("uniform", "non-uniform"):
            methods[f"ours DeepCache N={n} {schedule}"] = apply_deepcache(
                model, DeepCacheConfig(cache_interval=n, schedule=schedule))
    methods[f"ours step rehash (threshold {args.rehash_threshold})"] = apply_step_rehash(
        model, StepRehashConfig(args.rehash_threshold))
    (w8a8,) = QuantizeModel().apply(model, "w8a8", 8, 8)
    methods["ours Quantize MODEL W8A8 (int8 kernels)"] = w8a8
    if not args.no_dgq:
        methods["ours Quantize MODEL DGQ W8A8 (simulated: fake-quant in float)"] = \
            QuantizeModel().apply(model, "dgq", 8, 8)[0]
    methods[f"ours Slicing ×{args.slices}"] = SlicingModel().apply(model, args.slices)[0]
    deepest = max(intervals)
    methods[f"stack: DeepCache N={deepest} + W8A8"] = apply_deepcache(w8a8, DeepCacheConfig(cache_interval=deepest))
    if args.cachequant_full_steps:
        calibration = SamplerRun(positive, negative, {"samples": torch.zeros(1, 4, args.size, args.size)},
                                 tuple(range(100, 100 + args.cachequant_seeds)), args.steps, args.cfg, args.sampler,
                                 args.scheduler)
        started = time.perf_counter()
        plan = calibrate_cachequant(model, CacheQuantConfig(args.cachequant_full_steps), calibration,
                                    objective=args.cachequant_objective)
        print(f"CacheQuant calibrated in {time.perf_counter() - started:.1f} s: {plan.label()}, schedule "
              f"{plan.schedule.describe()}", flush=True)
        cachequant = apply_cachequant(model, plan)
        name = f"ours CacheQuant K={args.cachequant_full_steps} ({args.cachequant_objective} DP) + W8A8"
        methods[name] = cachequant
        methods[f"stack: CacheQuant K={args.cachequant_full_steps} + Slicing ×{args.slices}"] = \
            SlicingModel().apply(cachequant, args.slices)[0]
    return methods


def rows_of(results: dict[str, tuple[torch.Tensor, int, int]], seconds: dict[str, float]) -> list[Row]:
    """The table: speeds against uncached fp32 and bf16 of the same rounds, fidelity against uncached fp32."""
    reference = results[UNCACHED][0]
    return [Row(name, seconds[name], seconds[UNCACHED] / seconds[name], seconds[BF16] / seconds[name],
                psnr(latent.float(), reference), _latent_ssim(latent, reference), deep_calls, unet_calls)
            for name, (latent, deep_calls, unet_calls) in results.items()]


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
    lines = ["| method | s / image | speed vs fp32 | vs bf16 | latent PSNR | latent SSIM | U-Net calls: deep blocks "
             "run / U-Net run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        fidelity = "∞" if r.psnr == float("inf") else f"{r.psnr:.2f} dB"
        lines.append(f"| {r.method} | {r.seconds:.2f} | {r.speed:.2f}× | {r.speed_vs_bf16:.2f}× | {fidelity} | "
                     f"{r.ssim:.4f} | {r.deep_calls}/{r.unet_calls} |")
    return "\n".join(lines)
