"""`livecache bench rehash`: step rehash on LCM 4-step and DDIM 20-step sampling, against unaccelerated.

Everything runs in one process on the same model, seeds and scheduler: per (work, scheduler) the
unaccelerated run and each rehash threshold run in interleaved rounds after a warm-up; the time is the
median over rounds and the speed ratio is against the unaccelerated median of the same scheduler; the
call ratio (steps / steps that ran the U-Net) is the work saved, which timing noise cannot blur. Beside
them: steps skipped (of the generation's steps, with the per-step pattern), latent PSNR (peak = max − min
of the unaccelerated latent), and SSIM — on decoded images for the pixel-space embedded model, on the
latents mapped to 0..1 by the unaccelerated latent's range for the SD1.5-shaped U-Net (random weights:
its "images" mean nothing, only closeness to the unaccelerated run does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..accel.rehash import StepRehashConfig
from ..adapters.diffusers_site import accelerated
from ..files import text_writer, write_replacing
from ..models.sampling import make_scheduler, sample
from .scoring import Measured, fidelity_ssim
from .table import LATENT_PSNR, SECONDS, SPEED, WORK, Column, method_column, ssim_of, table
from .workloads import Workload, embedded_workload, sd15_workload

PLANS: dict[str, int] = {"lcm": 4, "ddim": 20}  # scheduler -> steps


@dataclass
class RehashRow(Measured):
    work: str
    scheduler: str
    steps: int
    method: str
    skipped_steps: int | None = None
    call_ratio: float | None = None  # steps / steps that ran the U-Net: the work saved, free of timing noise
    pattern: str = ""
    ssim: float | None = None


def _run(work: Workload, scheduler_name: str, steps: int, config: StepRehashConfig | None):
    scheduler = make_scheduler(scheduler_name, work.model.scheduler_config)
    with accelerated(work.model.unet, scheduler, [config] if config else []) as handles:
        out = sample(work.model, scheduler, work.cond, work.uncond, work.noise, steps, work.guidance, progress=False)
    return out, (handles[0].stats if handles else None)


def rehash_rows(work: Workload, scheduler_name: str, steps: int, configs: list[StepRehashConfig], runs: int = 2,
                progress: Callable[[str], None] = print) -> list[RehashRow]:
    """Unaccelerated plus one row per config on `work`: what `livecache bench suite` calls too."""
    plan: list[tuple[str, StepRehashConfig | None]] = [("unaccelerated", None)]
    plan += [(f"rehash τ={c.threshold:g} max {c.max_skips} {c.mode}", c) for c in configs]
    rows = {name: RehashRow(work.name, scheduler_name, steps, name) for name, _ in plan}
    outputs: dict[str, torch.Tensor] = {}
    _run(work, scheduler_name, min(steps, 2), None)  # warm-up: allocator, oneDNN primitives
    for round_index in range(runs):
        for name, config in plan:
            started = time.perf_counter()
            out, stats = _run(work, scheduler_name, steps, config)
            rows[name].times.append(time.perf_counter() - started)
            outputs.setdefault(name, out.float())
            if stats is not None:
                rows[name].skipped_steps, rows[name].pattern = stats.skipped_steps, stats.pattern
            progress(f"  [{work.name} {scheduler_name} {steps} round {round_index + 1}/{runs}] {name}: "
                     f"{rows[name].times[-1]:.2f} s")
    reference = outputs["unaccelerated"]
    base = statistics.median(rows["unaccelerated"].times)
    for name, row in rows.items():
        row.score(base, outputs[name], reference)
        row.skipped_steps = row.skipped_steps or 0
        row.call_ratio = steps / (steps - row.skipped_steps)
        row.ssim = fidelity_ssim(outputs[name], reference, work.model if work.is_image else None)
    return list(rows.values())


def format_table(rows: list[RehashRow]) -> str:
    return table(rows, [WORK, Column("sched", 5, "scheduler"), Column("steps", 5, "steps", "d"), method_column(30),
                        SECONDS, SPEED, Column("skipped", 8, lambda r: f"{r.skipped_steps}/{r.steps}", "s"),
                        Column("calls", 6, "call_ratio", ".2f", "×"), LATENT_PSNR, ssim_of("ssim")], last="pattern")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="embedded,sd15", help="comma list: embedded, sd15, sd15-tiny")
    parser.add_argument("--schedulers", default="lcm,ddim", help="comma list of lcm (4 steps), ddim (20 steps)")
    parser.add_argument("--thresholds", default="0.03,0.05,0.1,1", help="rehash thresholds to measure")
    parser.add_argument("--max-skips", type=int, default=1, help="consecutive skipped steps allowed (default 1)")
    parser.add_argument("--mode", default="reuse", choices=["reuse", "extrapolate"], help="what a skipped step returns")
    parser.add_argument("--runs", type=int, default=2, help="timed rounds; the median is reported (default 2)")
    parser.add_argument("--per-class", type=int, default=4, help="embedded: samples per digit (default 4)")
    parser.add_argument("--json", type=Path, default=None, help="write all rows as JSON here")


def main(args: argparse.Namespace) -> int:
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    bad = [s for s in schedulers if s not in PLANS]
    if bad or args.runs < 1:
        raise SystemExit(f"bad options: schedulers {bad or schedulers} (use {', '.join(PLANS)}), runs {args.runs}")
    try:
        configs = [StepRehashConfig(float(t), args.max_skips, args.mode) for t in args.thresholds.split(",") if t]
    except ValueError as err:
        raise SystemExit(f"bad options: {err}") from err
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.runs} rounds, median reported")
    rows: list[RehashRow] = []
    for work_name in [w.strip() for w in args.work.split(",") if w.strip()]:
        for scheduler_name in schedulers:
            steps = PLANS[scheduler_name]
            if work_name in ("sd15", "sd15-tiny"):
                work = sd15_workload(steps, tiny=work_name == "sd15-tiny")
            elif work_name == "embedded":
                work = embedded_workload(steps, args.per_class)
            else:
                raise SystemExit(f"unknown work {work_name!r}: use embedded, sd15 or sd15-tiny")
            work_rows = rehash_rows(work, scheduler_name, steps, configs, args.runs)
            print(format_table(work_rows), flush=True)
            rows += work_rows
    print()
    print(format_table(rows))
    print("skipped = steps whose U-Net evaluation step rehash skipped (pattern: F computed, . skipped); "
          "PSNR/SSIM against the unaccelerated run with the same scheduler and steps")
    if args.json:
        write_replacing(args.json, text_writer(json.dumps({"rows": [asdict(r) for r in rows]}, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return 0
