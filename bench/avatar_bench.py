"""`livecache bench avatar`: the diffusion avatar's per-stage cost, FPS, first-frame latency and lip sync,
with each acceleration switched on one at a time and all together, in one process on one clip.
`--engine musetalk` runs the same ladder on MuseTalk-format weights (`pipelines/musetalk.py`; without
`--weights`, a tiny random model in that layout, whose ratios mean something and whose lip sync does not),
without the LCM-step row and, on CUDA, with fp16 and torch.compile rows.

The clip is the shipped `workflows/hello_avatar.wav` (espeak-ng speech) twice with pauses, rendered
offline through `AvatarRenderer.render_clip` (`pipelines/avatar.py`) exactly as the ComfyUI node and the
live engine render it. Rows:
the baseline has every acceleration off (fp32, reference re-encoded per frame, one frame per call, no
pipeline, no temporal cache); each next row turns one more on; then everything on except the short
first chunk, everything on with one LCM step instead of `--steps` (a speed/fidelity knob), and everything
on plus W8A8 (`accel/quant.py`: int8 U-Net, calibrated when the engine starts).
Every row runs `--rounds` times interleaved after a warm-up; times are medians.

- *first frame ms*: from asking for the clip to the first frame, model loaded and session open;
- *FPS*: frames / seconds for the whole clip; *speed*: baseline seconds / row seconds;
- *ms/frame per stage*: wall time of each stage divided by its frames (stages overlap when pipelined);
- *crop PSNR*: the pixels the model renders (the mouth crop of each output frame) against the
  baseline's, peak 255 — what each acceleration costs in fidelity;
- *lip sync*: Pearson correlation, over the clip's frames, between the mouth opening measured on the
  rendered pixels (share of dark pixels in the lips box, `AvatarSession.mouth_opening`) and the
  speech energy of the 40 ms before the frame (dB, clipped to the −48..−12 dB range the teacher maps to
  its opening); the teacher (the embedded engine) is scored the same way on the same clip;
- *open speech / silence*: mean mouth opening in frames with and without voice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..accel.temporal_cache import TemporalReuseConfig
from ..files import text_writer, write_replacing
from ..models.audio_features import resample
from ..models.avatar import AVATAR_DIR, load_model
from .metrics import psnr

CLIP = Path(__file__).resolve().parent.parent / "workflows" / "hello_avatar.wav"


@dataclass
class Row:
    name: str
    options: dict
    seconds: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)
    frames: int = 0
    crop_psnr: float | None = None
    lip_sync: float | None = None
    open_speech: float | None = None
    open_silence: float | None = None
    reused: str = ""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("diffusion", "musetalk"), default="diffusion",
                        help="diffusion (default: the pack's avatar) or musetalk (MuseTalk-format weights)")
    parser.add_argument("--weights", type=Path, help="weights folder (diffusion default: the shipped avatar; "
                        "musetalk default: a tiny random MuseTalk-layout model, for ratios only)")
    parser.add_argument("--resolution", type=int, default=256, help="--engine musetalk: face crop side (256)")
    parser.add_argument("--size", type=int, default=256, choices=(256, 384, 512), help="output frame side (256)")
    parser.add_argument("--fps", type=float, default=25.0, help="frames per second of the clip (25)")
    parser.add_argument("--steps", type=int, default=2, choices=(1, 2, 3, 4), help="LCM steps per frame (2)")
    parser.add_argument("--batch", type=int, default=8, help="max_batch when batching is on (8)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timed runs per row (2)")
    parser.add_argument("--seconds", type=float, default=None, help="cut the clip to this many seconds (whole clip)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")


def _ladder(batch: int, engine: str = "diffusion") -> list[tuple[str, dict]]:
    from ..pipelines.musetalk import MUSETALK_REUSE

    reuse = MUSETALK_REUSE if engine == "musetalk" else TemporalReuseConfig()
    off = {"bf16": False, "reference_cache": False, "temporal_cache": None, "max_batch": 1, "pipeline": False,
           "first_chunk": 1}
    steps = [("+ bf16", {"bf16": True}), ("+ reference cache", {"reference_cache": True}),
             (f"+ batch {batch}", {"max_batch": batch}), ("+ pipeline", {"pipeline": True}),
             ("+ temporal DeepCache", {"temporal_cache": reuse})]
    rows, current = [("baseline (all off, fp32)", dict(off))], dict(off)
    for name, change in steps:
        current = {**current, **change}
        rows.append((name, dict(current)))
    rows.append((f"all on, first chunk {batch}", {**current, "first_chunk": batch}))
    if engine == "diffusion":
        rows.append(("all on, 1 LCM step", {**current, "steps": 1}))
    rows.append(("all on + W8A8 (int8 U-Net)", {**current, "w8a8": True}))
    if engine == "musetalk" and torch.cuda.is_available():  # fp16 and CUDA graphs exist on GPUs only
        rows.append(("all on, fp16 instead of bf16", {**current, "bf16": False, "dtype": torch.float16}))
        rows.append(("all on + torch.compile (CUDA graphs)", {**current, "compile": True}))
    return rows


def _renderer_factory(args: argparse.Namespace, folder: Path):
    """A fresh renderer per row (each casts and hooks its own model copy) for the chosen engine."""
    if args.engine == "musetalk":
        from ..models.musetalk import MuseTalkSpec, load_musetalk
        from ..pipelines.musetalk import MuseTalkRenderer

        return lambda options: MuseTalkRenderer(model=load_musetalk(folder, MuseTalkSpec(resolution=args.resolution)),
                                                **options)
    from ..pipelines.avatar import AvatarRenderer

    return lambda options: AvatarRenderer(model=load_model(folder), **{"steps": args.steps, **options})


def _clip(rate: int) -> np.ndarray:
    import soundfile

    speech, source = soundfile.read(str(CLIP), dtype="float32")
    speech = resample(speech, source, rate)
    pause = np.zeros(rate, np.float32)
    return np.concatenate([speech, pause, speech, pause])


def _energy(audio: np.ndarray, rate: int, fps: float, count: int) -> np.ndarray:
    """dB of the 40 ms before each frame's time, clipped to the teacher's −48..−12 dB range."""
    out = []
    for k in range(count):
        end = int(round((k + 1) / fps * rate))
        window = audio[max(0, end - int(0.04 * rate)) : end].astype(np.float64)
        out.append(20 * np.log10(np.sqrt(np.mean(window**2)) + 1e-9) if window.size else -180.0)
    return np.clip(np.array(out), -48.0, -12.0)


def _sync(opening: np.ndarray, energy: np.ndarray) -> tuple[float, float, float]:
    voiced = energy > -42.0
    corr = float(np.corrcoef(opening, energy)[0, 1]) if opening.std() > 0 else 0.0
    return corr, float(opening[voiced].mean()), float(opening[~voiced].mean())


def _teacher(audio: np.ndarray, rate: int, fps: float, size: int) -> np.ndarray:
    """The embedded engine's mouth on the same clip, measured on its pixels exactly like the model's."""
    from ..models.avatar import AvatarSpec
    from ..pipelines.avatar import AvatarSession, crop_box, crop_square
    from ..pipelines.frames import RenderRequest, SessionOptions
    from ..pipelines.portrait import default_portrait, prepare
    from ..pipelines.procedural import ProceduralSession
    from ..pipelines.rig import FaceRig
    from ..pipelines.states import StateTracker

    spec = AvatarSpec()
    image, layout = prepare(default_portrait(512), size)
    teacher = ProceduralSession(FaceRig(image, layout), SessionOptions(size=size))
    meter = AvatarSession(image, layout, spec, torch.zeros(1), SessionOptions(size=size))
    box = crop_box(layout, spec, size)
    tracker, ctx, out = StateTracker(rate), int(spec.audio_context_s * rate), []
    for k in range(int(len(audio) / rate * fps)):
        t = (k + 1) / fps
        end = int(round(t * rate))
        window = audio[max(0, end - ctx) : end]
        frame = teacher.pose(RenderRequest(teacher, t, window, tracker.update(t, window)), rate)
        out.append(meter.mouth_opening(crop_square(frame, box, spec.resolution).astype(np.float32) / 255.0))
    return np.array(out)


def main(args: argparse.Namespace) -> int:
    import tempfile

    if args.engine == "musetalk" and args.weights is None:
        with tempfile.TemporaryDirectory(prefix="lc-musetalk-") as folder:
            from ..models.musetalk_files import write_tiny_musetalk

            return _run(args, write_tiny_musetalk(Path(folder) / "musetalk"), tiny=True)
    return _run(args, args.weights or AVATAR_DIR)


def _run(args: argparse.Namespace, folder: Path, tiny: bool = False) -> int:
    from ..pipelines.avatar import AvatarRenderer
    from ..pipelines.portrait import default_portrait

    portrait = default_portrait(512)
    engines, rows = [], []
    make = _renderer_factory(args, folder)
    for name, options in _ladder(args.batch, args.engine):
        engines.append(make(options))
        rows.append(Row(name, {k: (v is not None if k == "temporal_cache" else str(v) if k == "dtype" else v)
                               for k, v in options.items()}))
    rate = engines[0].sample_rate
    audio = _clip(rate)[: int(args.seconds * rate) if args.seconds else None]
    warm = audio[: int(0.5 * rate)]
    outputs: dict[int, list] = {}

    def clip(engine: AvatarRenderer, sound: np.ndarray) -> tuple[list, float, float, tuple[int, int, int, int]]:
        session = engine.open_session(portrait, _options(args))
        start = time.perf_counter()
        frames, first = [], None
        for frame in engine.render_clip(session, sound, args.fps):
            first = first if first is not None else time.perf_counter() - start
            frames.append(frame)
        return frames, time.perf_counter() - start, first or 0.0, session.region

    # Rendering runs on a worker thread, as in the server (RenderWorker) and in ComfyUI: torch's main-thread
    # OpenMP team runs much slower per call than a worker thread's.
    with ThreadPoolExecutor(1, thread_name_prefix="lc-bench") as worker:
        for engine in engines:  # warm-up: kernels, allocator, first-call costs
            worker.submit(clip, engine, warm).result()
        for _ in range(max(1, args.rounds)):
            for i, (engine, row) in enumerate(zip(engines, rows, strict=True)):
                engine.clock.seconds.clear()
                engine.clock.frames.clear()
                frames, seconds, first, box = worker.submit(clip, engine, audio).result()
                row.seconds.append(seconds)
                row.first_ms.append(1000 * first)
                row.stage_ms = engine.clock.per_frame_ms()
                row.frames = len(frames)
                outputs[i] = (box, frames)
    energy = _energy(audio, rate, args.fps, rows[0].frames)
    box, reference = outputs[0]
    x, y, w, h = box
    crop = lambda frames: torch.from_numpy(np.stack([f.image[y : y + h, x : x + w] for f in frames]))  # noqa: E731
    for i, (row, engine) in enumerate(zip(rows, engines, strict=True)):
        frames = outputs[i][1]
        row.crop_psnr = psnr(crop(frames).float(), crop(reference).float(), peak=255.0)
        row.lip_sync, row.open_speech, row.open_silence = _sync(np.array([f.mouth for f in frames]), energy)
        full, reused = engine.cache_stats
        row.reused = f"{reused}/{full + reused}" if full + reused else "-"
        engine.close()
    teacher = _sync(_teacher(audio, rate, args.fps, args.size), energy)
    _print(rows, teacher, args, len(audio) / rate, tiny)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"rows": [asdict(r) for r in rows], "teacher_lip_sync": teacher[0]}
        write_replacing(args.json, text_writer(json.dumps(result, indent=2) + "\n"))
    return 0


def _options(args: argparse.Namespace):
    from ..pipelines.frames import SessionOptions

    return SessionOptions(size=args.size, fps=args.fps)


def _print(rows: list[Row], teacher: tuple[float, float, float], args: argparse.Namespace, seconds: float,
           tiny: bool) -> None:
    base = statistics.median(rows[0].seconds)
    stages = list(rows[0].stage_ms)
    what = (f"{args.steps} LCM steps" if args.engine == "diffusion" else
            f"MuseTalk single step, {args.resolution}px face crop"
            f"{', tiny random MuseTalk-layout model (ratios only)' if tiny else ''}")
    print(f"{args.engine} avatar, {rows[0].frames} frames ({seconds:.1f} s clip) at {args.size}px, {args.fps:g} fps, "
          f"{what}, torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.rounds} rounds")
    head = ["config", "s / clip", "FPS", "speed", "first frame ms", *[f"{s} ms/f" for s in stages],
            "crop PSNR dB", "lip sync r", "open speech/silence", "U-Net calls reused"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in rows:
        s = statistics.median(r.seconds)
        cells = [r.name, f"{s:.2f}", f"{r.frames / s:.1f}", f"{base / s:.2f}x", f"{statistics.median(r.first_ms):.0f}",
                 *[f"{r.stage_ms.get(k, 0.0):.1f}" for k in stages],
                 "inf" if r.crop_psnr == float("inf") else f"{r.crop_psnr:.1f}", f"{r.lip_sync:.2f}",
                 f"{r.open_speech:.2f}/{r.open_silence:.2f}", r.reused]
        print("| " + " | ".join(cells) + " |")
    print(f"teacher (embedded engine) on the same clip: lip sync r = {teacher[0]:.2f}, "
          f"open speech/silence {teacher[1]:.2f}/{teacher[2]:.2f}")
