"""How acceleration techniques stack on one model: the order they are applied in, and what is refused.

Rules (checked before any model is touched, by the nodes when a technique is added and by the adapters
when a sampler starts):
1. One config per technique. Two DeepCaches would override the same deep modules, two step rehashes
   would both answer for the same call, two slicers would slice already-sliced calls.
2. Techniques are applied in a fixed order, whatever order the user chained them in:
   slicing (exact, innermost: it only changes how a group computes) → feature caches (DeepCache:
   replace deep modules' outputs) → step rehash (outermost: a skipped step runs nothing at all).
   A cache may wrap a sliced module, never the reverse (a cache inside a sliced group would see each
   slice as a separate call), which this order guarantees.
3. Step rehash's "extrapolate" mode is refused together with DeepCache: it extrapolates the difference
   of the last two computed outputs, and with DeepCache those alternate between full and cached
   approximations, so the difference is mostly cache error and extrapolating amplifies it. "reuse"
   stacks fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .cachequant import CacheQuantPlan
from .deepcache import DeepCacheConfig
from .quant import QuantPlan
from .rehash import StepRehashConfig
from .slicing import SlicingConfig

# Application order: lower first (innermost). Unknown config types sort last and are refused by adapters.
# Quantization overrides leaf Linear/Conv2d layers, which no other core touches, so its rank only
# needs to be below the caches' (a cache then stores quantized outputs).
ORDER: dict[type, int] = {SlicingConfig: 0, QuantPlan: 0, DeepCacheConfig: 1, CacheQuantPlan: 1, StepRehashConfig: 2}
# Techniques whose cores override modules *inside* the model: slicing then keeps its groups at layer
# granularity so such a module is never inside a sliced group.
FEATURE_CACHES: tuple[type, ...] = (DeepCacheConfig, CacheQuantPlan)
NAMES: dict[type, str] = {SlicingConfig: "feature slicing", DeepCacheConfig: "DeepCache",
                          StepRehashConfig: "step rehash", CacheQuantPlan: "CacheQuant", QuantPlan: "quantization"}


def check_stack(configs: Sequence[Any]) -> None:
    """Raise ValueError naming the problem when `configs` cannot be applied together."""
    seen: set[type] = set()
    for config in configs:
        kind = type(config)
        if kind in seen:
            name = NAMES.get(kind, kind.__name__)
            raise ValueError(f"{name} is applied twice to one model; the two would fight over the same modules "
                             f"— keep one {name} node in the chain")
        seen.add(kind)
    caches = [NAMES[type(c)] for c in configs if isinstance(c, FEATURE_CACHES)]
    if len(caches) > 1:
        raise ValueError(f"{caches[0]} and {caches[1]} both cache the U-Net's deep features; two feature caches "
                         "cannot share one U-Net — keep one")
    if QuantPlan in seen and any(isinstance(c, CacheQuantPlan) and c.quant is not None for c in configs):
        raise ValueError("CacheQuant already quantizes the U-Net (W8A8); remove the separate quantization node")
    rehash = next((c for c in configs if isinstance(c, StepRehashConfig)), None)
    if rehash is not None and rehash.mode == "extrapolate" and caches:
        raise ValueError("step rehash mode 'extrapolate' cannot stack with DeepCache: it extrapolates the "
                         "difference of the last two outputs, which with DeepCache is mostly cache error; "
                         "use mode 'reuse'")


def application_order(configs: Sequence[Any]) -> list[Any]:
    """`configs` sorted innermost first (stable for equal ranks), after checking they stack."""
    check_stack(configs)
    return sorted(configs, key=lambda c: ORDER.get(type(c), len(ORDER)))
