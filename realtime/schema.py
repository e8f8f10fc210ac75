"""One validation mechanism for every HTTP JSON body and websocket message the live server accepts.

Each endpoint and message type declares its fields once (`Field`: JSON kind, default or required, allowed
values, bounds, length); `validate` checks a decoded JSON value against that declaration and either returns the
fields with their defaults filled in or raises `SchemaError` naming the first bad field. Doing this in one place
means no handler can forget a check (`[]` or `{"state": null}` are refused like any other wrong value) and every
error reads the same way on every transport.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

REQUIRED = object()  # the default of a field the client must send

# JSON kinds and the Python values json.loads produces for them (bool is not an integer in JSON)
_KINDS: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                      "boolean": (bool,), "object": (dict,)}


class SchemaError(ValueError):
    """A request body or message does not match its schema; `field` is None when the whole value is wrong."""

    def __init__(self, field: str | None, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.code = code  # a transport-specific error code the field asks for (e.g. "bad_sample_rate")


@dataclass(frozen=True)
class Field:
    """One field of a JSON object: its kind, its default (REQUIRED when it has none) and its limits."""

    kind: str
    default: object = REQUIRED
    choices: tuple[object, ...] | None = None
    low: float | None = None
    high: float | None = None
    max_len: int | None = None
    code: str | None = None

    def check(self, name: str, value: object) -> object:
        types = _KINDS[self.kind]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise SchemaError(name, f"{name} must be {self._describe()}, got {_show(value)}", self.code)
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(name, f"{name} must be a finite number, got {value!r}", self.code)
        if self.choices is not None and value not in self.choices:
            raise SchemaError(name, f"{name} must be one of {list(self.choices)}, got {_show(value)}", self.code)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise SchemaError(name, f"{name} must be {self._describe()}, got {_show(value)}", self.code)
        if self.max_len is not None and len(value) > self.max_len:
            raise SchemaError(name, f"{name} is {len(value)} characters long; the limit is {self.max_len}",
                              self.code)
        return value

    def _describe(self) -> str:
        article = "an" if self.kind[0] in "aeiou" else "a"
        if self.low is not None and self.high is not None:
            return f"{article} {self.kind} between {self.low:g} and {self.high:g}"
        return f"{article} {self.kind}"


Schema = Mapping[str, Field]


def validate(value: object, schema: Schema, what: str, *, extra: bool = False) -> dict[str, object]:
    """`value` checked against `schema` with defaults filled in; `what` names it in messages ("the offer").

    Unknown fields are refused (a typo such as "sampel_rate" would otherwise be silently ignored) unless
    `extra` is set, for bodies whose remaining fields another layer checks (an engine's condition).
    """
    if not isinstance(value, dict):
        raise SchemaError(None, f"{what} must be a JSON object, got {_show(value)}")
    if not extra:
        unknown = sorted(k for k in value if k not in schema)
        if unknown:
            raise SchemaError(unknown[0], f"{what} has an unknown field {_clip(unknown[0])!r}; "
                              f"its fields are {', '.join(schema) or 'none'}")
    out = dict(value) if extra else {}
    for name, field in schema.items():
        if name in value:
            out[name] = field.check(name, value[name])
        elif field.default is REQUIRED:
            raise SchemaError(name, f"{what} needs {name} ({field._describe()})", field.code)
        else:
            out[name] = field.default
    return out


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _show(value: object) -> str:
    """A short rendering of a client's value for an error message (never echo megabytes back)."""
    kind = {dict: "an object", list: "an array", type(None): "null"}.get(type(value))
    if kind is not None:
        return kind
    return _clip(repr(value))
