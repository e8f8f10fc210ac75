"""Validate and execute an API-format workflow with the node classes of this pack.

Everything that can be checked before running is checked first — unknown node types, missing or
unknown inputs, links to missing nodes or outputs, type mismatches, values out of bounds, cycles —
so a bad workflow fails in one line naming the node and nothing is computed or written. Only nodes
that feed an output node run, in dependency order, each once, like ComfyUI's executor.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import WorkflowError
from .ui_format import is_widget, ui_to_api

LOG = logging.getLogger("livecache")
Api = dict[str, dict[str, Any]]


class NodeFailure(RuntimeError):
    """A node raised while running; the message names it."""


def load_workflow(path: Path, classes: dict[str, type]) -> Api:
    """Read a workflow file in either format and return it in API format."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorkflowError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return ui_to_api(data, classes)
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # the body ComfyUI's /prompt endpoint takes
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise WorkflowError(f"{path}: neither a UI workflow (with 'nodes') nor an API workflow (id -> node)")
    return data


def validate(api: Api, classes: dict[str, type]) -> list[str]:
    """Check the whole graph; returns the node ids to run, in order."""
    for node_id, node in api.items():
        class_type = node.get("class_type")
        if class_type not in classes:
            raise WorkflowError(f"node {node_id} ({class_type}): unknown node type")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"node {node_id} ({class_type}): 'inputs' must be an object")
        _check_inputs(node_id, node, api, classes)
    outputs = [i for i, n in api.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("workflow has no output node (e.g. a save node): nothing would be produced")
    return _order(api, outputs)


def _check_inputs(node_id: str, node: dict[str, Any], api: Api, classes: dict[str, type]) -> None:
    class_type = node["class_type"]
    where = f"node {node_id} ({class_type})"
    declared = classes[class_type].INPUT_TYPES()
    required, optional = declared.get("required", {}), declared.get("optional", {})
    inputs = node.get("inputs", {})
    for name in inputs:
        if name not in required and name not in optional:
            raise WorkflowError(f"{where}: unknown input '{name}'")
    for name, spec in {**required, **optional}.items():
        if name not in inputs:
            if name in required:
                raise WorkflowError(f"{where}: missing required input '{name}'")
            continue
        value = inputs[name]
        if _is_link(value):
            _check_link(where, name, spec, value, api, classes)
        elif not is_widget(spec):
            raise WorkflowError(f"{where}: input '{name}' needs a link from a node that outputs {spec[0]}")
        else:
            _check_value(where, name, spec, value)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) and isinstance(
        value[1], int) and not isinstance(value[1], bool)


def _check_link(where: str, name: str, spec: tuple, link: list, api: Api, classes: dict[str, type]) -> None:
    source_id, slot = str(link[0]), link[1]
    if source_id not in api:
        raise WorkflowError(f"{where}: input '{name}' links to node {source_id}, which does not exist")
    source_type = api[source_id].get("class_type")
    outputs = getattr(classes.get(source_type), "RETURN_TYPES", ())
    if not 0 <= slot < len(outputs):
        raise WorkflowError(f"{where}: input '{name}' links to output {slot} of node {source_id} ({source_type}), "
                            f"which has {len(outputs)} output(s)")
    wanted = "COMBO" if isinstance(spec[0], list) else spec[0]
    if wanted != "*" and outputs[slot] != wanted:
        raise WorkflowError(f"{where}: input '{name}' expects {wanted} but node {source_id} ({source_type}) "
                            f"output {slot} is {outputs[slot]}")


def _check_value(where: str, name: str, spec: tuple, value: Any) -> None:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        if value not in kind:
            raise WorkflowError(f"{where}: input '{name}' = {value!r} is not one of {kind}")
        return
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if isinstance(value, bool) and kind != "BOOLEAN" or not isinstance(value, expected):
        raise WorkflowError(f"{where}: input '{name}' = {value!r} is not a {kind}")
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            raise WorkflowError(f"{where}: input '{name}' = {value} is below its minimum {options['min']}")
        if "max" in options and value > options["max"]:
            raise WorkflowError(f"{where}: input '{name}' = {value} is above its maximum {options['max']}")


def _order(api: Api, outputs: list[str]) -> list[str]:
    """Depth-first order of everything the outputs need; a cycle is named by its nodes."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(node_id: str, path: list[str]) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "active":
            cycle = path[path.index(node_id):] + [node_id]
            raise WorkflowError(f"node {node_id} ({api[node_id]['class_type']}): part of a cycle "
                                f"({' -> '.join(cycle)})")
        state[node_id] = "active"
        for value in api[node_id].get("inputs", {}).values():
            if _is_link(value):
                visit(str(value[0]), path + [node_id])
        state[node_id] = "done"
        order.append(node_id)

    for node_id in outputs:
        visit(node_id, [])
    return order


def _hidden_inputs(cls: type, node_id: str) -> dict[str, Any]:
    """ComfyUI fills `hidden` inputs itself; the headless runner knows only the node's id."""
    hidden = cls.INPUT_TYPES().get("hidden", {})
    return {name: node_id for name, kind in hidden.items() if kind == "UNIQUE_ID"}


def execute(api: Api, classes: dict[str, type], on_node: Callable[[int, int, str, str], None] | None = None
            ) -> dict[str, Any]:
    """Validate, then run; returns each output node's UI result (e.g. the images it saved)."""
    order = validate(api, classes)
    results: dict[str, tuple] = {}
    ui: dict[str, Any] = {}
    for index, node_id in enumerate(order):
        node = api[node_id]
        class_type = node["class_type"]
        if on_node:
            on_node(index, len(order), node_id, class_type)
        cls = classes[class_type]
        kwargs = {name: results[str(v[0])][v[1]] if _is_link(v) else v for name, v in node.get("inputs", {}).items()}
        kwargs.update(_hidden_inputs(cls, node_id))
        started = time.perf_counter()
        try:
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        except Exception as err:
            raise NodeFailure(f"node {node_id} ({class_type}) failed: {err}") from err
        LOG.debug("node %s (%s) ran in %.2f s", node_id, class_type, time.perf_counter() - started)
        if isinstance(out, dict):
            ui[node_id] = out.get("ui", {})
            out = tuple(out.get("result", ()))
        results[node_id] = tuple(out)
    return ui
