"""`livecache train digits|features|video`: rebuild the shipped embedded models from scratch."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def configure(parser: argparse.ArgumentParser, more: dict[str, str] | None = None) -> None:
    """`more`: further trainable models (name -> help) that a higher layer adds to the same command."""
    helps = {"digits": "the embedded diffusion U-Net", "features": "the FID-style feature extractor",
             "video": "the causal AR video model (`--steps` default 2400 for it)", **(more or {})}
    parser.add_argument("what", choices=list(helps), help="; ".join(f"{k}: {v}" for k, v in helps.items()))
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the shipped location)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps for `digits` (default 1500) or `video` (default 2400)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for `features` (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (training is reproducible)")


def main(args: argparse.Namespace) -> int:
    from .embedded import DIGITS_DIR, FEATURES_FILE
    from .training import train_digits, train_features

    start = time.perf_counter()
    if args.what == "digits":
        out = train_digits(args.out or DIGITS_DIR, steps=args.steps or 1500, seed=args.seed)
    elif args.what == "video":
        from .video import VIDEO_DIR
        from .video_training import train_video

        out = train_video(args.out or VIDEO_DIR, steps=args.steps or 2400, seed=args.seed)
    else:
        out = train_features(args.out or FEATURES_FILE, epochs=args.epochs, seed=args.seed)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0
