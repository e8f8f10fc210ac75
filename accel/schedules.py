"""Which steps of a generation run the whole network ("full steps") and which reuse the cache.

A schedule is a tuple of booleans, one per step, True where the deep branch is recomputed. Every
caching core takes one, so uniform, non-uniform and calibrated (dynamic-programming) schedules
are interchangeable artefacts that can be printed, saved and compared.
"""

from __future__ import annotations

import math

Schedule = tuple[bool, ...]


def _window(total: int, start: float, end: float) -> tuple[int, int]:
    """Steps [first, stop) where caching may happen; outside it every step is full."""
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"need 0 <= start < end <= 1, got start={start}, end={end}")
    first = min(total, int(math.floor(start * total + 1e-9)))
    stop = min(total, int(math.ceil(end * total - 1e-9)))
    return first, max(first, stop)


def uniform_schedule(total: int, interval: int, start: float = 0.0, end: float = 1.0) -> Schedule:
    """A full step every `interval` steps inside the caching window (DeepCache's N:1 strategy)."""
    _check(total, interval)
    first, stop = _window(total, start, end)
    return tuple(not (first <= k < stop) or (k - first) % interval == 0 for k in range(total))


def nonuniform_schedule(
    total: int, interval: int, start: float = 0.0, end: float = 1.0, center: float = 0.0, power: float = 1.4
) -> Schedule:
    """As many full steps as `uniform_schedule`, packed densest around `center` (a progress fraction).

    Why: in SD-shaped U-Nets under DDIM, reusing stale deep features costs most early in sampling,
    when the coarse layout forms, so spending the same budget of full steps denser there loses less
    than spacing them evenly (docs/benchmarks.md, DeepCache). It is a prior, not a law: on our
    trained digits model uniform spacing does better, which is why
    schedules are plain values that calibrated ones (dynamic programming) can replace.

    Positions come from evenly spaced points pushed towards `center` by
    `|u| ** power` (power 1 is uniform); collisions after rounding are moved to the nearest free step
    so the count of full steps equals the uniform schedule's exactly. The first point (u = -1) always
    lands on the window's first step, which must be full so later steps have a cache to reuse.
    """
    _check(total, interval)
    if power < 1.0:
        raise ValueError(f"power must be >= 1 (1 is uniform), got {power}")
    if not 0.0 <= center <= 1.0:
        raise ValueError(f"center must be a progress fraction in [0, 1], got {center}")
    first, stop = _window(total, start, end)
    span = stop - first
    budget = math.ceil(span / interval) if span else 0
    chosen: set[int] = set()
    if budget:
        c = center * (span - 1)
        for i in range(budget):
            u = -1.0 + 2.0 * i / budget  # budget points in [-1, 1): the window's last step stays cheap
            reach = c if u < 0 else (span - 1 - c)
            pos = c + math.copysign(abs(u) ** power, u) * reach
            chosen.add(_nearest_free(round(pos), chosen, span))
    return tuple(not (first <= k < stop) or (k - first) in chosen for k in range(total))


def count_full(schedule: Schedule) -> int:
    return sum(schedule)


def format_schedule(schedule: Schedule) -> str:
    """`F..F.F` style string: F is a full step, `.` reuses the cache."""
    return "".join("F" if full else "." for full in schedule)


def _nearest_free(pos: int, taken: set[int], span: int) -> int:
    for delta in range(span):
        for cand in (pos - delta, pos + delta):
            if 0 <= cand < span and cand not in taken:
                return cand
    raise ValueError("no free step left")  # unreachable while budget <= span


def _check(total: int, interval: int) -> None:
    if total < 1:
        raise ValueError(f"a generation needs at least 1 step, got {total}")
    if interval < 1:
        raise ValueError(f"cache_interval must be >= 1, got {interval}")
