"""Plain-text table cells shared by the benchmarks' printed tables."""

from __future__ import annotations


def cell(value: float | None, fmt: str, width: int, suffix: str = "") -> str:
    """`value` formatted and right-aligned; a measurement that does not apply prints as an em dash."""
    return ("—" if value is None else format(value, fmt) + suffix).rjust(width)
