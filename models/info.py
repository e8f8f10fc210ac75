"""`livecache info`: versions, devices and where models are looked for — the first thing to paste in a bug report."""

from __future__ import annotations

import argparse
import platform


def configure(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def main(args: argparse.Namespace) -> int:
    import torch

    from .embedded import DIGITS_DIR, FEATURES_FILE

    print(f"python      {platform.python_version()} ({platform.machine()})")
    print(f"torch       {torch.__version__}  threads={torch.get_num_threads()}")
    print(f"cuda        {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    print(f"embedded    {DIGITS_DIR} ({'present' if (DIGITS_DIR / 'unet').is_dir() else 'missing'})")
    print(f"features    {FEATURES_FILE} ({'present' if FEATURES_FILE.is_file() else 'missing'})")
    return 0
