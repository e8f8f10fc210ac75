"""`livecache run FILE.json`: run a saved workflow headless.

Exit codes: 0 done, 2 the workflow is invalid (nothing ran), 1 a node failed while running.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", type=Path, help="workflow JSON, ComfyUI UI format or API format")
    parser.add_argument("--output", type=Path, default=None, help="folder for saved images (default ./output)")
    parser.add_argument("--models", type=Path, action="append", default=None,
                        help="folder holding diffusers model folders; repeatable (default ./models)")
    parser.add_argument("--input", type=Path, action="append", default=None,
                        help="folder input files (audio clips) are read from; repeatable (default ./input)")
    parser.add_argument("--check", action="store_true", help="validate only, run nothing")


def main(args: argparse.Namespace) -> int:
    from .. import NODE_CLASS_MAPPINGS
    from ..nodes.context import output_dir
    from .errors import WorkflowError
    from .runner import NodeFailure, execute, load_workflow, validate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.output is not None:
        os.environ["LIVECACHE_OUTPUT"] = str(args.output)
    if args.input:
        os.environ["LIVECACHE_INPUT"] = os.pathsep.join(str(p) for p in args.input)
    if args.models:
        os.environ["LIVECACHE_MODELS"] = os.pathsep.join(str(p) for p in args.models)
    try:
        api = load_workflow(args.workflow, NODE_CLASS_MAPPINGS)
        if args.check:
            validate(api, NODE_CLASS_MAPPINGS)
            print(f"{args.workflow}: valid")
            return 0
        ui = execute(api, NODE_CLASS_MAPPINGS, on_node=lambda i, n, node_id, kind: print(
            f"[{i + 1}/{n}] node {node_id} {kind}", file=sys.stderr))
    except WorkflowError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except NodeFailure as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    for node_id, result in ui.items():
        for image in result.get("images", []):
            print(f"node {node_id}: saved {output_dir() / image['subfolder'] / image['filename']}")
    return 0


def _one_line(err: Exception) -> str:
    """The error as the single line the exit code promises (a node's message may span lines)."""
    return " ".join(str(err).split())
