"""Validate and execute an API-format workflow with the node classes of this pack.

Everything that can be checked before running is checked first — the file's structure
(`graph.schema`), unknown node types, missing or unknown inputs, links to missing nodes or outputs,
type mismatches, values out of bounds or not finite, cycles, then each node class's own
`VALIDATE_INPUTS` hook (ComfyUI's convention; e.g. a prompt the model cannot read) — so a bad
workflow fails in one line naming the node and nothing is computed or written (loaders a hook needs
run early; see `_preview`). Only nodes
that feed an output node run, in dependency order, each once, like ComfyUI's executor.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..nodes.validation import literal_problem, short
from .errors import WorkflowError, all_problems, unknown_types
from .schema import check_api
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
    except RecursionError:
        raise WorkflowError(f"{path}: not a workflow (JSON nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, and integers too long to convert
        raise WorkflowError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise WorkflowError(f"{path}: cannot read ({err.strerror or err})") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return ui_to_api(data, classes)
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # the body ComfyUI's /prompt endpoint takes
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise WorkflowError(f"{path}: neither a UI workflow (with 'nodes') nor an API workflow (id -> node)")
    return data


def validate(api: Api, classes: dict[str, type]) -> list[str]:
    """Check the whole graph, then every node's own validation hook; returns the node ids to run, in order."""
    return _validate(api, classes, {})


def _validate(api: Api, classes: dict[str, type], results: dict[str, Any]) -> list[str]:
    check_api(api)
    unknown = [(node_id, node["class_type"]) for node_id, node in api.items() if node["class_type"] not in classes]
    if unknown:
        raise WorkflowError(unknown_types(unknown))
    problems = [problem for node_id, node in api.items() for problem in _input_problems(node_id, node, api, classes)]
    if problems:  # every bad input at once: a user fixing a workflow should not rerun it per widget
        raise WorkflowError(all_problems(problems))
    outputs = [i for i, n in api.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("workflow has no output node (e.g. a save node): nothing would be produced")
    order = _order(api, outputs)
    for node_id in order:
        _check_hook(node_id, api, classes, results)
    return order


def _input_problems(node_id: str, node: dict[str, Any], api: Api, classes: dict[str, type]) -> list[str]:
    """Every problem with a node's inputs (unknown, missing, bad links, bad widget values), one line each."""
    class_type = node["class_type"]
    where = f"node {node_id} ({class_type})"
    declared = classes[class_type].INPUT_TYPES()
    required, optional = declared.get("required", {}), declared.get("optional", {})
    inputs = node.get("inputs", {})
    problems = [f"{where}: unknown input {short(name)}" for name in inputs if name not in required and
                name not in optional]
    for name, spec in {**required, **optional}.items():
        if name not in inputs:
            if name in required:
                problems.append(f"{where}: missing required input '{name}'")
            continue
        try:
            _check_input(where, name, spec, inputs[name], api, classes)
        except WorkflowError as err:
            problems.append(str(err))
    return problems


def _check_input(where: str, name: str, spec: tuple, value: Any, api: Api, classes: dict[str, type]) -> None:
    if isinstance(value, list) and not _is_link(value):
        raise WorkflowError(f"{where}: input '{name}' is a list but not a link [node id, output index] "
                            f"({short(value)})")
    if _is_link(value):
        _check_link(where, name, spec, value, api, classes)
    elif not is_widget(spec):
        raise WorkflowError(f"{where}: input '{name}' needs a link from a node that outputs {spec[0]}")
    else:
        _check_value(where, name, spec, value)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) and not isinstance(
        value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool)


def _check_link(where: str, name: str, spec: tuple, link: list, api: Api, classes: dict[str, type]) -> None:
    source_id, slot = str(link[0]), link[1]
    if source_id not in api:
        raise WorkflowError(f"{where}: input '{name}' links to node {source_id[:60]}, which does not exist")
    source_type = api[source_id]["class_type"]
    outputs = getattr(classes.get(source_type), "RETURN_TYPES", ())
    if not 0 <= slot < len(outputs):
        raise WorkflowError(f"{where}: input '{name}' links to output {slot} of node {source_id} ({source_type}), "
                            f"which has {len(outputs)} output(s)")
    wanted = "COMBO" if isinstance(spec[0], list) else spec[0]
    if wanted != "*" and outputs[slot] != wanted:
        raise WorkflowError(f"{where}: input '{name}' expects {wanted} but node {source_id} ({source_type}) "
                            f"output {slot} is {outputs[slot]}")


def _check_value(where: str, name: str, spec: tuple, value: Any) -> None:
    problem = literal_problem(name, spec, value)
    if problem:
        raise WorkflowError(f"{where}: {problem}")


def _order(api: Api, outputs: list[str]) -> list[str]:
    """Depth-first order of everything the outputs need; a cycle is named by its nodes.

    An explicit stack, not recursion: a chain of thousands of nodes is a valid graph."""
    order: list[str] = []
    state: dict[str, str] = {}
    for output in outputs:
        if state.get(output) == "done":
            continue
        state[output] = "active"
        stack: list[tuple[str, list[str]]] = [(output, _upstream(api, output))]
        path = [output]
        while stack:
            node_id, pending = stack[-1]
            if not pending:
                stack.pop()
                path.pop()
                state[node_id] = "done"
                order.append(node_id)
                continue
            source = pending.pop()
            if state.get(source) == "done":
                continue
            if state.get(source) == "active":
                cycle = path[path.index(source):] + [source]
                raise WorkflowError(f"node {source} ({api[source]['class_type']}): part of a cycle "
                                    f"({' -> '.join(cycle)})")
            state[source] = "active"
            stack.append((source, _upstream(api, source)))
            path.append(source)
    return order


