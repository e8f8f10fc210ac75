"""`livecache bench dit --profile`: how far any cache of the span's residual can go on a work, measured.

Every block-skipping row of `bench dit` — ours (reuse, the Taylor forecasts, the fitted forecast) and
the peers that skip blocks (MagCache's scaled reuse, FirstBlockCache's reuse) — answers a cached step
with a linear combination of the residuals it kept from full steps. So how well the best of them can
do at a given schedule is bounded by the best such combination *for the generation being measured*:
the fitted forecast with its weights fitted on that generation's own residuals (in-sample, up to
`MAX_FIT_HISTORY` kept residuals). That oracle is no method (it needs the residuals it replaces); it is
the ceiling of the family, and when it sits within a few dB of plain reuse no member can beat reuse,
or a peer that is reuse, by more.

Printed per work: per step, the span residual's norm, its change from the previous step (relative
to its norm) and the cosine between them — a trajectory a forecast can follow moves smoothly, a
random-weight model's fluctuates; then the latent PSNR of reuse, the calibrated fitted forecast,
MagCache and the oracles under the uniform and DP schedules of each interval, with block calls.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..accel.block_cache import BlockCacheConfig, fit_forecast
from ..accel.cache_schedule import dp_schedule, uniform_with
from ..accel.forecast_fit import MAX_FIT_HISTORY
from ..accel.schedules import count_full, format_schedule, uniform_schedule
from ..files import text_writer, write_replacing
from .dit_bench import Method, generate, intervals_of, peers, residual_stats, works_of
from .dit_workloads import DitWork
from .metrics import psnr
from .peers import PeerUnavailable

MAGCACHE = "diffusers MagCache (calibrated)"


def trajectory(gram: torch.Tensor) -> list[dict[str, float]]:
    """Per step: ‖r_i‖, ‖r_i − r_{i−1}‖ / ‖r_i‖ and cos(r_i, r_{i−1}), from the Gram matrix of the residuals."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    steps = []
    for i in range(len(gram)):
        row = {"step": i, "norm": float(norms[i])}
        if i:
            change = (gram[i, i] + gram[i - 1, i - 1] - 2 * gram[i, i - 1]).clamp_min(0).sqrt()
            row["change"] = float(change / norms[i].clamp_min(1e-30))
            row["cosine"] = float(gram[i, i - 1] / (norms[i] * norms[i - 1]).clamp_min(1e-30))
        steps.append(row)
    return steps


def profile_work(work: DitWork, intervals: list[int], log: Callable[[str], None]) -> dict[str, Any]:
    """The profile of one work (see the module docstring); rows are `{method, schedule, psnr, block_calls}`."""
    uncached = Method("uncached fp32", "baseline", work)
    holder: dict[str, torch.Tensor] = {}
    errors_measured, gram_measured = residual_stats(work, lambda s: holder.setdefault("out", work.sample(s)))
    reference = holder["out"].float()
    errors_calibration, gram_calibration = residual_stats(work)
    try:
        magcache: Method | None = Method(MAGCACHE, "peer", work, peer=peers(work, work.steps)[MAGCACHE])
    except PeerUnavailable as err:
        log(f"  [{work.name}] MagCache: {err}")
        magcache = None
    rows = []

    def measure(name: str, method: Method, schedule: str) -> None:
        try:
            out, calls = generate(method, lambda loop: loop())
        except PeerUnavailable as err:
            log(f"  [{work.name}] {name}: {err}")
            return
        rows.append({"method": name, "schedule": schedule, "psnr": psnr(out.float(), reference),
                     "block_calls": calls})
        log(f"  [{work.name}] {name:52s} {rows[-1]['psnr']:7.2f} dB  {calls:4d} blocks  {schedule}")

    _, calls = generate(uncached, lambda loop: loop())
    rows.append({"method": "uncached fp32", "schedule": "", "psnr": None, "block_calls": calls})  # None: exact
    if magcache is not None:
        measure(MAGCACHE, magcache, "")
    for interval in intervals:
        k = count_full(uniform_schedule(work.steps, interval))
        schedules = {"uniform": uniform_with(work.steps, k), "DP": dp_schedule(errors_calibration, k),
                     "oracle DP": dp_schedule(errors_measured, k)}
        for label, schedule in schedules.items():
            fixed = dict(schedule="calibrated", full_steps_override=schedule)
            variants: dict[str, BlockCacheConfig] = {}
            if label != "oracle DP":
                variants[f"block cache {label} K={k}"] = BlockCacheConfig(**fixed)
                variants[f"fitted forecast {label} K={k}"] = BlockCacheConfig(
                    **fixed, mode="fitted", weights=fit_forecast(gram_calibration, schedule))
            for history in (2, MAX_FIT_HISTORY):
                variants[f"oracle fit (last {history}) {label} K={k}"] = BlockCacheConfig(
                    **fixed, mode="fitted", weights=fit_forecast(gram_measured, schedule, history))
            for name, config in variants.items():
                measure(name, Method(name, "ours", work, (config,)), format_schedule(schedule))
    return {"work": work.name, "steps": trajectory(gram_measured), "rows": rows}


def print_profile(profile: dict[str, Any]) -> None:
    print(f"\nprofile [{profile['work']}]: the span's residual per step (measured generation)")
    print("| step | ‖r‖ | ‖r − r_prev‖ / ‖r‖ | cos(r, r_prev) |")
    print("|---:|---:|---:|---:|")
    for s in profile["steps"]:
        change = f"{s['change']:.3f}" if "change" in s else "—"
        cosine = f"{s['cosine']:.4f}" if "cosine" in s else "—"
        print(f"| {s['step']} | {s['norm']:.4g} | {change} | {cosine} |")
    print(f"\nprofile [{profile['work']}]: latent PSNR against uncached fp32 (oracle rows fit on the measured "
          "generation itself: the ceiling of every weighted-reuse cache at that schedule)")
    print("| method | latent PSNR | blocks | schedule |")
    print("|---|---:|---:|---|")
    for r in profile["rows"]:
        value = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        print(f"| {r['method']} | {value} | {r['block_calls']} | {r['schedule']} |")


def write_profiles(profiles: list[dict[str, Any]], path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_replacing(path, text_writer(json.dumps({"profiles": profiles}, indent=2, allow_nan=False) + "\n"))
    print(f"wrote {path}")


def main(args: argparse.Namespace) -> int:
    """`bench dit --profile`: the profile of every `--work` (printed, and to `--json`)."""
    intervals, started = intervals_of(args), time.perf_counter()
    profiles = []
    for work, _ in works_of(args):
        profiles.append(profile_work(work, intervals, print))
        print_profile(profiles[-1])
    write_profiles(profiles, args.json)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0
