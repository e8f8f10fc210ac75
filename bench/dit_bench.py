"""`livecache bench dit`: our block cache, forecasting and W8A8 on diffusion transformers against diffusers' hooks.

One process, per work (`dit_workloads`: a Flux-shaped `FluxTransformer2DModel`, the embedded digits
DiT), every method on the same inputs and seeds:

- calibration first, on other noise than the measured generation: the DP schedule (the span's
  residual recorded at every step of one uncached generation; errors[i, j] = ‖r_i − r_j‖² / ‖r_j‖²,
  the cost of reusing step i's residual at step j; `cache_schedule.dp_schedule` picks the K full
  steps of least total error), the fitted forecast's weights (`block_cache.fit_forecast`, least squares
  on the Gram matrix of the same residuals), W8A8, MagCache's magnitude ratios (its own calibration mode);
- each method runs once untimed (warm-up; its output gives the fidelity columns and the block
  calls), then `--runs` interleaved timed rounds; the median sampler-loop time against the fp32
  uncached median of the same work gives the speed ratio;
- block calls: transformer blocks whose attention ran (a `to_q` projection called), summed over the
  generation: a block a cache skips, or whose attention a hook reuses, does not count;
- fidelity: latent PSNR (peak = the reference's max − min) and SSIM (latent min–max scaled to 0..1;
  on the embedded DiT the images) against the fp32 uncached latent; on the embedded DiT also the
  FID-style score (FID*) against the real digits and the share of samples our digit classifier reads
  as the asked digit.

`--comfy-root` adds part (c) (`comfy_dit_bench`): ComfyUI's own Flux class through its KSampler, with
ComfyUI's EasyCache and LazyCache beside our nodes (`--comfy-tiny`: a tiny Flux, for the quick test).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..accel.block_cache import BlockCacheConfig, fit_forecast
from ..accel.cache_schedule import dp_schedule, uniform_with
from ..accel.quant import QuantConfig, calibrate_quant
from ..accel.schedules import Schedule, count_full, format_schedule, nonuniform_schedule, uniform_schedule
from ..adapters.diffusers_dit import DiTSite
from ..adapters.diffusers_site import accelerated
from .deepcache_bench import _fid_scorer, write_outputs
from .dit_workloads import DitWork, dit_work, flux_work
from .hook_peers import remove_diffusers_hooks
from .metrics import psnr
from .peers import PeerUnavailable
from .scoring import MethodRow, fidelity_ssim, timed_rounds
from .table import FID, LATENT_PSNR, SECONDS, SPEED, WORK, Column, method_column, ssim_of, table


@dataclass
class Row(MethodRow):
    dtype: str = "dit"
    ssim: float | None = None
    block_calls: int | None = None
    fid: float | None = None
    right_digit: float | None = None


Peer = Callable[[DitWork], None]  # applies diffusers hooks to the work's transformer
MAG_W8A8 = "diffusers MagCache + our W8A8"  # the peer row with our int8 under it
CLOCK: dict[str, float] = {"value": 1000.0}  # the current call's timestep, for hooks that ask through a callback


@dataclass
class Method:
    name: str
    family: str
    work: DitWork
    configs: tuple[Any, ...] = ()
    note: str = ""
    peer: Peer | None = None


class BlockCalls:
    """Counts the blocks whose attention runs: a forward hook on each block's first `to_q` projection."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        self.calls = 0
        self.handles = []
        for block in blocks:
            name = next(n for n, _ in block.named_modules() if n.endswith("to_q"))
            self.handles.append(block.get_submodule(name).register_forward_hook(self._count))

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class HookContext:
    """What a diffusers pipeline does around each transformer call for the cache hooks: `cache_context`
    with the step index (they keep their state per context and some read the step). It also sets
    `clock` to the call's timestep (0..1000) for hooks that ask for it through a callback."""

    def __init__(self, transformer: torch.nn.Module, steps: int, clock: dict[str, float], scale: float) -> None:
        from diffusers.models.cache_utils import CacheMixin

        site = DiTSite(transformer)
        self.calls, self.active = 0, None
        self.context = lambda i: CacheMixin.cache_context(transformer, "cond", step_index=i, num_inference_steps=steps,
                                                          timestep=clock["value"], sigma=clock["value"] / 1000)
        self.read = lambda args, kwargs: clock.update(value=site.read_level(args, kwargs) * scale)
        self.handles = [transformer.register_forward_pre_hook(self._enter, with_kwargs=True),
                        transformer.register_forward_hook(self._exit)]

    def _enter(self, _module: Any, args: tuple, kwargs: dict) -> None:
        self.read(args, kwargs)
        self.active = self.context(self.calls)
        self.active.__enter__()

    def _exit(self, *_: Any) -> None:
        self.active.__exit__(None, None, None)
        self.calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def generate(method: Method, meter: Callable[[Callable[[], torch.Tensor]], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """One generation through `meter`; returns the latent and the block calls."""
    work = method.work
    scheduler = work.new_scheduler()
    blocks = DiTSite(work.transformer).blocks
    with accelerated(work.transformer, scheduler, method.configs):  # a peer row's configs: ours stacked under it
        if method.peer is None:
            counter = BlockCalls(blocks)
            try:
                return meter(lambda: work.sample(scheduler)), counter.calls
            finally:
                counter.remove()
        try:
            method.peer(work)
        except Exception as err:
            remove_diffusers_hooks(work.transformer)
            raise PeerUnavailable(f"cannot apply ({type(err).__name__}: {str(err)[:200]})") from err
        context = HookContext(work.transformer, work.steps, CLOCK, work.timestep_scale)
        counter = BlockCalls(blocks)
        try:
            return meter(lambda: work.sample(scheduler)), counter.calls
        except Exception as err:
            raise PeerUnavailable(f"cannot run ({type(err).__name__}: {str(err)[:200]})") from err
        finally:
            counter.remove()
            context.remove()
            remove_diffusers_hooks(work.transformer)


def residual_stats(work: DitWork, run: Callable[[Any], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the default span's residuals r of one generation (`run(scheduler)`, default the calibration one):
    errors[i, j] = ‖r_i − r_j‖² / ‖r_j‖² (the DP schedule's objective) and the Gram matrix
    gram[i, j] = ⟨r_i, r_j⟩ (the fitted forecast's)."""
    span = DiTSite(work.transformer).block_span(None)
    first, last, io_first, io_last = span.blocks[0], span.blocks[-1], span.io[0], span.io[-1]
    entry: list[tuple[torch.Tensor, ...]] = []
    residuals: list[torch.Tensor] = []

    def enter(_m: Any, args: tuple, kwargs: dict) -> None:
        entry[:] = [tuple(s.clone() for s in io_first.streams_in(args, kwargs))]

    def leave(_m: Any, _args: tuple, _kwargs: dict, out: Any) -> None:
        streams = io_last.streams_out(out)
        residuals.append(torch.cat([(o - e).double().flatten() for o, e in zip(streams, entry[0], strict=True)]))

    handles = [first.register_forward_pre_hook(enter, with_kwargs=True),
               last.register_forward_hook(leave, with_kwargs=True)]
    try:
        (run or work.calibrate)(work.new_scheduler())
    finally:
        for handle in handles:
            handle.remove()
    r = torch.stack(residuals)
    return (torch.cdist(r, r) ** 2) / (r.norm(dim=1) ** 2).clamp_min(1e-30).unsqueeze(0), r @ r.T


def mag_ratios(work: DitWork) -> list[float]:
    """MagCache's own calibration mode on the calibration generation; it prints the ratios to copy."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    apply_mag_cache(work.transformer, MagCacheConfig(calibrate=True, num_inference_steps=work.steps))
    context, printed = HookContext(work.transformer, work.steps, CLOCK, work.timestep_scale), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            work.calibrate(work.new_scheduler())
    finally:
        context.remove()
        remove_diffusers_hooks(work.transformer)
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lines:
        raise PeerUnavailable("MagCache's calibration printed no ratios")
    return [float(v) for v in ast.literal_eval(lines[-1])]


def peers(work: DitWork, steps: int) -> dict[str, Peer]:
    """diffusers' cache hooks with the settings their docs suggest; each applies itself to the transformer."""
    from diffusers import hooks

    now = lambda: CLOCK["value"]  # noqa: E731

    try:
        ratios: list[float] | str = mag_ratios(work)
    except Exception as err:
        ratios = f"MagCache calibration failed ({type(err).__name__}: {str(err)[:160]})"

    def mag(w: DitWork) -> None:
        if isinstance(ratios, str):
            raise PeerUnavailable(ratios)
        hooks.apply_mag_cache(w.transformer, hooks.MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps))

    return {
        "diffusers FirstBlockCache thr 0.2": lambda w: hooks.apply_first_block_cache(
            w.transformer, hooks.FirstBlockCacheConfig(threshold=0.2)),
        "diffusers TaylorSeer interval 3": lambda w: hooks.apply_taylorseer_cache(
            w.transformer, hooks.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1)),
        "diffusers MagCache (calibrated)": mag,
        "diffusers FasterCache": lambda w: hooks.apply_faster_cache(w.transformer, hooks.FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=now, attention_weight_callback=lambda _: 0.3,
            is_guidance_distilled=not work.is_image, tensor_format="BCHW")),
        "diffusers PyramidAttentionBroadcast": lambda w: hooks.apply_pyramid_attention_broadcast(
            w.transformer, hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                                 spatial_attention_timestep_skip_range=(100, 800),
                                                                 current_timestep_callback=now)),
        "diffusers SeaCache": lambda w: hooks.apply_sea_cache(w.transformer, hooks.SeaCacheConfig()),
    }


def plan_methods(work: DitWork, intervals: list[int], with_peers: bool, log: Callable[[str], None],
                 only: list[str] | None = None) -> list[Method]:
    """Calibrate for `work` and list the methods of its table (with `only`: uncached fp32 and the methods whose
    name contains one of its strings; W8A8 is calibrated only when a row of it is kept)."""
    steps = work.steps
    started = time.perf_counter()

    def kept(name: str) -> bool:
        return only is None or name == "uncached fp32" or any(part in name for part in only)

    errors, gram = residual_stats(work)
    site = DiTSite(work.transformer)
    w8a8 = None
    if kept("W8A8") or kept("stack: W8A8") or (with_peers and kept(MAG_W8A8)):
        w8a8 = calibrate_quant(QuantConfig(), work.transformer, site.quant_layers(), site.read_level,
                               lambda: work.calibrate(work.new_scheduler()))
    methods = [Method("uncached fp32", "baseline", work)]
    if work.bf16 is not None:
        methods.append(Method("uncached bf16", "baseline", work.bf16()))
    dp_by_k: dict[int, Schedule] = {}  # the DP schedule of each budget, for the stacks below
    for interval in intervals:
        k = count_full(uniform_schedule(steps, interval))
        dp = dp_by_k[k] = dp_schedule(errors, k)
        schedules: dict[str, Schedule] = {"uniform": uniform_with(steps, k),
                                          "non-uniform": nonuniform_schedule(steps, interval), "DP": dp}
        for label, schedule in schedules.items():
            fixed = dict(schedule="calibrated", full_steps_override=schedule)
            methods.append(Method(f"block cache {label} K={k}", "ours", work, (BlockCacheConfig(**fixed),),
                                  format_schedule(schedule)))
            for order in (1, 2):
                methods.append(Method(f"forecast o{order} {label} K={k}", "ours", work,
                                      (BlockCacheConfig(**fixed, mode="forecast", order=order),),
                                      format_schedule(schedule)))
            methods.append(Method(f"fitted forecast {label} K={k}", "ours", work,
                                  (BlockCacheConfig(**fixed, mode="fitted", weights=fit_forecast(gram, schedule)),),
                                  format_schedule(schedule)))
    if w8a8 is not None:
        methods.append(Method("W8A8", "ours", work, (w8a8,), note=w8a8.backend))
        for index, (k, schedule) in enumerate(dp_by_k.items()):
            dp = dict(schedule="calibrated", full_steps_override=schedule)
            methods.append(Method(f"stack: W8A8 + block cache DP K={k}", "ours", work,
                                  (w8a8, BlockCacheConfig(**dp))))
            if index == 0:
                methods.append(Method(f"stack: W8A8 + forecast o1 DP K={k}", "ours", work,
                                      (w8a8, BlockCacheConfig(**dp, mode="forecast", order=1))))
    if with_peers:
        table = peers(work, steps)
        methods += [Method(name, "peer", work, peer=peer) for name, peer in table.items()]
        if w8a8 is not None:  # the stack's int8 under the best peer: how much of a stack's lead is the cache's
            methods.append(Method(MAG_W8A8, "peer", work, (w8a8,),
                                  peer=table["diffusers MagCache (calibrated)"]))
    log(f"  [{work.name}] calibrated in {time.perf_counter() - started:.0f} s (DP residual errors, W8A8, MagCache)")
    return [m for m in methods if kept(m.name)]


def bench_work(work: DitWork, methods: list[Method], runs: int, scorers: Any, log: Callable[[str], None]) -> list[Row]:
    rows = {m.name: Row(work.name, m.name, m.family, note=m.note) for m in methods}
    outputs: dict[str, torch.Tensor] = {}
    for method in methods:  # warm-up, fidelity output and block calls
        try:
            out, calls = generate(method, lambda loop: loop())
        except PeerUnavailable as err:
            rows[method.name].note = str(err)[:240]
            log(f"  [{work.name}] {method.name}: {rows[method.name].note}")
            continue
        outputs[method.name] = out.float()
        rows[method.name].block_calls = calls
    live = [m for m in methods if m.name in outputs]
    by_name = {m.name: m for m in live}
    timed_rounds(rows, list(by_name), lambda name: generate(by_name[name], lambda loop: loop()), runs, work.name, log)
    reference = outputs["uncached fp32"]
    base_time = statistics.median(rows["uncached fp32"].times) if runs else None
    for method in live:
        row, out = rows[method.name], outputs[method.name]
        if base_time is None:  # --runs 0: counts and fidelity only
            row.latent_psnr = psnr(out, reference)
        else:
            row.score(base_time, out, reference)
        row.ssim = fidelity_ssim(out, reference, work.model if work.is_image else None, work.as_image)
        if work.is_image and scorers is not None:
            row.fid, row.right_digit = scorers(out)
    return list(rows.values())


def digit_scorers(per_class: int) -> Callable[[torch.Tensor], tuple[float, float]] | None:
    """FID* and the share of samples the classifier reads as the asked digit (sample i asks for i mod 10)."""
    from ..models.embedded import FEATURES_FILE
    from ..models.features import DigitFeatures
    from ..models.loading import load_state_into

    fid = _fid_scorer()
    if fid is None or not FEATURES_FILE.is_file():
        return None
    classifier = load_state_into(DigitFeatures(), FEATURES_FILE).eval()
    asked = torch.arange(10 * per_class) % 10

    @torch.no_grad()
    def score(samples: torch.Tensor) -> tuple[float, float]:
        read = classifier(samples.clamp(-1, 1).float()).argmax(-1)
        return fid(samples), float((read == asked).float().mean())

    return score


def format_table(rows: list[Row]) -> str:
    return table(rows, [WORK, method_column(38), SECONDS, SPEED, LATENT_PSNR, ssim_of("ssim"),
                        Column("blocks", 6, "block_calls", "d"), FID,
                        Column("digit", 6, _right_digit_percent, ".0f", "%")])


def _right_digit_percent(row: Row) -> float | None:
    return None if row.right_digit is None else 100 * row.right_digit


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="flux,dit", help="comma list: flux, flux-tiny, dit (the embedded DiT)")
    parser.add_argument("--flux-steps", type=int, default=20, help="flow-matching Euler steps on the Flux-shaped "
                                                                   "transformer (default 20)")
    parser.add_argument("--dit-steps", type=int, default=20, help="DDIM steps on the embedded DiT (default 20)")
    parser.add_argument("--per-class", type=int, default=10, help="embedded DiT: samples per digit (default 10)")
    parser.add_argument("--intervals", default="3,5",
                        help="uniform cache intervals N; each gives K full steps, used by every cached row of it")
    parser.add_argument("--runs", type=int, default=2, help="timed rounds; the median is reported (default 2; 0: "
                                                            "no timing, block calls and fidelity only)")
    parser.add_argument("--only", default="", help="comma list: keep uncached fp32 and the methods whose name "
                                                   "contains one of these (e.g. 'block cache,forecast')")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers' cache hooks")
    parser.add_argument("--comfy-root", type=Path, default=None,
                        help="a ComfyUI folder: also ComfyUI's Flux class through its KSampler (part c)")
    parser.add_argument("--comfy-tiny", action="store_true",
                        help="part (c) on a tiny Flux (width 64, 2+3 blocks, 8x8 latent: counts, not timings)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table: the span residual's trajectory and the oracle ceiling of "
                             "every weighted-reuse cache per schedule (bench/dit_profile.py)")
    parser.add_argument("--json", type=Path, default=None, help="write all rows as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="speed-vs-PSNR PNG (default: beside --json)")


def comfy_rows(args: argparse.Namespace, intervals: list[int]) -> list[Row]:
    """Part (c): ComfyUI's Flux (config stated in the log) through ComfyUI's KSampler path."""
    from .comfy_dit_bench import comfy_flux_rows, flux_config
    from .comfy_workloads import use_comfyui

    use_comfyui(args.comfy_root)
    shape = (64, 2, 2, 3) if args.comfy_tiny else (256, 4, 2, 4)
    size = 8 if args.comfy_tiny else 32
    print(f"ComfyUI Flux: hidden {shape[0]}, {shape[1]} heads, {shape[2]} double + {shape[3]} single blocks, "
          f"latent 16x{size}x{size}, {args.flux_steps} euler/simple steps", flush=True)
    rows = comfy_flux_rows(flux_config(*shape), size, args.flux_steps, intervals, args.runs, Row, print)
    print(format_table(rows), flush=True)
    return rows


def intervals_of(args: argparse.Namespace) -> list[int]:
    """`--intervals` parsed and checked (with `--runs`); also sets `--threads`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    intervals = sorted({int(s) for s in args.intervals.split(",") if s.strip()})
    if args.runs < 0 or not intervals or min(intervals) < 2:
        raise SystemExit(f"bad options: runs {args.runs} (>= 0), intervals {intervals} (each >= 2)")
    return intervals


def works_of(args: argparse.Namespace) -> Iterator[tuple[DitWork, Callable[[torch.Tensor], Any] | None]]:
    """Each `--work` built in turn, with its FID*/digit scorer (None where it has none)."""
    for name in [w.strip() for w in args.work.split(",") if w.strip()]:
        if name in ("flux", "flux-tiny"):
            yield flux_work(args.flux_steps, tiny=name == "flux-tiny"), None
        elif name == "dit":
            yield dit_work(args.dit_steps, args.per_class), digit_scorers(args.per_class)
        else:
            raise SystemExit(f"unknown work {name!r}: use flux, flux-tiny or dit")


def main(args: argparse.Namespace) -> int:
    intervals = intervals_of(args)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.runs} timed rounds, median reported")
    rows: list[Row] = []
    started = time.perf_counter()
    for work, scorers in works_of(args):
        methods = plan_methods(work, intervals, not args.no_peers, print, only)
        work_rows = bench_work(work, methods, args.runs, scorers, print)
        print(format_table(work_rows), flush=True)
        rows += work_rows
    if args.comfy_root is not None:
        rows += comfy_rows(args, intervals)
    print()
    print(format_table(rows))
    print(f"total {time.perf_counter() - started:.0f} s. speed: sampler-loop time vs uncached fp32 of the same work; "
          "PSNR/SSIM vs uncached fp32 (latent PSNR peak = max − min; SSIM on the min–max scaled latent, on images "
          "for the embedded DiT); blocks: blocks whose attention ran; FID* = Fréchet distance of our digit-classifier "
          "features to the real digits (lower is better); digit: samples read as the asked digit")
    write_outputs(rows, args)
    return 0
