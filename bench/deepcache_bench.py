"""`livecache bench deepcache`: uncached vs our DeepCache vs the authors' helper, ToMe and T-GATE.

Everything runs in one process on the same model, seeds and sampler. Runs are interleaved in
rounds (every method once per round) after a warm-up, so slow drift of the machine hits all rows
alike; the time reported is the median over rounds, and the speed ratio is against the uncached
median of the same dtype in the same run. Fidelity sits beside speed: latent PSNR against the
uncached latent with peak = that latent's max − min; on the embedded (pixel-space) model also
image PSNR/SSIM and the FID-style score against the real digits. "deep calls" counts U-Net calls
that ran the mid block (read by a hook, so peers are counted the same way as ours).
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

from ..accel.deepcache import DeepCacheConfig
from ..adapters.diffusers_site import accelerated
from ..files import text_writer, write_replacing
from ..models.sampling import make_scheduler, sample
from .peers import PeerUnavailable, run_deepcache_authors, run_tgate, run_tome
from .scoring import Measured, image_fidelity
from .table import FID, IMAGE_PSNR, LATENT_PSNR, SECONDS, SPEED, WORK, Column, method_column, ssim_of, table
from .workloads import Workload, embedded_workload, sd15_workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row(Measured):
    work: str
    dtype: str
    method: str
    family: str
    speed_vs_fp32: float | None = None
    image_psnr: float | None = None
    image_ssim: float | None = None
    deep_calls: int | None = None
    unet_calls: int | None = None
    fid: float | None = None
    note: str = ""


Runner = Callable[[Workload], torch.Tensor]


def _ours(config: Any) -> Runner:
    """A runner sampling with `config` (any registered technique's) applied."""
    def run(work: Workload) -> torch.Tensor:
        scheduler = make_scheduler("ddim", work.model.scheduler_config)
        with accelerated(work.model.unet, scheduler, [config]):
            return sample(work.model, scheduler, work.cond, work.uncond, work.noise, work.steps, work.guidance,
                          progress=False)

    return run


def methods(intervals: list[int], peers: bool, steps: int) -> list[tuple[str, str, Runner]]:
    out: list[tuple[str, str, Runner]] = [("uncached", "baseline", _ours_uncached)]
    for n in intervals:
        out.append((f"ours N={n} uniform", "ours", _ours(DeepCacheConfig(n, 0, schedule="uniform"))))
        out.append((f"ours N={n} non-uniform", "ours", _ours(DeepCacheConfig(n, 0, schedule="non-uniform"))))
    if peers:
        for n in intervals:
            out.append((f"DeepCache authors N={n}", "peer", lambda w, n=n: run_deepcache_authors(w, n)))
        out.append(("ToMe ratio 0.5", "peer", run_tome))
        out.append((f"T-GATE gate {steps // 2}", "peer", lambda w: run_tgate(w, steps // 2)))
    return out


def _ours_uncached(work: Workload) -> torch.Tensor:
    scheduler = make_scheduler("ddim", work.model.scheduler_config)
    return sample(work.model, scheduler, work.cond, work.uncond, work.noise, work.steps, work.guidance,
                  progress=False)


class _CallCounter:
    """Counts U-Net calls and calls that reached the deep blocks (the mid block's first resnet)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet_calls = self.deep_calls = 0
        self._handles = [
            unet.register_forward_pre_hook(lambda *_: self._bump("unet_calls")),
            unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: self._bump("deep_calls")),
        ]

    def _bump(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def bench_workload(work: Workload, dtype_name: str, runs: int, intervals: list[int], peers: bool,
                   fid_reference=None, progress: Callable[[str], None] = print, only: str = "",
                   plan: list[tuple[str, str, Runner]] | None = None) -> list[Row]:
    """Every method of `plan` (default: this bench's `methods`; the first must be "uncached") in rounds."""
    rows: dict[str, Row] = {}
    outputs: dict[str, torch.Tensor] = {}
    wanted = [w.strip().lower() for w in only.split(",") if w.strip()]
    plan = [m for m in (plan or methods(intervals, peers, work.steps))
            if m[0] == "uncached" or not wanted or any(w in m[0].lower() for w in wanted)]
    _ours_uncached(work)  # warm-up: allocator, oneDNN primitives, caches
    for round_index in range(runs):
        for name, family, runner in plan:
            row = rows.setdefault(name, Row(work.name, dtype_name, name, family))
            if row.note:
                continue  # unavailable peers are not retried
            counter = _CallCounter(work.model.unet)
            started = time.perf_counter()
            try:
                out = runner(work)
            except PeerUnavailable as err:
                row.note = str(err)[:300]
                continue
            finally:
                counter.close()
            row.times.append(time.perf_counter() - started)
            row.unet_calls, row.deep_calls = counter.unet_calls, counter.deep_calls
            outputs.setdefault(name, out.float())
            progress(f"  [{work.name} {dtype_name} round {round_index + 1}/{runs}] {name}: {row.times[-1]:.2f} s")
    reference = outputs["uncached"]
    base = statistics.median(rows["uncached"].times)
    for name, row in rows.items():
        if not row.times:
            continue
        row.score(base, outputs[name], reference)
        if work.is_image:
            row.image_psnr, row.image_ssim = image_fidelity(work.model, outputs[name], reference)
            if fid_reference is not None:
                row.fid = fid_reference(outputs[name])
    return list(rows.values())


def _fid_scorer():
    """The FID-style score against all real digits, or None when the feature extractor is missing."""
    from ..models.digits import load_digits_tensor
    from ..models.embedded import FEATURES_FILE
    from ..models.features import DigitFeatures, embed, frechet_distance
    from ..models.loading import load_state_into

    if not FEATURES_FILE.is_file():
        return None
    extractor = load_state_into(DigitFeatures(), FEATURES_FILE)
    real = embed(extractor, load_digits_tensor()[0])
    return lambda samples: frechet_distance(embed(extractor, samples.clamp(-1, 1)), real)


def format_table(rows: list[Row]) -> str:
    return table(rows, [WORK, Column("dtype", 5, "dtype"), method_column(27), SECONDS, SPEED,
                        Column("vs fp32", 7, "speed_vs_fp32", ".2f", "×"), LATENT_PSNR, IMAGE_PSNR,
                        ssim_of("image_ssim"), Column("deep/calls", 10, _calls, "s"), FID])


def _calls(row: Row) -> str | None:
    """Deep-branch calls out of U-Net calls (the work DeepCache saved, free of timing noise)."""
    return None if row.unet_calls is None else f"{row.deep_calls}/{row.unet_calls}"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = sorted({(r.work, r.dtype) for r in rows})
    fig, axes = plt.subplots(1, len(works), figsize=(6 * len(works), 4.5), squeeze=False)
    markers = {"baseline": "s", "ours": "o", "peer": "^"}
    for ax, (work, dtype) in zip(axes[0], works, strict=True):
        for r in rows:
            if (r.work, r.dtype) != (work, dtype) or r.speed is None:
                continue
            y = min(r.latent_psnr, 80.0)  # the uncached row is infinite; draw it at the top
            ax.scatter(r.speed, y, marker=markers[r.family], label=r.method)
            ax.annotate(r.method, (r.speed, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speed ratio vs uncached (×)")
        ax.set_ylabel("latent PSNR vs uncached (dB; uncached drawn at 80)")
        ax.set_title(f"{work} ({dtype})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_replacing(path, lambda stream: fig.savefig(stream, format="png", dpi=120))
    plt.close(fig)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="sd15,embedded", help="comma list: sd15, sd15-tiny, embedded")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--intervals", default="2,3,5", help="cache intervals to measure")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    parser.add_argument("--per-class", type=int, default=10, help="embedded: samples per digit for the FID-style score")
    parser.add_argument("--no-peers", action="store_true", help="skip the DeepCache/ToMe/T-GATE peers")
    parser.add_argument("--only", default="", help="comma list of substrings: keep only methods whose name has one "
                                                   "(the uncached baseline always runs), e.g. 'N=3'")
    parser.add_argument("--json", type=Path, default=None, help="write all rows as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the speed-vs-fidelity PNG here "
                                                                "(default: beside --json)")


def main(args: argparse.Namespace) -> int:
    intervals = [int(x) for x in args.intervals.split(",") if x]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or args.runs < 1 or not intervals or min(intervals) < 1:
        raise SystemExit(f"bad options: dtypes {unknown or dtypes}, runs {args.runs}, intervals {intervals}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.runs} rounds, median reported")
    rows: list[Row] = []
    for work_name in [w.strip() for w in args.work.split(",") if w.strip()]:
        fp32_base = None
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            if work_name in ("sd15", "sd15-tiny"):
                work = sd15_workload(args.steps, tiny=work_name == "sd15-tiny", dtype=dtype)
                fid = None
            elif work_name == "embedded":
                work = embedded_workload(args.steps, args.per_class, dtype)
                fid = _fid_scorer()
            else:
                raise SystemExit(f"unknown work {work_name!r}: use sd15, sd15-tiny or embedded")
            work_rows = bench_workload(work, dtype_name, args.runs, intervals, not args.no_peers, fid, only=args.only)
            base = next(r.seconds for r in work_rows if r.method == "uncached")
            fp32_base = fp32_base or (base if dtype_name == "fp32" else None)
            for r in work_rows:
                if r.seconds is not None and fp32_base is not None:
                    r.speed_vs_fp32 = fp32_base / r.seconds
            rows += work_rows
            print(format_table(work_rows), flush=True)
    print()
    print(format_table(rows))
    print("latent PSNR peak = max − min of the uncached latent; FID* = Fréchet distance of our digit-classifier "
          "features to all 1,797 real digits (lower is better)")
    write_outputs(rows, args)
    return 0


def write_outputs(rows: list, args: argparse.Namespace) -> None:
    """`--json` (every row plus the arguments) and the speed-vs-PSNR plot (`--plot`, default beside the JSON)."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(args.json, text_writer(json.dumps({"rows": [asdict(r) for r in rows], "args": {
            k: str(v) for k, v in vars(args).items() if not k.startswith("_")}}, indent=2) + "\n"))
        print(f"wrote {args.json}")
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot_path:
        plot(rows, plot_path)
        print(f"wrote {plot_path}")
