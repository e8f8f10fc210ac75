"""`livecache bench dit`: the table (`dit_bench`), or with `--profile` the residual profile (`dit_profile`).

A module of its own because the profile runs the table's generations (it imports `dit_bench`), so the
choice between the two cannot live in `dit_bench` without an import cycle."""

from __future__ import annotations

import argparse

from . import dit_bench, dit_profile

configure = dit_bench.configure


def main(args: argparse.Namespace) -> int:
    return (dit_profile if args.profile else dit_bench).main(args)
