"""How a long loop reports how far it is and learns that its host wants it stopped.

Calibrations, samplings and clip renders run for minutes. Inside ComfyUI the user must see them
advance on the node's progress bar and must be able to cancel them (the Cancel button sets
ComfyUI's interrupt flag, which only code that looks at it obeys); in the headless runner a tqdm
bar is the report. The loops know neither host: they iterate through `Progress.loop`, which checks
for a stop before each step (the check raises, so the loop ends at once, before anything of the
unfinished step is kept) and reports after each. The host builds the `Progress`
(`nodes.context.host_progress`); a loop inside another loop takes `progress.nested()`, which
stops the same way but leaves the bar to the outer loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_END = object()


class Progress:
    """A host's progress report (`update(done, total)`) and stop check (`check()` raises to stop)."""

    def __init__(self, update: Callable[[int, int], None] | None = None, check: Callable[[], None] | None = None,
                 bar: bool = True) -> None:
        self.update = update
        self.check = check
        self.bar = bar  # a tqdm bar on the console as well

    def loop(self, items: Iterable[T], desc: str, unit: str, total: int | None = None,
             leave: bool = True) -> Iterator[T]:
        """Yield `items`, checking for a stop before each one is taken and reporting after each.

        `items` may be lazy (the check then runs before the next item is computed); `total`
        defaults to its length.
        """
        total = len(items) if total is None else total  # type: ignore[arg-type]
        source = iter(items)
        try:
            with tqdm(total=total, desc=desc, unit=unit, disable=not self.bar, leave=leave) as bar:
                self._report(0, total)
                done = 0
                while True:
                    if self.check is not None:
                        self.check()
                    item = next(source, _END)
                    if item is _END:
                        return
                    yield item  # type: ignore[misc]
                    done += 1
                    bar.update()
                    self._report(done, total)
        finally:  # a lazy source (a render stream with worker threads) is closed now, not when collected
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def nested(self) -> Progress:
        """For a loop inside this one: the same stop check, no bar of its own."""
        return Progress(None, self.check, bar=False)

    def _report(self, done: int, total: int) -> None:
        if self.update is not None:
            self.update(done, total)


def as_progress(progress: Progress | bool | None) -> Progress:
    """A `Progress` from what a caller passed: one as it is, True/None a console bar, False nothing at all."""
    if isinstance(progress, Progress):
        return progress
    return Progress(bar=progress is not False)
