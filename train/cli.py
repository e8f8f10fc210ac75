"""`livecache train digits|features|avatar`: rebuild the shipped models from scratch.

`digits` and `features` are pure model training (`models/cli.py`). `avatar` needs its teacher — the
embedded live engine animating espeak-ng speech (`realtime/distill.py`) — so the command is wired
here, in the layer that may use both. Only the standard library loads at import time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..models import cli as model_cli


def configure(parser: argparse.ArgumentParser) -> None:
    model_cli.configure(parser, {"avatar": "the diffusion avatar, distilled from the embedded engine animating "
                                           "espeak-ng speech"})
    parser.add_argument("--sentences", type=int, default=14,
                        help="`avatar`: espeak-ng sentences rendered by the teacher (default 14)")
    parser.add_argument("--vae-steps", type=int, default=300, help="`avatar`: VAE optimizer steps (default 300)")
    parser.add_argument("--unet-steps", type=int, default=1000,
                        help="`avatar`: U-Net + audio encoder optimizer steps (default 1000)")


def main(args: argparse.Namespace) -> int:
    if args.what != "avatar":
        return model_cli.main(args)
    from ..models.avatar import AVATAR_DIR
    from ..models.avatar_training import TrainSettings, train_avatar
    from .distill import SpeechError, make_dataset

    start = time.perf_counter()
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
