"""`livecache train digits|dit|features|video|video-features|avatar|ilf`: rebuild the shipped models from scratch.

`digits` and `features` fit the embedded image models (`train/embedded.py`), `dit` the embedded
class-conditional DiT (`train/dit.py`, resumable: rerun the command after an interruption), `video` the causal video
model and `video-features` the classifier its bench scores frames with (`train/video.py`), `avatar` the
diffusion avatar (`train/avatar.py`) on frames its teacher — the procedural avatar animating espeak-ng
speech (`train/distill.py`) — renders; `ilf` an Inner Loop Feedback module for `--model` by distillation
from that model's own sampling (`train/ilf.py`). Training is reproducible (seeded) and CPU-friendly. Only
the standard library loads at import time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

MODELS = {"digits": "the embedded diffusion U-Net",
          "dit": "the embedded class-conditional DiT (`--steps` default 2000; resumes from its checkpoint)",
          "features": "the FID-style feature extractor",
          "video": "the causal AR video model (`--steps` default 10000 for it)",
          "video-features": "the video content classifier for `bench video` (`--steps` default 1500)",
          "avatar": "the diffusion avatar, distilled from the procedural avatar animating espeak-ng speech",
          "ilf": "an ILF feedback module for --model, distilled from its own sampling (no data set)"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=list(MODELS), help="; ".join(f"{k}: {v}" for k, v in MODELS.items()))
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the shipped location)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps for `digits` (default 1500), `dit` (2000), `video` (10000), "
                             "`video-features` (1500) or `ilf` (300)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for `features` (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (training is reproducible)")
    parser.add_argument("--sentences", type=int, default=14,
                        help="`avatar`: espeak-ng sentences rendered by the teacher (default 14)")
    parser.add_argument("--vae-steps", type=int, default=300, help="`avatar`: VAE optimizer steps (default 300)")
    parser.add_argument("--model", default="embedded:digits",
                        help="`ilf`: the backbone, embedded:digits, embedded:dit or a diffusers folder of a "
                             "digits-prompt U-Net (default embedded:digits)")
    parser.add_argument("--interval", type=int, default=2,
                        help="`ilf`: the cache interval the module is trained for (default 2: every other step)")
    parser.add_argument("--generations", type=int, default=6,
                        help="`ilf`: teacher generations to distil from (default 6; 2 more, other seeds, are held out)")
    parser.add_argument("--batch", type=int, default=8, help="`ilf`: samples per teacher generation (default 8)")
    parser.add_argument("--forecast", type=int, default=0, choices=(0, 1, 2),
                        help="`ilf` on a DiT: correct the block cache's forecast of this order instead of plain "
                             "reuse (default 0: reuse)")
    parser.add_argument("--rollout", action="store_true",
                        help="`ilf`: train on whole generations sampled with the module at the inference schedule "
                             "(every --interval-th step full; its own errors feed its later inputs) instead of on "
                             "single cached steps after the teacher's exact ones; each step is a whole generation: "
                             "150 steps of embedded:dit took 17-20 min on 2 loaded cores)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="`ilf`: keep the run's state here and resume from it (default: beside --out)")
    parser.add_argument("--unet-steps", type=int, default=1000,
                        help="`avatar`: U-Net + audio encoder optimizer steps (default 1000)")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.what == "avatar":
        return _avatar(args, start)
    if args.what == "ilf":
        return _ilf(args, start)
    if args.what == "digits":
        from ..models.embedded import DIGITS_DIR
        from .embedded import train_digits

        out = train_digits(args.out or DIGITS_DIR, steps=args.steps or 1500, seed=args.seed)
    elif args.what == "dit":
        from ..models.dit import DIT_DIR
        from .dit import train_dit

        out = train_dit(args.out or DIT_DIR, steps=args.steps or 2000, seed=args.seed)
    elif args.what == "video":
        from ..models.video import VIDEO_DIR
        from .video import train_video

        out = train_video(args.out or VIDEO_DIR, steps=args.steps or 10000, seed=args.seed, checkpoint_every=500)
    elif args.what == "video-features":
        from ..models.video import VIDEO_FEATURES_FILE
        from .video import train_video_features

        out = train_video_features(args.out or VIDEO_FEATURES_FILE, steps=args.steps or 1500, seed=args.seed)
    else:
        from ..models.embedded import FEATURES_FILE
        from .embedded import train_features

        out = train_features(args.out or FEATURES_FILE, epochs=args.epochs, seed=args.seed)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


def _avatar(args: argparse.Namespace, start: float) -> int:
    from ..models.avatar import AVATAR_DIR
    from .avatar import TrainSettings, train_avatar
    from .distill import SpeechError, make_dataset

    try:
        data = make_dataset(sentences=args.sentences, seed=args.seed)
    except SpeechError as err:
        print(err)
        return 1
    print(f"teacher rendered {len(data.crops)} frames in {time.perf_counter() - start:.0f} s")
    out = Path(args.out) if args.out else AVATAR_DIR
    train_avatar(data.crops, data.windows, data.states, data.reference_index, data.references, out,
                 TrainSettings(vae_steps=args.vae_steps, unet_steps=args.unet_steps, seed=args.seed))
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


def _ilf(args: argparse.Namespace, start: float) -> int:
    from ..models.dit import EMBEDDED_DIT, load_dit
    from ..models.embedded import ILF_FILES
    from ..models.loading import WeightsError
    from ..models.pipeline import load_model
    from .ilf import ILFTraining, model_teacher, train_ilf

    try:
        if args.model == EMBEDDED_DIT:
            model = load_dit()
        else:
            model = load_model(None if args.model == "embedded:digits" else Path(args.model))
        settings = ILFTraining(steps=args.steps or 300, interval=args.interval, generations=args.generations,
                               seed=args.seed, mode="forecast" if args.forecast else "reuse",
                               order=args.forecast or 1, objective="rollout" if args.rollout else "pairs")
    except (WeightsError, ValueError) as err:
        print(err)
        return 2
    shipped = args.out is None and args.model in ILF_FILES
    out = ILF_FILES[args.model] if shipped else args.out or Path(f"ilf_{model.name}.safetensors")
    checkpoint = args.checkpoint or out.with_name(f".{out.stem}.checkpoint.safetensors")
    try:
        weights = train_ilf(model_teacher(model, batch=args.batch), out, settings, checkpoint=checkpoint,
                            replace=shipped)
    except (FileExistsError, ValueError) as err:
        print(err)
        return 1
    checkpoint.unlink(missing_ok=True)
    loss = weights.training["held_out_loss"]
    print(f"held-out distillation loss {loss['ilf']:.4g} (without the module, plain {settings.mode} at the same "
          f"step gaps: {loss['reuse']:.4g})")
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0
