"""`livecache run FILE.json`: run a saved workflow headless.

Workflows of this pack's nodes only run in the pack's own runner (`graph.runner`); a workflow with
ComfyUI's nodes (Load Checkpoint → MODEL → KSampler) runs with `--comfy-root DIR` inside that ComfyUI
installation, with its executor and node classes (`graph.comfy_host`).
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
    parser.add_argument("--comfy-root", type=Path, default=None, metavar="DIR",
                        help="a ComfyUI folder: run the workflow inside it, with ComfyUI's own nodes (Load "
                             "Checkpoint, KSampler, ...) and executor; needed when the workflow has ComfyUI nodes")
    parser.add_argument("--comfy-base", type=Path, default=None, metavar="DIR",
                        help="with --comfy-root: ComfyUI's --base-directory (its models/, input/, output/ "
                             "folders), instead of the ComfyUI folder itself")


def main(args: argparse.Namespace) -> int:
    from .. import NODE_CLASS_MAPPINGS
    from ..nodes.context import output_dir
    from .errors import WorkflowError
    from .runner import NodeFailure, execute, load_workflow, validate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("livecache").setLevel(logging.INFO)  # also where ComfyUI configured logging first
    if args.output is not None:
        os.environ["LIVECACHE_OUTPUT"] = str(args.output)
    if args.input:
        os.environ["LIVECACHE_INPUT"] = os.pathsep.join(str(p) for p in args.input)
    if args.models:
        os.environ["LIVECACHE_MODELS"] = os.pathsep.join(str(p) for p in args.models)
    if args.comfy_base is not None and args.comfy_root is None:
        print("error: --comfy-base needs --comfy-root (the ComfyUI folder to run in)", file=sys.stderr)
        return 2
    try:
        if args.comfy_root is not None:
            ui = _run_in_comfyui(args)
            if ui is None:
                return 0
        else:
            api = load_workflow(args.workflow, NODE_CLASS_MAPPINGS)
            if args.check:
                validate(api, NODE_CLASS_MAPPINGS)
                print(f"{args.workflow}: valid")
                return 0
            ui = execute(api, NODE_CLASS_MAPPINGS, on_node=lambda i, n, node_id, kind: print(
                f"[{i + 1}/{n}] node {node_id} {kind}", file=sys.stderr))
    except (FileNotFoundError, ImportError) as err:  # --comfy-root is no (usable) ComfyUI folder
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except WorkflowError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except NodeFailure as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    for node_id, result in ui.items():
        for image in result.get("images", []):
            if image.get("type", "output") != "output":
                continue  # previews in ComfyUI's temp folder
            print(f"node {node_id}: saved {output_dir() / image['subfolder'] / image['filename']}")
    return 0


def _run_in_comfyui(args: argparse.Namespace) -> dict | None:
    """Validate and run inside the ComfyUI at --comfy-root; None after --check."""
    from .. import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .comfy_host import execute_in_comfyui, load_comfyui, validate_in_comfyui
    from .runner import load_workflow

    classes = load_comfyui(args.comfy_root, args.comfy_base, args.output, args.input[0] if args.input else None,
                           NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    api = load_workflow(args.workflow, classes)
    outputs = validate_in_comfyui(api)
    if args.check:
        print(f"{args.workflow}: valid")
        return None
    return execute_in_comfyui(api, outputs, on_node=lambda node_id, kind: print(
        f"node {node_id} {kind}", file=sys.stderr))


def _one_line(err: Exception) -> str:
    """The error as the single line the exit code promises (a node's message may span lines)."""
    return " ".join(str(err).split())
