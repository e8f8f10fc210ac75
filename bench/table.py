"""The benchmarks' printed tables: columns declared once, one formatter for every bench.

A bench lists its columns (the shared ones below, plus its own) and `table` lays them out: titles,
a rule, one line per row; text left-aligned, numbers right-aligned under their titles, a
measurement that does not apply as an em dash, and the free-text column last, unpadded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def cell(value: float | None, fmt: str, width: int, suffix: str = "") -> str:
    """`value` formatted and right-aligned; a measurement that does not apply prints as an em dash."""
    return ("—" if value is None else format(value, fmt) + suffix).rjust(width)


@dataclass(frozen=True)
class Column:
    """A column: its title and width, what it reads from a row (an attribute name or a function of the row), and
    the format of a number (`fmt`, with `suffix`); `fmt=None` prints the value as text, left-aligned."""

    title: str
    width: int
    read: str | Callable[[Any], Any]
    fmt: str | None = None
    suffix: str = ""

    def head(self) -> str:
        return self.title.ljust(self.width) if self.fmt is None else self.title.rjust(self.width)

    def of(self, row: Any) -> str:
        value = getattr(row, self.read) if isinstance(self.read, str) else self.read(row)
        return str(value).ljust(self.width) if self.fmt is None else cell(value, self.fmt, self.width, self.suffix)


def table(rows: Sequence[Any], columns: Sequence[Column], last: str = "note") -> str:
    """`rows` under `columns`, then the text attribute `last` (titled by its name) after two spaces."""
    head = " ".join(c.head() for c in columns) + f"  {last}"
    lines = [head, "-" * len(head)]
    lines += [" ".join(c.of(r) for c in columns) + f"  {getattr(r, last)}" for r in rows]
    return "\n".join(lines)


def method_column(width: int) -> Column:
    """The method column, as wide as the bench's longest method name."""
    return Column("method", width, "method")


def ssim_of(attribute: str) -> Column:
    """SSIM against the uncached output (of the decoded image, or of the latent where there is none)."""
    return Column("SSIM", 6, attribute, ".3f")


# the columns every speed/fidelity bench prints alike
WORK = Column("work", 9, "work")
SECONDS = Column("s/gen", 7, "seconds", ".2f")
SPEED = Column("speed", 7, "speed", ".2f", "×")
LATENT_PSNR = Column("lat PSNR", 8, "latent_psnr", ".2f")
IMAGE_PSNR = Column("img PSNR", 8, "image_psnr", ".2f")
FID = Column("FID*", 7, "fid", ".2f")
