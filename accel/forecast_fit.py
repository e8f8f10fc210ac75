"""The fitted forecast's weights: least squares over a calibration trajectory, from its Gram matrix alone.

A block cache in mode "fitted" (`block_cache`) answers a cached step with a weighted sum of the last
full steps' residuals; this module finds those weights for one schedule and checks a set of them. It
needs no model: the Gram matrix of the calibration's per-step features (`cache_schedule.PairStats.gram`,
or the bench's span residuals) is everything a least-squares fit over linear combinations reads, so a
schedule file can carry the weights for its own full steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .schedules import Schedule

MAX_FIT_HISTORY = 8


def check_weights(weights: Any, schedule: Schedule | None) -> None:
    """Fitted weights belong to one calibrated schedule: one tuple per step, empty exactly on its full steps,
    no more entries than full steps before, finite numbers."""
    if schedule is None:
        raise ValueError("mode='fitted' needs schedule='calibrated' (its weights were fitted for one schedule)")
    if not isinstance(weights, tuple) or len(weights) != len(schedule):
        raise ValueError(f"weights must be a tuple of {len(schedule)} tuples (one per step of the schedule), "
                         f"got {type(weights).__name__} of {len(weights) if isinstance(weights, tuple) else '?'}")
    seen = 0
    for step, (w, full) in enumerate(zip(weights, schedule, strict=True)):
        seen += bool(full)
        if not isinstance(w, tuple) or not all(isinstance(v, float) and math.isfinite(v) for v in w):
            raise ValueError(f"weights[{step}] must be a tuple of finite floats, got {w!r}")
        if full and w:
            raise ValueError(f"weights[{step}]: step {step} is a full step and takes no weights, got {w!r}")
        most = min(seen, MAX_FIT_HISTORY)
        if not full and not 1 <= len(w) <= most:
            raise ValueError(f"weights[{step}]: a cached step after {seen} full steps takes 1..{most} weights, "
                             f"got {len(w)}")


def fit_forecast(gram: torch.Tensor, schedule: Schedule, history: int = 2) -> tuple[tuple[float, ...], ...]:
    """Least-squares weights for mode "fitted": per cached step j of `schedule`, the weights w over the last
    `history` full steps' residuals r_f (oldest first) minimising Σ‖r_j − Σ_k w_k r_{f_k}‖² over the
    calibration data, from its Gram matrix `gram[i, j]` = Σ⟨r_i, r_j⟩ (steps × steps; every stream,
    every sample and call of a step, summed).

    Solved in the basis (r_a, r_a − r_b, …) — the newest kept residual and its differences to the older
    ones — with the minimum-norm solution (singular values below 1e-9 of the largest dropped): where the
    residuals do not change, the differences vanish, their coefficients are 0 and the fit is reuse.
    """
    steps = len(schedule)
    if gram.shape != (steps, steps):
        raise ValueError(f"gram is {tuple(gram.shape)}, the schedule has {steps} steps")
    if not schedule or not schedule[0]:
        raise ValueError("the schedule must start with a full step")
    if isinstance(history, bool) or not isinstance(history, int) or not 1 <= history <= MAX_FIT_HISTORY:
        raise ValueError(f"history must be an integer in 1..{MAX_FIT_HISTORY}, got {history!r}")
    g = gram.double()
    weights: list[tuple[float, ...]] = []
    full: list[int] = []
    for j, is_full in enumerate(schedule):
        if is_full:
            full.append(j)
            weights.append(())
            continue
        kept = full[-history:]
        m = len(kept)
        basis = torch.zeros(m, m, dtype=torch.float64)  # row k: basis vector k in terms of the kept residuals
        basis[:, m - 1] = 1.0
        for k in range(1, m):
            basis[k, m - 1 - k] = -1.0
        idx = torch.tensor(kept)
        lhs = basis @ g[idx][:, idx] @ basis.T
        rhs = basis @ g[idx, j]
        coefs = torch.linalg.pinv(lhs, rtol=1e-9, hermitian=True) @ rhs
        weights.append(tuple(float(v) for v in basis.T @ coefs))
    return tuple(weights)
