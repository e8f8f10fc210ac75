"""Node inputs as one declarative line each, and the node kinds several front-end classes share.

ComfyUI's V1 schema spells every input as a `(type, options)` tuple; written out by hand, each
number input is three lines of the same dict keys and every node repeats the same class header.
These helpers build exactly those tuples (same keys, same order), so a node's `INPUT_TYPES` reads
as a list of what it takes: `int_field(3, 1, 50, "…")` is
`("INT", {"default": 3, "min": 1, "max": 50, "step": 1, "tooltip": "…"})`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Spec = tuple[Any, dict[str, Any]]
MAX_SEED = 2**63 - 1
HIDDEN_ID = {"unique_id": "UNIQUE_ID"}  # the node's id, to route its stats line to it in the frontend
PIPE_MODEL = ("LC_PIPE", {"tooltip": "The model to accelerate; it is not modified, a copy is returned."})
MODEL_INPUT = ("MODEL", {"tooltip": "The model to accelerate; it is not modified, a patched copy is returned."})


def int_field(default: int, lo: int, hi: int, tooltip: str, step: int = 1, **extra: Any) -> Spec:
    """An INT widget; `extra` options (e.g. `control_after_generate`) go before the tooltip."""
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, **extra, "tooltip": tooltip})


def float_field(default: float, lo: float, hi: float, tooltip: str, step: float = 0.01) -> Spec:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def seed_field(tooltip: str) -> Spec:
    """A noise seed over the whole range torch takes, re-rolled by ComfyUI after each run when asked."""
    return int_field(0, 0, MAX_SEED, tooltip, control_after_generate=True)


def choice_field(options: Iterable[str], default: str, tooltip: str) -> Spec:
    return (list(options), {"default": default, "tooltip": tooltip})


def bool_field(default: bool, tooltip: str) -> Spec:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


def text_field(default: str, tooltip: str, multiline: bool | None = None) -> Spec:
    """A STRING widget; `multiline` is declared only when given (ComfyUI's default is one line)."""
    shown = {} if multiline is None else {"multiline": multiline}
    return ("STRING", {"default": default, **shown, "tooltip": tooltip})


def link(kind: str, tooltip: str | None = None) -> Spec:
    """An input another node's output connects to (no widget)."""
    return (kind, {} if tooltip is None else {"tooltip": tooltip})


def schema(required: dict[str, Spec], optional: dict[str, Spec] | None = None, *,
           unique_id: bool = False) -> dict[str, dict[str, Any]]:
    """The dict `INPUT_TYPES` returns: required inputs, then optional ones, then the hidden node id if asked."""
    declared: dict[str, dict[str, Any]] = {"required": dict(required)}
    if optional is not None:
        declared["optional"] = dict(optional)
    if unique_id:
        declared["hidden"] = dict(HIDDEN_ID)
    return declared


def declare(required: dict[str, Spec], optional: dict[str, Spec] | None = None, *,
            unique_id: bool = False) -> classmethod:
    """`INPUT_TYPES` for a node whose inputs are known when its class is defined (most are): ComfyUI calls it
    for the schema, and each call gets its own dicts, so no caller can change what another sees."""
    def INPUT_TYPES(cls: type) -> dict[str, dict[str, Any]]:  # noqa: N802 (the name ComfyUI calls)
        return schema(required, optional, unique_id=unique_id)

    return classmethod(INPUT_TYPES)