def _upstream(api: Api, node_id: str) -> list[str]:
    """The nodes `node_id` links to, in reverse input order (popped from the end: declaration order)."""
    return [str(v[0]) for v in reversed(list(api[node_id].get("inputs", {}).values())) if _is_link(v)]


def _check_hook(node_id: str, api: Api, classes: dict[str, type], results: dict[str, Any]) -> None:
    """Call the node class's `VALIDATE_INPUTS` the way ComfyUI does: with the literal inputs its signature
    names; it answers True or a message. Linked inputs are not computed yet, so ComfyUI passes none;
    here a linked input the hook names is passed when it can be previewed cheaply (`_preview`)."""
    node = api[node_id]
    cls = classes[node["class_type"]]
    hook = getattr(cls, "VALIDATE_INPUTS", None)
    if hook is None:
        return
    parameters = inspect.signature(hook).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs: dict[str, Any] = {}
    for name, value in node.get("inputs", {}).items():
        if name not in parameters and not takes_all:
            continue
        if not _is_link(value):
            kwargs[name] = value
        elif name in parameters and (preview := _preview(value, api, classes, results)) is not None:
            kwargs[name] = preview[0]
    try:
        verdict = hook(**kwargs)
    except Exception as err:  # a hook that raises instead of answering: its message is still the reason
        verdict = str(err) or type(err).__name__
    if verdict is not True:
        raise WorkflowError(f"node {node_id} ({node['class_type']}): {verdict}")


def _preview(link: list, api: Api, classes: dict[str, type], results: dict[str, Any]) -> tuple[Any] | None:
    """The value a link will carry as far as it is known before anything heavy runs, or None.

    Followed upstream through nodes that take and return the same type (e.g. accelerations of an
    LC_PIPE, which keep its prompt encoder), like a bypass would, to a node with only literal inputs
    (a loader); that one runs now — its result is kept for the real run. A hook gets this preview
    only for checks on what the intermediate nodes pass on unchanged.
    """
    source_id, slot = str(link[0]), link[1]
    seen: set[str] = set()
    while source_id not in seen:
        seen.add(source_id)
        node = api[source_id]
        cls = classes[node["class_type"]]
        links = {name: v for name, v in node.get("inputs", {}).items() if _is_link(v)}
        if not links:
            if source_id not in results:
                try:
                    results[source_id] = _run(source_id, node, cls, {})
                except NodeFailure as err:
                    raise WorkflowError(str(err)) from err
            return (_outputs(results[source_id])[slot],)
        declared = cls.INPUT_TYPES()
        specs = {**declared.get("required", {}), **declared.get("optional", {})}
        kind = cls.RETURN_TYPES[slot]
        through = [v for name, v in links.items() if specs[name][0] == kind]
        if len(through) != 1:
            return None
        source_id, slot = str(through[0][0]), through[0][1]
    return None


def _hidden_inputs(cls: type, node_id: str) -> dict[str, Any]:
    """ComfyUI fills `hidden` inputs itself; the headless runner knows only the node's id."""
    hidden = cls.INPUT_TYPES().get("hidden", {})
    return {name: node_id for name, kind in hidden.items() if kind == "UNIQUE_ID"}


def _run(node_id: str, node: dict[str, Any], cls: type, results: dict[str, Any]) -> Any:
    """Run one node on its literal inputs and its upstream results; a failure names the node.

    Returns what the node returned: a tuple of outputs, or an output node's {"ui", "result"} dict."""
    kwargs = {name: _outputs(results[str(v[0])])[v[1]] if _is_link(v) else v
              for name, v in node.get("inputs", {}).items()}
    kwargs.update(_hidden_inputs(cls, node_id))
    started = time.perf_counter()
    try:
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
    except Exception as err:
        raise NodeFailure(f"node {node_id} ({node['class_type']}) failed: {err}") from err
    LOG.debug("node %s (%s) ran in %.2f s", node_id, node["class_type"], time.perf_counter() - started)
    return out if isinstance(out, dict) else tuple(out)


def _outputs(out: Any) -> tuple:
    return tuple(out.get("result", ())) if isinstance(out, dict) else out


def execute(api: Api, classes: dict[str, type], on_node: Callable[[int, int, str, str], None] | None = None
            ) -> dict[str, Any]:
    """Validate, then run; returns each output node's UI result (e.g. the images it saved)."""
    results: dict[str, Any] = {}  # node id -> what it returned (nodes previewed during validation included)
    order = _validate(api, classes, results)
    for index, node_id in enumerate(order):
        node = api[node_id]
        if on_node:
            on_node(index, len(order), node_id, node["class_type"])
        if node_id not in results:
            results[node_id] = _run(node_id, node, classes[node["class_type"]], results)
    return {node_id: out.get("ui", {}) for node_id, out in results.items() if isinstance(out, dict)}
