"""`livecache` command line: run | serve | bench | train | convert | info.

Each subcommand lives in the layer it belongs to and exposes `configure(parser)` and
`main(args) -> int`; this file only wires them, importing each lazily so `livecache --help`
stays fast and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module relative to the package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": (".graph.cli", "run a saved workflow JSON (ComfyUI UI or API format) headless"),
    "serve": (".realtime.cli", "start the live server: web page, WebRTC and websocket API on one port"),
    "bench": (".bench.cli", "measure speed and fidelity against baselines and peers"),
    "train": (".train.cli", "train the embedded default models (reproducible, CPU-friendly)"),
    "convert": (".models.convert", "convert other projects' weights (pickle) into the safetensors layouts we load"),
    "info": (".models.info", "show versions, devices and where models are looked for"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livecache",
        description="LiveCache: training-free diffusion acceleration and a real-time avatar/video runtime.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        _load(module).configure(sub_parser)
    return parser


def _load(module: str):
    return importlib.import_module(module, package=__package__ or "livecache")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from .files import raise_on_sigterm

    raise_on_sigterm()  # a `kill` unwinds like Ctrl-C: half-written files are removed, not left behind
    try:
        return int(_load(args._module).main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
