"""Reversible replacement of `module.forward`, the mechanism every caching core applies through.

Why instance attributes: `nn.Module.__call__` looks `forward` up on the instance first, so
setting it on the instance changes one module without touching its class (other models of the
same class stay untouched), hooks registered by others keep firing, and deleting the attribute
restores the class method exactly — the model is bit-identical after `restore()`.

Overrides come in two kinds. An *exact* override computes the same function as the forward it
replaces, only differently (the feature slicer runs it per slice); an *approximate* one changes what
comes out (a cache returning stale features). Approximate techniques may wrap an exact override, but
two approximate ones on one module would fight over it, so they check `has_approximate_override`.

Several techniques may override one module (a cache around a sliced block, step rehash around a
sliced U-Net). Each module keeps the chain of its overrides, innermost first, so any one technique
can be removed — not only the last one applied: the overrides above it are rebuilt on the forward
below it (`make` is called again), which is what lets a model drop one technique by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

Forward = Callable[..., Any]
_CHAIN = "_livecache_forwards"


@dataclass
class _Layer:
    owner: ForwardOverrides
    make: Callable[[Forward], Forward]
    exact: bool
    forward: Forward


@dataclass
class _Chain:
    """A module's overrides, innermost first, over `base` (an instance forward set before ours; None: the class's)."""

    base: Forward | None
    layers: list[_Layer] = field(default_factory=list)


def has_approximate_override(module: nn.Module) -> bool:
    """True when `module.forward` carries an override that changes its results (another cache)."""
    chain: _Chain | None = module.__dict__.get(_CHAIN)
    if chain is not None:
        return chain.base is not None or any(not layer.exact for layer in chain.layers)
    return module.__dict__.get("forward") is not None


class ForwardOverrides:
    """A set of `forward` replacements that are installed and removed together."""

    def __init__(self) -> None:
        self._modules: list[nn.Module] = []

    def install(self, module: nn.Module, make: Callable[[Forward], Forward], exact: bool = False) -> None:
        """Replace `module.forward` with `make(current_forward)`; `exact` marks it as result-preserving.

        A module may carry only one override from a given set; stacking two techniques on one
        module goes through two sets, each removable on its own.
        """
        if any(m is module for m in self._modules):
            raise ValueError(f"{type(module).__name__} already has an override from this set")
        chain = module.__dict__.get(_CHAIN)
        if chain is None:
            chain = _Chain(module.__dict__.get("forward"))
            module.__dict__[_CHAIN] = chain
        forward = make(module.forward)
        chain.layers.append(_Layer(self, make, exact, forward))
        module.forward = forward
        self._modules.append(module)

    def restore(self) -> None:
        """Take this set's overrides off every module; the others on the same modules stay in place."""
        while self._modules:
            module = self._modules.pop()
            chain: _Chain = module.__dict__[_CHAIN]
            index = next(i for i, layer in enumerate(chain.layers) if layer.owner is self)
            del chain.layers[index]
            forward = chain.layers[index - 1].forward if index else chain.base
            for layer in chain.layers[index:]:  # rebuild the overrides that wrapped the removed one
                layer.forward = layer.make(forward if forward is not None else _class_forward(module))
                forward = layer.forward
            if forward is not None:
                module.forward = forward
            elif "forward" in module.__dict__:
                del module.forward
            if not chain.layers:
                del module.__dict__[_CHAIN]

    def __len__(self) -> int:
        return len(self._modules)


def _class_forward(module: nn.Module) -> Forward:
    return type(module).forward.__get__(module)
