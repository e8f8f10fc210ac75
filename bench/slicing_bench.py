"""`livecache bench slicing`: peak memory, speed and exactness of feature slicing, per model.

Rows: a U-Net call (SD1.5-shaped, a batch of images with CFG), the VAE decoder (SD-shaped), a
16-frame video-shaped input through the U-Net (frames folded into the batch, as AnimateDiff does) and
a 16-frame AnimateDiff-shaped `UNetMotionModel` (its temporal layers run whole). Each row runs the
same call unsliced and sliced in one process on the same inputs.

How peak memory is measured (and why not tracemalloc or RSS): tracemalloc does not see torch's CPU
allocator, and process RSS mixes in weights, allocator caching and freed-but-kept pages. On CPU we
record every torch allocation and free during one call with `torch.profiler` (`profile_memory=True`)
and take the peak of their running sum: the bytes of tensors alive at once during that call, above
what was alive before it — weights and inputs excluded, activations and outputs included. On CUDA,
`torch.cuda.max_memory_allocated` minus the allocation before the call gives the same quantity.
Allocations made outside torch's allocator (oneDNN scratch buffers) are not counted on CPU.
Speed: median of `runs` interleaved timed calls (the profiled calls before them warm up). Exactness:
max |sliced − unsliced| over the output, and that over max |unsliced| (float rounding grows with the
output's magnitude).

What slicing cannot lower: buffers that do not scale with the batch. On CPU, fp32 convolutions copy
their weight into oneDNN's layout on every call; the SD1.5 U-Net's largest (2560→1280, 3×3) is 112.5
MiB. That copy is a floor under the sliced peak,
paid once per slice (which is also why slicing is slower on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..accel.slicing import SlicingConfig
from ..adapters.diffusers_site import accelerated
from ..adapters.diffusers_slicing import sliced_decoder
from ..files import text_writer, write_replacing

VIDEO_FRAMES = 16


@dataclass
class SlicingRow:
    work: str
    input: str
    config: str
    peak_mb_full: float
    peak_mb_sliced: float
    memory_ratio: float
    seconds_full: float
    seconds_sliced: float
    speed: float
    max_abs_diff: float
    max_rel_diff: float  # max |Δ| / max |unsliced output|: float rounding scales with the output's size
    slices: int


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment (native code writes there, bypassing sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run `fn()` once; return its result and the peak bytes of torch tensors it had alive at once."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # kineto prints two trace lines per profile; the bench table is the output
        prof.start()
    try:
        result = fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    alive = peak = 0
    for _, size in sorted(events):
        alive += size
        peak = max(peak, alive)
    return result, peak


def measure(work: str, label: str, call: Callable[[], torch.Tensor],
            sliced: Callable[[], AbstractContextManager[Any]], config: SlicingConfig, runs: int = 2,
            device: str = "cpu") -> SlicingRow:
    """One row: `call()` unsliced and inside `sliced()` (a context that applies `config`), same inputs."""
    with torch.no_grad():
        reference, peak_full = peak_memory(call, device)
        with sliced() as handle:
            out, peak_sliced = peak_memory(call, device)
            slices = handle.stats.slice_calls
        times: dict[str, list[float]] = {"full": [], "sliced": []}
        for _ in range(runs):
            for name in ("full", "sliced"):
                with sliced() if name == "sliced" else nullcontext():
                    started = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - started)
    diff = float((out.float() - reference.float()).abs().max())
    full_s, sliced_s = statistics.median(times["full"]), statistics.median(times["sliced"])
    return SlicingRow(work, label, _describe(config), peak_full / 2**20, peak_sliced / 2**20,
                      peak_full / max(peak_sliced, 1), full_s, sliced_s, full_s / sliced_s,
                      diff, diff / max(float(reference.float().abs().max()), 1e-30), slices)


@contextmanager
def sliced_unet(unet: torch.nn.Module, config: SlicingConfig) -> Iterator[Any]:
    """`config` applied to `unet` for a `with` block, yielding its handle (`.stats`)."""
    with accelerated(unet, None, [config]) as (handle,):
        yield handle


def _describe(config: SlicingConfig) -> str:
    return f"{config.axis}, {config.slices} slices"


# -- workloads -------------------------------------------------------------------------------------
def _unet(tiny: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if tiny:
        return UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
                                    attention_head_dim=8, norm_num_groups=16, sample_size=32).eval()
    return UNet2DConditionModel(sample_size=32, cross_attention_dim=768).eval()


def _vae(tiny: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    channels = (32, 64) if tiny else (128, 256, 512, 512)
    kinds = len(channels)
    return AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * kinds,
                         up_block_types=("UpDecoderBlock2D",) * kinds, latent_channels=4, layers_per_block=2,
                         norm_num_groups=32).eval()


def _motion_unet(tiny: bool):
    from diffusers import UNetMotionModel

    torch.manual_seed(0)
    channels = (32, 64) if tiny else (64, 128, 256)
    down = ("CrossAttnDownBlockMotion",) * (len(channels) - 1) + ("DownBlockMotion",)
    up = ("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * (len(channels) - 1)
    return UNetMotionModel(block_out_channels=channels, layers_per_block=1, down_block_types=down,
                           up_block_types=up, cross_attention_dim=64, norm_num_groups=8, num_attention_heads=4,
                           motion_num_attention_heads=4, sample_size=32, in_channels=4, out_channels=4,
                           motion_max_seq_length=32).eval()


@torch.no_grad()
def slicing_rows(work: str = "sd15", batch: int = 4, slices: int = 16, runs: int = 2,
                 only: str = "", progress: Callable[[str], None] = print) -> list[SlicingRow]:
    """Every slicing row for `work` ("sd15" or "sd15-tiny"): what `livecache bench suite` calls too."""
    tiny = work == "sd15-tiny"
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    rows: list[SlicingRow] = []
    generator = torch.Generator().manual_seed(1)
    batch_config = SlicingConfig("batch", slices, vae=False)

    def keep(name: str) -> bool:
        return not wanted or name in wanted

    if keep("unet") or keep("video"):
        unet = _unet(tiny)
        dim = unet.config.cross_attention_dim
        for name, rows_in in (("unet", batch), ("video", VIDEO_FRAMES)):
            if not keep(name):
                continue
            x = torch.randn(rows_in, 4, 32, 32, generator=generator)
            states = torch.randn(rows_in, 77, dim, generator=generator)
            label = (f"U-Net batch {rows_in} (CFG) 4×32×32" if name == "unet"
                     else f"{rows_in}-frame video through the U-Net, 4×32×32 per frame")
            rows.append(measure(work, label, lambda x=x, s=states: unet(x, 500, encoder_hidden_states=s).sample,
                                lambda: sliced_unet(unet, batch_config), batch_config, runs))
            progress(format_table(rows[-1:]))
        if keep("unet"):
            spatial = SlicingConfig("spatial", 4, vae=False)
            x = torch.randn(batch, 4, 32, 32, generator=generator)
            states = torch.randn(batch, 77, dim, generator=generator)
            rows.append(measure(work, f"U-Net batch {batch} (CFG) 4×32×32", lambda: unet(
                x, 500, encoder_hidden_states=states).sample, lambda: sliced_unet(unet, spatial), spatial,
                runs))
            progress(format_table(rows[-1:]))
        del unet
    if keep("vae"):
        vae = _vae(tiny)
        latents = torch.randn(batch, 4, 32, 32, generator=generator)
        vae_config = SlicingConfig("batch", slices, vae=True)
        rows.append(measure(work, f"VAE decoder, {batch} latents 4×32×32 → 256×256",
                            lambda: vae.decode(latents).sample, lambda: sliced_decoder(vae, [vae_config]),
                            vae_config, runs))
        progress(format_table(rows[-1:]))
        del vae
    if keep("motion"):
        motion = _motion_unet(tiny)
        x = torch.randn(1, 4, VIDEO_FRAMES, 32, 32, generator=generator)
        states = torch.randn(VIDEO_FRAMES, 77, 64, generator=generator)  # AnimateDiff repeats the prompt per frame
        rows.append(measure(work, f"{VIDEO_FRAMES}-frame AnimateDiff-shaped UNetMotionModel, 4×32×32",
                            lambda: motion(x, 500, encoder_hidden_states=states).sample,
                            lambda: sliced_unet(motion, batch_config), batch_config, runs))
        progress(format_table(rows[-1:]))
    return rows


def format_table(rows: list[SlicingRow]) -> str:
    lines = []
    for r in rows:
        lines.append(f"{r.work:9} {r.input:58} {r.config:17} {r.peak_mb_full:9.1f} {r.peak_mb_sliced:9.1f} "
                     f"{r.memory_ratio:6.2f}× {r.seconds_full:7.2f} {r.seconds_sliced:7.2f} {r.speed:5.2f}× "
                     f"{r.max_abs_diff:9.2e} {r.max_rel_diff:9.2e} {r.slices:6d}")
    return "\n".join(lines)


HEADER = (f"{'work':9} {'input':58} {'slicing':17} {'peak MB':>9} {'sliced':>9} {'memory':>7} {'s full':>7} "
          f"{'s sliced':>7} {'speed':>6} {'max |Δ|':>9} {'relative':>9} {'slices':>6}")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="sd15", help="sd15 (SD1.5-shaped, random weights) or sd15-tiny")
    parser.add_argument("--only", default="", help="comma list of rows: unet, video, vae, motion (default all)")
    parser.add_argument("--batch", type=int, default=4, help="U-Net and VAE batch (default 4: 2 images with CFG)")
    parser.add_argument("--slices", type=int, default=16, help="slices per group call, at most one row each "
                        "(default 16: one frame of the 16-frame video, one sample of a batch)")
    parser.add_argument("--runs", type=int, default=2, help="timed calls per variant; the median is reported")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")


def main(args: argparse.Namespace) -> int:
    if args.work not in ("sd15", "sd15-tiny") or args.batch < 1 or args.slices < 1 or args.runs < 1:
        raise SystemExit(f"bad options: work {args.work!r} (sd15 or sd15-tiny), batch {args.batch}, "
                         f"slices {args.slices}, runs {args.runs}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peak = torch tensors alive at once "
          f"during one call (profiler allocation events), speed = median of {args.runs}")
    print(HEADER)
    rows = slicing_rows(args.work, args.batch, args.slices, args.runs, args.only)
    print()
    print(HEADER)
    print(format_table(rows))
    if args.json:
        write_replacing(args.json, text_writer(json.dumps({"rows": [asdict(r) for r in rows]}, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return 0
