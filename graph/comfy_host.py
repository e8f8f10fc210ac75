"""Run a workflow inside a ComfyUI installation: its own node classes, validator and executor.

`livecache run FILE --comfy-root DIR` comes here when a workflow holds ComfyUI's own nodes (Load
Checkpoint, KSampler, ...): the pack's runner (`graph.runner`) knows only this pack's node classes,
and re-implementing ComfyUI's would be a second, drifting copy. ComfyUI is imported lazily, from the
folder given, and configured as `main.py --cpu` would be where no GPU is usable. Its built-in nodes
(nodes.py and comfy_extras/) are loaded, then this pack's classes are registered next to them —
the user's other custom nodes are not loaded, so a workflow runs the same wherever it is run.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import WorkflowError, all_problems, unknown_types

CLIENT = "livecache-cli"
_extras_loaded = False  # ComfyUI's built-in extra nodes register globally: once per process


def use_comfyui(root: str | Path | None, base_directory: str | Path | None = None) -> None:
    """Make ComfyUI importable from `root` (or check that it already is when `root` is None).

    Without a usable GPU, ComfyUI is configured as `main.py --cpu` would configure it: its device
    choice happens when `comfy.model_management` is first imported, so this must run before that.
    `base_directory` is ComfyUI's `--base-directory` (models/, input/, output/ under it); its folder
    table is built when `folder_paths` is first imported, so it too must be set before.
    """
    import torch

    if root is not None:
        root = Path(root).resolve()
        if not (root / "comfy" / "model_patcher.py").is_file():
            raise FileNotFoundError(f"{root} is not a ComfyUI folder (no comfy/model_patcher.py in it)")
        if str(root) not in sys.path:
            # first on the path: ComfyUI's top-level modules (nodes, server, utils) must win over same-named ones
            sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        if base_directory is not None:
            if "folder_paths" in sys.modules and comfy.cli_args.args.base_directory != str(base_directory):
                raise RuntimeError("ComfyUI's folders are already set up; the base directory cannot change now")
            comfy.cli_args.args.base_directory = str(base_directory)
        import comfy.model_patcher  # noqa: F401
    except ImportError as error:
        raise ImportError(f"ComfyUI is not importable ({error}); pass its folder (--comfy-root), e.g. the one "
                          "scripts/setup_comfy.sh unpacks to .comfy/ComfyUI") from error


class _Host:
    """What ComfyUI's executor expects of its server: where messages go, and the ids it records.

    Messages come back through `on_message` (node starts, errors); nothing is sent anywhere."""

    def __init__(self, on_message: Callable[[str, Any], None]) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}
        self._on_message = on_message

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self._on_message(event, data)


def load_comfyui(root: Path, base_directory: Path | None, output: Path | None, input_dir: Path | None,
                 ours: dict[str, type], display: dict[str, str]) -> dict[str, type]:
    """Import ComfyUI from `root`, load its built-in nodes, register ours; returns every node class."""
    use_comfyui(root, base_directory)
    import folder_paths

    import nodes

    if output is not None:
        folder_paths.set_output_directory(str(output.resolve()))
    if input_dir is not None:
        folder_paths.set_input_directory(str(input_dir.resolve()))
    global _extras_loaded
    if not _extras_loaded:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        _extras_loaded = True
    for key, cls in ours.items():
        nodes.NODE_CLASS_MAPPINGS.setdefault(key, cls)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(key, display.get(key, key))
    return nodes.NODE_CLASS_MAPPINGS


def validate_in_comfyui(api: dict[str, dict[str, Any]]) -> list[str]:
    """ComfyUI's own validation of the whole prompt; returns the output nodes, or raises one line naming
    the node and the problem (ComfyUI's message and details)."""
    import execution

    import nodes

    missing = [(i, n.get("class_type")) for i, n in api.items() if n.get("class_type") not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise WorkflowError(unknown_types(missing, "neither ComfyUI's built-in nodes nor LiveCache's; other "
                                                   "custom node packs are not loaded by `livecache run`"))
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(uuid.uuid4().hex, api, None))
    if valid:
        return list(outputs)
    problems = [f"node {node_id} ({entry.get('class_type')}): {r.get('message')}: {r.get('details')}"
                for node_id, entry in node_errors.items() for r in entry.get("errors", [])]
    if problems:  # every node's every error, as `livecache run --check` does without ComfyUI
        raise WorkflowError(all_problems(problems))
    raise WorkflowError(f"{error.get('message')}: {error.get('details')}".rstrip(": "))


def execute_in_comfyui(api: dict[str, dict[str, Any]], outputs: list[str],
                       on_node: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Run a validated prompt with ComfyUI's `PromptExecutor`; returns each output node's UI result.

    A node's failure raises `NodeFailure` naming the node, with ComfyUI's exception message."""
    import execution

    from .runner import NodeFailure

    failures: list[dict[str, Any]] = []

    def on_message(event: str, data: Any) -> None:
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None and on_node:
            node_id = str(data["node"])
            on_node(node_id, api.get(node_id, {}).get("class_type", "?"))
        elif event in ("execution_error", "execution_interrupted"):
            failures.append({"event": event, **data})

    executor = execution.PromptExecutor(_Host(on_message), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    executor.execute(api, uuid.uuid4().hex, {"client_id": CLIENT}, outputs)
    if not executor.success or failures:
        failure = failures[0] if failures else {}
        where = f"node {failure.get('node_id')} ({failure.get('node_type')})"
        if failure.get("event") == "execution_interrupted":
            raise NodeFailure(f"{where}: interrupted")
        raise NodeFailure(f"{where} failed: {failure.get('exception_type', 'error')}: "
                          f"{failure.get('exception_message', 'no message')}")
    return dict(executor.history_result.get("outputs", {}))
