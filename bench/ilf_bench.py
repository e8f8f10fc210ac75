"""`livecache bench ilf`: uncached vs ILF vs plain feature caching at the same number of full backbone passes.

One process, one model, the same seeds and sampler for every row (the DeepCache bench's rounds, medians
and fidelity measures: `deepcache_bench.bench_workload`). For each cache interval N, DeepCache and ILF
run the whole backbone on the same steps (every N-th), so the "deep/calls" column is equal and the rows
differ only in what the steps between get: the stale deep features (DeepCache) or those features
corrected by the trained module (ILF, with its small extra block). The ILF row's note carries the
module's training cost (seconds, steps, as recorded in the module file). Forecasting (the block cache's
"forecast" mode) exists for DiTs only; on the U-Net its row is absent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..accel.deepcache import DeepCacheConfig
from ..accel.ilf import FeedbackWeights, ILFConfig
from ..models.embedded import ILF_FILES
from .deepcache_bench import Row, _fid_scorer, _ours, _ours_uncached, bench_workload, format_table, write_outputs
from .workloads import embedded_workload


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--intervals", default="2", help="cache intervals to measure (default 2: the module's)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    parser.add_argument("--per-class", type=int, default=10, help="samples per digit for the FID-style score")
    parser.add_argument("--module", type=Path, default=None,
                        help="the ILF module (default: the one shipped for embedded:digits)")
    parser.add_argument("--json", type=Path, default=None, help="write all rows as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the speed-vs-fidelity PNG here")


def main(args: argparse.Namespace) -> int:
    intervals = [int(x) for x in args.intervals.split(",") if x]
    if args.runs < 1 or not intervals or min(intervals) < 2:
        raise SystemExit(f"bad options: runs {args.runs}, intervals {intervals} (each >= 2)")
    try:
        module = FeedbackWeights.load(args.module or ILF_FILES["embedded:digits"])
    except ValueError as err:
        raise SystemExit(f"{err} (train one with `livecache train ilf`)") from None
    trained = module.training
    cost = f"trained {trained.get('seconds', '?')} s, {trained.get('steps', '?')} steps"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.runs} rounds, median reported")
    plan = [("uncached", "baseline", _ours_uncached)]
    for n in intervals:
        plan.append((f"DeepCache N={n}", "ours", _ours(DeepCacheConfig(n, 0))))
        plan.append((f"ILF N={n}", "ours", _ours(ILFConfig(n, module=module))))
    work = embedded_workload(args.steps, args.per_class)
    rows: list[Row] = bench_workload(work, "fp32", args.runs, intervals, False, _fid_scorer(), plan=plan)
    for row in rows:
        if row.method.startswith("ILF"):
            row.note = cost
    print(format_table(rows))
    print("deep/calls: U-Net calls that ran the deep blocks / all U-Net calls (equal for DeepCache and ILF at one "
          "N); FID* = Fréchet distance of our digit-classifier features to all 1,797 real digits (lower is better)")
    write_outputs(rows, args)
    return 0
