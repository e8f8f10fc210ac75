"""Node input checks that run before any node of a workflow does (ComfyUI's `VALIDATE_INPUTS`).

ComfyUI calls a node class's `VALIDATE_INPUTS` classmethod during validation with the literal
(widget) inputs its signature names, and expects True or a message; the headless runner calls it
the same way, for every node, before executing any — so a prompt the sampler would refuse fails
in one line before a ten-minute calibration, not after. Linked inputs are not computed yet, so
ComfyUI passes none: every parameter defaults to None and a check needing it is skipped then (the
runner passes a linked model when a loader can provide it cheaply; see `graph.runner._preview`).

ComfyUI skips its own type, min/max and choice checks for every input a `VALIDATE_INPUTS` names
(linked ones arrive as None), so `verdict` repeats them for the named inputs with `literal_problem`,
the same check the headless runner applies to every literal input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}


def short(value: Any, limit: int = 60) -> str:
    """A value for an error line: containers by size (never recursed into), long text cut."""
    if isinstance(value, (list, dict, tuple)):
        return f"{'an object' if isinstance(value, dict) else 'a list'} of {len(value)} item(s)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def literal_problem(name: str, spec: tuple, value: Any) -> str | None:
    """What is wrong with a literal `value` for an input declared as `spec`, or None.

    Booleans are not numbers, NaN and infinities are no FLOAT (a NaN compares false with every
    bound, so it would pass min/max), and numbers stay within the declared min/max."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        return None if not isinstance(value, (list, dict)) and value in kind else \
            f"input '{name}' = {short(value)} is not one of {kind}"
    if kind not in TYPES:
        return f"input '{name}' needs a link from a node that outputs {kind}"
    if isinstance(value, bool) and kind != "BOOLEAN" or not isinstance(value, TYPES[kind]):
        return f"input '{name}' = {short(value)} is not a {kind}"
    if kind == "FLOAT" and not math.isfinite(value):
        return f"input '{name}' = {value} is not a finite number"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"input '{name}' = {value} is below its minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"input '{name}' = {value} is above its maximum {options['max']}"
    return None


def verdict(cls: type, values: dict[str, Any], *checks: Callable[[], object]) -> bool | str:
    """ComfyUI's answer for `cls.VALIDATE_INPUTS`: True, or the first problem of the named literal
    `values` (None: linked, not known yet), then of `checks` (the message of the ValueError one raises)."""
    declared = cls.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    for name, value in values.items():
        if value is not None and name in specs and (problem := literal_problem(name, specs[name], value)):
            return problem
    for check in checks:
        try:
            check()
        except ValueError as err:
            return str(err)
    return True
