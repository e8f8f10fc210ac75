"""`livecache bench ilf`: uncached vs ILF vs plain feature caching vs forecasting at the same full backbone passes.

One process, both embedded models, the same seeds and sampler for every row of a model:

- `digits` (the U-Net): the DeepCache bench's rounds, medians and fidelity measures
  (`deepcache_bench.bench_workload`); DeepCache and ILF at each cache interval N run the whole
  U-Net on the same steps (every N-th), so "deep/calls" is equal and the rows differ only in what
  the steps between get: the stale deep features (DeepCache) or those features corrected by the
  trained module. Forecasting exists for DiTs only; the U-Net has no forecast row.
- `dit` (the embedded DiT): the DiT bench's rounds and measures (`dit_bench.bench_work`: a warm-up
  run gives the fidelity and the block calls, then interleaved timed rounds); the block cache, its
  forecast mode (order 1 and 2) and ILF at each N skip the same block span on the same steps. The
  "blocks" column counts the backbone's blocks only: ILF also runs its one copied block on every
  cached step (noted on its row).

Every ILF row's note carries the module's training cost (seconds and optimizer steps, as its file
records them). The closing summary puts each ILF row beside uncached and beside the cache and
forecast rows of nearest speed, which is how the issue's target (≥ 1.7×, FID* within 5% of
uncached and better than plain caching and forecasting at that speed) is read off.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..accel.block_cache import BlockCacheConfig
from ..accel.deepcache import DeepCacheConfig
from ..accel.ilf import FeedbackWeights, ILFConfig
from ..models.embedded import ILF_FILES
from . import deepcache_bench, dit_bench
from .deepcache_bench import _fid_scorer, _ours, _ours_uncached, bench_workload, write_outputs
from .dit_workloads import dit_work
from .workloads import embedded_workload

WORKS = {"digits": "embedded:digits", "dit": "embedded:dit"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="digits,dit", help="comma list: digits (the U-Net), dit (the DiT)")
    parser.add_argument("--intervals", default="2,3,4",
                        help="cache intervals N to measure; every cached row of one N has the same full steps")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    parser.add_argument("--per-class", type=int, default=30,
                        help="samples per digit for the FID-style score (default 30: at 10 the ranking of ILF "
                             "against forecasting flips between noise sets, docs/benchmarks.md)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the fastest on a loaded 2-core machine; 0: torch's own)")
    parser.add_argument("--digits-module", type=Path, default=None,
                        help="the U-Net's ILF module (default: the one shipped for embedded:digits)")
    parser.add_argument("--dit-module", type=Path, default=None,
                        help="the DiT's ILF module (default: the one shipped for embedded:dit)")
    parser.add_argument("--json", type=Path, default=None, help="write all rows as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the speed-vs-fidelity PNG here")


def load_module(path: Path | None, work: str) -> FeedbackWeights:
    try:
        return FeedbackWeights.load(path or ILF_FILES[WORKS[work]])
    except ValueError as err:
        raise SystemExit(f"{err} (train one with `livecache train ilf --model {WORKS[work]}`)") from None


def training_cost(module: FeedbackWeights) -> str:
    """Its training cost, and its held-out distillation loss beside that of the plain mode it corrects (the
    same loss at scale 0, same held-out seeds and step gaps), as its file records them."""
    trained = module.training
    loss = trained.get("held_out_loss", {})
    held = (f", held-out loss {loss['ilf']:.3g} vs {loss['reuse']:.3g} without"
            if {"ilf", "reuse"} <= set(loss) else "")
    return (f"trained {trained.get('seconds', '?')} s, {trained.get('steps', '?')} steps, "
            f"interval {trained.get('interval', '?')}{held}")


def digits_rows(args: argparse.Namespace, intervals: list[int], module: FeedbackWeights) -> list[Any]:
    plan = [("uncached", "baseline", _ours_uncached)]
    for n in intervals:
        plan.append((f"DeepCache N={n}", "ours", _ours(DeepCacheConfig(n, 0))))
        plan.append((f"ILF N={n}", "ours", _ours(ILFConfig(n, module=module))))
    work = embedded_workload(args.steps, args.per_class)
    rows = bench_workload(work, "fp32", args.runs, intervals, False, _fid_scorer(), plan=plan)
    for row in rows:
        row.work = "digits"
        if row.method.startswith("ILF"):
            row.note = training_cost(module)
    print(deepcache_bench.format_table(rows))
    return rows


def dit_rows(args: argparse.Namespace, intervals: list[int], module: FeedbackWeights) -> list[Any]:
    work = dit_work(args.steps, args.per_class)
    methods = [dit_bench.Method("uncached fp32", "baseline", work)]
    for n in intervals:
        methods += [dit_bench.Method(f"block cache N={n}", "ours", work, (BlockCacheConfig(n),)),
                    dit_bench.Method(f"forecast o1 N={n}", "ours", work, (BlockCacheConfig(n, mode="forecast"),)),
                    dit_bench.Method(f"forecast o2 N={n}", "ours", work,
                                     (BlockCacheConfig(n, mode="forecast", order=2),)),
                    dit_bench.Method(f"ILF N={n}", "ours", work, (ILFConfig(n, module=module),),
                                     f"{training_cost(module)}; +1 module block per cached step")]
    rows = dit_bench.bench_work(work, methods, args.runs, dit_bench.digit_scorers(args.per_class), print)
    print(dit_bench.format_table(rows))
    return rows


def summary(rows: list[Any]) -> list[str]:
    """Each ILF row against uncached and against the cache / forecast rows of its work nearest in speed."""
    lines = []
    for work in dict.fromkeys(r.work for r in rows):
        mine = [r for r in rows if r.work == work and r.speed is not None and r.fid is not None]
        base = next((r for r in mine if r.family == "baseline"), None)
        if base is None:
            continue
        others = [r for r in mine if r.family != "baseline" and not r.method.startswith("ILF")]
        for ilf in (r for r in mine if r.method.startswith("ILF")):
            line = (f"{work} {ilf.method}: {ilf.speed:.2f}×, FID* {ilf.fid:.2f} "
                    f"({100 * (ilf.fid / base.fid - 1):+.1f}% vs uncached {base.fid:.2f})")
            near = sorted(others, key=lambda r: abs(r.speed - ilf.speed))[:3]
            line += "; nearest in speed: " + ", ".join(f"{r.method} {r.speed:.2f}× FID* {r.fid:.2f}" for r in near)
            lines.append(line)
    return lines


def main(args: argparse.Namespace) -> int:
    intervals = sorted({int(x) for x in args.intervals.split(",") if x.strip()})
    works = [w.strip() for w in args.work.split(",") if w.strip()]
    if args.runs < 1 or not intervals or min(intervals) < 2 or not works or set(works) - set(WORKS):
        raise SystemExit(f"bad options: runs {args.runs} (>= 1), intervals {intervals} (each >= 2), work {works} "
                         f"(of {', '.join(WORKS)})")
    modules = {work: load_module(getattr(args, f"{work}_module"), work) for work in works}
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.runs} rounds, median reported")
    rows: list[Any] = []
    if "digits" in modules:
        rows += digits_rows(args, intervals, modules["digits"])
    if "dit" in modules:
        rows += dit_rows(args, intervals, modules["dit"])
    print("digits deep/calls: U-Net calls that ran the deep blocks / all U-Net calls; dit blocks: backbone blocks "
          "whose attention ran; speed vs uncached of the same model; PSNR/SSIM vs uncached; FID* = Fréchet "
          "distance of our digit-classifier features to all 1,797 real digits (lower is better)")
    for line in summary(rows):
        print(line)
    write_outputs(rows, args)
    return 0
