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
    parser.add_argument("workflow", type=Path, nargs="+",
                        help="workflow JSON, ComfyUI UI format or API format; with --ray several files or folders")
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
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run the workflows as Ray tasks, in parallel, on the cluster at ADDRESS or on a local "
                             "one; each writes what `livecache run FILE` writes, a failure is reported with its "
                             "node and the others go on (pip install 'comfyui-livecache[ray]'; docs/ray.md)")
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="with --ray: run each workflow once per seed (0-7, or 1,5,9), setting every node's "
                             "seed input")


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
    if args.ray is not None:
        return _run_on_ray(args)
    if args.seeds is not None or len(args.workflow) > 1:
        print("error: several workflows and --seeds run with --ray (one workflow runs without it)", file=sys.stderr)
        return 2
    args.workflow = args.workflow[0]
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


def _run_on_ray(args: argparse.Namespace) -> int:
    """Many workflows as Ray tasks (graph.ray_batch); the exit code 1 when any of them failed."""
    if args.comfy_root is not None or args.check:
        print("error: --ray runs this pack's workflows; --comfy-root and --check run without it", file=sys.stderr)
        return 2
    try:
        from .ray_batch import jobs, parse_seeds, run_batch
    except ImportError as err:
        print(f"error: {err}; install it with: pip install 'comfyui-livecache[ray]'", file=sys.stderr)
        return 2
    from .errors import WorkflowError

    try:
        batch = jobs(args.workflow, parse_seeds(args.seeds) if args.seeds is not None else None)
    except (ValueError, WorkflowError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    env = {k: os.pathsep.join(str(Path(p).resolve()) for p in os.environ[k].split(os.pathsep))
           for k in ("LIVECACHE_OUTPUT", "LIVECACHE_INPUT", "LIVECACHE_MODELS") if k in os.environ}
    env.setdefault("LIVECACHE_OUTPUT", str(Path.cwd() / "output"))  # where `livecache run` would write here
    return run_batch(batch, env, args.ray or None)


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
