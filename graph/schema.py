"""The shape of a workflow file (UI and API format), checked before anything reads it.

Conversion and validation index into nodes, inputs and links; a value of the wrong type there
(an `inputs` that is a string, a link id that is a list, a `class_type` that is an object) would
surface as a TypeError or KeyError deep inside. One small declarative checker walks the document
against the schemas below first and names the first value that does not fit — by node where
there is one — so every malformed file fails with one line. Schemas only describe the few fields
the runner reads; everything else in a file (positions, colours, groups, `_meta`) is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..nodes.validation import short as describe
from .errors import WorkflowError

Label = Callable[[Any, Any], str | None]  # (key or index, item) -> how to name the item, or None


class Schema:
    """Checks one value; `where` names its place (e.g. "node 3 (LiveCacheSampler): inputs[0].link")."""

    expected = "a value"

    def check(self, value: Any, where: str) -> None:
        if not self.fits(value):
            raise WorkflowError(f"{where} must be {self.expected}, got {describe(value)}")
        self.check_items(value, where)

    def fits(self, value: Any) -> bool:
        return True

    def check_items(self, value: Any, where: str) -> None:
        pass


class Kind(Schema):
    """A scalar (or a container whose content is not read) recognised by a predicate."""

    def __init__(self, expected: str, predicate: Callable[[Any], bool]) -> None:
        self.expected, self.predicate = expected, predicate

    def fits(self, value: Any) -> bool:
        return self.predicate(value)


class Either(Schema):
    def __init__(self, *options: Schema) -> None:
        self.options = options
        self.expected = " or ".join(o.expected for o in options)

    def fits(self, value: Any) -> bool:
        return any(o.fits(value) for o in self.options)

    def check_items(self, value: Any, where: str) -> None:
        next(o for o in self.options if o.fits(value)).check_items(value, where)


class ListOf(Schema):
    """A list whose items all fit `item`; `unique` gives a key no two items may share (`unique_name`)."""

    expected = "a list"

    def __init__(self, item: Schema, label: Label | None = None, unique: Callable[[Any], Any] | None = None,
                 unique_name: str = "") -> None:
        self.item, self.label, self.unique, self.unique_name = item, label, unique, unique_name

    def fits(self, value: Any) -> bool:
        return isinstance(value, list)

    def check_items(self, value: list, where: str) -> None:
        seen: set = set()
        for index, item in enumerate(value):
            self.item.check(item, _place(where, f"[{index}]", self.label and self.label(index, item)))
            if self.unique is not None:
                key = self.unique(item)
                if key in seen:
                    raise WorkflowError(f"{where.rstrip(':')}: two items share the {self.unique_name} {describe(key)}")
                seen.add(key)


class Tuple(Schema):
    """A list with fixed item schemas first (at least `len(items)` entries; later entries are not read)."""

    def __init__(self, items: tuple[Schema, ...], shape: str) -> None:
        self.items, self.expected = items, f"a list {shape}"

    def fits(self, value: Any) -> bool:
        return isinstance(value, list) and len(value) >= len(self.items)

    def check_items(self, value: list, where: str) -> None:
        for index, schema in enumerate(self.items):
            schema.check(value[index], f"{where}[{index}]")


class Obj(Schema):
    """An object with `required` and `optional` fields; other fields are allowed and not read."""

    expected = "an object"

    def __init__(self, required: dict[str, Schema] | None = None, optional: dict[str, Schema] | None = None) -> None:
        self.required, self.optional = required or {}, optional or {}

    def fits(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check_items(self, value: dict, where: str) -> None:
        for name in self.required:
            if name not in value:
                raise WorkflowError(f"{where} has no '{name}'")
        for name, schema in {**self.required, **self.optional}.items():
            if name in value:
                schema.check(value[name], _place(where, f".{name}"))


class MapOf(Schema):
    """An object whose every value fits `value` (the API format: node id -> node)."""

    expected = "an object"

    def __init__(self, value: Schema, label: Label | None = None) -> None:
        self.value, self.label = value, label

    def fits(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check_items(self, value: dict, where: str) -> None:
        for key, item in value.items():
            self.value.check(item, _place(where, f"[{key!r}]", self.label and self.label(key, item)))


def _place(where: str, step: str, label: str | None = None) -> str:
    """The place of a child: a label (a node's name) starts afresh; otherwise the path grows."""
    if label:
        return f"{label}:"
    return f"{where} {step.lstrip('.')}" if where.endswith(":") else f"{where}{step}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


NULL = Kind("null", lambda v: v is None)
STRING = Kind("a string", lambda v: isinstance(v, str))
INTEGER = Kind("an integer", _is_int)
INDEX = Kind("a non-negative integer", lambda v: _is_int(v) and v >= 0)
NODE_ID = Kind("a node id (integer or string)", lambda v: _is_int(v) or isinstance(v, str))
ANY = Kind("a value", lambda v: True)
ANY_LIST = Kind("a list", lambda v: isinstance(v, list))
ANY_OBJECT = Kind("an object", lambda v: isinstance(v, dict))


def _ui_node_label(index: int, node: Any) -> str:
    if isinstance(node, dict) and _scalar(node.get("id")):
        kind = node.get("type")
        return f"node {node['id']} ({kind if isinstance(kind, str) else '?'})"
    return f"UI workflow: nodes[{index}]"


def _api_node_label(node_id: str, node: Any) -> str:
    kind = node.get("class_type") if isinstance(node, dict) else None
    return f"node {node_id} ({kind})" if isinstance(kind, str) else f"node {node_id}"


UI_INPUT = Obj(required={"name": STRING}, optional={"link": Either(INTEGER, NULL)})
UI_OUTPUT = Obj(optional={"links": Either(ListOf(INTEGER), NULL)})
UI_NODE = Obj(required={"id": NODE_ID, "type": STRING}, optional={
    "mode": INTEGER,
    "inputs": Either(ListOf(UI_INPUT), NULL),
    "outputs": Either(ListOf(UI_OUTPUT), NULL),
    "widgets_values": Either(ANY_LIST, ANY_OBJECT, NULL),
})
UI_LINK = Tuple((INTEGER, NODE_ID, INDEX, NODE_ID, INDEX), "[id, from node, from slot, to node, to slot, type]")
UI_WORKFLOW = Obj(required={"nodes": ListOf(UI_NODE, _ui_node_label, lambda n: str(n["id"]), "node id")},
                  optional={"links": Either(ListOf(UI_LINK, unique=lambda link: link[0], unique_name="link id"),
                                            NULL)})
API_NODE = Obj(required={"class_type": STRING}, optional={"inputs": ANY_OBJECT})
API_WORKFLOW = MapOf(API_NODE, _api_node_label)


def check_ui(workflow: Any) -> None:
    """Raise `WorkflowError` naming the first field of a UI-format workflow that has the wrong shape."""
    UI_WORKFLOW.check(workflow, "UI workflow:")


def check_api(workflow: Any) -> None:
    """Raise `WorkflowError` naming the first node of an API-format workflow that has the wrong shape."""
    API_WORKFLOW.check(workflow, "API workflow:")
    if not workflow:
        raise WorkflowError("API workflow: no nodes")
