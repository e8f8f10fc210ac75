"""Reversible replacement of `module.forward`, the mechanism every caching core applies through.

Why instance attributes: `nn.Module.__call__` looks `forward` up on the instance first, so
setting it on the instance changes one module without touching its class (other models of the
same class stay untouched), hooks registered by others keep firing, and deleting the attribute
restores the class method exactly — the model is bit-identical after `restore()`.

Overrides come in two kinds. An *exact* override computes the same function as the forward it
replaces, only differently (the feature slicer runs it per slice); an *approximate* one changes what
comes out (a cache returning stale features). Approximate techniques may wrap an exact override, but
two approximate ones on one module would fight over it, so they check `has_approximate_override`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

Forward = Callable[..., Any]
_EXACT = "_livecache_exact"


def has_approximate_override(module: nn.Module) -> bool:
    """True when `module.forward` carries an override that changes its results (another cache)."""
    override = module.__dict__.get("forward")
    return override is not None and not getattr(override, _EXACT, False)


class ForwardOverrides:
    """A set of `forward` replacements that are installed and removed together."""

    def __init__(self) -> None:
        self._installed: list[tuple[nn.Module, Forward | None]] = []

    def install(self, module: nn.Module, make: Callable[[Forward], Forward], exact: bool = False) -> None:
        """Replace `module.forward` with `make(original_forward)`; `exact` marks it as result-preserving.

        A module may carry only one override from a given set; stacking two techniques on one
        module goes through two sets, and removing them in reverse order restores each layer.
        """
        if any(m is module for m, _ in self._installed):
            raise ValueError(f"{type(module).__name__} already has an override from this set")
        previous = module.__dict__.get("forward")
        forward = make(module.forward)
        if exact:
            setattr(forward, _EXACT, True)
        module.forward = forward
        self._installed.append((module, previous))

    def restore(self) -> None:
        """Put every module back as it was (class forward or the earlier instance override)."""
        while self._installed:
            module, previous = self._installed.pop()
            if previous is None:
                del module.forward
            else:
                module.forward = previous

    def __len__(self) -> int:
        return len(self._installed)
