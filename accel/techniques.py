"""The built-in techniques, each registered once: how it applies to a site, what it refuses, how it reports.

Application order (rank, lowest innermost):
- 0 feature slicing (exact: it only changes how a group computes) and quantization (it overrides
  leaf Linear/Conv2d layers, which no other core touches, so a cache then stores quantized outputs);
- 1 the feature caches, DeepCache, CacheQuant, the block cache and ILF (replace deep modules' or a
  transformer block span's outputs; ILF corrects them with its trained module). A cache may wrap a
  sliced module, never the reverse (a cache inside a sliced group would see each slice as a separate
  call): slicing is applied first, and with a feature cache in the stack it keeps its groups at layer
  granularity, so a module a cache names is never inside a group;
- 2 step rehash (outermost: a skipped step runs nothing at all).

Refusals beyond "one per technique, one feature cache": step rehash's "extrapolate" mode with a
feature cache (it extrapolates the difference of the last two computed outputs, which with a cache
alternate between full and cached approximations, so the difference is mostly cache error; "reuse"
stacks fine), a separate quantization with a CacheQuant that quantizes already, and quantization under
ILF (its module copies a float block and was trained on the float backbone).

Front ends use `REGISTRY` (and the two shortcuts below) and nothing else of this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .block_cache import BlockCache, BlockCacheConfig, BlockCacheStats
from .cachequant import CacheQuant, CacheQuantPlan, CacheQuantStats
from .deepcache import DeepCache, DeepCacheConfig, DeepCacheStats
from .ilf import ILFConfig, ILFStats, build_ilf
from .quant import Quantizer, QuantPlan, QuantStats
from .registry import Handle, Registry, Technique
from .rehash import StepRehash, StepRehashConfig, StepRehashStats
from .site import Site
from .slicing import FeatureSlicer, SlicingConfig, SlicingStats


# -- feature slicing --------------------------------------------------------------------------
def _apply_slicing(site: Site, config: SlicingConfig, handle: Handle, stack: Sequence[Technique]) -> None:
    handle.core = FeatureSlicer(config)
    cache_inside = any(t.feature_cache for t in stack)
    handle.core.apply(site.operator_groups(config.axis, cache_inside))
    handle.undo(handle.core.remove)


def _report_slicing(stats: SlicingStats, seconds: float, _calls: str) -> tuple[str, dict[str, Any]]:
    return (f"Slicing: {stats.group_calls} sliced calls run as {stats.slice_calls} slices in {seconds:.2f} s",
            {"group_calls": stats.group_calls, "slice_calls": stats.slice_calls, "seconds": seconds})


# -- quantization (W8A8, DGQ) -----------------------------------------------------------------
def _apply_quantization(site: Site, plan: QuantPlan, handle: Handle, _stack: Sequence[Technique]) -> None:
    if plan.fingerprint and plan.fingerprint != site.fingerprint:
        raise ValueError("this quantization was calibrated for another model: calibrate it for this one")
    handle.core = Quantizer(plan).apply(site.root, site.quant_layers(), site.read_level)
    handle.undo(handle.core.remove)
    if plan.config.attention_bits:
        handle.undo(site.quantize_attention(plan.config.attention_bits))


def _report_quantization(stats: QuantStats, seconds: float, calls: str) -> tuple[str, dict[str, Any]]:
    return (f"{stats.label}: {stats.quantized_layers} layers, {stats.described()}, weights {stats.size_ratio:.2f}× "
            f"smaller{', quantization error corrected' if stats.corrected else ''}; {stats.calls} {calls} "
            f"in {seconds:.2f} s",
            {"quantized_layers": stats.quantized_layers, "size_ratio": stats.size_ratio, "calls": stats.calls,
             "kernels": dict(stats.kernels), "seconds": seconds})


def _drive(site: Site, core: Any, handle: Handle) -> None:
    """A reuse cache's undo steps and its announcements: calls drive its step clock, and a generation's
    start (with its length, which fixes the schedule) resets it."""
    handle.undo(core.remove)
    handle.undo(site.watch_calls(core.begin_call, core.end_call))
    handle.undo(site.watch_generations(core.reset))


# -- DeepCache --------------------------------------------------------------------------------
def _apply_deepcache(site: Site, config: DeepCacheConfig, handle: Handle, _stack: Sequence[Technique]) -> None:
    core = handle.core = DeepCache(config)
    core.attach(site.deep_modules(config.cache_branch_id))
    _drive(site, core, handle)


def _report_deepcache(stats: DeepCacheStats, seconds: float, calls: str) -> tuple[str, dict[str, Any]]:
    return (f"DeepCache: {stats.full_calls} full / {stats.cached_calls} cached {calls} "
            f"in {seconds:.2f} s, schedule {stats.schedule}",
            {"full_calls": stats.full_calls, "cached_calls": stats.cached_calls, "seconds": seconds})


# -- block cache (DiTs) -----------------------------------------------------------------------
def _apply_blockcache(site: Site, config: BlockCacheConfig, handle: Handle, _stack: Sequence[Technique]) -> None:
    core = handle.core = BlockCache(config)
    core.attach_span(site.block_span(config.span))
    _drive(site, core, handle)


def _report_blockcache(stats: BlockCacheStats, seconds: float, calls: str) -> tuple[str, dict[str, Any]]:
    forecast = f" ({stats.forecast_calls} forecast)" if stats.forecast_calls else ""
    return (f"Block cache: {stats.full_calls} full / {stats.cached_calls} cached {calls}{forecast}, "
            f"{stats.skipped_blocks} block calls skipped in {seconds:.2f} s, schedule {stats.schedule}",
            {"full_calls": stats.full_calls, "cached_calls": stats.cached_calls,
             "forecast_calls": stats.forecast_calls, "skipped_blocks": stats.skipped_blocks, "seconds": seconds})


# -- Inner Loop Feedback ----------------------------------------------------------------------
def _apply_ilf(site: Site, config: ILFConfig, handle: Handle, _stack: Sequence[Technique]) -> None:
    where = config.module.where if config.module is not None else config.where
    core = handle.core = build_ilf(config, site.feedback_point(where), lambda: site.fingerprint)
    _drive(site, core, handle)


def _report_ilf(stats: ILFStats, seconds: float, calls: str) -> tuple[str, dict[str, Any]]:
    return (f"ILF: {stats.full_calls} full / {stats.cached_calls} cached {calls}, {stats.feedback_calls} "
            f"corrected by the feedback module in {seconds:.2f} s, schedule {stats.schedule}",
            {"full_calls": stats.full_calls, "cached_calls": stats.cached_calls,
             "feedback_calls": stats.feedback_calls, "seconds": seconds})


def _ilf_refuses(_config: ILFConfig, other: Any) -> str | None:
    if isinstance(other, QuantPlan):
        return ("ILF cannot stack with quantization: its feedback module is a copy of a float backbone block, "
                "trained on the float backbone; remove the quantization node")
    return None


# -- CacheQuant -------------------------------------------------------------------------------
def _apply_cachequant(site: Site, plan: CacheQuantPlan, handle: Handle, _stack: Sequence[Technique]) -> None:
    plan.schedule.check(site.fingerprint)
    blocks = plan.config.blocks  # a DiT's block span, else a U-Net's skip branch
    cache_site = site.cache_site(plan.config.cache_branch_id) if blocks is None else site.span_cache_site(blocks)
    core = handle.core = CacheQuant(plan).apply(cache_site)
    handle.undo(core.remove)
    handle.undo(site.watch_generations(core.reset))


def _report_cachequant(stats: CacheQuantStats, seconds: float, calls: str) -> tuple[str, dict[str, Any]]:
    return (f"CacheQuant ({stats.label}): {stats.full_calls} full / {stats.cached_calls} cached {calls} "
            f"in {seconds:.2f} s, schedule {stats.schedule}, {stats.backend or 'no quantization'}",
            {"full_calls": stats.full_calls, "cached_calls": stats.cached_calls, "size_ratio": stats.size_ratio,
             "seconds": seconds})


def _cachequant_refuses(plan: CacheQuantPlan, other: Any) -> str | None:
    if isinstance(other, QuantPlan) and plan.quant is not None:
        return "CacheQuant already quantizes the model (W8A8); remove the separate quantization node"
    return None


# -- step rehash ------------------------------------------------------------------------------
def _apply_rehash(site: Site, config: StepRehashConfig, handle: Handle, _stack: Sequence[Technique]) -> None:
    core = handle.core = StepRehash(config)
    handle.undo(core.forget)  # drop the kept outputs once the model is back
    handle.undo(site.wrap_calls(core.call))
    handle.undo(site.watch_generations(core.reset))


def _report_rehash(stats: StepRehashStats, seconds: float, calls: str) -> tuple[str, dict[str, Any]]:
    return (f"Step rehash: {stats.skipped_steps} of {len(stats.pattern)} steps skipped "
            f"({stats.computed_calls} {calls}) in {seconds:.2f} s, steps {stats.pattern}",
            {"skipped_steps": stats.skipped_steps, "computed_calls": stats.computed_calls,
             "skipped_calls": stats.skipped_calls, "seconds": seconds})


def _rehash_refuses(config: StepRehashConfig, other: Any) -> str | None:
    cache = REGISTRY.of(other)
    if config.mode == "extrapolate" and cache.feature_cache:
        return (f"step rehash mode 'extrapolate' cannot stack with {cache.title}: it extrapolates the difference "
                f"of the last two outputs, which with {cache.title} is mostly cache error; use mode 'reuse'")
    return None


REGISTRY = Registry([
    Technique("slicing", "feature slicing", SlicingConfig, 0, _apply_slicing, _report_slicing, depends_on_stack=True),
    Technique("quantization", "quantization", QuantPlan, 0, _apply_quantization, _report_quantization),
    Technique("deepcache", "DeepCache", DeepCacheConfig, 1, _apply_deepcache, _report_deepcache, feature_cache=True),
    Technique("blockcache", "block cache", BlockCacheConfig, 1, _apply_blockcache, _report_blockcache,
              feature_cache=True),
    Technique("ilf", "ILF", ILFConfig, 1, _apply_ilf, _report_ilf, feature_cache=True, refuses=_ilf_refuses),
    Technique("cachequant", "CacheQuant", CacheQuantPlan, 1, _apply_cachequant, _report_cachequant,
              feature_cache=True, refuses=_cachequant_refuses),
    Technique("rehash", "step rehash", StepRehashConfig, 2, _apply_rehash, _report_rehash, refuses=_rehash_refuses),
])
check_stack = REGISTRY.check_stack
application_order = REGISTRY.application_order
