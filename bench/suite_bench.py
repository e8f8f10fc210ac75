"""`livecache bench suite`: every technique of the acceleration suite and diffusers' cache hooks, one table.

One process, per work (the SD1.5-shaped U-Net at a reduced latent/step count, and the trained
embedded digits model): calibration first (DP schedules for the output and the feature objective,
CacheQuant, W8A8, DGQ; on seeds the measured generations do not use), then every method on the same
inputs:

- timing: each method runs once untimed (warm-up; its output gives the fidelity columns and a
  profiled copy gives peak memory), then `--runs` interleaved timed rounds; the median sampling
  time (the sampler loop only: applying a calibrated plan is a one-off) against the fp32
  uncached median of the same work in the same run gives the speed ratio;
- peak memory: `slicing_bench.peak_memory`: torch's profiler records every CPU allocation and free
  of torch's allocator during one generation's sampler loop (activations, caches, temporaries; the weights already
  exist), and the peak of the running sum is compared with the uncached run's. tracemalloc would
  miss torch tensors and RSS keeps freed pages, so neither is used. Kernel-internal scratch buffers
  (oneDNN) are not seen;
- model size ratio: fp32 weight bytes over the bytes the method's weights need (quantized
  weights + scales; the float originals stay in RAM here so the model can be restored);
- fidelity: latent PSNR against the fp32 uncached latent (peak = its max − min); on the embedded
  model image PSNR/SSIM and the FID-style score against the real digits.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..accel.cache_schedule import dp_schedule, schedule_cost, uniform_with
from ..accel.cachequant import CacheQuantConfig, Calibration
from ..accel.deepcache import DeepCacheConfig
from ..accel.quant import QuantConfig
from ..accel.rehash import StepRehashConfig
from ..accel.schedules import count_full, format_schedule, uniform_schedule
from ..accel.slicing import SlicingConfig
from ..adapters.diffusers_quant import calibrate_cachequant_unet, calibrate_quantization, calibrate_schedule
from ..adapters.diffusers_site import accelerated
from ..models.calibration import calibration_runs
from ..models.loading import cast
from ..models.sampling import make_scheduler, sample
from .deepcache_bench import _fid_scorer, write_outputs
from .hook_peers import HOOK_PEERS, Loop
from .peers import PeerUnavailable
from .scoring import MethodRow, image_fidelity
from .slicing_bench import peak_memory
from .table import FID, IMAGE_PSNR, LATENT_PSNR, SECONDS, SPEED, WORK, Column, method_column, ssim_of, table
from .workloads import Workload, embedded_workload, sd15_workload


@dataclass
class Row(MethodRow):
    dtype: str = "suite"
    peak_mb: float | None = None
    memory_ratio: float | None = None
    size_ratio: float = 1.0
    image_psnr: float | None = None
    image_ssim: float | None = None
    fid: float | None = None


@dataclass
class Method:
    name: str
    family: str
    work: Workload
    configs: tuple[Any, ...] = ()
    size_ratio: float = 1.0
    note: str = ""
    peer: Callable[[Workload, Loop], torch.Tensor] | None = None


class SamplerLoop:
    """Runs a generation's sampler loop: times it and, when `profiled`, records its peak memory.

    Only the loop is measured: applying a technique (installing hooks, fingerprinting the model
    against its calibration) is a one-off and would otherwise dominate the peak.
    """

    def __init__(self, profiled: bool = False) -> None:
        self.profiled = profiled
        self.seconds = 0.0
        self.peak = 0

    def __call__(self, loop: Callable[[], torch.Tensor]) -> torch.Tensor:
        started = time.perf_counter()
        if self.profiled:
            out, self.peak = peak_memory(loop)
        else:
            out = loop()
        self.seconds = time.perf_counter() - started
        return out


def _generate(method: Method, meter: SamplerLoop) -> torch.Tensor:
    """One generation through `meter`; returns the latent."""
    work = method.work
    if method.peer is not None:
        return method.peer(work, meter)
    scheduler = make_scheduler("ddim", work.model.scheduler_config)
    with accelerated(work.model.unet, scheduler, method.configs) as handles:
        out = meter(lambda: sample(work.model, scheduler, work.cond, work.uncond, work.noise, work.steps,
                                   work.guidance, progress=False))
    skipped = [h.stats for h in handles if hasattr(h.stats, "skipped_steps")]
    if skipped and not method.note:  # step rehash: how many steps it skipped
        method.note = f"skipped {skipped[0].skipped_steps}/{work.steps} steps ({skipped[0].pattern})"
    return out


def _bf16(work: Workload) -> Workload:
    model = replace(work.model, unet=cast(copy.deepcopy(work.model.unet), torch.bfloat16))
    return replace(work, model=model, cond=work.cond.bfloat16(), uncond=work.uncond.bfloat16(),
                   noise=work.noise.bfloat16())


def plan_methods(work: Workload, interval: int, calibration_seeds: list[int], peers: bool,
                 log: Callable[[str], None]) -> list[Method]:
    """Calibrate everything for `work` and list the methods of its table."""
    steps, unet = work.steps, work.model.unet
    prompts = [str(d) for d in range(10)] if work.is_image else ["calibration"]
    runs = calibration_runs(work.model, prompts, calibration_seeds, steps, "ddim", work.guidance,
                            height=work.noise.shape[-2], width=work.noise.shape[-1])
    k = count_full(uniform_schedule(steps, interval))
    uniform = uniform_with(steps, k)
    started = time.perf_counter()
    calibration = Calibration(runs, steps, work.name, "ddim")
    schedule = calibrate_schedule(unet, calibration, k, 0)
    errors = torch.tensor(schedule.errors)  # the same calibration pass gives the feature objective's DP
    feature_full = dp_schedule(errors, k)
    feature_gain = schedule_cost(errors, feature_full) / max(schedule_cost(errors, uniform), 1e-30)
    cq = calibrate_cachequant_unet(unet, CacheQuantConfig(k), calibration, schedule)
    w8a8 = calibrate_quantization(unet, QuantConfig(), runs)
    bf16 = _bf16(work)
    bf16_runs = calibration_runs(bf16.model, prompts, calibration_seeds, steps, "ddim", work.guidance,
                                 height=work.noise.shape[-2], width=work.noise.shape[-1])
    cq_bf16 = calibrate_cachequant_unet(bf16.model.unet, CacheQuantConfig(k, quant=None),
                                        Calibration(bf16_runs, steps, work.name, "ddim"), schedule)
    dgq = {bits: calibrate_quantization(unet, QuantConfig("dgq", bits, attention_bits=8), runs) for bits in (8, 6, 4)}
    log(f"  [{work.name}] calibrated in {time.perf_counter() - started:.0f} s on {len(runs)} runs: "
        f"DP schedule {schedule.describe()}; feature objective {format_schedule(feature_full)} "
        f"({feature_gain:.0%} of uniform's feature error)")
    fixes = cq.cache_correction, cq.quant.correction_error
    cache_note = f"cache error on calibration {fixes[0].error_before:.3g} -> {fixes[0].error_after:.3g}"
    quant_note = f"layer quant error on calibration {fixes[1][0]:.3g} -> {fixes[1][1]:.3g}"
    dp_config = DeepCacheConfig(schedule="calibrated", full_steps_override=schedule.full_steps)
    uniform_dc = DeepCacheConfig(cache_interval=interval)
    methods = [
        Method("uncached fp32", "baseline", work),
        Method("uncached bf16", "baseline", bf16, size_ratio=2.0),
        Method(f"DeepCache uniform K={k}", "ours", work, (uniform_dc,),
               note="".join("F" if f else "." for f in uniform)),
        Method(f"DeepCache DP K={k}", "ours", work, (dp_config,), note=schedule.describe().split(" (")[0]),
        Method(f"DeepCache DP K={k} (feature objective)", "ours", work,
               (replace(dp_config, full_steps_override=feature_full),), note=format_schedule(feature_full)),
        Method("W8A8", "ours", work, (w8a8,), w8a8.size_ratio, w8a8.backend),
        Method(f"CacheQuant K={k}", "ours", work, (cq,), cq.quant.size_ratio, f"{cache_note}; {quant_note}"),
        Method("  ablation: no correction", "ours", work, (cq.variant(False, False),), cq.quant.size_ratio),
        Method("  ablation: cache corr. only", "ours", work, (cq.variant(True, False),), cq.quant.size_ratio,
               cache_note),
        Method("  ablation: quant corr. only", "ours", work, (cq.variant(False, True),), cq.quant.size_ratio,
               quant_note),
    ]
    methods.append(Method(f"CacheQuant on bf16 K={k} (DP+cache corr, no int8)", "ours", bf16, (cq_bf16,),
                          2.0, f"cache error on calibration {cq_bf16.cache_correction.error_before:.3g} -> "
                          f"{cq_bf16.cache_correction.error_after:.3g}"))
    for bits, plan in dgq.items():
        methods.append(Method(f"DGQ W{bits}A8 log8-attn", "ours", work, (plan,), plan.size_ratio, plan.backend))
    methods += [
        Method("step rehash reuse thr 0.1", "ours", work, (StepRehashConfig(),)),
        Method("slicing batch ×2", "ours", work, (SlicingConfig("batch", 2, False),)),
        Method(f"stack: W8A8 + DeepCache K={k} + slicing", "ours", work,
               (w8a8, uniform_dc, SlicingConfig("batch", 2, False)), w8a8.size_ratio),
        Method(f"stack: CacheQuant K={k} + slicing", "ours", work, (cq, SlicingConfig("batch", 2, False)),
               cq.quant.size_ratio),
    ]
    if peers:
        methods += [Method(name, "peer", work, peer=runner) for name, runner in HOOK_PEERS.items()]
    return methods


def bench_work(work: Workload, methods: list[Method], runs: int, fid: Callable[[torch.Tensor], float] | None,
               log: Callable[[str], None]) -> list[Row]:
    rows = {m.name: Row(work.name, m.name, m.family, size_ratio=m.size_ratio) for m in methods}
    outputs: dict[str, torch.Tensor] = {}
    peaks: dict[str, int] = {}
    for method in methods:  # warm-up, fidelity output and peak memory
        meter = SamplerLoop(profiled=True)
        try:
            out = _generate(method, meter)
        except PeerUnavailable as err:
            rows[method.name].note = str(err)[:240]
            continue
        outputs[method.name], peaks[method.name] = out.float(), meter.peak
    live = [m for m in methods if m.name in outputs]
    for round_index in range(runs):
        for method in live:
            meter = SamplerLoop()
            _generate(method, meter)
            seconds = meter.seconds
            rows[method.name].times.append(seconds)
            log(f"  [{work.name} round {round_index + 1}/{runs}] {method.name.strip()}: {seconds:.2f} s")
    reference = outputs["uncached fp32"]
    base_time = statistics.median(rows["uncached fp32"].times)
    base_peak = peaks["uncached fp32"]
    for method in live:
        row = rows[method.name]
        row.note = method.note
        row.score(base_time, outputs[method.name], reference)
        row.peak_mb = peaks[method.name] / 2**20
        row.memory_ratio = peaks[method.name] / base_peak if base_peak else None
        if work.is_image:
            row.image_psnr, row.image_ssim = image_fidelity(work.model, outputs[method.name], reference)
            if fid is not None:
                row.fid = fid(outputs[method.name])
    return list(rows.values())


def format_table(rows: list[Row]) -> str:
    return table(rows, [WORK, method_column(46), SECONDS, SPEED, Column("peak MB", 8, "peak_mb", ".1f"),
                        Column("mem", 6, "memory_ratio", ".2f", "×"), Column("size", 6, "size_ratio", ".2f", "×"),
                        LATENT_PSNR, IMAGE_PSNR, ssim_of("image_ssim"), FID])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="sd15,embedded", help="comma list: sd15, sd15-tiny, embedded")
    parser.add_argument("--sd15-steps", type=int, default=10, help="DDIM steps on the SD1.5-shaped U-Net (default 10)")
    parser.add_argument("--sd15-size", type=int, default=16, help="latent side on the SD1.5-shaped U-Net (default 16)")
    parser.add_argument("--embedded-steps", type=int, default=20, help="DDIM steps on the embedded model (default 20)")
    parser.add_argument("--per-class", type=int, default=10, help="embedded: samples per digit (FID-style score)")
    parser.add_argument("--interval", type=int, default=3,
                        help="uniform DeepCache interval N; K = its number of full steps, used by every cached row")
    parser.add_argument("--calibration-seeds", default="101,102", help="noise seeds of the calibration runs")
    parser.add_argument("--runs", type=int, default=2, help="timed rounds; the median is reported (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers' cache hooks")
    parser.add_argument("--json", type=Path, default=None, help="write all rows as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="speed-vs-PSNR PNG (default: beside --json)")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.calibration_seeds.split(",") if s.strip()]
    if args.runs < 1 or args.interval < 2 or not seeds:
        raise SystemExit(f"bad options: runs {args.runs} (>= 1), interval {args.interval} (>= 2), seeds {seeds}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.runs} timed rounds, median reported")
    rows: list[Row] = []
    started = time.perf_counter()
    for name in [w.strip() for w in args.work.split(",") if w.strip()]:
        if name in ("sd15", "sd15-tiny"):
            work, fid = sd15_workload(args.sd15_steps, tiny=name == "sd15-tiny", size=args.sd15_size), None
        elif name == "embedded":
            work, fid = embedded_workload(args.embedded_steps, args.per_class), _fid_scorer()
        else:
            raise SystemExit(f"unknown work {name!r}: use sd15, sd15-tiny or embedded")
        methods = plan_methods(work, args.interval, seeds, not args.no_peers, print)
        work_rows = bench_work(work, methods, args.runs, fid, print)
        print(format_table(work_rows), flush=True)
        rows += work_rows
    print()
    print(format_table(rows))
    print(f"total {time.perf_counter() - started:.0f} s. speed: sampler-loop time vs uncached fp32 of the same work; "
          "mem: peak torch CPU allocations during a generation vs uncached fp32; size: fp32 weight bytes / the "
          "method's; PSNR vs uncached fp32 (latent peak = max − min); FID* = Fréchet distance of our digit-classifier "
          "features to the real digits (lower is better)")
    write_outputs(rows, args)
    return 0
