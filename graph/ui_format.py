"""ComfyUI's UI (frontend) workflow format converted to the API format the executor runs.

The UI format keeps nodes with positional `widgets_values` and a separate link table; the API
format names every input. Widget values are matched to the node's `INPUT_TYPES` in declaration
order, skipping inputs that only take links, and skipping the extra "control after generate"
value the frontend stores after a seed widget — exactly how ComfyUI's frontend writes them.
"""

from __future__ import annotations

from typing import Any

from ..nodes.validation import short
from .errors import WorkflowError, unknown_types
from .schema import check_ui

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
SKIPPED_NODE_TYPES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
MODE_MUTED, MODE_BYPASS = 2, 4


def is_widget(spec: tuple) -> bool:
    """Inputs the frontend shows as widgets (their values sit in `widgets_values`)."""
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_seed_control(name: str, spec: tuple) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(workflow: Any, classes: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow; raises `WorkflowError` naming the node for anything off."""
    check_ui(workflow)
    nodes = workflow["nodes"]
    link_table: dict[int, tuple[str, int]] = {link[0]: (str(link[1]), link[2]) for link in workflow.get("links") or []}
    by_id = {str(node["id"]): node for node in nodes}
    unknown = [(str(node["id"]), node["type"]) for node in nodes if node["type"] not in classes
               and node["type"] not in SKIPPED_NODE_TYPES and node.get("mode") not in (MODE_MUTED, MODE_BYPASS)]
    if unknown:
        raise WorkflowError(unknown_types(unknown))
    api: dict[str, dict[str, Any]] = {}
    for node in nodes:
        node_id, class_type = str(node["id"]), node["type"]
        if class_type in SKIPPED_NODE_TYPES or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue  # notes, reroutes and primitives; muted and bypassed nodes (links pass through below)
        inputs: dict[str, Any] = {}
        for entry in node.get("inputs") or []:
            if entry.get("link") is None:
                continue
            where = f"node {node_id} ({class_type}): input '{entry['name']}'"
            source = _source(entry["link"], link_table, by_id, where)
            if source is not None:
                inputs[entry["name"]] = list(source)
        inputs.update(_widget_inputs(node_id, class_type, classes[class_type], node.get("widgets_values") or [],
                                     set(inputs)))
        api[node_id] = {"class_type": class_type, "inputs": inputs}
    return api


def _source(link_id: int, links: dict[int, tuple[str, int]], nodes: dict[str, dict[str, Any]],
            where: str) -> tuple[str, int] | None:
    """Where a link really comes from: through reroutes and bypassed nodes (matched by type, as the
    frontend does); None when it comes from a primitive, whose value already sits in widgets_values.

    A loop over the chain, not recursion: a workflow may chain thousands of reroutes."""
    seen: set[str] = set()
    while True:
        if link_id not in links:
            raise WorkflowError(f"{where} uses link {link_id}, which is not in the link table")
        node_id, slot = links[link_id]
        node = nodes.get(node_id)
        if node is None or node_id in seen:
            return node_id, slot  # validation names the missing node or the cycle
        if node["type"] == "PrimitiveNode":
            return None
        if node["type"] != "Reroute" and node.get("mode") != MODE_BYPASS:
            return node_id, slot
        seen.add(node_id)
        outputs = node.get("outputs") or []
        wanted = outputs[slot].get("type") if slot < len(outputs) else None
        passing = [entry["link"] for entry in node.get("inputs") or [] if entry.get("link") is not None
                   and (node["type"] == "Reroute" or entry.get("type") == wanted)]
        if not passing:
            raise WorkflowError(f"{where} comes through bypassed node {node_id} ({node['type']}), "
                                f"which has no linked input of type {short(wanted)} to pass through")
        link_id = passing[0]


def _widget_inputs(node_id: str, class_type: str, cls: type, values: Any, linked: set[str]) -> dict[str, Any]:
    if isinstance(values, dict):  # newer frontends may store widgets by name
        return {k: v for k, v in values.items() if k not in linked}
    if not isinstance(values, list):
        raise WorkflowError(f"node {node_id} ({class_type}): widgets_values must be a list")
    declared = cls.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    out: dict[str, Any] = {}
    position = 0
    for name, spec in specs.items():
        if not is_widget(spec):
            continue
        if position >= len(values):
            break  # fewer values than widgets: the missing ones are reported as missing inputs later
        if name not in linked:
            out[name] = values[position]
        position += 1
        if has_seed_control(name, spec) and position < len(values) and values[position] in SEED_CONTROLS:
            position += 1
    return out
