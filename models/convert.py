"""`livecache convert FORMAT SRC DST`: other projects' pickle weights into the safetensors layouts we load.

Pickle files run code when unpickled, so the live runtime never loads them; this command reads them once
with `torch.load(weights_only=True)` (plain tensors only), checks names and shapes against the configs, and
writes safetensors beside copies of the configs, never over an existing file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    muse = sub.add_parser("musetalk", help="MuseTalk's models/ folder (U-Net, sd-vae, whisper) to safetensors",
                          description="Convert the authors' MuseTalk folder (musetalkV15/unet.pth or musetalk/"
                          "pytorch_model.bin, sd-vae/diffusion_pytorch_model.bin, whisper/pytorch_model.bin with "
                          "their configs) into DST in the same layout with .safetensors files, for "
                          "`livecache serve --engine musetalk --weights DST`. Only the Whisper encoder is kept.")
    muse.add_argument("src", type=Path, help="the authors' models/ folder")
    muse.add_argument("dst", type=Path, help="a new folder (existing files in it are never overwritten)")


def main(args: argparse.Namespace) -> int:
    from .loading import WeightsError
    from .musetalk_files import convert_musetalk

    try:
        written = convert_musetalk(args.src, args.dst)
    except WeightsError as err:
        print(f"cannot convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files under {args.dst}; serve with: livecache serve --engine musetalk "
          f"--weights {args.dst}")
    return 0
